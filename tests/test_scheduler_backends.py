"""
The allocator on the real backends (SQLite file, PostgreSQL; the in-memory store too):
many concurrent allocations from two stores on one database (two management nodes) against
few hosts never reserve beyond capacity and leave no drift; the pre-filter's SQL agrees with
the pure filters on a random inventory on each backend's SQL.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.db_support import MemoryStoreFactory, PostgresStoreFactory, SQLiteStoreFactory
from tests.test_scheduler_fixtures import Inventory, load_inventory, snapshot_of
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import OperationError
from zcontrol.db import open_store
from zcontrol.scheduler.allocator import Allocator
from zcontrol.scheduler.filters import run_filters, usable_primary_storages
from zcontrol.scheduler.messages import ALLOCATOR
from zcontrol.scheduler.model import AllocationRequest
from zcontrol.scheduler.strategies import STRATEGIES, order_hosts, strategy_named

GIB = 1024**3


def random_inventory(seed: int, hosts: int = 40) -> Inventory:
    """
    A random inventory (as tests/test_scheduler_fixtures draws, from a seeded Random).
    """
    rnd = random.Random(seed)
    rows: list[tuple[str, dict[str, Any]]] = [("zone", {"uuid": "z", "name": "z"})]
    clusters = [f"c{i}" for i in range(4)]
    for c in clusters:
        rows.append(("cluster", {"uuid": c, "name": c, "zoneUuid": "z", "hypervisorType": "KVM",
                                 "state": rnd.choice(["Enabled"] * 5 + ["Disabled"])}))
    for i in range(2):
        rows.append(("l2Network", {"uuid": f"l2{i}", "name": f"l2{i}", "zoneUuid": "z",
                                   "physicalInterface": f"eth{i}"}))
        rows.append(("l3Network", {"uuid": f"l3{i}", "name": f"l3{i}", "zoneUuid": "z",
                                   "l2NetworkUuid": f"l2{i}"}))
        for c in clusters:
            if rnd.random() < 0.8:
                rows.append(("l2NetworkClusterRef", {"uuid": f"r{i}{c}", "clusterUuid": c,
                                                     "l2NetworkUuid": f"l2{i}"}))
    host_uuids = [f"h{rnd.randrange(16**6):06x}" for _ in range(hosts)]
    for i, h in enumerate(dict.fromkeys(host_uuids)):
        cpu, mem = rnd.randint(1, 16), rnd.randint(1, 64) * GIB
        rows.append(("host", {
            "uuid": h, "name": h, "zoneUuid": "z", "clusterUuid": rnd.choice(clusters),
            "managementIp": f"10.2.{i}.1", "hypervisorType": "KVM",
            "state": rnd.choice(["Enabled"] * 8 + ["Disabled", "Maintenance"]),
            "status": rnd.choice(["Connected"] * 8 + ["Disconnected"]),
            "cpuNum": cpu, "totalCpuCapacity": cpu, "availableCpuCapacity": rnd.randint(0, cpu),
            "totalMemoryCapacity": mem,
            "availableMemoryCapacity": rnd.randint(0, mem // GIB) * GIB}))
    for j, ps_type in enumerate(["LocalStorage", "NFS", "NFS"]):
        ps = f"ps{j}"
        rows.append(("primaryStorage", {
            "uuid": ps, "name": ps, "zoneUuid": "z", "url": f"/{ps}", "type": ps_type,
            "state": "Enabled", "status": rnd.choice(["Connected"] * 4 + ["Disconnected"]),
            "totalCapacity": 500 * GIB, "availableCapacity": rnd.randint(0, 500) * GIB}))
        for c in clusters:
            if rnd.random() < 0.6:
                rows.append(("primaryStorageClusterRef", {"uuid": f"p{j}{c}",
                                                          "primaryStorageUuid": ps,
                                                          "clusterUuid": c}))
        for h in dict.fromkeys(host_uuids):
            if ps_type == "LocalStorage":
                t = rnd.randint(0, 100) * GIB
                rows.append(("localStorageHostRef", {
                    "uuid": f"l{h}", "primaryStorageUuid": ps, "hostUuid": h,
                    "totalCapacity": t, "availableCapacity": rnd.randint(0, t // GIB) * GIB}))
            elif rnd.random() < 0.8:
                rows.append(("primaryStorageHostRef", {
                    "uuid": f"m{j}{h}", "primaryStorageUuid": ps, "hostUuid": h,
                    "status": rnd.choice(["Connected"] * 4 + ["Disconnected"])}))
    return Inventory(tuple(rows))


def random_requests(seed: int, count: int) -> list[AllocationRequest]:
    rnd = random.Random(seed)
    names = [None, *sorted(STRATEGIES)]
    return [AllocationRequest(
        cpu_num=rnd.randint(1, 12), memory_size=rnd.randint(1, 48) * GIB,
        disk_size=rnd.randint(0, 80) * GIB,
        l3_network_uuids=rnd.sample(["l30", "l31"], rnd.randint(0, 2)),
        cluster_uuid=rnd.choice([None, None, None, "c1"]),
        allocator_strategy=rnd.choice(names),
        primary_storage_uuid=rnd.choice([None, None, None, "ps0", "ps1"]))
        for _ in range(count)]


class AllocatorBackendMixin:
    """
    The allocator on one backend (mixed with a store factory and trial's TestCase).
    """

    store_options: dict[str, Any]

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.stores: list[Any] = []
        self.store = await self.open()

    @async_to_deferred
    async def tearDown(self) -> None:
        for s in self.stores:
            await s.stop()
        await self.tearDown_database()

    async def open(self) -> Any:
        s = open_store(self.store_url(), reactor, **self.store_options)
        self.stores.append(s)
        await s.start()
        return s

    async def seed_small_cloud(self, hosts: int, cpu: int) -> None:
        for resource, values in [
            ("zone", {"uuid": "z", "name": "zone"}),
            ("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z", "hypervisorType": "KVM"}),
            ("l2Network", {"uuid": "l2", "name": "l2", "zoneUuid": "z",
                           "physicalInterface": "eth0"}),
            ("l3Network", {"uuid": "l3", "name": "l3", "l2NetworkUuid": "l2", "zoneUuid": "z"}),
            ("l2NetworkClusterRef", {"uuid": "l2c", "l2NetworkUuid": "l2", "clusterUuid": "c"}),
            ("primaryStorage", {"uuid": "nfs", "name": "nfs", "zoneUuid": "z", "url": "n:/x",
                                "type": "NFS", "status": "Connected",
                                "totalCapacity": 100 * GIB, "availableCapacity": 100 * GIB}),
            ("primaryStorageClusterRef", {"uuid": "psc", "primaryStorageUuid": "nfs",
                                          "clusterUuid": "c"}),
        ]:
            await self.store.insert(resource, values)
        for i in range(hosts):
            await self.store.add_host({
                "uuid": f"h{i}", "name": f"h{i}", "zoneUuid": "z", "clusterUuid": "c",
                "managementIp": f"10.3.0.{i}", "hypervisorType": "KVM", "status": "Connected",
                "cpuNum": cpu, "totalCpuCapacity": cpu, "totalMemoryCapacity": 64 * GIB})
            await self.store.insert("primaryStorageHostRef", {
                "uuid": f"m{i}", "primaryStorageUuid": "nfs", "hostUuid": f"h{i}"})

    @async_to_deferred
    async def test_concurrent_allocations_never_exceed_capacity(self) -> None:
        """
        120 allocations of 1 CPU at once, from two stores on the same database (as two
        management nodes would), first-fit and least-used mixed, against 3 hosts of 4 CPUs:
        exactly 12 win, every CPU is accounted for by one holder, no drift; giving all back
        (twice) restores the hosts.
        """
        await self.seed_small_cloud(hosts=3, cpu=4)
        other = await self.open()
        allocators = [Allocator(self.store), Allocator(other)]

        async def one(i: int) -> Any:
            req = AllocationRequest(cpu_num=1, memory_size=GIB, disk_size=GIB,
                                    l3_network_uuids=["l3"],
                                    allocator_strategy=[None, "LeastUsedHostAllocatorStrategy"][i % 2])
            try:
                return await allocators[i % 2].allocate(req, ("VmInstanceVO", f"vm-{i}"))
            except OperationError as e:
                self.assertEqual(e.error.code, ALLOCATOR.NO_AVAILABLE_HOST)
                return None

        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(i)) for i in range(120)])
        won = [(i, r) for i, r in enumerate(results) if r is not None]
        self.assertEqual(len(won), 12)
        per_host: dict[str, int] = {}
        for i, r in won:
            held = await self.store.holder_reservations(("VmInstanceVO", f"vm-{i}"))
            self.assertEqual(held, [(r.host["uuid"], 1, GIB)])
            per_host[r.host["uuid"]] = per_host.get(r.host["uuid"], 0) + 1
        self.assertEqual(per_host, {"h0": 4, "h1": 4, "h2": 4})
        for h in ("h0", "h1", "h2"):
            self.assertEqual((await self.store.get("host", h))["availableCpuCapacity"], 0)
        self.assertEqual(await self.store.audit_capacity(), [])
        releases = [self.store.release_host_capacity(r.host["uuid"], ("VmInstanceVO", f"vm-{i}"))
                    for i, r in won for _ in range(2)]
        await defer.gatherResults(releases)
        for h in ("h0", "h1", "h2"):
            self.assertEqual((await self.store.get("host", h))["availableCpuCapacity"], 4)
        self.assertEqual(await self.store.audit_capacity(), [])

    @async_to_deferred
    async def test_pre_filter_agrees_with_pure_filters(self) -> None:
        """
        On a random 40-host inventory and 60 random requests: the counts query equals the
        pure filters' counts over the full snapshot, the page is the first fitting hosts in
        the strategy's order (the backend's sort included), and the storages offered are
        the pure function's.
        """
        inv = random_inventory(7)
        await load_inventory(self.store, inv)
        expected_snap = snapshot_of(inv)
        fits = 0
        for req in random_requests(11, 60):
            expected = run_filters(req, expected_snap)
            strategy = strategy_named(req.allocator_strategy)
            ordered = order_hosts(strategy, expected.hosts)
            fits += bool(ordered)
            candidates, lefts = await self.store.allocation_counts(req)
            self.assertEqual((candidates, lefts),
                             (expected.candidates, [c.left for c in expected.counts]), req)
            page = await self.store.allocation_snapshot(req, strategy.order, 5)
            got = order_hosts(strategy, page.hosts)
            self.assertEqual([h.uuid for h in got], [h.uuid for h in ordered[:5]], req)
            for h in got:
                self.assertEqual(usable_primary_storages(req, page, h),
                                 usable_primary_storages(req, expected_snap, h))
        self.assertGreater(fits, 10)
        self.assertLess(fits, 60)


class SQLiteAllocatorTests(SQLiteStoreFactory, AllocatorBackendMixin, unittest.TestCase):
    """
    On a SQLite file.
    """


class PostgresAllocatorTests(PostgresStoreFactory, AllocatorBackendMixin, unittest.TestCase):
    """
    On PostgreSQL.
    """


class MemoryAllocatorTests(MemoryStoreFactory, AllocatorBackendMixin, unittest.TestCase):
    """
    On the in-memory store (the real reactor).
    """
