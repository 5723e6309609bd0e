# -*- test-case-name: tests.test_scheduler_service -*-
"""
One allocation: read a pre-filtered snapshot from the store, filter and order it with the
pure functions, reserve on the first host, and on a lost race try the next one.

Note [allocation races]: two allocators (on one node or on several) may choose the same
host from snapshots read before either reserved, and a host may leave allocation
(maintenance, disable, disconnect, its cluster or zone disabled) between the snapshot and
the reservation. The reservation (C{store.reserve_host_capacity_for_allocation}, a
conditional UPDATE recording the holder, which also requires the host Enabled and Connected
and its cluster and zone Enabled) lets at most as many win as the host has room for, and
none once the host left allocation; a loser gets C{DB.1003} (or C{DB.1008}) and tries the
next host of its page, re-reading a fresh snapshot when the page is used up, for at most C{max_attempts}
reservations in all. When they are used up, the "no available host" error says how many
races were lost. Nothing is held in memory between allocations.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from zcontrol.core.errors import OperationError
from zcontrol.db.interfaces import DB
from zcontrol.scheduler.filters import FILTER_NAMES, run_filters, usable_primary_storages
from zcontrol.scheduler.messages import ALLOCATOR
from zcontrol.scheduler.model import AllocationRequest
from zcontrol.scheduler.strategies import order_hosts, strategy_named

__all__ = ["Allocation", "Allocator", "no_host_error"]

log = Logger()

#: The reservation's refusals that mean a concurrent change took the host (its capacity,
#: or its allocatability): try the next one.
_LOST_RACE = (DB.HOST_CAPACITY, DB.HOST_NOT_ALLOCATABLE)


@attrs.frozen
class Allocation:
    """
    The outcome of an allocation.

    @ivar host: the host's row after the reservation.
    @ivar primary_storage_uuids: the primary storages that can take the root volume on it,
        best first.
    @ivar attempts: the reservations tried (1 unless races were lost).
    """

    host: dict[str, Any]
    primary_storage_uuids: list[str]
    attempts: int = 1


#: What a host removed by each filter lacked, for the error's text (an operator reads why).
FILTER_REASONS: dict[str, str] = {
    "narrowing": "outside the zone/cluster/host asked for",
    "avoid": "on the avoid list",
    "state": "not Enabled and Connected, or in a Disabled cluster or zone (or in maintenance)",
    "l2Network": "in a cluster not attached to the L2 network of every requested L3",
    "primaryStorage": "no Enabled, Connected primary storage attached to its cluster with room "
                      "for the root disk (LocalStorage: on that very host; NFS: mounted there)",
    "capacity": "not enough free CPU or memory",
}


def no_host_error(req: AllocationRequest, candidates: int, lefts: list[int],
                  lost_races: int = 0) -> OperationError:
    """
    C{ALLOCATOR.1000} naming the request and, per filter, how many candidates it removed
    (C{lefts}: how many were left after each filter, in L{FILTER_NAMES} order).
    """
    filters, before = [], candidates
    for name, left in zip(FILTER_NAMES, lefts, strict=True):
        filters.append({"name": name, "removed": before - left, "left": left})
        before = left
    why = ", ".join(f"{f['name']} removed {f['removed']}"
                    + (f" ({FILTER_REASONS[f['name']]})" if f["removed"] else "")
                    for f in filters)
    details = f"no available host for {req.describe()}: of {candidates} hosts, {why}"
    extra: dict[str, Any] = {}
    if lost_races:
        details += (f"; {lost_races} reservations were lost to concurrent allocations"
                    " (their hosts filled up or stopped taking VMs meanwhile)")
        extra["lostRaces"] = lost_races
    return OperationError.of(ALLOCATOR.NO_AVAILABLE_HOST, details, filters=filters,
                             candidates=candidates, request=request_dict(req), **extra)


def request_dict(req: AllocationRequest) -> dict[str, Any]:
    """
    The request as a camelCase dict (for error details).
    """
    return {"cpuNum": req.cpu_num, "cpuSpeed": req.cpu_speed, "memorySize": req.memory_size,
            "diskSize": req.disk_size, "l3NetworkUuids": list(req.l3_network_uuids),
            "zoneUuid": req.zone_uuid, "clusterUuid": req.cluster_uuid,
            "hostUuid": req.host_uuid, "avoidHostUuids": sorted(req.avoid_host_uuids),
            "allocatorStrategy": req.allocator_strategy,
            "primaryStorageUuid": req.primary_storage_uuid,
            "lastHostUuid": req.last_host_uuid}


@attrs.define
class Allocator:
    """
    Host allocation over a store (see the module docstring).

    @ivar store: the L{zcontrol.db.interfaces.IStore}.
    @ivar page_size: how many fitting hosts one snapshot reads.
    @ivar max_attempts: how many reservations one allocation tries at most.
    """

    store: Any
    page_size: int = 16
    max_attempts: int = 8

    async def allocate(self, req: AllocationRequest, holder: Any) -> Allocation:
        """
        Choose a host for C{req} and reserve its CPU and memory for C{holder}.

        @raise OperationError: C{ALLOCATOR.1000} (no host; the details say why),
            C{ALLOCATOR.1001} naming an unknown L3 network, C{ALLOCATOR.1002} when C{holder}
            holds other amounts on a host.
        """
        strategy = strategy_named(req.allocator_strategy)
        held, snap = await self.store.allocation_start(req, strategy.order, self.page_size,
                                                       holder)
        # A reservation on an avoided host is not an earlier answer to this request: a
        # migrating VM holds its source (avoided) while it asks for a destination.
        held = [h for h in held if h[0] not in req.avoid_host_uuids]
        if held:
            return await self._again(req, holder, held)
        attempts = lost = 0
        if strategy.prefers_last_host and req.last_host_uuid is not None:
            attempts, preferred = await self._last_host(req, holder)
            if preferred is not None:
                return preferred
            lost = attempts
        while attempts < self.max_attempts:
            if snap is None:
                snap = await self.store.allocation_snapshot(req, strategy.order,
                                                            self.page_size)
            missing = [u for u in req.l3_network_uuids if u not in snap.l3_l2]
            if missing:
                raise OperationError.of(ALLOCATOR.NOT_FOUND,
                                        f"no l3Network with uuid {missing[0]}",
                                        resource="l3Network", uuid=missing[0],
                                        field="l3NetworkUuids")
            ordered = order_hosts(strategy, run_filters(req, snap).hosts)
            if not ordered:
                break
            for host in ordered:
                attempts += 1
                try:
                    row = await self.store.reserve_host_capacity_for_allocation(
                        host.uuid, req.cpu_num, req.memory_size, holder)
                except OperationError as e:
                    if e.error.code not in _LOST_RACE:
                        raise
                    lost += 1
                    log.debug("allocation lost the race for host {host}", host=host.uuid)
                    if attempts >= self.max_attempts:
                        break
                    continue
                return Allocation(row, usable_primary_storages(req, snap, host), attempts)
            snap = None
        candidates, lefts = await self.store.allocation_counts(req)
        raise no_host_error(req, candidates, lefts, lost)

    async def _last_host(self, req: AllocationRequest, holder: Any
                         ) -> tuple[int, Allocation | None]:
        """
        C{LastHostPreferredAllocatorStrategy}: reserve on C{req.last_host_uuid} when it
        passes every filter (a snapshot of that host alone).

        @return: C{(reservations tried, the allocation or None)}: None when the last host
            does not fit, is outside the request's narrowing, or was lost to a race (the
            caller then goes on first-fit).
        """
        last = req.last_host_uuid
        if req.host_uuid is not None and req.host_uuid != last:
            return 0, None
        only = attrs.evolve(req, host_uuid=last)
        snap = await self.store.allocation_snapshot(only, (("uuid", False),), 1)
        fitting = run_filters(only, snap).hosts
        if not fitting:
            return 0, None
        try:
            row = await self.store.reserve_host_capacity_for_allocation(
                last, req.cpu_num, req.memory_size, holder)
        except OperationError as e:
            if e.error.code not in _LOST_RACE:
                raise
            log.debug("allocation lost the race for the last host {host}", host=last)
            return 1, None
        return 1, Allocation(row, usable_primary_storages(req, snap, fitting[0]), 1)

    async def _again(self, req: AllocationRequest, holder: Any,
                     held: list[tuple[str, int, int]]) -> Allocation:
        """
        The answer to a repeated allocation: the host the holder already holds, when it
        holds the amounts asked (Note [holders] in L{zcontrol.db._store}).
        """
        host_uuid, cpu, memory = held[0]
        if len(held) > 1 or (cpu, memory) != (req.cpu_num, req.memory_size):
            raise OperationError.of(
                ALLOCATOR.HELD_ELSEWHERE,
                f"{holder[0]} {holder[1]} already holds {cpu} CPUs and {memory} bytes of"
                f" memory on host {host_uuid}; return them first",
                hostUuid=host_uuid, cpu=cpu, memory=memory)
        again = attrs.evolve(req, host_uuid=host_uuid, cpu_num=0, memory_size=0,
                             avoid_host_uuids=frozenset(), zone_uuid=None, cluster_uuid=None)
        snap = await self.store.allocation_snapshot(again, (("uuid", False),), 1)
        row = await self.store.get("host", host_uuid)
        storages = (usable_primary_storages(req, snap, snap.hosts[0]) if snap.hosts else [])
        return Allocation(row, storages, 0)
