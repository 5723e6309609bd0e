# -*- test-case-name: tests.test_scheduler_service -*-
"""
The host allocator's bus messages (ZStack's C{HostAllocatorConstant.SERVICE_ID},
C{"host.allocator"}) and error codes (ZStack's C{HOST_ALLOCATION} prefix is not
alphanumeric: C{ALLOCATOR}).

Neither message names a resource to route by: any node may allocate (the reservation in the
store is the arbiter), so they are sent with C{resource_uuid=None} and run on the local node.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "ALLOCATOR",
    "SERVICE_ID",
    "AllocateHostMsg",
    "AllocateHostReply",
    "HostCapacityReply",
    "ReturnHostCapacityMsg",
]

#: The bus service id of the host allocator (ZStack's C{HostAllocatorConstant.SERVICE_ID}).
SERVICE_ID = "host.allocator"


class ALLOCATOR:
    """
    The host allocator's error codes.
    """

    _codes = register_codes(
        "ALLOCATOR",
        {
            1000: "No available host",
            1001: "A resource named by the allocation does not exist",
            1002: "The VM already holds a different host reservation",
        },
    )
    #: ZStack's C{HOST_ALLOCATION.1001} "no available host": the details name the request
    #: and how many candidates each filter removed (opaque: C{filters}, C{candidates},
    #: C{request}, and C{lostRaces} when concurrent allocations took the capacity).
    NO_AVAILABLE_HOST = _codes[1000]
    NOT_FOUND = _codes[1001]
    HELD_ELSEWHERE = _codes[1002]


@registry.register
@attrs.define(kw_only=True)
class AllocateHostReply(Reply):
    """
    The host chosen and reserved: its inventory (after the reservation) and the primary
    storages that can take the root volume on it, best first (the VM service reserves on
    one of them: the allocator reserves only CPU and memory).
    """

    inventory: dict[str, Any] | None = None
    primary_storage_uuids: list[str] = attrs.field(factory=list)


@registry.register
@attrs.define(kw_only=True)
class AllocateHostMsg(NeedReplyMessage):
    """
    Choose a host for a VM and reserve C{cpu_num} CPUs and C{memory_size} bytes on it for
    the holder C{("VmInstanceVO", vm_instance_uuid)} (ZStack's C{AllocateHostMsg} /
    C{DesignatedAllocateHostMsg}). See L{zcontrol.scheduler.filters} for the filters and
    L{zcontrol.scheduler.strategies} for C{allocator_strategy}; C{last_host_uuid} (the VM's
    last host) is chosen first by C{LastHostPreferredAllocatorStrategy} when it fits.

    Idempotent per VM: when the VM already holds the same amounts on a host (a retry after a
    lost reply), that host is answered again; different amounts fail with C{ALLOCATOR.1002}.

    Fails with C{ALLOCATOR.1000} when no host fits, C{ALLOCATOR.1001} naming an unknown L3
    network, primary storage, zone, cluster or host, C{SYS.1007} naming a bad field.
    """

    reply_type: ClassVar[type[Reply]] = AllocateHostReply

    vm_instance_uuid: str
    cpu_num: int
    memory_size: int
    cpu_speed: int = 0
    disk_size: int = 0
    l3_network_uuids: list[str] = attrs.field(factory=list)
    zone_uuid: str | None = None
    cluster_uuid: str | None = None
    host_uuid: str | None = None
    avoid_host_uuids: list[str] = attrs.field(factory=list)
    allocator_strategy: str | None = None
    primary_storage_uuid: str | None = None
    last_host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class HostCapacityReply(Reply):
    """
    The host's inventory after its capacity was given back.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class ReturnHostCapacityMsg(NeedReplyMessage):
    """
    Give back what the VM holds on a host (ZStack's C{ReturnHostCapacityMsg}); nothing held
    is a no-op, so it may be sent twice. Fails with C{ALLOCATOR.1001} for an unknown host.
    """

    reply_type: ClassVar[type[Reply]] = HostCapacityReply

    host_uuid: str
    vm_instance_uuid: str
