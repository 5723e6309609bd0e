# -*- test-case-name: tests.test_offering -*-
"""
The offering service's bus messages and replies: instance offerings (ZStack's
C{APICreateInstanceOfferingMsg}, C{APIUpdateInstanceOfferingMsg},
C{APIChangeInstanceOfferingStateMsg}, C{APIDeleteInstanceOfferingMsg}) and disk offerings
(the C{DiskOffering} counterparts), without C{API}. ZStack serves both in one service,
C{configuration}; here it is C{offering}.

Units as ZStack's: C{memory_size} and C{disk_size} in bytes, C{cpu_speed} in MHz.
Messages about one offering carry its uuid in C{uuid} and are sent with C{resource_uuid} =
that uuid.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes
from zcontrol.scheduler.strategies import STRATEGIES

__all__ = [
    "DISK_ALLOCATOR_STRATEGIES",
    "HOST_ALLOCATOR_STRATEGIES",
    "INSTANCE_OFFERING_TYPES",
    "MIN_DISK_SIZE",
    "MIN_MEMORY_SIZE",
    "OFFERING",
    "SERVICE_ID",
    "ChangeDiskOfferingStateMsg",
    "ChangeInstanceOfferingStateMsg",
    "CreateDiskOfferingMsg",
    "CreateInstanceOfferingMsg",
    "DeleteDiskOfferingMsg",
    "DeleteInstanceOfferingMsg",
    "DiskOfferingReply",
    "InstanceOfferingReply",
    "UpdateDiskOfferingMsg",
    "UpdateInstanceOfferingMsg",
]

#: The bus service id of the offering service (ZStack: C{configuration}).
SERVICE_ID = "offering"

#: The host allocator strategies an instance offering may name: the allocator's own list
#: (L{zcontrol.scheduler.strategies.STRATEGIES}, ZStack's user-facing
#: C{HostAllocatorConstant} names and ours), so an offering never names one the allocator
#: refuses. C{DesignatedHostAllocatorStrategy} and C{MigrateVmAllocatorStrategy} are chosen
#: internally, never by an offering. None: the allocator's default.
HOST_ALLOCATOR_STRATEGIES: tuple[str, ...] = tuple(sorted(STRATEGIES))

#: The primary storage allocator strategies a disk offering may name (ZStack's
#: C{PrimaryStorageConstant.DEFAULT_PRIMARY_STORAGE_ALLOCATION_STRATEGY_TYPE} and
#: C{LocalStorageConstants.LOCAL_STORAGE_ALLOCATOR_STRATEGY}).
DISK_ALLOCATOR_STRATEGIES = (
    "DefaultPrimaryStorageAllocationStrategy",
    "LocalPrimaryStorageStrategy",
)

#: Instance offering types (ZStack's C{InstanceOfferingType}; the virtual router's comes
#: with the network services).
INSTANCE_OFFERING_TYPES = ("UserVm",)

#: ZStack's C{ConfigurationApiInterceptor}: "no modern operating system is likely able to
#: boot with" less than 16 MiB.
MIN_MEMORY_SIZE = 16 * 1024**2

#: ZStack's C{APICreateDiskOfferingMsg.diskSize} range starts at one byte.
MIN_DISK_SIZE = 1


class OFFERING:
    """
    The offering service's error codes.
    """

    _codes = register_codes(
        "OFFERING",
        {
            1000: "No such instance offering",
            1001: "No such disk offering",
            1002: "An offering with the same uuid already exists",
        },
    )
    #: Details: C{resource}, C{uuid}, C{field}.
    INSTANCE_OFFERING_NOT_FOUND = _codes[1000]
    #: Details: C{resource}, C{uuid}, C{field}.
    DISK_OFFERING_NOT_FOUND = _codes[1001]
    #: Details: C{field} C{uuid}, C{value}.
    DUPLICATE = _codes[1002]


@registry.register
@attrs.define(kw_only=True)
class InstanceOfferingReply(Reply):
    """
    A reply carrying the instance offering's inventory (its row: C{uuid}, C{name},
    C{description}, C{cpuNum}, C{cpuSpeed}, C{memorySize}, C{allocatorStrategy},
    C{sortKey}, C{type}, C{state}, C{accountUuid}, C{createDate}, C{lastOpDate}); None
    after a delete.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class DiskOfferingReply(Reply):
    """
    A reply carrying the disk offering's inventory (its row: C{uuid}, C{name},
    C{description}, C{diskSize}, C{sortKey}, C{allocatorStrategy}, C{type}, C{state},
    C{accountUuid}, C{createDate}, C{lastOpDate}); None after a delete.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class CreateInstanceOfferingMsg(NeedReplyMessage):
    """
    Create an instance offering, C{Enabled}.

    @ivar cpu_num: 1 to 1024.
    @ivar cpu_speed: MHz, 0 (unspecified, ZStack's default) or more.
    @ivar memory_size: bytes, at least L{MIN_MEMORY_SIZE}.
    @ivar allocator_strategy: one of L{HOST_ALLOCATOR_STRATEGIES}, or None.
    @ivar sort_key: a 32-bit integer the UI sorts by.
    @ivar type: one of L{INSTANCE_OFFERING_TYPES}.
    """

    reply_type: ClassVar[type[Reply]] = InstanceOfferingReply

    name: str
    cpu_num: int
    memory_size: int
    cpu_speed: int = 0
    description: str | None = None
    allocator_strategy: str | None = None
    sort_key: int = 0
    type: str = "UserVm"
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateInstanceOfferingMsg(NeedReplyMessage):
    """
    Change an instance offering's name, description and/or allocator strategy (None:
    unchanged). CPU and memory cannot change (VMs copied them at creation).
    """

    reply_type: ClassVar[type[Reply]] = InstanceOfferingReply

    uuid: str
    name: str | None = None
    description: str | None = None
    allocator_strategy: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeInstanceOfferingStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} -> C{Enabled}, C{disable} -> C{Disabled} (a disabled offering
    creates no new VMs).
    """

    reply_type: ClassVar[type[Reply]] = InstanceOfferingReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class DeleteInstanceOfferingMsg(NeedReplyMessage):
    """
    Delete an instance offering, even one VMs were created from (they keep the CPU and
    memory they copied, as in ZStack).
    """

    reply_type: ClassVar[type[Reply]] = InstanceOfferingReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class CreateDiskOfferingMsg(NeedReplyMessage):
    """
    Create a disk offering, C{Enabled}.

    @ivar disk_size: bytes, at least L{MIN_DISK_SIZE}.
    @ivar allocation_strategy: one of L{DISK_ALLOCATOR_STRATEGIES}, or None (ZStack's API
        field is C{allocationStrategy}; the inventory shows it as C{allocatorStrategy}).
    @ivar sort_key: a 32-bit integer.
    """

    reply_type: ClassVar[type[Reply]] = DiskOfferingReply

    name: str
    disk_size: int
    description: str | None = None
    allocation_strategy: str | None = None
    sort_key: int = 0
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateDiskOfferingMsg(NeedReplyMessage):
    """
    Change a disk offering's name and/or description (None: unchanged).
    """

    reply_type: ClassVar[type[Reply]] = DiskOfferingReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeDiskOfferingStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} -> C{Enabled}, C{disable} -> C{Disabled}.
    """

    reply_type: ClassVar[type[Reply]] = DiskOfferingReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class DeleteDiskOfferingMsg(NeedReplyMessage):
    """
    Delete a disk offering, even one volumes were created from (they keep their size).
    """

    reply_type: ClassVar[type[Reply]] = DiskOfferingReply

    uuid: str
