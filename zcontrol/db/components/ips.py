# -*- test-case-name: tests.test_db_contract -*-
"""
IP addresses of L3 networks: allocation (random or first free), free and release by holder.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.components.base import (
    Db,
    Holder,
    StoreComponent,
    _cols,
    _held_ip_refusal,
    _not_found,
    _row,
    _uuid,
)
from zcontrol.db.interfaces import DB
from zcontrol.db.query import (
    _short,
    check_text,
    ip_to_long,
    resource,
)

_USED_IP = resource("usedIp")

_RANGES = (
    "SELECT uuid, start_ip_in_long, end_ip_in_long, netmask, gateway FROM ip_ranges"
    " WHERE l3_network_uuid = ? ORDER BY start_ip_in_long, uuid"
)
_START_USED = "SELECT 1 FROM used_ips WHERE l3_network_uuid = ? AND ip_in_long = ?"
_GAPS = (
    "SELECT cand FROM (SELECT ip_in_long + 1 AS cand,"
    " LEAD(ip_in_long) OVER (ORDER BY ip_in_long) AS nxt"
    " FROM used_ips WHERE l3_network_uuid = ? AND ip_in_long >= ? AND ip_in_long <= ?) g"
    " WHERE (nxt IS NULL OR nxt > cand) AND cand <= ? ORDER BY cand LIMIT 64"
)


def _free_candidates_thd(db: Db, l3_uuid: str, ranges: list[tuple]) -> list[tuple]:
    out: list[tuple] = []
    for range_uuid, start, end, netmask, gateway in ranges:
        start, end = int(start), int(end)
        if db.one(_START_USED, (l3_uuid, start)) is None:
            out.append((range_uuid, start, netmask, gateway))
        for (cand,) in db.all(_GAPS, (l3_uuid, start, end, end)):
            out.append((range_uuid, int(cand), netmask, gateway))
        if len(out) >= 64:
            break
    return out


_INSERT_IP = (
    "INSERT INTO used_ips (uuid, ip_range_uuid, l3_network_uuid, ip, ip_in_long, netmask,"
    " gateway, create_date, last_op_date, holder_type, holder_uuid)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (l3_network_uuid, ip_in_long) DO NOTHING"
    f" RETURNING {_cols(_USED_IP)}"
)


def _insert_ip_thd(db: Db, uuid: str, range_uuid: str, l3_uuid: str, n: int, netmask: str,
                   gateway: str, now: float, holder: Holder) -> list[tuple]:
    return db.all(_INSERT_IP, (uuid, range_uuid, l3_uuid, _long_to_ip(n), int(n), netmask,
                               gateway, now, now, holder.type, holder.uuid))


def _ip_held_thd(db: Db, l3_uuid: str, holder: Holder) -> dict | None:
    r = db.one(f"SELECT {_cols(_USED_IP)} FROM used_ips WHERE l3_network_uuid = ?"
               " AND holder_type = ? AND holder_uuid = ?", (l3_uuid, holder.type, holder.uuid))
    return None if r is None else _row(_USED_IP, r)

_IP_ATTEMPTS = 200


def _long_to_ip(n: int) -> str:
    import ipaddress

    return str(ipaddress.IPv4Address(int(n)))


IP_STRATEGIES = ("random", "first")
_RANDOM_PROBES = 4


def allocate_ip_thd(
    db: Db, l3_uuid: str, holder: Any, ip: str | None, uuid: str | None, now: float,
    strategy: str = "random",
) -> dict:
    """
    C{holder}'s address in an L3 network: the one it already holds (a retry after a lost
    acknowledgement gets the same address; Note [holders]), else a newly taken one.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    holder = Holder.of(holder)
    if uuid is not None:
        uuid = _uuid("uuid", uuid)
    if ip is not None:
        check_text("ip", ip, 64)
    held = _ip_held_thd(db, l3_uuid, holder)
    if held is not None:
        if ip is not None and ip_to_long(ip) != held["ipInLong"]:
            raise OperationError.of(
                DB.DUPLICATE,
                f"{holder.type} {holder.uuid} already holds {held['ip']} in L3 network"
                f" {l3_uuid}, not {ip}: release it first",
                l3_network_uuid=l3_uuid, ip=held["ip"], holder_type=holder.type,
                holder_uuid=holder.uuid)
        return held
    try:
        return _allocate_ip_thd(db, l3_uuid, holder, ip, uuid, now, strategy)
    except Exception as e:
        # A concurrent call for the same holder won (the holder's unique key).
        err = db.dialect.map_error(e)
        if err is None or err.code != DB.DUPLICATE:
            raise
        held = _ip_held_thd(db, l3_uuid, holder)
        if held is None or (ip is not None and ip_to_long(ip) != held["ipInLong"]):
            raise
        return held


def _allocate_ip_thd(
    db: Db, l3_uuid: str, holder: Holder, ip: str | None, uuid: str | None, now: float,
    strategy: str = "random",
) -> dict:
    """
    Take a free address of an L3 network: each attempt is one C{INSERT ... ON CONFLICT DO
    NOTHING} on the (L3, address) unique key, so concurrent callers never share an address;
    a caller that loses a race tries another candidate.

    Strategies (ZStack's C{RandomIpAllocatorStrategy} and
    C{FirstAvailableIpAllocatorStrategy}): C{"first"} takes the lowest free address (a gap
    search whose cost grows with the addresses in use); C{"random"} probes a few random
    addresses of the ranges first (constant cost while the network is not nearly full) and
    falls back to the gap search, so a full network is still reported exactly.
    """
    import random
    import uuid as uuidlib

    if strategy not in IP_STRATEGIES:
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR, f"unknown IP allocator strategy {_short(strategy)}",
            field="strategy")

    uuid = uuid or uuidlib.uuid4().hex
    if ip is not None:
        n = ip_to_long(ip)
        rng = db.one(
            "SELECT uuid, netmask, gateway FROM ip_ranges WHERE l3_network_uuid = ?"
            " AND start_ip_in_long <= ? AND end_ip_in_long >= ? ORDER BY uuid LIMIT 1",
            (l3_uuid, n, n),
        )
        if rng is None:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"{ip} is in no IP range of L3 network {l3_uuid}",
                field="ip",
                l3_network_uuid=l3_uuid,
                ip=ip,
            )
        rows = _insert_ip_thd(db, uuid, rng[0], l3_uuid, n, rng[1], rng[2], now, holder)
        if not rows:
            raise OperationError.of(
                DB.DUPLICATE, f"{ip} is already allocated in L3 network {l3_uuid}",
                l3_network_uuid=l3_uuid, ip=ip,
            )
        return _row(_USED_IP, rows[0])
    ranges = db.all(_RANGES, (l3_uuid,))
    if strategy == "random":
        size = sum(int(r[2]) - int(r[1]) + 1 for r in ranges)
        for _ in range(_RANDOM_PROBES if size else 0):
            k = random.randrange(size)
            for rng in ranges:
                width = int(rng[2]) - int(rng[1]) + 1
                if k < width:
                    break
                k -= width
            n = int(rng[1]) + k
            rows = _insert_ip_thd(db, uuid, rng[0], l3_uuid, n, rng[3], rng[4], now, holder)
            if rows:
                return _row(_USED_IP, rows[0])
    # One optimistic round; after a lost race, take the network's row lock so that the
    # allocators of one network stop racing for the same lowest address (with 100 callers
    # on one network an unlucky one lost 200 races in a row).
    found = _take_first_free_thd(db, l3_uuid, ranges, uuid, now, holder, rounds=1)
    if found is not None:
        return found
    with db.transaction():
        db.dialect.lock_row(db, "l3_networks", l3_uuid)
        found = _take_first_free_thd(db, l3_uuid, ranges, uuid, now, holder, rounds=_IP_ATTEMPTS)
    if found is not None:
        return found
    raise OperationError.of(
        DB.CONTENTION,
        f"gave up allocating an IP in L3 network {l3_uuid} after {_IP_ATTEMPTS} lost races",
        l3_network_uuid=l3_uuid,
    )


def _take_first_free_thd(db: Db, l3_uuid: str, ranges: list[tuple], uuid: str, now: float,
                         holder: Holder, rounds: int) -> dict | None:
    """
    Up to C{rounds} times: find the lowest free addresses and insert the first one nobody
    took meanwhile. None when every round lost its races.

    @raise OperationError: DB.1005 when the network is full, SYS.1003 when it does not exist.
    """
    for _ in range(rounds):
        candidates = _free_candidates_thd(db, l3_uuid, ranges)
        if not candidates:
            if db.one("SELECT uuid FROM l3_networks WHERE uuid = ?", (l3_uuid,)) is None:
                raise _not_found(resource("l3Network"), l3_uuid)
            raise OperationError.of(
                DB.NO_FREE_IP, f"no free IP left in L3 network {l3_uuid}", l3_network_uuid=l3_uuid
            )
        for range_uuid, n, netmask, gateway in candidates:
            rows = _insert_ip_thd(db, uuid, range_uuid, l3_uuid, n, netmask, gateway, now,
                                  holder)
            if rows:
                return _row(_USED_IP, rows[0])
    return None


def free_ip_thd(db: Db, used_ip_uuid: str) -> bool:
    """
    Give back an address that has no holder (a row of schema version 1), in one DELETE:
    whether there was one (freeing twice is a no-op). A held address is refused with
    C{SYS.1006}: only its holder releases it (L{release_ip_thd}), so that a retried or late
    release by uuid cannot free an address its holder still uses (Note [holders]).
    """
    used_ip_uuid = _uuid("used_ip_uuid", used_ip_uuid)
    if db.run("DELETE FROM used_ips WHERE uuid = ? AND holder_uuid IS NULL",
              (used_ip_uuid,)) > 0:
        return True
    refusal = _held_ip_refusal(db, used_ip_uuid, "free_ip")
    if refusal is not None:
        raise refusal
    return False


def release_ip_thd(db: Db, l3_uuid: str, holder: Any) -> dict | None:
    """
    Give back the address C{holder} holds in an L3 network (one DELETE): the freed usedIp
    row, or None when it held none.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    holder = Holder.of(holder)
    rows = db.all(f"DELETE FROM used_ips WHERE l3_network_uuid = ? AND holder_type = ?"
                  f" AND holder_uuid = ? RETURNING {_cols(_USED_IP)}",
                  (l3_uuid, holder.type, holder.uuid))
    return _row(_USED_IP, rows[0]) if rows else None


class IpsComponent(StoreComponent):
    """
    Used IPs of L3 networks (see L{IStore}).
    """

    def allocate_ip(self, l3_network_uuid: str, holder: Any, ip: str | None = None,
                    uuid: str | None = None, strategy: str = "random") -> Deferred:
        return self._run(allocate_ip_thd, l3_network_uuid, holder, ip, uuid, self._now(),
                         strategy)

    def free_ip(self, used_ip_uuid: str) -> Deferred:
        return self._run(free_ip_thd, used_ip_uuid)

    def release_ip(self, l3_network_uuid: str, holder: Any) -> Deferred:
        return self._run(release_ip_thd, l3_network_uuid, holder)
