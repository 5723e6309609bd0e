"""
Shared by the allocator tests (no test cases here): random inventories (hypothesis), their
rows in a store (the tables of migration 0004, filled directly: the services that fill them
are other issues' work), the same inventory as a pure L{Snapshot}, and random requests.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from zcontrol.scheduler.model import (
    AllocationRequest,
    HostView,
    PrimaryStorageView,
    Snapshot,
)
from zcontrol.scheduler.strategies import STRATEGIES

__all__ = ["Inventory", "inventories", "load_inventory", "requests", "snapshot_of"]

_HOST_STATES = ("Enabled", "Disabled", "PreMaintenance", "Maintenance")
_STATUSES = ("Connected", "Disconnected", "Connecting")
_PS_STATES = ("Enabled", "Disabled", "Maintenance")
GIB = 1024**3


@attrs.frozen
class Inventory:
    """
    Store rows by resource, in insertion order (C{(resource, values)} pairs).
    """

    rows: tuple[tuple[str, dict[str, Any]], ...]

    def of(self, resource: str) -> list[dict[str, Any]]:
        return [v for r, v in self.rows if r == resource]


def _uuid(prefix: str, i: int) -> str:
    # Hex-like, equal length: every collation sorts these the same.
    return f"{prefix}{i:04x}"


@st.composite
def inventories(draw: Any, max_hosts: int = 8) -> Inventory:
    """
    A random small cloud: zones, clusters, L2/L3 networks, primary storage (LocalStorage and
    NFS) attached to clusters, hosts with capacities, states and statuses, LocalStorage host
    refs and NFS mounts.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    # Half the inventories are healthy (every state Enabled, every status Connected, most
    # things attached): otherwise the chain of six filters almost never lets a host through.
    healthy = draw(st.booleans())

    def state(choices: Any, good: str = "Enabled") -> str:
        return good if healthy else draw(st.sampled_from(choices))

    def often() -> bool:
        # (hypothesis favours the bounds of a range: test a middle value)
        return healthy or draw(st.integers(0, 4)) != 2

    zones = [_uuid("a0", i) for i in range(draw(st.integers(1, 2)))]
    for z in zones:
        rows.append(("zone", {"uuid": z, "name": z,
                              "state": state(("Enabled", "Disabled"))}))
    clusters: dict[str, str] = {}
    for i in range(draw(st.integers(1, 3))):
        c = _uuid("c0", i)
        clusters[c] = draw(st.sampled_from(zones))
        rows.append(("cluster", {"uuid": c, "name": c, "zoneUuid": clusters[c],
                                 "hypervisorType": "KVM",
                                 "state": state(("Enabled", "Disabled"))}))
    l2s = [_uuid("b0", i) for i in range(draw(st.integers(1, 3)))]
    for i, l2 in enumerate(l2s):
        rows.append(("l2Network", {"uuid": l2, "name": l2, "zoneUuid": zones[0],
                                   "physicalInterface": f"eth{i}"}))
    for i in range(draw(st.integers(1, 3))):
        l3 = _uuid("d0", i)
        rows.append(("l3Network", {"uuid": l3, "name": l3, "l2NetworkUuid": draw(st.sampled_from(l2s)),
                                   "zoneUuid": zones[0]}))
    for c in clusters:
        for l2 in l2s:
            if often():
                rows.append(("l2NetworkClusterRef", {"uuid": f"r{c}{l2}", "l2NetworkUuid": l2,
                                                     "clusterUuid": c}))
    hosts: list[str] = []
    for i in range(draw(st.integers(0, max_hosts))):
        h = _uuid("e", draw(st.integers(0, 0xFFFF)))
        if h in hosts:
            continue
        hosts.append(h)
        c = draw(st.sampled_from(sorted(clusters)))
        total_cpu = draw(st.integers(2 if healthy else 0, 8))
        total_mem = draw(st.integers(2 if healthy else 0, 8)) * GIB
        low_cpu = total_cpu // 2 if healthy else 0
        low_mem = total_mem // GIB // 2 if healthy else 0
        rows.append(("host", {
            "uuid": h, "name": h, "zoneUuid": clusters[c], "clusterUuid": c,
            "managementIp": f"10.0.{i}.1", "hypervisorType": "KVM",
            "state": state(_HOST_STATES),
            "status": state(_STATUSES, "Connected"),
            "cpuNum": total_cpu, "totalCpuCapacity": total_cpu,
            "availableCpuCapacity": draw(st.integers(low_cpu, total_cpu)),
            "totalMemoryCapacity": total_mem,
            "availableMemoryCapacity": draw(st.integers(low_mem, total_mem // GIB)) * GIB}))
    for i in range(draw(st.integers(1 if healthy else 0, 4))):
        ps = _uuid("f0", i)
        ps_type = draw(st.sampled_from(("LocalStorage", "NFS")))
        total = draw(st.integers(50 if healthy else 0, 100)) * GIB
        rows.append(("primaryStorage", {
            "uuid": ps, "name": ps, "zoneUuid": zones[0], "url": f"/ps/{i}", "type": ps_type,
            "state": state(_PS_STATES),
            "status": state(_STATUSES, "Connected"),
            "totalCapacity": total,
            "availableCapacity": draw(st.integers(total // GIB // 2 if healthy else 0,
                                                  total // GIB)) * GIB}))
        for c in clusters:
            if often():
                rows.append(("primaryStorageClusterRef", {"uuid": f"p{ps}{c}",
                                                          "primaryStorageUuid": ps,
                                                          "clusterUuid": c}))
        for h in hosts:
            if not often():
                continue
            if ps_type == "LocalStorage":
                t = draw(st.integers(20 if healthy else 0, 40)) * GIB
                rows.append(("localStorageHostRef", {
                    "uuid": f"l{ps}{h}", "primaryStorageUuid": ps, "hostUuid": h,
                    "totalCapacity": t,
                    "availableCapacity": draw(st.integers(t // GIB // 2 if healthy else 0,
                                                          t // GIB)) * GIB}))
            else:
                rows.append(("primaryStorageHostRef", {
                    "uuid": f"m{ps}{h}", "primaryStorageUuid": ps, "hostUuid": h,
                    "status": state(("Connected", "Disconnected"), "Connected")}))
    return Inventory(tuple(rows))


@st.composite
def requests(draw: Any, inv: Inventory) -> AllocationRequest:
    """
    A random request over C{inv}: sizes around the inventory's, existing L3 networks, and
    sometimes a zone, cluster, host or primary storage narrowing and an avoid list.
    """
    def maybe(resource: str) -> str | None:
        uuids = [r["uuid"] for r in inv.of(resource)]
        if not uuids or draw(st.integers(0, 4)) != 2:
            return None
        return draw(st.sampled_from(uuids))

    hosts = [r["uuid"] for r in inv.of("host")]
    l3s = [r["uuid"] for r in inv.of("l3Network")]
    return AllocationRequest(
        cpu_num=draw(st.integers(1, 4)),
        memory_size=draw(st.integers(1, 4 * GIB)),
        disk_size=draw(st.integers(0, 30)) * GIB,
        l3_network_uuids=draw(st.lists(st.sampled_from(l3s), max_size=2, unique=True)),
        zone_uuid=maybe("zone"), cluster_uuid=maybe("cluster"), host_uuid=maybe("host"),
        avoid_host_uuids=draw(st.lists(st.sampled_from(hosts), max_size=2, unique=True))
        if hosts and draw(st.integers(0, 4)) == 2 else (),
        allocator_strategy=draw(st.sampled_from((None, *sorted(STRATEGIES)))),
        primary_storage_uuid=maybe("primaryStorage"),
    )


async def load_inventory(store: Any, inv: Inventory) -> None:
    """
    Insert C{inv}'s rows into C{store} (hosts through C{add_host}).
    """
    for resource, values in inv.rows:
        if resource == "host":
            await store.add_host(values)
        else:
            await store.insert(resource, values)


def snapshot_of(inv: Inventory, l3_uuids: Any = None) -> Snapshot:
    """
    The full snapshot of C{inv}, computed in Python (what the store's C{full_snapshot}
    must read).
    """
    zones = {z["uuid"]: z.get("state", "Enabled") for z in inv.of("zone")}
    clusters = {c["uuid"]: c.get("state", "Enabled") for c in inv.of("cluster")}
    hosts = [HostView(uuid=h["uuid"], zone_uuid=h["zoneUuid"], cluster_uuid=h["clusterUuid"],
                      state=h.get("state", "Enabled"), status=h.get("status", "Connecting"),
                      available_cpu=h["availableCpuCapacity"],
                      available_memory=h["availableMemoryCapacity"],
                      cluster_state=clusters[h["clusterUuid"]], zone_state=zones[h["zoneUuid"]])
             for h in inv.of("host")]
    cluster_l2: dict[str, set[str]] = {}
    for r in inv.of("l2NetworkClusterRef"):
        cluster_l2.setdefault(r["clusterUuid"], set()).add(r["l2NetworkUuid"])
    cluster_ps: dict[str, list[str]] = {}
    for r in inv.of("primaryStorageClusterRef"):
        cluster_ps.setdefault(r["clusterUuid"], []).append(r["primaryStorageUuid"])
    storages = {p["uuid"]: PrimaryStorageView(
        uuid=p["uuid"], type=p["type"], state=p.get("state", "Enabled"),
        status=p.get("status", "Connecting"), available_capacity=p["availableCapacity"])
        for p in inv.of("primaryStorage")}
    l3_l2 = {r["uuid"]: r["l2NetworkUuid"] for r in inv.of("l3Network")
             if l3_uuids is None or r["uuid"] in l3_uuids}
    return Snapshot(
        hosts=hosts, cluster_l2=cluster_l2, cluster_primary_storages=cluster_ps, l3_l2=l3_l2,
        primary_storages=storages,
        local_capacity={(r["primaryStorageUuid"], r["hostUuid"]): r["availableCapacity"]
                        for r in inv.of("localStorageHostRef")},
        mounted={(r["primaryStorageUuid"], r["hostUuid"]) for r in inv.of("primaryStorageHostRef")
                 if r.get("status", "Connected") == "Connected"})
