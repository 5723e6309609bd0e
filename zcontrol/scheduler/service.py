# -*- test-case-name: tests.test_scheduler_service -*-
"""
The host allocator service, C{"host.allocator"} (ZStack's C{HostAllocatorManagerImpl}):
L{AllocateHostMsg} chooses and reserves a host (L{zcontrol.scheduler.allocator}),
L{ReturnHostCapacityMsg} gives the capacity back.

It runs on every node and keeps no state: the messages carry no resource uuid, so each is
handled where it was sent, and the store's reservation arbitrates between nodes (Note
[allocation races] in L{zcontrol.scheduler.allocator}). Allocations for one VM run one at a
time (chain C{allocate-<vm uuid>}), so a retried message finds the first one's reservation.
"""

from __future__ import annotations

from typing import Any

from zcontrol.core.errors import SYS, OperationError
from zcontrol.scheduler.allocator import Allocator
from zcontrol.scheduler.messages import (
    ALLOCATOR,
    SERVICE_ID,
    AllocateHostMsg,
    AllocateHostReply,
    HostCapacityReply,
    ReturnHostCapacityMsg,
)
from zcontrol.scheduler.model import AllocationRequest
from zcontrol.scheduler.strategies import STRATEGIES
from zcontrol.services import validate
from zcontrol.services.base import Service, handles

__all__ = ["HostAllocatorService", "VM_HOLDER_TYPE", "make", "request_of"]

#: The holder type of a VM's reservations (ZStack's C{VmInstanceVO}).
VM_HOLDER_TYPE = "VmInstanceVO"
#: The most hosts an allocation may avoid.
MAX_AVOID = 10_000
#: The most L3 networks one allocation may name.
MAX_L3 = 64


def _optional_uuid(value: Any, field: str) -> str | None:
    return None if value is None else validate.uuid(value, field)


def request_of(msg: AllocateHostMsg) -> AllocationRequest:
    """
    The L{AllocationRequest} of C{msg}, every field checked (C{SYS.1007} naming the field,
    in ZStack's camelCase).
    """
    validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
    l3s = validate.uuids(msg.l3_network_uuids, "l3NetworkUuids", allow_empty=True)
    if len(l3s) > MAX_L3:
        raise validate.invalid("l3NetworkUuids", len(l3s), f"must name at most {MAX_L3}")
    avoid = validate.uuids(msg.avoid_host_uuids, "avoidHostUuids", allow_empty=True)
    if len(avoid) > MAX_AVOID:
        raise validate.invalid("avoidHostUuids", len(avoid), f"must name at most {MAX_AVOID}")
    if msg.allocator_strategy is not None:
        validate.one_of(msg.allocator_strategy, "allocatorStrategy", sorted(STRATEGIES))
    return AllocationRequest(
        cpu_num=validate.integer(msg.cpu_num, "cpuNum", 1, 2**31 - 1),
        cpu_speed=validate.integer(msg.cpu_speed, "cpuSpeed", 0, 2**31 - 1),
        memory_size=validate.size(msg.memory_size, "memorySize"),
        disk_size=validate.size(msg.disk_size, "diskSize", minimum=0),
        l3_network_uuids=l3s,
        zone_uuid=_optional_uuid(msg.zone_uuid, "zoneUuid"),
        cluster_uuid=_optional_uuid(msg.cluster_uuid, "clusterUuid"),
        host_uuid=_optional_uuid(msg.host_uuid, "hostUuid"),
        avoid_host_uuids=avoid,
        allocator_strategy=msg.allocator_strategy,
        primary_storage_uuid=_optional_uuid(msg.primary_storage_uuid, "primaryStorageUuid"),
        last_host_uuid=_optional_uuid(msg.last_host_uuid, "lastHostUuid"),
    )


class HostAllocatorService(Service):
    """
    The C{host.allocator} service (see the module docstring).
    """

    service_id = SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, page_size: int = 16,
                 max_attempts: int = 8) -> None:
        super().__init__(clock, bus, store)
        self.allocator = Allocator(store, page_size=page_size, max_attempts=max_attempts)

    @handles(AllocateHostMsg)
    async def allocate_host(self, msg: AllocateHostMsg) -> AllocateHostReply:
        """
        Choose and reserve a host (see L{AllocateHostMsg}).
        """
        req = request_of(msg)
        for resource, uuid, field in (("zone", req.zone_uuid, "zoneUuid"),
                                      ("cluster", req.cluster_uuid, "clusterUuid"),
                                      ("host", req.host_uuid, "hostUuid"),
                                      ("primaryStorage", req.primary_storage_uuid,
                                       "primaryStorageUuid")):
            if uuid is not None:
                await self.must_get(resource, uuid, ALLOCATOR.NOT_FOUND, field=field)
        holder = (VM_HOLDER_TYPE, msg.vm_instance_uuid)
        allocation = await self.serialized(f"allocate-{msg.vm_instance_uuid}",
                                           lambda: self.allocator.allocate(req, holder))
        return AllocateHostReply(inventory=allocation.host,
                                 primary_storage_uuids=list(allocation.primary_storage_uuids))

    @handles(ReturnHostCapacityMsg)
    async def return_host_capacity(self, msg: ReturnHostCapacityMsg) -> HostCapacityReply:
        """
        Give back what the VM holds on the host (idempotent; see L{ReturnHostCapacityMsg}).
        """
        host_uuid = validate.uuid(msg.host_uuid, "hostUuid")
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        try:
            row = await self.serialized(
                f"allocate-{vm_uuid}",
                lambda: self.store.release_host_capacity(host_uuid, (VM_HOLDER_TYPE, vm_uuid)))
        except OperationError as e:
            if e.error.code != SYS.RESOURCE_NOT_FOUND:
                raise
            raise OperationError.of(ALLOCATOR.NOT_FOUND, f"no host with uuid {host_uuid}",
                                    resource="host", uuid=host_uuid, field="hostUuid") from None
        return HostCapacityReply(inventory=row)


def make(node: Any) -> HostAllocatorService:
    """
    The host allocator service of C{node}.
    """
    return HostAllocatorService(node.reactor, node.bus, node.store)
