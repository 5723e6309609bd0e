# -*- test-case-name: tests.test_db_contract -*-
"""
Hosts: capacity reservations by holder, host status, and the capacity audit (hosts,
primary storage, LocalStorage host refs). Primary storage capacity lives in
L{zcontrol.db.components.storage} (its functions are re-exported here).
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred

from zcontrol.core.errors import OperationError
from zcontrol.db.components.base import (
    Db,
    Holder,
    StoreComponent,
    _amount,
    _cols,
    _not_found,
    _release_thd,
    _reserve_thd,
    _row,
    _uuid,
)
from zcontrol.db.components.storage import (  # noqa: F401 (moved there, re-exported)
    release_primary_storage_thd,
    reserve_primary_storage_thd,
)
from zcontrol.db.interfaces import DB
from zcontrol.db.query import (
    check_int,
    resource,
)

_HOST = resource("host")
_PS = resource("primaryStorage")

#: The conditions a host must meet to take a new VM, as the allocator's C{state} filter
#: (L{zcontrol.scheduler.filters}) has them: over the C{hosts} row being updated.
_ALLOCATABLE_SQL = (
    " AND state = 'Enabled' AND status = 'Connected'"
    " AND EXISTS (SELECT 1 FROM clusters c JOIN zones z ON z.uuid = c.zone_uuid"
    " WHERE c.uuid = hosts.cluster_uuid AND c.state = 'Enabled' AND z.state = 'Enabled')"
)


def reserve_host_capacity_thd(db: Db, host_uuid: str, cpu: int, memory: int, holder: Any,
                              now: float, allocatable: bool = False) -> dict:
    """
    C{holder} takes cpu and memory from a host, once (Note [holders]).

    With C{allocatable} (the allocator's reservation, Note [allocation races] in
    L{zcontrol.scheduler.allocator}), the same statement also requires the host Enabled and
    Connected and its cluster and zone Enabled: a host that went to (Pre)Maintenance,
    Disabled or Disconnected after the allocator's snapshot is refused with C{DB.1008}, so
    nothing new is reserved on it once its state change committed.
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    cpu, memory = _amount("cpu", cpu), _amount("memory", memory)
    holder = Holder.of(holder)

    def short() -> OperationError:
        r = db.one(
            "SELECT h.available_cpu_capacity, h.available_memory_capacity, h.state, h.status,"
            " c.state, z.state FROM hosts h LEFT JOIN clusters c ON c.uuid = h.cluster_uuid"
            " LEFT JOIN zones z ON z.uuid = h.zone_uuid WHERE h.uuid = ?",
            (host_uuid,),
        )
        if r is None:
            return _not_found(_HOST, host_uuid)
        if allocatable and tuple(r[2:]) != ("Enabled", "Connected", "Enabled", "Enabled"):
            return OperationError.of(
                DB.HOST_NOT_ALLOCATABLE,
                f"host {host_uuid} takes no new VM: it is {r[2]} and {r[3]}, its cluster"
                f" {r[4]}, its zone {r[5]}",
                host_uuid=host_uuid, state=r[2], status=r[3], clusterState=r[4],
                zoneState=r[5])
        return OperationError.of(
            DB.HOST_CAPACITY,
            f"host {host_uuid} has {r[0]} CPU and {r[1]} memory available;"
            f" {cpu} CPU and {memory} memory were asked",
            host_uuid=host_uuid,
            availableCpu=int(r[0]),
            availableMemory=int(r[1]),
            cpu=cpu,
            memory=memory,
        )

    return _reserve_thd(
        db, table="host_capacity_holders", key="host_uuid", res=_HOST,
        resource_uuid=host_uuid, holder=holder, amounts={"cpu": cpu, "memory": memory},
        update_sql="UPDATE hosts SET available_cpu_capacity = available_cpu_capacity - ?,"
        " available_memory_capacity = available_memory_capacity - ?, last_op_date = ?"
        " WHERE uuid = ? AND available_cpu_capacity >= ? AND available_memory_capacity >= ?"
        f"{_ALLOCATABLE_SQL if allocatable else ''}"
        f" RETURNING {_cols(_HOST)}",
        update_params=(cpu, memory, now, host_uuid, cpu, memory), short=short, now=now)


def release_host_capacity_thd(db: Db, host_uuid: str, holder: Any, now: float) -> dict:
    """
    Give back what C{holder} holds on a host (nothing held: no-op).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    return _release_thd(
        db, table="host_capacity_holders", key="host_uuid", res=_HOST,
        resource_uuid=host_uuid, holder=Holder.of(holder),
        figures=(("available_cpu_capacity", "cpu"), ("available_memory_capacity", "memory")),
        now=now)


def set_host_capacity_thd(
    db: Db, host_uuid: str, total_cpu: int, total_memory: int, cpu_num: int | None, now: float
) -> dict:
    """
    New totals keeping what is reserved, in one UPDATE (the CHECK constraints refuse totals
    below the reservations).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    total_cpu, total_memory = _amount("total_cpu", total_cpu), _amount("total_memory", total_memory)
    extra, params = "", [total_cpu, total_cpu, total_memory, total_memory, now]
    if cpu_num is not None:
        extra = ", cpu_num = ?"
        params.append(check_int("cpu_num", _amount("cpu_num", cpu_num), 0, 2**31 - 1))
    rows = db.all(
        "UPDATE hosts SET"
        " available_cpu_capacity = ? - (total_cpu_capacity - available_cpu_capacity),"
        " total_cpu_capacity = ?,"
        " available_memory_capacity = ? - (total_memory_capacity - available_memory_capacity),"
        f" total_memory_capacity = ?, last_op_date = ?{extra}"
        f" WHERE uuid = ? RETURNING {_cols(_HOST)}",
        params + [host_uuid],
    )
    if not rows:
        raise _not_found(_HOST, host_uuid)
    return _row(_HOST, rows[0])


def host_capacity_holders_thd(db: Db, host_uuid: str, limit: int) -> dict:
    """
    Who holds CPU and memory of a host: C{{"total": n, "holders": [{holderType,
    holderUuid, cpu, memory}]}} (at most C{limit}, by holder type and uuid).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    limit = check_int("limit", limit, 0, 10_000)
    total = db.one("SELECT COUNT(*) FROM host_capacity_holders WHERE host_uuid = ?",
                   (host_uuid,))[0]
    rows = db.all("SELECT holder_type, holder_uuid, cpu, memory FROM host_capacity_holders"
                  " WHERE host_uuid = ? ORDER BY holder_type, holder_uuid LIMIT ?",
                  (host_uuid, limit))
    return {"total": int(total), "holders": [
        {"holderType": t, "holderUuid": u, "cpu": int(c), "memory": int(m)}
        for t, u, c, m in rows]}


def delete_host_thd(db: Db, host_uuid: str, now: float) -> bool:
    """
    Delete a host; in the same transaction its Destroyed VMs let go of it (C{hostUuid}
    cleared, C{lastHostUuid} the host: as ZStack, a Destroyed VM keeps no host). Anything
    else still referring to the host (a VM in another state, an image cache, held
    capacity) fails the delete with C{DB.1001} and nothing changes.

    @return: whether there was a host.
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    with db.transaction():
        db.run("UPDATE vm_instances SET last_host_uuid = host_uuid, host_uuid = NULL,"
               " last_op_date = ? WHERE host_uuid = ? AND state = 'Destroyed'",
               (now, host_uuid))
        return db.run("DELETE FROM hosts WHERE uuid = ?", (host_uuid,)) > 0


_AUDITS = (
    # (resource, table, holders table, how a holder row h matches the row r, [(API field,
    #  total column, available column, held column)])
    ("host", "hosts", "host_capacity_holders", "h.host_uuid = r.uuid",
     (("availableCpuCapacity", "total_cpu_capacity", "available_cpu_capacity", "cpu"),
      ("availableMemoryCapacity", "total_memory_capacity", "available_memory_capacity",
       "memory"))),
    ("primaryStorage", "primary_storages", "primary_storage_capacity_holders",
     "h.primary_storage_uuid = r.uuid",
     (("availableCapacity", "total_capacity", "available_capacity", "size"),)),
    # LocalStorage: each host's share (Note [local capacity] in components.storage).
    ("localStorageHostRef", "local_storage_host_refs", "primary_storage_capacity_holders",
     "h.primary_storage_uuid = r.primary_storage_uuid AND h.host_uuid = r.host_uuid",
     (("availableCapacity", "total_capacity", "available_capacity", "size"),)),
)


def audit_capacity_thd(db: Db, repair: bool, now: float) -> list[dict]:
    """
    Recompute every host's and primary storage's available capacity from its holders
    (C{total - sum(held)}) and report where the recorded figure drifted; with C{repair},
    set the recomputed figure, each row in a transaction that holds the row's lock (so a
    concurrent reservation is either counted or waits).
    """
    drift: list[dict] = []
    for res_name, table, holders, match, figures in _AUDITS:
        select = ", ".join(
            f"r.{total}, r.{avail}, COALESCE((SELECT SUM(h.{held}) FROM {holders} h"
            f" WHERE {match}), 0)" for _, total, avail, held in figures)
        check = f"SELECT r.uuid, {select} FROM {table} r"
        for row in db.all(check + " ORDER BY r.uuid"):
            found = _drift(res_name, row, figures)
            if not found:
                continue
            if repair:
                with db.transaction():
                    # A no-op update takes the row lock before the holders are summed again.
                    db.run(f"UPDATE {table} SET last_op_date = last_op_date WHERE uuid = ?",
                           (row[0],))
                    fresh = db.one(check + " WHERE r.uuid = ?", (row[0],))
                    found = [] if fresh is None else _drift(res_name, fresh, figures)
                    if found:
                        sets = ", ".join(f"{d['column']} = ?" for d in found)
                        db.run(f"UPDATE {table} SET {sets}, last_op_date = ? WHERE uuid = ?",
                               (*(d["computed"] for d in found), now, row[0]))
                for d in found:
                    d["repaired"] = True
            drift.extend(found)
    for d in drift:
        d.pop("column")
    return drift


def _drift(res_name: str, row: tuple, figures: tuple) -> list[dict]:
    out = []
    for i, (field, _, avail_col, _) in enumerate(figures):
        total, avail, held = (int(v) for v in row[1 + 3 * i: 4 + 3 * i])
        if total - held != avail:
            out.append({"resource": res_name, "uuid": row[0], "field": field,
                        "column": avail_col, "recorded": avail, "computed": total - held,
                        "held": held, "repaired": False})
    return out


# The lowest free addresses of one range: its start when free, else the address after each
# used one whose successor is not used (a gap). LEAD over the (l3_network_uuid, ip_in_long)
# unique index is one ordered walk that stops at the first gaps: linear at worst, never the
# quadratic anti-join a planner without statistics may pick for a NOT EXISTS form.


class HostsComponent(StoreComponent):
    """
    Hosts and the capacity audit (see L{IStore}).
    """

    def add_host(self, values: dict) -> Deferred:
        if not isinstance(values, Mapping):
            return self.insert("host", values)
        values = dict(values)
        values.setdefault("availableCpuCapacity", values.get("totalCpuCapacity", 0))
        values.setdefault("availableMemoryCapacity", values.get("totalMemoryCapacity", 0))
        return self.insert("host", values)

    def update_host_status(self, host_uuid: str, status: str, expected: Any = None) -> Deferred:
        return self.update("host", host_uuid, {"status": status},
                           None if expected is None else {"status": expected})

    def set_host_capacity(self, host_uuid: str, total_cpu: int, total_memory: int,
                          cpu_num: int | None = None) -> Deferred:
        return self._run(set_host_capacity_thd, host_uuid, total_cpu, total_memory, cpu_num,
                         self._now())

    def reserve_host_capacity(self, host_uuid: str, cpu: int, memory: int, holder: Any
                              ) -> Deferred:
        return self._run(reserve_host_capacity_thd, host_uuid, cpu, memory, holder,
                         self._now())

    def reserve_host_capacity_for_allocation(self, host_uuid: str, cpu: int, memory: int,
                                             holder: Any) -> Deferred:
        return self._run(reserve_host_capacity_thd, host_uuid, cpu, memory, holder,
                         self._now(), True)

    def release_host_capacity(self, host_uuid: str, holder: Any) -> Deferred:
        return self._run(release_host_capacity_thd, host_uuid, holder, self._now())

    def host_capacity_holders(self, host_uuid: str, limit: int = 20) -> Deferred:
        return self._run(host_capacity_holders_thd, host_uuid, limit)

    def delete_host(self, host_uuid: str) -> Deferred:
        return self._run(delete_host_thd, host_uuid, self._now())

    def audit_capacity(self, repair: bool = False) -> Deferred:
        return self._run(audit_capacity_thd, bool(repair), self._now())
