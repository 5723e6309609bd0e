# -*- test-case-name: tests.test_l3_network -*-
"""
The store component of L2 and L3 networks, IP ranges, DNS servers and network service refs
(the L2 and L3 network services, L{zcontrol.services.network}).

The operations whose checks and writes must be atomic run as one transaction here; the
services serialise their own operations per network (chain tasks), and these transactions
make the same checks hold across management nodes:
 - range changes take the L2 network's lock (C{lock_row("l2_networks", ...)}; SQLite's
   write transactions exclude each other anyway) before reading the ranges of every L3 of
   that L2, so two concurrent adds never both pass the overlap check;
 - an L2 attach takes the cluster's lock, so two L2s on one interface and vlan never both
   attach to one cluster;
 - deletes check their dependents inside the transaction, and the foreign keys (no cascade
   from used_ips to ip_ranges, from l3_networks to l2_networks, from vm_nics to
   l3_networks) refuse what a concurrent writer added after the check.

Checks that need the service's rules are passed in as pure functions (C{check}), so this
module does not depend on the services. Results that are refusals come back as values
(C{{"dependents": [...]}}) for the service to turn into its own error codes.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred

from zcontrol.db.components.base import Db, StoreComponent, _cols, _not_found, _row, _uuid
from zcontrol.db.query import resource

__all__ = ["NetworksComponent"]

_L2 = resource("l2Network")
_L3 = resource("l3Network")
_RANGE = resource("ipRange")
_DNS = resource("l3NetworkDns")
_REF = resource("networkServiceL3NetworkRef")
_CLUSTER_REF = resource("l2NetworkClusterRef")
_USED_IP = resource("usedIp")

# Long IN lists are split so that no statement exceeds the backends' parameter limits.
_CHUNK = 500


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" for _ in items)


def _new_uuid() -> str:
    return uuidlib.uuid4().hex


def _insert(db: Db, res: Any, values: dict[str, Any]) -> dict[str, Any]:
    row = res.to_row(values)
    sql = (f"INSERT INTO {res.table} ({', '.join(row)}) VALUES ({_marks(row)})"
           f" RETURNING {_cols(res)}")
    return _row(res, db.all(sql, tuple(row.values()))[0])


# L2 ----------------------------------------------------------------------------------------


def attach_l2_to_cluster_thd(db: Db, l2_uuid: str, cluster_uuid: str, now: float
                             ) -> dict[str, Any]:
    """
    Attach an L2 network to a cluster unless the cluster already has one on the same
    physical interface with the same vlan (NoVlan: any other NoVlan one on it).

    @return: C{{"ref": row}} (the new ref), C{{"attached": row}} (already attached: the
        existing ref), C{{"conflicts": [l2 uuids]}}, or C{{"missing": "l2Network"}} /
        C{{"missing": "cluster"}} when the L2 network or the cluster is gone (deleted
        since the caller looked; a cluster deleted after this check fails the ref's
        foreign key, C{DB.1001}).
    """
    l2_uuid = _uuid("l2_network_uuid", l2_uuid)
    cluster_uuid = _uuid("cluster_uuid", cluster_uuid)
    with db.transaction():
        db.dialect.lock_row(db, "clusters", cluster_uuid)
        l2 = db.one("SELECT physical_interface, vlan FROM l2_networks WHERE uuid = ?",
                    (l2_uuid,))
        if l2 is None:
            return {"missing": "l2Network"}
        if db.one("SELECT 1 FROM clusters WHERE uuid = ?", (cluster_uuid,)) is None:
            return {"missing": "cluster"}
        ref = db.one(f"SELECT {_cols(_CLUSTER_REF)} FROM l2_network_cluster_refs"
                     " WHERE l2_network_uuid = ? AND cluster_uuid = ?", (l2_uuid, cluster_uuid))
        if ref is not None:
            return {"attached": _row(_CLUSTER_REF, ref)}
        iface, vlan = l2
        same_vlan = "n.vlan IS NULL" if vlan is None else "n.vlan = ?"
        params: tuple = (cluster_uuid, iface, l2_uuid) + (() if vlan is None else (vlan,))
        conflicts = [u for (u,) in db.all(
            "SELECT n.uuid FROM l2_networks n JOIN l2_network_cluster_refs r"
            " ON r.l2_network_uuid = n.uuid WHERE r.cluster_uuid = ?"
            f" AND n.physical_interface = ? AND n.uuid <> ? AND {same_vlan} ORDER BY n.uuid",
            params)]
        if conflicts:
            return {"conflicts": conflicts}
        return {"ref": _insert(db, _CLUSTER_REF, {
            "uuid": _new_uuid(), "l2NetworkUuid": l2_uuid, "clusterUuid": cluster_uuid,
            "createDate": now, "lastOpDate": now})}


def detach_l2_from_cluster_thd(db: Db, l2_uuid: str, cluster_uuid: str) -> dict[str, Any]:
    """
    Detach an L2 network from a cluster unless VMs of the cluster have NICs on its L3
    networks.

    @return: C{{"vms": [vm uuids]}} (refused) or C{{"detached": bool}}.
    """
    l2_uuid = _uuid("l2_network_uuid", l2_uuid)
    cluster_uuid = _uuid("cluster_uuid", cluster_uuid)
    with db.transaction():
        db.dialect.lock_row(db, "clusters", cluster_uuid)
        vms = [u for (u,) in db.all(
            "SELECT DISTINCT vm.uuid FROM vm_nics n"
            " JOIN vm_instances vm ON vm.uuid = n.vm_instance_uuid"
            " JOIN l3_networks l3 ON l3.uuid = n.l3_network_uuid"
            " WHERE l3.l2_network_uuid = ? AND vm.cluster_uuid = ? ORDER BY vm.uuid",
            (l2_uuid, cluster_uuid))]
        if vms:
            return {"vms": vms}
        n = db.run("DELETE FROM l2_network_cluster_refs WHERE l2_network_uuid = ?"
                   " AND cluster_uuid = ?", (l2_uuid, cluster_uuid))
        return {"detached": n > 0}


def delete_l2_thd(db: Db, l2_uuid: str) -> dict[str, Any]:
    """
    Delete an L2 network and its cluster refs unless it has L3 networks.

    @return: C{{"l3s": [l3 uuids]}} (refused) or C{{"deleted": bool}}.
    """
    l2_uuid = _uuid("uuid", l2_uuid)
    with db.transaction():
        db.dialect.lock_row(db, "l2_networks", l2_uuid)
        l3s = [u for (u,) in db.all(
            "SELECT uuid FROM l3_networks WHERE l2_network_uuid = ? ORDER BY uuid", (l2_uuid,))]
        if l3s:
            return {"l3s": l3s}
        db.run("DELETE FROM l2_network_cluster_refs WHERE l2_network_uuid = ?", (l2_uuid,))
        return {"deleted": db.run("DELETE FROM l2_networks WHERE uuid = ?", (l2_uuid,)) > 0}


def l2_cluster_uuids_thd(db: Db, l2_uuids: Sequence[str]) -> dict[str, list[str]]:
    """
    The clusters each L2 network is attached to (by L2 uuid; ordered by cluster uuid).
    """
    out: dict[str, list[str]] = {u: [] for u in l2_uuids}
    for chunk in _chunks(list(l2_uuids)):
        for l2, cluster in db.all(
                "SELECT l2_network_uuid, cluster_uuid FROM l2_network_cluster_refs"
                f" WHERE l2_network_uuid IN ({_marks(chunk)})"
                " ORDER BY l2_network_uuid, cluster_uuid", tuple(chunk)):
            out.setdefault(l2, []).append(cluster)
    return out


# L3 ----------------------------------------------------------------------------------------


def _dependents_thd(db: Db, where: str, params: tuple) -> dict[str, Any]:
    """
    The holders of the used IPs matching C{where} (and their NICs' VMs).
    """
    holders = [{"holderType": t, "holderUuid": u, "ip": ip} for t, u, ip in db.all(
        f"SELECT holder_type, holder_uuid, ip FROM used_ips WHERE {where}"
        " ORDER BY ip_in_long", params)]
    return {"holders": holders}


def delete_l3_thd(db: Db, l3_uuid: str) -> dict[str, Any]:
    """
    Delete an L3 network with its ranges, DNS servers and network service refs, unless VM
    NICs are on it or any of its addresses is held.

    @return: C{{"vms": [...], "holders": [...]}} (refused; holders are C{{holderType,
        holderUuid, ip}}) or C{{"deleted": bool}}.
    """
    l3_uuid = _uuid("uuid", l3_uuid)
    with db.transaction():
        r = db.one("SELECT l2_network_uuid FROM l3_networks WHERE uuid = ?", (l3_uuid,))
        if r is None:
            return {"deleted": False}
        db.dialect.lock_row(db, "l2_networks", r[0])
        db.dialect.lock_row(db, "l3_networks", l3_uuid)
        vms = [u for (u,) in db.all(
            "SELECT DISTINCT vm_instance_uuid FROM vm_nics WHERE l3_network_uuid = ?"
            " ORDER BY vm_instance_uuid", (l3_uuid,))]
        deps = _dependents_thd(db, "l3_network_uuid = ?", (l3_uuid,))
        if vms or deps["holders"]:
            return {"vms": vms, **deps}
        for table in ("ip_ranges", "l3_network_dns", "network_service_l3_refs"):
            db.run(f"DELETE FROM {table} WHERE l3_network_uuid = ?", (l3_uuid,))
        return {"deleted": db.run("DELETE FROM l3_networks WHERE uuid = ?", (l3_uuid,)) > 0}


def _must_l3_thd(db: Db, l3_uuid: str) -> None:
    if db.one("SELECT 1 FROM l3_networks WHERE uuid = ?", (l3_uuid,)) is None:
        raise _not_found(_L3, l3_uuid)


def add_ip_ranges_thd(db: Db, l3_uuid: str, ranges: list[dict[str, Any]],
                      check: Callable[[list[dict[str, Any]]], None], now: float
                      ) -> list[dict[str, Any]] | None:
    """
    Insert ranges into an L3 network after C{check(existing)} accepted them, where
    C{existing} are the ipRange rows of every L3 network of the same L2 network, read under
    the L2's lock (so concurrent adds on any node see each other).

    @param ranges: ipRange values without C{l3NetworkUuid} and dates (a C{uuid} each).
    @param check: raises to refuse (the service's rules,
        L{zcontrol.services.network.ranges.check_new_ranges}).
    @return: the inserted rows in order, or None when the L3 network does not exist.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    with db.transaction():
        r = db.one("SELECT l2_network_uuid FROM l3_networks WHERE uuid = ?", (l3_uuid,))
        if r is None:
            return None
        db.dialect.lock_row(db, "l2_networks", r[0])
        # Again under the L2's lock, which delete_l3_thd takes too: deleted meanwhile?
        if db.one("SELECT 1 FROM l3_networks WHERE uuid = ?", (l3_uuid,)) is None:
            return None
        existing = [_row(_RANGE, row) for row in db.all(
            f"SELECT {', '.join('i.' + f.column for f in _RANGE.fields.values())}"
            " FROM ip_ranges i JOIN l3_networks l3 ON l3.uuid = i.l3_network_uuid"
            " WHERE l3.l2_network_uuid = ? ORDER BY i.start_ip_in_long", (r[0],))]
        check(existing)
        return [_insert(db, _RANGE, {**values, "l3NetworkUuid": l3_uuid, "createDate": now,
                                     "lastOpDate": now}) for values in ranges]


def delete_ip_range_thd(db: Db, range_uuid: str) -> dict[str, Any]:
    """
    Delete an IP range unless addresses in it are held.

    @return: C{{"holders": [...]}} (refused) or C{{"deleted": bool}}.
    """
    range_uuid = _uuid("uuid", range_uuid)
    with db.transaction():
        r = db.one("SELECT l2_network_uuid FROM l3_networks l3 JOIN ip_ranges i"
                   " ON i.l3_network_uuid = l3.uuid WHERE i.uuid = ?", (range_uuid,))
        if r is None:
            return {"deleted": False}
        db.dialect.lock_row(db, "l2_networks", r[0])
        deps = _dependents_thd(db, "ip_range_uuid = ?", (range_uuid,))
        if deps["holders"]:
            return deps
        return {"deleted": db.run("DELETE FROM ip_ranges WHERE uuid = ?", (range_uuid,)) > 0}


def add_dns_thd(db: Db, l3_uuid: str, dns: str, now: float) -> dict[str, Any] | None:
    """
    Append a DNS server to an L3 network (position after the others).

    @return: the new row, or None when the L3 already has it; C{SYS.1003} when the L3
        network is gone (checked under its lock, which delete_l3_thd takes too).
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    with db.transaction():
        db.dialect.lock_row(db, "l3_networks", l3_uuid)
        _must_l3_thd(db, l3_uuid)
        if db.one("SELECT 1 FROM l3_network_dns WHERE l3_network_uuid = ? AND dns = ?",
                  (l3_uuid, dns)) is not None:
            return None
        pos = db.one("SELECT MAX(position) FROM l3_network_dns WHERE l3_network_uuid = ?",
                     (l3_uuid,))[0]
        return _insert(db, _DNS, {"uuid": _new_uuid(), "l3NetworkUuid": l3_uuid, "dns": dns,
                                  "position": 0 if pos is None else int(pos) + 1,
                                  "createDate": now, "lastOpDate": now})


def remove_dns_thd(db: Db, l3_uuid: str, dns: str) -> bool:
    """
    Remove a DNS server: whether it was there.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    return db.run("DELETE FROM l3_network_dns WHERE l3_network_uuid = ? AND dns = ?",
                  (l3_uuid, dns)) > 0


def attach_network_services_thd(db: Db, l3_uuid: str, refs: list[tuple[str, str]],
                                now: float) -> dict[str, Any]:
    """
    Attach C{(provider uuid, service type)} refs to an L3 network, all or none: a type the
    same provider already gives is kept.

    @return: C{{"conflicts": [{networkServiceType, networkServiceProviderUuid}]}} (a type
        another provider gives; nothing attached) or C{{"added": [rows]}}; C{SYS.1003}
        when the L3 network is gone (checked under its lock).
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    with db.transaction():
        db.dialect.lock_row(db, "l3_networks", l3_uuid)
        _must_l3_thd(db, l3_uuid)
        have = dict(db.all("SELECT network_service_type, network_service_provider_uuid"
                           " FROM network_service_l3_refs WHERE l3_network_uuid = ?",
                           (l3_uuid,)))
        conflicts = [{"networkServiceType": t, "networkServiceProviderUuid": have[t]}
                     for p, t in refs if t in have and have[t] != p]
        if conflicts:
            return {"conflicts": conflicts}
        added = []
        for p, t in refs:
            if t in have:
                continue
            have[t] = p
            added.append(_insert(db, _REF, {
                "uuid": _new_uuid(), "l3NetworkUuid": l3_uuid,
                "networkServiceProviderUuid": p, "networkServiceType": t,
                "createDate": now, "lastOpDate": now}))
        return {"added": added}


def detach_network_services_thd(db: Db, l3_uuid: str, refs: list[tuple[str, str]]) -> int:
    """
    Detach C{(provider uuid, service type)} refs: how many there were.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    n = 0
    with db.transaction():
        for p, t in refs:
            n += db.run("DELETE FROM network_service_l3_refs WHERE l3_network_uuid = ?"
                        " AND network_service_provider_uuid = ? AND network_service_type = ?",
                        (l3_uuid, p, t))
    return n


def l3_extras_thd(db: Db, l3_uuids: Sequence[str]) -> dict[str, dict[str, list]]:
    """
    The ranges (rows, by start address), DNS servers (by position) and network service
    refs of each L3 network: C{{uuid: {"ipRanges": [...], "dns": [...],
    "networkServices": [...]}}}.
    """
    out: dict[str, dict[str, list]] = {
        u: {"ipRanges": [], "dns": [], "networkServices": []} for u in l3_uuids}
    with db.transaction(write=False):
        for chunk in _chunks(list(l3_uuids)):
            params = tuple(chunk)
            for row in db.all(f"SELECT {_cols(_RANGE)} FROM ip_ranges WHERE l3_network_uuid"
                              f" IN ({_marks(chunk)}) ORDER BY start_ip_in_long, uuid", params):
                r = _row(_RANGE, row)
                out[r["l3NetworkUuid"]]["ipRanges"].append(r)
            for l3, dns in db.all("SELECT l3_network_uuid, dns FROM l3_network_dns WHERE"
                                  f" l3_network_uuid IN ({_marks(chunk)})"
                                  " ORDER BY position, dns", params):
                out[l3]["dns"].append(dns)
            for l3, p, t in db.all(
                    "SELECT l3_network_uuid, network_service_provider_uuid,"
                    " network_service_type FROM network_service_l3_refs WHERE"
                    f" l3_network_uuid IN ({_marks(chunk)})"
                    " ORDER BY network_service_type, network_service_provider_uuid", params):
                out[l3]["networkServices"].append({
                    "l3NetworkUuid": l3, "networkServiceProviderUuid": p,
                    "networkServiceType": t})
    return out


# Addresses ---------------------------------------------------------------------------------


#: How many used addresses L{free_ips_thd} reads per statement.
_FREE_IP_BATCH = 256


def free_ips_thd(db: Db, ranges: list[tuple], start: int | None, limit: int) -> list[dict]:
    """
    Up to C{limit} free addresses of C{ranges} (C{(uuid, l3 uuid, start, end, netmask,
    gateway)}, in address order), at or above C{start} when given, lowest first. Reads the
    used addresses in batches, so the cost grows with the addresses skipped, not with the
    ranges' size.
    """
    import ipaddress

    out: list[dict] = []
    for range_uuid, l3_uuid, lo, hi, netmask, gateway in ranges:
        cursor = max(int(lo), start) if start is not None else int(lo)
        hi = int(hi)
        while cursor <= hi and len(out) < limit:
            used = [int(n) for (n,) in db.all(
                "SELECT ip_in_long FROM used_ips WHERE l3_network_uuid = ? AND ip_in_long >= ?"
                " AND ip_in_long <= ? ORDER BY ip_in_long LIMIT ?",
                (l3_uuid, cursor, hi, _FREE_IP_BATCH))]
            # A full batch may be followed by more used addresses: the gaps up to its last
            # one are free, what lies after it is for the next batch. Only a short batch
            # is the last one, its end the range's.
            full = len(used) == _FREE_IP_BATCH
            for n in used if full else [*used, hi + 1]:
                while cursor < n and len(out) < limit:
                    out.append({"ipRangeUuid": range_uuid,
                                "ip": str(ipaddress.IPv4Address(cursor)),
                                "netmask": netmask, "gateway": gateway})
                    cursor += 1
                if len(out) >= limit:
                    break
                cursor = max(cursor, n + 1)
            if not full:
                break
    return out


def ip_capacity_thd(db: Db, range_uuids: Sequence[str], l3_uuids: Sequence[str],
                    zone_uuids: Sequence[str], everything: bool) -> tuple[int, int]:
    """
    (total addresses, used addresses) of the ranges named, of the ranges of the L3
    networks named and of the L3 networks of the zones named (a range counted once), or of
    every range when C{everything}.
    """
    terms: list[str] = []
    params: list[Any] = []
    for column, uuids in (("i.uuid", range_uuids), ("i.l3_network_uuid", l3_uuids),
                          ("l3.zone_uuid", zone_uuids)):
        for chunk in _chunks(list(uuids)):
            terms.append(f"{column} IN ({_marks(chunk)})")
            params.extend(chunk)
    if everything:
        terms, params = ["1 = 1"], []
    if not terms:
        return 0, 0
    where = " OR ".join(terms)
    with db.transaction(write=False):
        total = db.one("SELECT COALESCE(SUM(i.end_ip_in_long - i.start_ip_in_long + 1), 0)"
                       " FROM ip_ranges i JOIN l3_networks l3 ON l3.uuid = i.l3_network_uuid"
                       f" WHERE {where}", tuple(params))[0]
        used = db.one("SELECT COUNT(*) FROM used_ips u JOIN ip_ranges i"
                      " ON i.uuid = u.ip_range_uuid JOIN l3_networks l3"
                      f" ON l3.uuid = i.l3_network_uuid WHERE {where}", tuple(params))[0]
    return int(total), int(used)


def ranges_of_thd(db: Db, l3_uuid: str | None, range_uuid: str | None) -> list[tuple]:
    """
    C{(uuid, l3 uuid, start, end, netmask, gateway)} of an L3 network's ranges (or of one
    range), in address order.
    """
    if range_uuid is not None:
        return db.all("SELECT uuid, l3_network_uuid, start_ip_in_long, end_ip_in_long,"
                      " netmask, gateway FROM ip_ranges WHERE uuid = ?", (range_uuid,))
    return db.all("SELECT uuid, l3_network_uuid, start_ip_in_long, end_ip_in_long, netmask,"
                  " gateway FROM ip_ranges WHERE l3_network_uuid = ?"
                  " ORDER BY start_ip_in_long, uuid", (l3_uuid,))


def ip_use_thd(db: Db, l3_uuid: str, n: int) -> tuple[dict | None, dict | None]:
    """
    (the ipRange row containing address C{n} of an L3 network or None, the usedIp row of
    C{n} or None).
    """
    with db.transaction(write=False):
        rng = db.one(f"SELECT {_cols(_RANGE)} FROM ip_ranges WHERE l3_network_uuid = ?"
                     " AND start_ip_in_long <= ? AND end_ip_in_long >= ? LIMIT 1",
                     (l3_uuid, n, n))
        used = db.one(f"SELECT {_cols(_USED_IP)} FROM used_ips WHERE l3_network_uuid = ?"
                      " AND ip_in_long = ?", (l3_uuid, n))
    return (None if rng is None else _row(_RANGE, rng),
            None if used is None else _row(_USED_IP, used))


class NetworksComponent(StoreComponent):
    """
    Store operations of L2 and L3 networks, IP ranges, DNS servers and network service refs,
    run on the store's one pool (see the C{*_thd} functions for what each fires with).
    """

    def attach_l2_to_cluster(self, l2_uuid: str, cluster_uuid: str) -> Deferred:
        return self._run(attach_l2_to_cluster_thd, l2_uuid, cluster_uuid, self._now())

    def detach_l2_from_cluster(self, l2_uuid: str, cluster_uuid: str) -> Deferred:
        return self._run(detach_l2_from_cluster_thd, l2_uuid, cluster_uuid)

    def delete_l2_network(self, l2_uuid: str) -> Deferred:
        return self._run(delete_l2_thd, l2_uuid)

    def l2_cluster_uuids(self, l2_uuids: Sequence[str]) -> Deferred:
        return self._run(l2_cluster_uuids_thd, list(l2_uuids))

    def delete_l3_network(self, l3_uuid: str) -> Deferred:
        return self._run(delete_l3_thd, l3_uuid)

    def add_ip_ranges(self, l3_uuid: str, ranges: list[dict[str, Any]],
                      check: Callable[[list[dict[str, Any]]], None]) -> Deferred:
        return self._run(add_ip_ranges_thd, l3_uuid, [dict(r) for r in ranges], check,
                         self._now())

    def delete_ip_range(self, range_uuid: str) -> Deferred:
        return self._run(delete_ip_range_thd, range_uuid)

    def add_dns(self, l3_uuid: str, dns: str) -> Deferred:
        return self._run(add_dns_thd, l3_uuid, dns, self._now())

    def remove_dns(self, l3_uuid: str, dns: str) -> Deferred:
        return self._run(remove_dns_thd, l3_uuid, dns)

    def attach_network_services(self, l3_uuid: str, refs: list[tuple[str, str]]) -> Deferred:
        return self._run(attach_network_services_thd, l3_uuid, list(refs), self._now())

    def detach_network_services(self, l3_uuid: str, refs: list[tuple[str, str]]) -> Deferred:
        return self._run(detach_network_services_thd, l3_uuid, list(refs))

    def l3_extras(self, l3_uuids: Sequence[str]) -> Deferred:
        return self._run(l3_extras_thd, list(l3_uuids))

    def free_ips(self, ranges: list[tuple], start: int | None, limit: int) -> Deferred:
        return self._run(free_ips_thd, list(ranges), start, limit)

    def ip_capacity(self, range_uuids: Sequence[str] = (), l3_uuids: Sequence[str] = (),
                    zone_uuids: Sequence[str] = (), everything: bool = False) -> Deferred:
        return self._run(ip_capacity_thd, list(range_uuids), list(l3_uuids),
                         list(zone_uuids), everything)

    def ip_ranges_of(self, l3_uuid: str | None, range_uuid: str | None = None) -> Deferred:
        return self._run(ranges_of_thd, l3_uuid, range_uuid)

    def ip_use(self, l3_uuid: str, n: int) -> Deferred:
        return self._run(ip_use_thd, l3_uuid, n)
