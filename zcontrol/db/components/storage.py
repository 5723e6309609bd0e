# -*- test-case-name: tests.test_primary_storage_db -*-
"""
The store component of primary storage (the primary storage service's tables): capacity
reservations by holder (shared storage, and LocalStorage where a reservation takes from the
storage and the host's L{local_storage_host_refs} row at once), the LocalStorage host refs
and the storage's totals over them, NFS capacity, image caches with the capacity they hold,
and the deletion of a storage with everything it keeps.

Note [local capacity]: a LocalStorage's C{totalCapacity} is the sum of its host refs'
totals and its C{availableCapacity} that total minus everything held on it; each host ref's
available figure is its total minus what is held on that host
(C{primary_storage_capacity_holders.host_uuid}). Every change is relative (C{available =
available - size}) and made in one transaction that updates the storage row before the host
ref row, so that concurrent reservations, releases and capacity updates never lose one
another's change and never deadlock (the same lock order everywhere); the audit
(L{zcontrol.db.components.hosts.audit_capacity_thd}) recomputes both figures from the holders.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.components.base import (
    Db,
    Holder,
    StoreComponent,
    _amount,
    _cols,
    _mapping,
    _not_found,
    _reserve_thd,
    _Rollback,
    _row,
    _uuid,
    get_thd,
    insert_thd,
)
from zcontrol.db.interfaces import DB
from zcontrol.db.query import resource

__all__ = [
    "IMAGE_CACHE_HOLDER",
    "StorageComponent",
    "create_image_cache_thd",
    "delete_image_cache_thd",
    "add_image_cache_volume_ref_thd",
    "delete_primary_storage_thd",
    "detach_primary_storage_thd",
    "forget_primary_storage_host_thd",
    "remove_image_cache_volume_refs_thd",
    "primary_storage_holders_thd",
    "recompute_local_storage_thd",
    "release_primary_storage_thd",
    "remove_local_storage_host_thd",
    "reserve_primary_storage_thd",
    "set_local_storage_host_capacity_thd",
    "set_primary_storage_capacity_thd",
]

_PS = resource("primaryStorage")
_REF = resource("localStorageHostRef")
_CACHE = resource("imageCache")

#: The holder type of an image cache's capacity (ZStack's C{ImageCacheVO}).
IMAGE_CACHE_HOLDER = "ImageCacheVO"


def _lock_storage(db: Db, ps_uuid: str) -> None:
    # The storage row's lock, taken first by every multi-row change (Note [local capacity]).
    if db.run("UPDATE primary_storages SET last_op_date = last_op_date WHERE uuid = ?",
              (ps_uuid,)) == 0:
        raise _not_found(_PS, ps_uuid)


def _ps_row(db: Db, ps_uuid: str) -> dict:
    row = get_thd(db, "primaryStorage", ps_uuid)
    if row is None:
        raise _not_found(_PS, ps_uuid)
    return row


def _short(db: Db, ps_uuid: str, size: int, host_uuid: str | None) -> OperationError:
    r = db.one("SELECT available_capacity FROM primary_storages WHERE uuid = ?", (ps_uuid,))
    if r is None:
        return _not_found(_PS, ps_uuid)
    if host_uuid is None:
        return OperationError.of(
            DB.STORAGE_CAPACITY,
            f"primary storage {ps_uuid} has {r[0]} bytes available; {size} were asked",
            primary_storage_uuid=ps_uuid, availableCapacity=int(r[0]), size=size)
    h = db.one("SELECT available_capacity FROM local_storage_host_refs"
               " WHERE primary_storage_uuid = ? AND host_uuid = ?", (ps_uuid, host_uuid))
    if h is None:
        return OperationError.of(
            DB.STORAGE_CAPACITY,
            f"primary storage {ps_uuid} has no capacity on host {host_uuid} (not initialised"
            " there)", primary_storage_uuid=ps_uuid, host_uuid=host_uuid,
            availableCapacity=0, size=size)
    return OperationError.of(
        DB.STORAGE_CAPACITY,
        f"primary storage {ps_uuid} has {h[0]} bytes available on host {host_uuid}"
        f" ({r[0]} in all); {size} were asked",
        primary_storage_uuid=ps_uuid, host_uuid=host_uuid, availableCapacity=int(h[0]),
        storageAvailableCapacity=int(r[0]), size=size)


def _take_in_tx(db: Db, ps_uuid: str, size: int, holder: Holder, host_uuid: str | None,
                now: float) -> dict | None:
    """
    Inside a transaction: record the holder and take C{size} from the storage, then from the
    host's ref (LocalStorage). The storage row, or None when a step changed nothing (the
    holder is there already, or capacity is short): the caller rolls back.
    """
    if not db.all(
            "INSERT INTO primary_storage_capacity_holders (primary_storage_uuid,"
            " holder_type, holder_uuid, size, host_uuid, create_date)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING holder_uuid",
            (ps_uuid, holder.type, holder.uuid, size, host_uuid, now)):
        return None
    rows = db.all(
        "UPDATE primary_storages SET available_capacity = available_capacity - ?,"
        " last_op_date = ? WHERE uuid = ? AND available_capacity >= ?"
        f" RETURNING {_cols(_PS)}", (size, now, ps_uuid, size))
    if not rows:
        return None
    if host_uuid is not None and not db.all(
            "UPDATE local_storage_host_refs SET available_capacity ="
            " available_capacity - ?, last_op_date = ? WHERE primary_storage_uuid = ?"
            " AND host_uuid = ? AND available_capacity >= ? RETURNING uuid",
            (size, now, ps_uuid, host_uuid, size)):
        return None
    return _row(_PS, rows[0])


def reserve_primary_storage_thd(db: Db, ps_uuid: str, size: int, holder: Any, now: float,
                                host_uuid: str | None = None, report: bool = False) -> Any:
    """
    C{holder} takes C{size} bytes from a primary storage, once (Note [holders] in
    L{zcontrol.db._store}); with C{host_uuid} (LocalStorage), from the storage and that
    host's ref row together, in one transaction (Note [local capacity]).

    @param report: return C{(row, inserted)}: whether this call recorded the holder
        (False: it already held C{size} there, nothing changed), so that a failure path
        gives back only what its own call reserved.
    @return: the storage row (C{(row, inserted)} with C{report}).
    @raise OperationError: C{DB.1004} short (on the storage or, naming it, on the host),
        C{DB.1000} when C{holder} already holds another amount (or on another host),
        C{SYS.1003} no such storage.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    size = _amount("size", size)
    holder = Holder.of(holder)
    if host_uuid is None and not report:
        return _reserve_thd(
            db, table="primary_storage_capacity_holders", key="primary_storage_uuid",
            res=_PS, resource_uuid=ps_uuid, holder=holder, amounts={"size": size},
            update_sql="UPDATE primary_storages SET available_capacity = available_capacity - ?,"
            " last_op_date = ? WHERE uuid = ? AND available_capacity >= ?"
            f" RETURNING {_cols(_PS)}",
            update_params=(size, now, ps_uuid, size),
            short=lambda: _short(db, ps_uuid, size, None), now=now)
    if host_uuid is not None:
        host_uuid = _uuid("host_uuid", host_uuid)
    try:
        with db.transaction():
            row = _take_in_tx(db, ps_uuid, size, holder, host_uuid, now)
            if row is None:
                raise _Rollback()
            return (row, True) if report else row
    except _Rollback:
        pass
    except Exception as e:
        err = db.dialect.map_error(e)
        if err is None or err.code != DB.REFERENCE:
            raise
        if db.one("SELECT 1 FROM primary_storages WHERE uuid = ?", (ps_uuid,)) is None:
            raise _not_found(_PS, ps_uuid) from None
        raise _not_found(resource("host"), host_uuid) from None
    held = db.one("SELECT size, host_uuid FROM primary_storage_capacity_holders"
                  " WHERE primary_storage_uuid = ? AND holder_type = ? AND holder_uuid = ?",
                  (ps_uuid, holder.type, holder.uuid))
    if held is None:
        raise _short(db, ps_uuid, size, host_uuid)
    if int(held[0]) != size or held[1] != host_uuid:
        raise OperationError.of(
            DB.DUPLICATE,
            f"{holder.type} {holder.uuid} already holds {int(held[0])} bytes of primary"
            f" storage {ps_uuid} on host {held[1]}, not {size} on {host_uuid}: release it"
            " first", resource="primaryStorage", uuid=ps_uuid, holder_type=holder.type,
            holder_uuid=holder.uuid, held={"size": int(held[0]), "host_uuid": held[1]})
    row = _ps_row(db, ps_uuid)
    return (row, False) if report else row


def _release_in_tx(db: Db, ps_uuid: str, holder: Holder, now: float) -> dict | None:
    """
    Inside a transaction: drop C{holder}'s reservation and give its bytes back to the
    storage and (LocalStorage) the host ref. The storage row (None: nothing held).
    """
    held = db.all("DELETE FROM primary_storage_capacity_holders WHERE primary_storage_uuid = ?"
                  " AND holder_type = ? AND holder_uuid = ? RETURNING size, host_uuid",
                  (ps_uuid, holder.type, holder.uuid))
    if not held:
        return None
    size, host_uuid = int(held[0][0]), held[0][1]
    rows = db.all("UPDATE primary_storages SET available_capacity = available_capacity + ?,"
                  f" last_op_date = ? WHERE uuid = ? RETURNING {_cols(_PS)}",
                  (size, now, ps_uuid))
    if host_uuid is not None:
        db.run("UPDATE local_storage_host_refs SET available_capacity = available_capacity + ?,"
               " last_op_date = ? WHERE primary_storage_uuid = ? AND host_uuid = ?",
               (size, now, ps_uuid, host_uuid))
    return _row(_PS, rows[0]) if rows else None


def release_primary_storage_thd(db: Db, ps_uuid: str, holder: Any, now: float) -> dict:
    """
    Give back what C{holder} holds on a primary storage (and on its host, for LocalStorage);
    nothing held is a no-op.

    @return: the storage row; C{SYS.1003} when there is no such storage.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    holder = Holder.of(holder)
    if db.dialect.writable_ctes:
        # One statement (one round trip). PostgreSQL runs the unreferenced C{l} after the
        # main UPDATE: the storage row is locked before the host ref, as everywhere.
        returning = ", ".join(f"primary_storages.{f.column}" for f in _PS.fields.values())
        rows = db.all(
            "WITH d AS (DELETE FROM primary_storage_capacity_holders WHERE"
            " primary_storage_uuid = ? AND holder_type = ? AND holder_uuid = ?"
            " RETURNING size, host_uuid),"
            " l AS (UPDATE local_storage_host_refs SET available_capacity ="
            " local_storage_host_refs.available_capacity + d.size, last_op_date = ? FROM d"
            " WHERE local_storage_host_refs.primary_storage_uuid = ?"
            " AND local_storage_host_refs.host_uuid = d.host_uuid RETURNING 1)"
            " UPDATE primary_storages SET available_capacity ="
            " primary_storages.available_capacity + d.size, last_op_date = ? FROM d"
            f" WHERE primary_storages.uuid = ? RETURNING {returning}",
            (ps_uuid, holder.type, holder.uuid, now, ps_uuid, now, ps_uuid))
        if rows:
            return _row(_PS, rows[0])
        return _ps_row(db, ps_uuid)
    with db.transaction():
        row = _release_in_tx(db, ps_uuid, holder, now)
    return row if row is not None else _ps_row(db, ps_uuid)


def primary_storage_holders_thd(db: Db, ps_uuid: str, host_uuids: list[str] | None,
                                exclude_type: str | None) -> list[dict]:
    """
    The reservations on a primary storage (on C{host_uuids} only, when given), except those
    of C{exclude_type}: C{[{holderType, holderUuid, size, hostUuid}]} ordered by holder.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    sql = ("SELECT holder_type, holder_uuid, size, host_uuid FROM"
           " primary_storage_capacity_holders WHERE primary_storage_uuid = ?")
    params: list[Any] = [ps_uuid]
    if host_uuids is not None:
        if not host_uuids:
            return []
        sql += f" AND host_uuid IN ({', '.join('?' for _ in host_uuids)})"
        params.extend(_uuid("host_uuid", h) for h in host_uuids)
    if exclude_type is not None:
        sql += " AND holder_type <> ?"
        params.append(exclude_type)
    rows = db.all(sql + " ORDER BY holder_type, holder_uuid", params)
    return [{"holderType": r[0], "holderUuid": r[1], "size": int(r[2]), "hostUuid": r[3]}
            for r in rows]


def _physical_sums(db: Db, ps_uuid: str, now: float) -> None:
    db.run("UPDATE primary_storages SET"
           " total_physical_capacity = (SELECT COALESCE(SUM(total_physical_capacity), 0)"
           " FROM local_storage_host_refs WHERE primary_storage_uuid = ?),"
           " available_physical_capacity = (SELECT COALESCE(SUM(available_physical_capacity),"
           " 0) FROM local_storage_host_refs WHERE primary_storage_uuid = ?),"
           " last_op_date = ? WHERE uuid = ?", (ps_uuid, ps_uuid, now, ps_uuid))


def set_local_storage_host_capacity_thd(db: Db, ps_uuid: str, host_uuid: str, total: int,
                                        available_physical: int, now: float) -> dict:
    """
    Record a host's local disk for a LocalStorage (its ref row, created if new, keeping what
    is reserved on the host) and move the storage's totals by the change (Note [local
    capacity]); in one transaction.

    @return: the host ref row.
    @raise OperationError: C{SYS.1003} no such storage; C{DB.1001} no such host; the
        store's check error when the new total is below what is held on the host.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    host_uuid = _uuid("host_uuid", host_uuid)
    total = _amount("total", total)
    available_physical = _amount("available_physical", available_physical)
    with db.transaction():
        _lock_storage(db, ps_uuid)
        old = db.one("SELECT total_capacity FROM local_storage_host_refs"
                     " WHERE primary_storage_uuid = ? AND host_uuid = ?", (ps_uuid, host_uuid))
        if old is None:
            held = db.one("SELECT COALESCE(SUM(size), 0) FROM primary_storage_capacity_holders"
                          " WHERE primary_storage_uuid = ? AND host_uuid = ?",
                          (ps_uuid, host_uuid))[0]
            insert_thd(db, "localStorageHostRef", {
                "uuid": uuidlib.uuid4().hex, "primaryStorageUuid": ps_uuid,
                "hostUuid": host_uuid, "totalCapacity": total,
                "availableCapacity": total - int(held), "totalPhysicalCapacity": total,
                "availablePhysicalCapacity": available_physical}, now)
            delta = total
        else:
            db.run("UPDATE local_storage_host_refs SET"
                   " available_capacity = ? - (total_capacity - available_capacity),"
                   " total_capacity = ?, total_physical_capacity = ?,"
                   " available_physical_capacity = ?, last_op_date = ?"
                   " WHERE primary_storage_uuid = ? AND host_uuid = ?",
                   (total, total, total, available_physical, now, ps_uuid, host_uuid))
            delta = total - int(old[0])
        db.run("UPDATE primary_storages SET total_capacity = total_capacity + ?,"
               " available_capacity = available_capacity + ?, last_op_date = ? WHERE uuid = ?",
               (delta, delta, now, ps_uuid))
        _physical_sums(db, ps_uuid, now)
        r = db.one(f"SELECT {_cols(_REF)} FROM local_storage_host_refs"
                   " WHERE primary_storage_uuid = ? AND host_uuid = ?", (ps_uuid, host_uuid))
        return _row(_REF, r)


def set_primary_storage_capacity_thd(db: Db, ps_uuid: str, total: int,
                                     available_physical: int, now: float) -> dict:
    """
    A shared (NFS) storage's capacity as its agent reported it: the new total keeping what
    is reserved, in one statement.

    @return: the storage row.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    total = _amount("total", total)
    available_physical = _amount("available_physical", available_physical)
    rows = db.all(
        "UPDATE primary_storages SET available_capacity = ? - (total_capacity -"
        " available_capacity), total_capacity = ?, total_physical_capacity = ?,"
        " available_physical_capacity = ?, last_op_date = ? WHERE uuid = ?"
        f" RETURNING {_cols(_PS)}", (total, total, total, available_physical, now, ps_uuid))
    if not rows:
        raise _not_found(_PS, ps_uuid)
    return _row(_PS, rows[0])


def _refuse_held(db: Db, ps_uuid: str, host_uuids: list[str] | None, what: str) -> None:
    blockers = primary_storage_holders_thd(db, ps_uuid, host_uuids, IMAGE_CACHE_HOLDER)
    if blockers:
        raise OperationError.of(
            SYS.OPERATION_ERROR,
            f"{what}: {len(blockers)} reservation(s) hold capacity on primary storage"
            f" {ps_uuid}: " + ", ".join(f"{b['holderType']} {b['holderUuid']}"
                                        for b in blockers[:10]),
            primary_storage_uuid=ps_uuid, holders=blockers)


def _forget_host_in_tx(db: Db, ps_uuid: str, host_uuid: str, now: float) -> list[dict]:
    """
    Inside a transaction holding the storage's lock: refuse while anything but an image cache
    holds capacity on the host, then drop the host's image caches (rows and capacity), its
    LocalStorage ref (the totals shrink by it) and its NFS host ref. The caches dropped.
    """
    _refuse_held(db, ps_uuid, [host_uuid], f"host {host_uuid} cannot be removed")
    freed = db.all("DELETE FROM primary_storage_capacity_holders WHERE"
                   " primary_storage_uuid = ? AND host_uuid = ? AND holder_type = ?"
                   " RETURNING size", (ps_uuid, host_uuid, IMAGE_CACHE_HOLDER))
    caches = [_row(_CACHE, r) for r in db.all(
        f"DELETE FROM image_caches WHERE primary_storage_uuid = ? AND host_uuid = ?"
        f" RETURNING {_cols(_CACHE)}", (ps_uuid, host_uuid))]
    ref = db.all("DELETE FROM local_storage_host_refs WHERE primary_storage_uuid = ?"
                 " AND host_uuid = ? RETURNING total_capacity, available_capacity",
                 (ps_uuid, host_uuid))
    if ref:
        # The ref's available figure left out what its caches held, and so did the
        # storage's: both shrink by the ref's figures (Note [local capacity]).
        db.run("UPDATE primary_storages SET total_capacity = total_capacity - ?,"
               " available_capacity = available_capacity - ?, last_op_date = ?"
               " WHERE uuid = ?", (int(ref[0][0]), int(ref[0][1]), now, ps_uuid))
        _physical_sums(db, ps_uuid, now)
    elif freed:
        db.run("UPDATE primary_storages SET available_capacity = available_capacity + ?,"
               " last_op_date = ? WHERE uuid = ?",
               (sum(int(r[0]) for r in freed), now, ps_uuid))
    db.run("DELETE FROM primary_storage_host_refs WHERE primary_storage_uuid = ?"
           " AND host_uuid = ?", (ps_uuid, host_uuid))
    return sorted(caches, key=lambda c: c["uuid"])


def forget_primary_storage_host_thd(db: Db, ps_uuid: str, host_uuid: str, now: float
                                    ) -> dict:
    """
    Forget a host of a primary storage, in one transaction: its image caches (their rows
    and the capacity they hold), its LocalStorage ref (the storage's totals shrink by it)
    and its NFS host ref. Refused (C{SYS.1006}, details C{holders}) while anything other
    than an image cache holds capacity on the host; then nothing changes.

    @return: C{{"primaryStorage": row, "imageCaches": [the cache rows dropped]}} (their
        bits are the caller's to delete on the host).
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    host_uuid = _uuid("host_uuid", host_uuid)
    with db.transaction():
        _lock_storage(db, ps_uuid)
        caches = _forget_host_in_tx(db, ps_uuid, host_uuid, now)
    return {"primaryStorage": _ps_row(db, ps_uuid), "imageCaches": caches}


def remove_local_storage_host_thd(db: Db, ps_uuid: str, host_uuid: str, now: float) -> dict:
    """
    L{forget_primary_storage_host_thd}, the storage row only.
    """
    return forget_primary_storage_host_thd(db, ps_uuid, host_uuid, now)["primaryStorage"]


def detach_primary_storage_thd(db: Db, ps_uuid: str, cluster_uuid: str, now: float) -> dict:
    """
    Detach a primary storage from a cluster in one transaction: the dependency check, the
    forgetting of every host of the cluster (L{forget_primary_storage_host_thd}) and the
    cluster ref's deletion, all or nothing. Refused (C{SYS.1006}, details C{holders}) while
    anything but an image cache holds capacity on the cluster's hosts (LocalStorage) or,
    when the cluster is the storage's last, on the storage (shared storage). C{SYS.1003}
    (resource C{primaryStorageClusterRef}) when it is not attached to the cluster.

    @return: C{{"primaryStorage": row, "hostUuids": [the cluster's hosts], "imageCaches":
        [the cache rows dropped]}}.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    cluster_uuid = _uuid("cluster_uuid", cluster_uuid)
    with db.transaction():
        _lock_storage(db, ps_uuid)
        refs = db.all("SELECT uuid, cluster_uuid FROM primary_storage_cluster_refs"
                      " WHERE primary_storage_uuid = ?", (ps_uuid,))
        ref = next((r[0] for r in refs if r[1] == cluster_uuid), None)
        if ref is None:
            raise _not_found(resource("primaryStorageClusterRef"), cluster_uuid)
        ps_type = db.one("SELECT type FROM primary_storages WHERE uuid = ?", (ps_uuid,))[0]
        hosts = sorted(r[0] for r in db.all("SELECT uuid FROM hosts WHERE cluster_uuid = ?",
                                            (cluster_uuid,)))
        what = f"primary storage {ps_uuid} cannot be detached from cluster {cluster_uuid}"
        if ps_type == "LocalStorage":
            _refuse_held(db, ps_uuid, hosts, what)
        elif len(refs) == 1:
            _refuse_held(db, ps_uuid, None, what + " (its last)")
        caches: list[dict] = []
        for h in hosts:
            caches.extend(_forget_host_in_tx(db, ps_uuid, h, now))
        db.run("DELETE FROM primary_storage_cluster_refs WHERE uuid = ?", (ref,))
    return {"primaryStorage": _ps_row(db, ps_uuid), "hostUuids": hosts, "imageCaches": caches}


def recompute_local_storage_thd(db: Db, ps_uuid: str, now: float) -> dict:
    """
    A LocalStorage's totals recomputed from its host refs and holders (after host refs went
    with their hosts): total = the sum of the refs' totals, available = total minus all
    that is held.

    @return: the storage row.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    with db.transaction():
        _lock_storage(db, ps_uuid)
        total = int(db.one("SELECT COALESCE(SUM(total_capacity), 0) FROM"
                           " local_storage_host_refs WHERE primary_storage_uuid = ?",
                           (ps_uuid,))[0])
        held = int(db.one("SELECT COALESCE(SUM(size), 0) FROM"
                          " primary_storage_capacity_holders WHERE primary_storage_uuid = ?",
                          (ps_uuid,))[0])
        db.run("UPDATE primary_storages SET total_capacity = ?, available_capacity = ?,"
               " last_op_date = ? WHERE uuid = ?", (total, total - held, now, ps_uuid))
        _physical_sums(db, ps_uuid, now)
    return _ps_row(db, ps_uuid)


def create_image_cache_thd(db: Db, values: dict, now: float) -> dict:
    """
    Insert an image cache row (C{Downloading}) and reserve its C{size} on the storage (and
    its host), holder (C{ImageCacheVO}, cache uuid), in one transaction: both or neither.

    @return: the cache row.
    @raise OperationError: C{DB.1000} a cache of this image is already there; C{DB.1004}
        short; as L{reserve_primary_storage_thd}.
    """
    values = _mapping("values", values)
    row: dict = {}
    try:
        with db.transaction():
            row = insert_thd(db, "imageCache", values, now)
            if _take_in_tx(db, row["primaryStorageUuid"], row["size"],
                           Holder(IMAGE_CACHE_HOLDER, row["uuid"]), row["hostUuid"],
                           now) is None:
                raise _Rollback()
            return row
    except _Rollback:
        raise _short(db, row["primaryStorageUuid"], row["size"], row["hostUuid"]) from None


def delete_image_cache_thd(db: Db, cache_uuid: str, now: float,
                           unreferenced_only: bool = False) -> bool:
    """
    Delete an image cache row (its volume refs go with it) and give back the capacity it
    holds, in one transaction. With C{unreferenced_only}, only while no volume references it
    (ZStack's C{ImageCacheVolumeRefVO}). Whether it was deleted.
    """
    cache_uuid = _uuid("uuid", cache_uuid)
    with db.transaction():
        r = db.one("SELECT primary_storage_uuid FROM image_caches WHERE uuid = ?",
                   (cache_uuid,))
        if r is None:
            return False
        _lock_storage(db, r[0])
        if unreferenced_only and db.one("SELECT 1 FROM image_cache_volume_refs"
                                        " WHERE image_cache_uuid = ?", (cache_uuid,)):
            return False
        _release_in_tx(db, r[0], Holder(IMAGE_CACHE_HOLDER, cache_uuid), now)
        db.run("DELETE FROM image_caches WHERE uuid = ?", (cache_uuid,))
        return True


def add_image_cache_volume_ref_thd(db: Db, cache_uuid: str, volume_uuid: str,
                                   now: float) -> bool:
    """
    Record that a volume is (being) created from an image cache (ZStack's
    C{ImageCacheVolumeRefVO}); idempotent. Whether this call recorded it.

    @raise OperationError: C{SYS.1003} (resource C{imageCache}) when the cache is gone.
    """
    cache_uuid = _uuid("image_cache_uuid", cache_uuid)
    volume_uuid = _uuid("volume_uuid", volume_uuid)
    try:
        with db.transaction():
            r = db.one("SELECT primary_storage_uuid FROM image_caches WHERE uuid = ?",
                       (cache_uuid,))
            if r is None:
                raise _not_found(_CACHE, cache_uuid)
            return bool(db.all(
                "INSERT INTO image_cache_volume_refs (uuid, image_cache_uuid, volume_uuid,"
                " primary_storage_uuid, create_date, last_op_date) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING RETURNING uuid",
                (uuidlib.uuid4().hex, cache_uuid, volume_uuid, r[0], now, now)))
    except OperationError:
        raise
    except Exception as e:
        err = db.dialect.map_error(e)
        if err is None or err.code != DB.REFERENCE:
            raise
        raise _not_found(_CACHE, cache_uuid) from None


def remove_image_cache_volume_refs_thd(db: Db, ps_uuid: str, volume_uuid: str,
                                       cache_uuid: str | None) -> list[dict]:
    """
    Forget a volume's refs to the image caches of a storage (of C{cache_uuid} only, when
    given): its bits are gone, or were never made. The caches that no volume references
    any more, for the caller to drop when their image is deleted.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    volume_uuid = _uuid("volume_uuid", volume_uuid)
    sql = ("DELETE FROM image_cache_volume_refs WHERE primary_storage_uuid = ?"
           " AND volume_uuid = ?")
    params: list[Any] = [ps_uuid, volume_uuid]
    if cache_uuid is not None:
        sql += " AND image_cache_uuid = ?"
        params.append(_uuid("image_cache_uuid", cache_uuid))
    with db.transaction():
        gone = sorted({r[0] for r in db.all(sql + " RETURNING image_cache_uuid", params)})
        out = []
        for c in gone:
            if db.one("SELECT 1 FROM image_cache_volume_refs WHERE image_cache_uuid = ?",
                      (c,)) is None:
                row = get_thd(db, "imageCache", c)
                if row is not None:
                    out.append(row)
        return out


def delete_primary_storage_thd(db: Db, ps_uuid: str) -> bool:
    """
    Delete a primary storage with its image caches, cache reservations and host refs, in
    one transaction. Refused (C{SYS.1006}) while it is attached to a cluster (details
    C{clusterUuids}) or anything but an image cache holds its capacity (C{holders}).
    Whether there was one.
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    with db.transaction():
        if db.one("SELECT 1 FROM primary_storages WHERE uuid = ?", (ps_uuid,)) is None:
            return False
        _lock_storage(db, ps_uuid)
        clusters = [r[0] for r in db.all(
            "SELECT cluster_uuid FROM primary_storage_cluster_refs WHERE"
            " primary_storage_uuid = ? ORDER BY cluster_uuid", (ps_uuid,))]
        if clusters:
            raise OperationError.of(
                SYS.OPERATION_ERROR,
                f"primary storage {ps_uuid} is attached to cluster(s) {', '.join(clusters)}",
                primary_storage_uuid=ps_uuid, clusterUuids=clusters)
        _refuse_held(db, ps_uuid, None, f"primary storage {ps_uuid} cannot be deleted")
        db.run("DELETE FROM primary_storage_capacity_holders WHERE primary_storage_uuid = ?",
               (ps_uuid,))
        db.run("DELETE FROM image_caches WHERE primary_storage_uuid = ?", (ps_uuid,))
        db.run("DELETE FROM local_storage_host_refs WHERE primary_storage_uuid = ?",
               (ps_uuid,))
        db.run("DELETE FROM primary_storage_host_refs WHERE primary_storage_uuid = ?",
               (ps_uuid,))
        return db.run("DELETE FROM primary_storages WHERE uuid = ?", (ps_uuid,)) > 0


class StorageComponent(StoreComponent):
    """
    Store operations of primary storage (see the module docstring), run on the store's one
    pool.
    """

    def reserve_primary_storage_capacity(self, primary_storage_uuid: str, size: int,
                                         holder: Any, host_uuid: str | None = None
                                         ) -> Deferred:
        return self._run(reserve_primary_storage_thd, primary_storage_uuid, size, holder,
                         self._now(), host_uuid)

    def release_primary_storage_capacity(self, primary_storage_uuid: str, holder: Any
                                         ) -> Deferred:
        return self._run(release_primary_storage_thd, primary_storage_uuid, holder,
                         self._now())

    def primary_storage_holders(self, primary_storage_uuid: str,
                                host_uuids: list[str] | None = None,
                                exclude_type: str | None = None) -> Deferred:
        return self._run(primary_storage_holders_thd, primary_storage_uuid,
                         None if host_uuids is None else list(host_uuids), exclude_type)

    def set_local_storage_host_capacity(self, primary_storage_uuid: str, host_uuid: str,
                                        total: int, available_physical: int) -> Deferred:
        return self._run(set_local_storage_host_capacity_thd, primary_storage_uuid, host_uuid,
                         total, available_physical, self._now())

    def set_primary_storage_capacity(self, primary_storage_uuid: str, total: int,
                                     available_physical: int) -> Deferred:
        return self._run(set_primary_storage_capacity_thd, primary_storage_uuid, total,
                         available_physical, self._now())

    def reserve_primary_storage_capacity_reporting(
            self, primary_storage_uuid: str, size: int, holder: Any,
            host_uuid: str | None = None) -> Deferred:
        """
        As L{reserve_primary_storage_capacity}; fires with C{(row, inserted)}.
        """
        return self._run(reserve_primary_storage_thd, primary_storage_uuid, size, holder,
                         self._now(), host_uuid, True)

    def remove_primary_storage_host(self, primary_storage_uuid: str, host_uuid: str
                                    ) -> Deferred:
        return self._run(forget_primary_storage_host_thd, primary_storage_uuid, host_uuid,
                         self._now())

    def detach_primary_storage(self, primary_storage_uuid: str, cluster_uuid: str
                               ) -> Deferred:
        return self._run(detach_primary_storage_thd, primary_storage_uuid, cluster_uuid,
                         self._now())

    def add_image_cache_volume_ref(self, cache_uuid: str, volume_uuid: str) -> Deferred:
        return self._run(add_image_cache_volume_ref_thd, cache_uuid, volume_uuid,
                         self._now())

    def remove_image_cache_volume_refs(self, primary_storage_uuid: str, volume_uuid: str,
                                       cache_uuid: str | None = None) -> Deferred:
        return self._run(remove_image_cache_volume_refs_thd, primary_storage_uuid,
                         volume_uuid, cache_uuid)

    def recompute_local_storage(self, primary_storage_uuid: str) -> Deferred:
        return self._run(recompute_local_storage_thd, primary_storage_uuid, self._now())

    def create_image_cache(self, values: dict) -> Deferred:
        return self._run(create_image_cache_thd, dict(values), self._now())

    def delete_image_cache(self, cache_uuid: str, unreferenced_only: bool = False
                           ) -> Deferred:
        return self._run(delete_image_cache_thd, cache_uuid, self._now(), unreferenced_only)

    def delete_primary_storage(self, primary_storage_uuid: str) -> Deferred:
        return self._run(delete_primary_storage_thd, primary_storage_uuid)
