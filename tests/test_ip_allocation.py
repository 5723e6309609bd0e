"""
AllocateIpMsg / ReturnIpMsg of the L3 network service: deterministically on MemoryStore,
and on the real backends (SQLite and PostgreSQL through their pools, on the real reactor):
concurrent allocations never hand one address twice, concurrent range adds never overlap,
and the whole network lifecycle leaves the store clean.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.db_support import MemoryStoreFactory, PostgresStoreFactory, SQLiteStoreFactory
from tests.test_l2_network import NetworkTestCase
from tests.test_l3_network import add_range
from zcontrol._defer import async_to_deferred
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import Query, open_store
from zcontrol.services import inventory as inv
from zcontrol.services.network import (
    L3,
    L3_SERVICE_ID,
    AllocateIpMsg,
    AttachL2NetworkToClusterMsg,
    ChangeL3NetworkStateMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
    DeleteL2NetworkMsg,
    DeleteL3NetworkMsg,
    ReturnIpMsg,
)
from zcontrol.services.network.l2 import L2NetworkService
from zcontrol.services.network.l3 import L3NetworkService
from zcontrol.services.network.ranges import check_new_ranges, overlaps, range_from_fields


def alloc(holder: str, l3: str = "l3a", **kw: Any) -> AllocateIpMsg:
    return AllocateIpMsg(l3_network_uuid=l3, holder_type="VmInstanceVO", holder_uuid=holder,
                         service_id=L3_SERVICE_ID, resource_uuid=l3, **kw)


def give_back(holder: str, l3: str = "l3a") -> ReturnIpMsg:
    return ReturnIpMsg(l3_network_uuid=l3, holder_type="VmInstanceVO", holder_uuid=holder,
                       service_id=L3_SERVICE_ID, resource_uuid=l3)


class AllocateTests(NetworkTestCase):
    """
    AllocateIpMsg and ReturnIpMsg on MemoryStore.
    """

    def setUp(self) -> None:
        super().setUp()
        self.novlan()
        self.l3()
        self.ok(add_range("10.0.0.10", "10.0.0.19", uuid="r1"))

    def test_allocate_first_available(self) -> None:
        """
        FirstAvailableIpAllocatorStrategy hands out the lowest free addresses in order; the
        reply is the usedIp row with the range's netmask and gateway.
        """
        ips = [self.ok(alloc(f"vm{i}", allocate_strategy="FirstAvailableIpAllocatorStrategy"))
               .inventory for i in range(3)]
        self.assertEqual([r["ip"] for r in ips], ["10.0.0.10", "10.0.0.11", "10.0.0.12"])
        self.assertEqual((ips[0]["netmask"], ips[0]["gateway"], ips[0]["ipRangeUuid"],
                          ips[0]["holderUuid"]), ("255.255.255.0", "10.0.0.1", "r1", "vm0"))

    def test_allocate_random_then_full(self) -> None:
        """
        The default (random) strategy fills the range with distinct addresses; then L3.1005
        caused by DB.1005.
        """
        got = {self.ok(alloc(f"vm{i}")).inventory["ip"] for i in range(10)}
        self.assertEqual(got, {f"10.0.0.{n}" for n in range(10, 20)})
        err = self.refused(alloc("vm10"), L3.ALLOCATE_IP_ERROR)
        self.assertEqual(err.cause.code, "DB.1005")

    def test_retry_same_holder(self) -> None:
        """
        A holder asking again gets the address it holds (a retry after a lost reply).
        """
        a = self.ok(alloc("vm1")).inventory
        b = self.ok(alloc("vm1")).inventory
        self.assertEqual((a["uuid"], a["ip"]), (b["uuid"], b["ip"]))
        self.assertEqual(len(self.rows("usedIp")), 1)

    def test_required_ip(self) -> None:
        """
        A required address is taken; taken again by another holder: L3.1007 naming
        requiredIp; outside the ranges (the gateway included): SYS.1007 naming requiredIp.
        """
        self.assertEqual(self.ok(alloc("vm1", required_ip="10.0.0.15")).inventory["ip"],
                         "10.0.0.15")
        err = self.refused(alloc("vm2", required_ip="10.0.0.15"), L3.IP_IN_USE, "requiredIp")
        self.assertIn("10.0.0.15", err.details)
        for ip in ("10.0.0.1", "10.0.0.20", "192.168.0.1"):
            self.refused(alloc("vm2", required_ip=ip), SYS.INVALID_ARGUMENT_ERROR, "requiredIp")
        self.refused(alloc("vm2", required_ip="10.0.0"), SYS.INVALID_ARGUMENT_ERROR,
                     "requiredIp")

    def test_refusals(self) -> None:
        """
        Unknown network: L3.1000; disabled: L3.1003 naming the state; bad fields: SYS.1007.
        """
        self.refused(alloc("vm1", l3="nope"), L3.NOT_FOUND, "l3NetworkUuid")
        self.refused(alloc("vm1", allocate_strategy="Best"), SYS.INVALID_ARGUMENT_ERROR,
                     "allocateStrategy")
        self.refused(AllocateIpMsg(l3_network_uuid="l3a", holder_type="", holder_uuid="x"),
                     SYS.INVALID_ARGUMENT_ERROR, "holderType")
        self.ok(ChangeL3NetworkStateMsg(uuid="l3a", state_event="disable"))
        err = self.refused(alloc("vm1"), L3.STATE_ERROR)
        self.assertEqual(err.opaque["state"], "Disabled")
        self.assertEqual(self.rows("usedIp"), [])

    def test_return_is_idempotent(self) -> None:
        """
        ReturnIp frees the address (the reply is the freed row); again: nothing, no error.
        """
        ip = self.ok(alloc("vm1")).inventory
        self.assertEqual(self.ok(give_back("vm1")).inventory["ip"], ip["ip"])
        self.assertIsNone(self.ok(give_back("vm1")).inventory)
        self.assertIsNone(self.ok(give_back("vm1", l3="gone")).inventory)
        self.assertEqual(self.rows("usedIp"), [])

    def test_concurrent_allocations(self) -> None:
        """
        30 allocations at once on a range of 10: exactly 10 win, all distinct.
        """
        ds = [self.bus.send(alloc(f"vm{i}", allocate_strategy=s))
              for i in range(30)
              for s in [("RandomIpAllocatorStrategy", "FirstAvailableIpAllocatorStrategy")[i % 2]]]
        self.pump()
        replies = [self.successResultOf(d) for d in ds]
        won = [r.inventory["ip"] for r in replies if r.success]
        self.assertEqual(len(won), 10)
        self.assertEqual(len(set(won)), 10)
        self.assertEqual({r.error.code for r in replies if not r.success},
                         {L3.ALLOCATE_IP_ERROR})


class RealBackendMixin:
    """
    The L2 and L3 services on LocalBus over a real store (the mixed-in factory), on the
    real reactor.
    """

    store_options: dict[str, Any] = {"pool_size": 4}

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.store = open_store(self.store_url(), reactor, **self.store_options)
        await self.store.start()
        self.bus = LocalBus(reactor, node_id="mn-1")
        await self.bus.start()
        self.services = [L2NetworkService(reactor, self.bus, self.store),
                         L3NetworkService(reactor, self.bus, self.store)]
        for s in self.services:
            s.start()
        await self.store.insert("zone", {"uuid": "z", "name": "zone"})
        await self.store.insert("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z",
                                            "hypervisorType": "KVM"})

    @async_to_deferred
    async def tearDown(self) -> None:
        for s in reversed(self.services):
            await s.stop()
        await self.bus.stop()
        await self.store.stop()
        await self.tearDown_database()

    async def ok(self, msg: Any) -> Any:
        if not msg.service_id:
            msg.service_id = "network.l2" if "L2" in type(msg).__name__ else L3_SERVICE_ID
        reply = await self.bus.send(msg)
        self.assertTrue(reply.success, reply.error)
        return reply

    async def rows(self, resource: str) -> list[dict[str, Any]]:
        return (await self.store.query(resource, Query(limit=100_000))).inventories

    async def network(self, cidr_start: int = 10, cidr_end: int = 49) -> None:
        await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid="z",
                                               physical_interface="eth0", uuid="l2a"))
        await self.ok(CreateL3NetworkMsg(name="l3", l2_network_uuid="l2a", uuid="l3a"))
        await self.ok(add_range(f"10.0.0.{cidr_start}", f"10.0.0.{cidr_end}", uuid="r1"))

    @async_to_deferred
    async def test_lifecycle(self) -> None:
        """
        Create L2 -> attach -> L3 -> range -> allocate -> return -> delete L3 and L2, the
        inventories checked at each step; the store is left clean.
        """
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(
            name="l2", zone_uuid="z", physical_interface="eth0", uuid="l2a"))).inventory
        self.assertEqual(l2["attachedClusterUuids"], [])
        l2 = (await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid="l2a",
                                                        cluster_uuid="c"))).inventory
        self.assertEqual(l2["attachedClusterUuids"], ["c"])
        l3 = (await self.ok(CreateL3NetworkMsg(name="l3", l2_network_uuid="l2a",
                                               uuid="l3a"))).inventory
        self.assertEqual((l3["zoneUuid"], l3["ipRanges"]), ("z", []))
        rng = (await self.ok(add_range("10.0.0.10", "10.0.0.12", uuid="r1"))).inventory
        self.assertEqual(rng["networkCidr"], "10.0.0.0/24")
        l3 = await inv.inventory(self.store, "l3Network", "l3a")
        self.assertEqual([r["uuid"] for r in l3["ipRanges"]], ["r1"])
        ip = (await self.ok(alloc("vm1", allocate_strategy="FirstAvailableIpAllocatorStrategy"))
              ).inventory
        self.assertEqual(ip["ip"], "10.0.0.10")
        reply = await self.bus.send(DeleteL3NetworkMsg(uuid="l3a", service_id=L3_SERVICE_ID))
        self.assertEqual(reply.error.code, L3.DELETE_ERROR)
        self.assertEqual((await self.ok(give_back("vm1"))).inventory["ip"], "10.0.0.10")
        await self.ok(DeleteL3NetworkMsg(uuid="l3a"))
        await self.ok(DeleteL2NetworkMsg(uuid="l2a"))
        for resource in ("l2Network", "l2NetworkClusterRef", "l3Network", "ipRange", "usedIp",
                         "l3NetworkDns", "networkServiceL3NetworkRef"):
            self.assertEqual(await self.rows(resource), [], resource)

    @async_to_deferred
    async def test_concurrent_allocations(self) -> None:
        """
        60 allocations at once (both strategies) on 40 addresses: 40 distinct winners, the
        others L3.1005; the store holds exactly the winners.
        """
        await self.network()
        strategies = ("RandomIpAllocatorStrategy", "FirstAvailableIpAllocatorStrategy")
        replies = await defer.gatherResults([
            self.bus.send(alloc(f"vm{i}", allocate_strategy=strategies[i % 2]))
            for i in range(60)])
        won = sorted(r.inventory["ip"] for r in replies if r.success)
        self.assertEqual(len(won), 40)
        self.assertEqual(len(set(won)), 40)
        self.assertEqual({r.error.code for r in replies if not r.success},
                         {L3.ALLOCATE_IP_ERROR})
        self.assertEqual(sorted(r["ip"] for r in await self.rows("usedIp")), won)
        # Returns and re-allocations racing: still no address twice.
        mixed = [self.bus.send(give_back(f"vm{i}")) for i in range(0, 60, 3)]
        mixed += [self.bus.send(alloc(f"new{i}")) for i in range(20)]
        await defer.gatherResults(mixed)
        held = [r["ip"] for r in await self.rows("usedIp")]
        self.assertEqual(len(held), len(set(held)))
        self.assertLessEqual(len(held), 40)

    @async_to_deferred
    async def test_concurrent_range_adds_in_store(self) -> None:
        """
        Overlapping range adds racing in the store itself (as from two management nodes,
        each past its own service's checks): the L2 lock lets one win.
        """
        await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid="z",
                                               physical_interface="eth0", uuid="l2a"))
        for u in ("l3a", "l3b"):
            await self.ok(CreateL3NetworkMsg(name=u, l2_network_uuid="l2a", uuid=u))
        calls = []
        for i in range(8):
            l3 = ("l3a", "l3b")[i % 2]
            new = [range_from_fields(f"10.0.0.{10 + i}", f"10.0.0.{50 + i}", "255.255.255.0",
                                     "10.0.0.1")]

            def check(existing: list, l3: str = l3, new: list = new) -> None:
                check_new_ranges(l3, new, existing)

            calls.append(self.store.add_ip_ranges(
                l3, [{"uuid": f"r{i}", "name": "r", **new[0].values()}], check))
        results = await defer.DeferredList(calls, consumeErrors=True)
        wins = [ok for ok, _ in results if ok]
        self.assertEqual(len(wins), 1)
        for ok, value in results:
            if not ok:
                self.assertIsInstance(value.value, OperationError)
                self.assertEqual(value.value.error.code, L3.IP_RANGE_OVERLAP)
        ranges = await self.rows("ipRange")
        self.assertEqual(len(ranges), 1)
        self.assertFalse(any(overlaps(a["startIpInLong"], a["endIpInLong"],
                                      b["startIpInLong"], b["endIpInLong"])
                             for i, a in enumerate(ranges) for b in ranges[:i]))


class SQLiteAllocationTests(SQLiteStoreFactory, RealBackendMixin, unittest.TestCase):
    """
    On a SQLite file.
    """


class PostgresAllocationTests(PostgresStoreFactory, RealBackendMixin, unittest.TestCase):
    """
    On a fresh PostgreSQL database.
    """


class MemoryAllocationTests(MemoryStoreFactory, RealBackendMixin, unittest.TestCase):
    """
    On the in-memory store, driven by the real reactor.
    """

    store_options: dict[str, Any] = {}
