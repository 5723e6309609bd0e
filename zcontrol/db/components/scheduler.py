# -*- test-case-name: tests.test_scheduler_property -*-
"""
The allocator's store component: read-only, batched snapshots for host allocation.

Note [allocation pre-filter]: a decision must not read every host. The filters of
L{zcontrol.scheduler.filters} are written here once more in SQL (L{_conditions}, one
boolean expression per filter over C{hosts h JOIN clusters c JOIN zones z}), so that
L{allocation_snapshot_thd} reads only a page of hosts that pass all of them, already in the
strategy's order (C{ORDER BY} ... C{LIMIT}), and then, in the same pool trip, what the pure
filters need about those hosts (their clusters' L2 networks and primary storages, their
LocalStorage capacities and NFS mounts): about six statements per decision whatever the
number of hosts, each an index lookup (migration 0005 adds the indexes by cluster and the
least-used order). The pure filters then run again over that snapshot (a host changed
between the statements is dropped there) and the strategy orders what is left. When the
page is empty, L{allocation_counts_thd} counts, in one statement over every host (each
host's conditions evaluated in order up to the first that fails), how many hosts pass each
prefix of the filters: the per-filter figures of the "no available host" error. The
property tests check that both agree with the pure filters over a full snapshot
(L{full_snapshot_thd}) on random inventories.

Reads are not wrapped in a transaction: a snapshot may be slightly stale, and the
reservation (L{zcontrol.db.components.hosts.reserve_host_capacity_thd}, a conditional
UPDATE) is the arbiter.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from twisted.internet.defer import Deferred

from zcontrol.db.components.base import Db, Holder, StoreComponent
from zcontrol.scheduler.model import (
    CONNECTED,
    ENABLED,
    LOCAL_STORAGE,
    AllocationRequest,
    HostView,
    PrimaryStorageView,
    Snapshot,
)

__all__ = [
    "SchedulerComponent",
    "allocation_counts_thd",
    "allocation_snapshot_thd",
    "allocation_start_thd",
    "full_snapshot_thd",
    "holder_reservations_thd",
]

_HOST_COLUMNS = ("h.uuid, h.zone_uuid, h.cluster_uuid, h.state, h.status,"
                 " h.available_cpu_capacity, h.available_memory_capacity, c.state, z.state")
# CROSS JOIN: SQLite then keeps hosts as the outer loop, so that the strategy's ORDER BY
# walks an index (the primary key, hosts_least_used) and stops at the page's end, instead
# of starting from the zones and sorting every host (10,000 hosts: 24 ms against 1 ms).
# PostgreSQL plans a CROSS JOIN as any inner join.
_FROM = (" FROM hosts h CROSS JOIN clusters c CROSS JOIN zones z"
         " WHERE c.uuid = h.cluster_uuid AND z.uuid = h.zone_uuid")
_ORDER_COLUMNS = {"uuid": "h.uuid", "available_memory": "h.available_memory_capacity",
                  "available_cpu": "h.available_cpu_capacity"}


def _in(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _l3_l2_thd(db: Db, l3_uuids: Sequence[str]) -> dict[str, str]:
    if not l3_uuids:
        return {}
    rows = db.all(f"SELECT uuid, l2_network_uuid FROM l3_networks WHERE uuid IN ({_in(l3_uuids)})",
                  tuple(l3_uuids))
    return {r[0]: r[1] for r in rows}


def _conditions(req: AllocationRequest, l3_l2: dict[str, str]
                ) -> list[tuple[str, str, tuple]]:
    """
    The filters of L{zcontrol.scheduler.filters} in SQL: C{(name, expression, params)} in
    the same order, each over the aliases C{h}, C{c}, C{z}.
    """
    out: list[tuple[str, str, tuple]] = []
    parts, params = ["1 = 1"], []
    for column, value in (("h.zone_uuid", req.zone_uuid), ("h.cluster_uuid", req.cluster_uuid),
                          ("h.uuid", req.host_uuid)):
        if value is not None:
            parts.append(f"{column} = ?")
            params.append(value)
    out.append(("narrowing", " AND ".join(parts), tuple(params)))
    avoid = tuple(sorted(req.avoid_host_uuids))
    out.append(("avoid", f"h.uuid NOT IN ({_in(avoid)})" if avoid else "1 = 1", avoid))
    out.append(("state", "h.state = ? AND h.status = ? AND c.state = ? AND z.state = ?",
                (ENABLED, CONNECTED, ENABLED, ENABLED)))
    if any(l3 not in l3_l2 for l3 in req.l3_network_uuids):
        out.append(("l2Network", "1 = 0", ()))
    else:
        l2s = sorted({l3_l2[l3] for l3 in req.l3_network_uuids})
        exprs = ["EXISTS (SELECT 1 FROM l2_network_cluster_refs r WHERE r.l2_network_uuid = ?"
                 " AND r.cluster_uuid = h.cluster_uuid)" for _ in l2s]
        out.append(("l2Network", " AND ".join(exprs) or "1 = 1", tuple(l2s)))
    ps_params: list[Any] = [ENABLED, CONNECTED, req.disk_size]
    required = ""
    if req.primary_storage_uuid is not None:
        required = " AND p.uuid = ?"
        ps_params.append(req.primary_storage_uuid)
    ps_params += [LOCAL_STORAGE, req.disk_size, LOCAL_STORAGE, CONNECTED]
    out.append((
        "primaryStorage",
        "EXISTS (SELECT 1 FROM primary_storage_cluster_refs pc"
        " JOIN primary_storages p ON p.uuid = pc.primary_storage_uuid"
        " WHERE pc.cluster_uuid = h.cluster_uuid AND p.state = ? AND p.status = ?"
        f" AND p.available_capacity >= ?{required}"
        " AND ((p.type = ? AND EXISTS (SELECT 1 FROM local_storage_host_refs l"
        " WHERE l.primary_storage_uuid = p.uuid AND l.host_uuid = h.uuid"
        " AND l.available_capacity >= ?))"
        " OR (p.type <> ? AND EXISTS (SELECT 1 FROM primary_storage_host_refs m"
        " WHERE m.primary_storage_uuid = p.uuid AND m.host_uuid = h.uuid AND m.status = ?))))",
        tuple(ps_params)))
    # "+ 0": not an index range (SQLite would then pick hosts_least_used for it and sort
    # every fitting host by uuid for first-fit); the ORDER BY's index is walked instead.
    out.append(("capacity",
                "h.available_cpu_capacity + 0 >= ? AND h.available_memory_capacity + 0 >= ?",
                (req.cpu_num, req.memory_size)))
    return out


def _host(row: tuple) -> HostView:
    return HostView(uuid=row[0], zone_uuid=row[1], cluster_uuid=row[2], state=row[3],
                    status=row[4], available_cpu=int(row[5]), available_memory=int(row[6]),
                    cluster_state=row[7], zone_state=row[8])


def _snapshot_of(db: Db, hosts: list[HostView], l3_l2: dict[str, str], everything: bool
                 ) -> Snapshot:
    """
    The snapshot of C{hosts}: what the filters need about them, in four statements
    (about all hosts, without C{IN} lists, when C{everything}).
    """
    clusters = sorted({h.cluster_uuid for h in hosts})
    host_uuids = [h.uuid for h in hosts]
    if not hosts and not everything:
        return Snapshot(l3_l2=l3_l2)
    if everything:
        by_cluster, by_host, c_params, h_params = "", "", (), ()
    else:
        by_cluster = f" WHERE r.cluster_uuid IN ({_in(clusters)})"
        by_host = f" AND host_uuid IN ({_in(host_uuids)})"
        c_params, h_params = tuple(clusters), tuple(host_uuids)
    cluster_l2: dict[str, set[str]] = {}
    for cluster, l2 in db.all("SELECT r.cluster_uuid, r.l2_network_uuid"
                              " FROM l2_network_cluster_refs r" + by_cluster, c_params):
        cluster_l2.setdefault(cluster, set()).add(l2)
    cluster_ps: dict[str, list[str]] = {}
    storages: dict[str, PrimaryStorageView] = {}
    for row in db.all("SELECT r.cluster_uuid, p.uuid, p.type, p.state, p.status,"
                      " p.available_capacity FROM primary_storage_cluster_refs r"
                      " JOIN primary_storages p ON p.uuid = r.primary_storage_uuid"
                      + by_cluster, c_params):
        cluster_ps.setdefault(row[0], []).append(row[1])
        storages[row[1]] = PrimaryStorageView(uuid=row[1], type=row[2], state=row[3],
                                              status=row[4], available_capacity=int(row[5]))
    local = {(r[0], r[1]): int(r[2]) for r in db.all(
        "SELECT primary_storage_uuid, host_uuid, available_capacity"
        " FROM local_storage_host_refs WHERE 1 = 1" + by_host, h_params)}
    mounted = {(r[0], r[1]) for r in db.all(
        "SELECT primary_storage_uuid, host_uuid FROM primary_storage_host_refs"
        " WHERE status = ?" + by_host, (CONNECTED, *h_params))}
    return Snapshot(hosts=hosts, cluster_l2=cluster_l2, cluster_primary_storages=cluster_ps,
                    l3_l2=l3_l2, primary_storages=storages, local_capacity=local,
                    mounted=mounted)


def allocation_snapshot_thd(db: Db, req: AllocationRequest,
                            order: Iterable[tuple[str, bool]], limit: int) -> Snapshot:
    """
    The snapshot of at most C{limit} hosts that pass every filter in SQL, the first ones
    in C{order} (a strategy's C{(HostView attribute, descending)} pairs), with what the
    pure filters need about them (Note [allocation pre-filter]). Its C{l3_l2} maps only
    the requested L3 networks that exist.
    """
    l3_l2 = _l3_l2_thd(db, req.l3_network_uuids)
    conds = _conditions(req, l3_l2)
    where = " AND ".join(f"({expr})" for _, expr, _ in conds)
    params = tuple(p for _, _, ps in conds for p in ps)
    order_sql = ", ".join(f"{_ORDER_COLUMNS[a]}{' DESC' if desc else ''}" for a, desc in order)
    rows = db.all(f"SELECT {_HOST_COLUMNS}{_FROM} AND {where} ORDER BY {order_sql} LIMIT ?",
                  (*params, int(limit)))
    return _snapshot_of(db, [_host(r) for r in rows], l3_l2, everything=False)


def allocation_start_thd(db: Db, req: AllocationRequest, order: Iterable[tuple[str, bool]],
                         limit: int, holder: Any
                         ) -> tuple[list[tuple[str, int, int]], Snapshot | None]:
    """
    The first step of an allocation in one pool trip: C{holder}'s host reservations
    (L{holder_reservations_thd}) and, when it holds none, the snapshot of
    L{allocation_snapshot_thd} (else None).
    """
    held = holder_reservations_thd(db, holder)
    if held:
        return held, None
    return held, allocation_snapshot_thd(db, req, order, limit)


def allocation_counts_thd(db: Db, req: AllocationRequest) -> tuple[int, list[int]]:
    """
    How many hosts there are and how many pass each prefix of the filters (the first,
    the first two, ...), in one statement (Note [allocation pre-filter]): a C{CASE} gives
    each host the number of filters it passes in a row (the branches are evaluated in
    order, so a host's later, costlier conditions are not evaluated once one failed), and
    the outer query counts the hosts past each depth.

    @return: C{(candidates, [left after each filter])}.
    """
    conds = _conditions(req, _l3_l2_thd(db, req.l3_network_uuids))
    whens = " ".join(f"WHEN NOT ({expr}) THEN {i}" for i, (_, expr, _) in enumerate(conds))
    params = tuple(p for _, _, ps in conds for p in ps)
    # GROUP BY, not one SUM per depth: a planner inlining the subquery would evaluate the
    # CASE once per SUM.
    sql = (f"SELECT t.depth, COUNT(*) FROM (SELECT CASE {whens} ELSE {len(conds)} END AS depth"
           f"{_FROM}) t GROUP BY t.depth")
    # (On PostgreSQL, JIT is off for every connection: see PostgresDialect.connect_args.)
    rows = db.all(sql, params)
    by_depth = {int(d): int(n) for d, n in rows}
    lefts = [sum(n for d, n in by_depth.items() if d > i) for i in range(len(conds))]
    return sum(by_depth.values()), lefts


def full_snapshot_thd(db: Db, l3_uuids: Sequence[str] = ()) -> Snapshot:
    """
    The snapshot of every host (for tests and diagnostics: linear in the inventory).
    """
    rows = db.all(f"SELECT {_HOST_COLUMNS}{_FROM} ORDER BY h.uuid")
    return _snapshot_of(db, [_host(r) for r in rows], _l3_l2_thd(db, list(l3_uuids)),
                        everything=True)


def holder_reservations_thd(db: Db, holder: Any) -> list[tuple[str, int, int]]:
    """
    The host reservations of C{holder}: C{[(host uuid, cpu, memory)]}, by host uuid.
    """
    holder = Holder.of(holder)
    return [(r[0], int(r[1]), int(r[2])) for r in db.all(
        "SELECT host_uuid, cpu, memory FROM host_capacity_holders"
        " WHERE holder_type = ? AND holder_uuid = ? ORDER BY host_uuid",
        (holder.type, holder.uuid))]


class SchedulerComponent(StoreComponent):
    """
    The allocator's reads (see the module docstring); reservations are the hosts
    component's (C{reserve_host_capacity}).
    """

    def allocation_snapshot(self, request: AllocationRequest,
                            order: Iterable[tuple[str, bool]], limit: int) -> Deferred:
        """
        @return: a Deferred firing with the L{Snapshot} of L{allocation_snapshot_thd}.
        """
        return self._run(allocation_snapshot_thd, request, tuple(order), limit)

    def allocation_start(self, request: AllocationRequest, order: Iterable[tuple[str, bool]],
                         limit: int, holder: Any) -> Deferred:
        """
        @return: a Deferred firing with L{allocation_start_thd}'s C{(held, snapshot)}.
        """
        return self._run(allocation_start_thd, request, tuple(order), limit, holder)

    def allocation_counts(self, request: AllocationRequest) -> Deferred:
        """
        @return: a Deferred firing with L{allocation_counts_thd}'s C{(candidates, lefts)}.
        """
        return self._run(allocation_counts_thd, request)

    def full_snapshot(self, l3_uuids: Sequence[str] = ()) -> Deferred:
        """
        @return: a Deferred firing with the L{Snapshot} of every host.
        """
        return self._run(full_snapshot_thd, tuple(l3_uuids))

    def holder_reservations(self, holder: Any) -> Deferred:
        """
        @return: a Deferred firing with L{holder_reservations_thd}'s list.
        """
        return self._run(holder_reservations_thd, holder)
