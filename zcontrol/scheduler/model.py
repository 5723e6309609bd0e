# -*- test-case-name: tests.test_scheduler -*-
"""
The allocator's values: what is asked (L{AllocationRequest}) and what it is decided over
(L{Snapshot}, an immutable view of the candidate hosts and of what the filters need about
their clusters, networks and primary storage). Both are plain frozen values, so the filters
and strategies (L{zcontrol.scheduler.filters}, L{zcontrol.scheduler.strategies}) are pure
functions, property-tested with hypothesis.

Units as ZStack's: sizes in bytes, CPU speed in MHz. CPU capacity is counted in CPUs: a
host's C{availableCpuCapacity} is what its agent reported as C{cpuNum} minus the CPUs its
holders reserved (L{zcontrol.services.host}), so a request takes C{cpu_num} from it and
C{cpu_speed} is informational (ZStack's current C{HostCapacityVO} counts CPUs likewise).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import attrs

__all__ = [
    "ENABLED",
    "CONNECTED",
    "LOCAL_STORAGE",
    "AllocationRequest",
    "HostView",
    "PrimaryStorageView",
    "Snapshot",
]

ENABLED = "Enabled"
CONNECTED = "Connected"
#: ZStack's C{LocalStorageConstants.LOCAL_STORAGE_TYPE}: capacity per host. Every other
#: primary storage type is shared (NFS): mounted on the hosts of its attached clusters.
LOCAL_STORAGE = "LocalStorage"


def _frozen_map(value: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class AllocationRequest:
    """
    What a VM needs from a host (ZStack's C{AllocateHostMsg}/C{HostAllocatorSpec}).

    @ivar cpu_num: CPUs to take from the host's available CPU capacity.
    @ivar cpu_speed: MHz (informational: capacity is counted in CPUs).
    @ivar memory_size: bytes of memory to take from the host.
    @ivar disk_size: bytes of the root volume: some primary storage attached to the host's
        cluster must have that much room (on the host itself for LocalStorage).
    @ivar l3_network_uuids: the host's cluster must be attached to the L2 network of each.
    @ivar zone_uuid: only hosts of this zone (None: any).
    @ivar cluster_uuid: only hosts of this cluster (None: any).
    @ivar host_uuid: only this host (ZStack's C{DesignatedAllocateHostMsg.hostUuid}).
    @ivar avoid_host_uuids: never these hosts.
    @ivar allocator_strategy: a name of L{zcontrol.scheduler.strategies.STRATEGIES}
        (None: the default, first-fit).
    @ivar primary_storage_uuid: the root volume must go to this primary storage (None: any
        attached one).
    @ivar last_host_uuid: the VM's last host (ZStack's C{VmInstanceVO.lastHostUuid}):
        chosen first by C{LastHostPreferredAllocatorStrategy} when it passes every filter;
        ignored by the other strategies.
    """

    cpu_num: int
    memory_size: int
    cpu_speed: int = 0
    disk_size: int = 0
    l3_network_uuids: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    zone_uuid: str | None = None
    cluster_uuid: str | None = None
    host_uuid: str | None = None
    avoid_host_uuids: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    allocator_strategy: str | None = None
    primary_storage_uuid: str | None = None
    last_host_uuid: str | None = None

    def describe(self) -> str:
        """
        The request in one line, for errors and logs.
        """
        parts = [f"cpuNum={self.cpu_num}", f"memorySize={self.memory_size}",
                 f"diskSize={self.disk_size}",
                 f"l3NetworkUuids=[{', '.join(self.l3_network_uuids)}]"]
        for label, value in (("zoneUuid", self.zone_uuid), ("clusterUuid", self.cluster_uuid),
                             ("hostUuid", self.host_uuid),
                             ("primaryStorageUuid", self.primary_storage_uuid),
                             ("lastHostUuid", self.last_host_uuid)):
            if value is not None:
                parts.append(f"{label}={value}")
        if self.avoid_host_uuids:
            parts.append(f"avoidHostUuids={len(self.avoid_host_uuids)}")
        return ", ".join(parts)


@attrs.frozen(kw_only=True)
class HostView:
    """
    A candidate host as the filters see it (from C{hosts}, C{clusters}, C{zones}).

    @ivar available_cpu: CPUs available.
    @ivar available_memory: bytes available.
    @ivar cluster_state: its cluster's state (a Disabled cluster takes no new VM).
    @ivar zone_state: its zone's state (likewise).
    """

    uuid: str
    zone_uuid: str
    cluster_uuid: str
    state: str = ENABLED
    status: str = CONNECTED
    available_cpu: int = 0
    available_memory: int = 0
    cluster_state: str = ENABLED
    zone_state: str = ENABLED


@attrs.frozen(kw_only=True)
class PrimaryStorageView:
    """
    A primary storage as the filters see it.

    @ivar type: C{LocalStorage} (capacity per host) or a shared type (C{NFS}).
    @ivar available_capacity: bytes available on the whole storage.
    """

    uuid: str
    type: str
    state: str = ENABLED
    status: str = CONNECTED
    available_capacity: int = 0


@attrs.frozen(kw_only=True)
class Snapshot:
    """
    What an allocation decides over: immutable, read from the store in one batch
    (L{zcontrol.db.components.scheduler.allocation_snapshot_thd}) or built by tests.

    @ivar hosts: the candidate hosts, ordered by uuid.
    @ivar cluster_l2: cluster uuid -> the uuids of the L2 networks attached to it.
    @ivar cluster_primary_storages: cluster uuid -> the uuids of the primary storages
        attached to it (ordered by uuid).
    @ivar l3_l2: L3 network uuid -> its L2 network's uuid.
    @ivar primary_storages: uuid -> L{PrimaryStorageView}.
    @ivar local_capacity: (LocalStorage uuid, host uuid) -> bytes available on that host
        (ZStack's C{LocalStorageHostRefVO.availableCapacity}).
    @ivar mounted: the (shared storage uuid, host uuid) pairs whose mount is Connected
        (ZStack's C{PrimaryStorageHostRefVO}).
    """

    hosts: tuple[HostView, ...] = attrs.field(
        default=(), converter=lambda hs: tuple(sorted(hs, key=lambda h: h.uuid)))
    cluster_l2: Mapping[str, frozenset[str]] = attrs.field(
        factory=dict, converter=lambda m: _frozen_map({k: frozenset(v) for k, v in m.items()}))
    cluster_primary_storages: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=lambda m: _frozen_map({k: tuple(sorted(v)) for k, v in m.items()}))
    l3_l2: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    primary_storages: Mapping[str, PrimaryStorageView] = attrs.field(
        factory=dict, converter=_frozen_map)
    local_capacity: Mapping[tuple[str, str], int] = attrs.field(
        factory=dict, converter=_frozen_map)
    mounted: frozenset[tuple[str, str]] = attrs.field(factory=frozenset, converter=frozenset)
