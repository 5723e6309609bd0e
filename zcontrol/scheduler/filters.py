# -*- test-case-name: tests.test_scheduler -*-
"""
The host filters: pure functions of an L{AllocationRequest} and a L{Snapshot}, applied in
order, each removing candidates (ZStack's host allocator flows: C{HostStateAndHypervisor},
C{AttachedL2Network}, C{HostPrimaryStorage}, C{HostCapacity}, with the designated
zone/cluster/host and the avoid list first).

The store's SQL pre-filter
(L{zcontrol.db.components.scheduler}) is the same conditions written in SQL: the property
tests (tests/test_scheduler_property.py) check that the two agree on random inventories.

The filters, in order (their names appear in the "no available host" error):
 1. C{narrowing}: the requested zone, cluster and host, when given;
 2. C{avoid}: not one of C{avoid_host_uuids};
 3. C{state}: the host Enabled (not Disabled, PreMaintenance, Maintenance) and Connected,
    its cluster and zone Enabled;
 4. C{l2Network}: its cluster attached to the L2 network of every requested L3 network;
 5. C{primaryStorage}: some primary storage attached to its cluster (the requested one
    only, when given) is Enabled and Connected with room for the root volume: for
    LocalStorage, room on that very host (and on the storage); for shared storage (NFS),
    mounted on the host (Connected) and room on the storage;
 6. C{capacity}: enough available CPUs and memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import attrs

from zcontrol.scheduler.model import (
    CONNECTED,
    ENABLED,
    LOCAL_STORAGE,
    AllocationRequest,
    HostView,
    Snapshot,
)

__all__ = [
    "FILTER_NAMES",
    "FilterCount",
    "FilterResult",
    "passes",
    "run_filters",
    "usable_primary_storages",
]


@attrs.frozen
class FilterCount:
    """
    What one filter did: how many candidates it removed, how many were left after it.
    """

    name: str
    removed: int
    left: int

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "removed": self.removed, "left": self.left}


@attrs.frozen
class FilterResult:
    """
    The hosts that passed every filter (ordered by uuid) and each filter's count.

    @ivar candidates: the number of hosts before the first filter.
    """

    hosts: tuple[HostView, ...]
    counts: tuple[FilterCount, ...]
    candidates: int


def _narrowing(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    return ((req.zone_uuid is None or h.zone_uuid == req.zone_uuid)
            and (req.cluster_uuid is None or h.cluster_uuid == req.cluster_uuid)
            and (req.host_uuid is None or h.uuid == req.host_uuid))


def _avoid(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    return h.uuid not in req.avoid_host_uuids


def _state(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    return (h.state == ENABLED and h.status == CONNECTED and h.cluster_state == ENABLED
            and h.zone_state == ENABLED)


def _l2(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    attached = snap.cluster_l2.get(h.cluster_uuid, frozenset())
    return all(snap.l3_l2.get(l3) in attached for l3 in req.l3_network_uuids)


def _primary_storage(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    return bool(usable_primary_storages(req, snap, h))


def _capacity(req: AllocationRequest, snap: Snapshot, h: HostView) -> bool:
    return h.available_cpu >= req.cpu_num and h.available_memory >= req.memory_size


_FILTERS: tuple[tuple[str, Callable[[AllocationRequest, Snapshot, HostView], bool]], ...] = (
    ("narrowing", _narrowing),
    ("avoid", _avoid),
    ("state", _state),
    ("l2Network", _l2),
    ("primaryStorage", _primary_storage),
    ("capacity", _capacity),
)

#: The filters' names, in the order they apply.
FILTER_NAMES: tuple[str, ...] = tuple(name for name, _ in _FILTERS)


def usable_primary_storages(req: AllocationRequest, snap: Snapshot, h: HostView) -> list[str]:
    """
    The primary storages attached to C{h}'s cluster that can take the root volume on C{h}
    (the C{primaryStorage} filter's test), best first: most room (on the host for
    LocalStorage), then uuid. Only C{req.primary_storage_uuid} when it is given.
    """
    found: list[tuple[int, str]] = []
    for ps_uuid in snap.cluster_primary_storages.get(h.cluster_uuid, ()):
        if req.primary_storage_uuid is not None and ps_uuid != req.primary_storage_uuid:
            continue
        ps = snap.primary_storages.get(ps_uuid)
        if ps is None or ps.state != ENABLED or ps.status != CONNECTED:
            continue
        if ps.available_capacity < req.disk_size:
            continue
        if ps.type == LOCAL_STORAGE:
            room = snap.local_capacity.get((ps_uuid, h.uuid))
            if room is None or room < req.disk_size:
                continue
        else:
            if (ps_uuid, h.uuid) not in snap.mounted:
                continue
            room = ps.available_capacity
        found.append((room, ps_uuid))
    found.sort(key=lambda r: (-r[0], r[1]))
    return [u for _, u in found]


def passes(req: AllocationRequest, snap: Snapshot, h: HostView) -> dict[str, bool]:
    """
    Each filter's verdict on C{h} alone (for tests and diagnostics).
    """
    return {name: fn(req, snap, h) for name, fn in _FILTERS}


def run_filters(req: AllocationRequest, snap: Snapshot,
                hosts: Iterable[HostView] | None = None) -> FilterResult:
    """
    Apply the filters in order to C{hosts} (default: every host of C{snap}).

    @return: a L{FilterResult}: the hosts left (ordered by uuid) and, per filter, how many
        it removed and how many were left (the removed counts add up to the candidates
        minus the hosts left).
    """
    left = sorted(snap.hosts if hosts is None else hosts, key=lambda h: h.uuid)
    total = len(left)
    counts = []
    for name, fn in _FILTERS:
        kept = [h for h in left if fn(req, snap, h)]
        counts.append(FilterCount(name, len(left) - len(kept), len(kept)))
        left = kept
    return FilterResult(tuple(left), tuple(counts), total)
