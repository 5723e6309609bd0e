"""
The zone service, deterministically (MemoryStore + LocalBus on a Clock), and the
zone -> cluster -> offering create/delete path on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from tests.db_support import PostgresStoreFactory, SQLiteStoreFactory
from zcontrol._defer import async_to_deferred
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS, ErrorCode
from zcontrol.db import open_store
from zcontrol.db.memory import MemoryStore
from zcontrol.db.query import Query
from zcontrol.services import registry
from zcontrol.services.cluster import (
    ClusterService,
    CreateClusterMsg,
    DeleteClusterMsg,
)
from zcontrol.services.offering import (
    CreateDiskOfferingMsg,
    CreateInstanceOfferingMsg,
    DeleteDiskOfferingMsg,
    DeleteInstanceOfferingMsg,
    OfferingService,
)
from zcontrol.services.zone import (
    ZONE,
    ChangeZoneStateMsg,
    CreateZoneMsg,
    DeleteZoneMsg,
    UpdateZoneMsg,
    ZoneDeletedEvent,
    ZoneService,
    ZoneStateChangedEvent,
)

ZONE_FIELDS = {"uuid", "name", "description", "type", "state", "createDate", "lastOpDate"}


class ServiceTestCase(SynchronousTestCase):
    """
    The zone, cluster and offering services on one LocalBus and one in-memory store, on a
    Clock at t=1000; every event published is recorded in C{events}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)
        self.services = [ZoneService(self.clock, self.bus, self.store),
                         ClusterService(self.clock, self.bus, self.store),
                         OfferingService(self.clock, self.bus, self.store)]
        for s in self.services:
            s.start()
        self.events: list[Any] = []
        for topic in ("zone.#", "cluster.#", "host.#"):
            self.bus.subscribe(topic, self.events.append)

    def stop_store(self) -> None:
        for s in self.services:
            d = s.stop()
            self.pump()
            self.successResultOf(d)
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def pump(self) -> None:
        """
        Run what the clock has scheduled at this time (bus deliveries, store operations).
        """
        for _ in range(50):
            self.clock.advance(0)

    def result(self, d: Deferred) -> Any:
        self.pump()
        return self.successResultOf(d)

    def send(self, msg: Any) -> Any:
        """
        Send C{msg} and return its reply.
        """
        return self.result(self.bus.send(msg))

    def ok(self, msg: Any) -> Any:
        reply = self.send(msg)
        self.assertTrue(reply.success, reply.error)
        return reply

    def refused(self, msg: Any, code: str) -> ErrorCode:
        """
        Send C{msg}; its reply must be the error C{code}.
        """
        reply = self.send(msg)
        self.assertFalse(reply.success, f"{type(msg).__name__} succeeded")
        self.assertEqual(reply.error.code, code, str(reply.error))
        return reply.error

    def invalid(self, msg: Any, field: str) -> ErrorCode:
        """
        Send C{msg}; its reply must be C{SYS.1007} naming C{field}.
        """
        err = self.refused(msg, SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque.get("field"), field, str(err))
        return err

    def seed(self, resource: str, values: dict[str, Any]) -> dict[str, Any]:
        return self.result(self.store.insert(resource, values))

    def row(self, resource: str, uuid: str) -> dict[str, Any] | None:
        return self.result(self.store.get(resource, uuid))

    def count(self, resource: str) -> int:
        return self.result(self.store.query(resource, Query(count=True))).total

    def zone(self, uuid: str = "z1", name: str | None = None) -> dict[str, Any]:
        return self.ok(CreateZoneMsg(service_id="zone", name=name or uuid, uuid=uuid)).inventory

    def cluster(self, uuid: str = "c1", zone_uuid: str = "z1") -> dict[str, Any]:
        return self.ok(CreateClusterMsg(service_id="cluster", zone_uuid=zone_uuid, name=uuid,
                                        uuid=uuid)).inventory

    def of_type(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class CreateZoneTests(ServiceTestCase):
    """
    CreateZoneMsg.
    """

    def test_create(self) -> None:
        """
        A new zone is Enabled, of type zstack, dated by the clock; its inventory is its row.
        """
        reply = self.ok(CreateZoneMsg(service_id="zone", name="zone one", description="d"))
        inv = reply.inventory
        self.assertEqual(set(inv), ZONE_FIELDS)
        self.assertEqual((inv["name"], inv["description"], inv["state"], inv["type"]),
                         ("zone one", "d", "Enabled", "zstack"))
        self.assertEqual((inv["createDate"], inv["lastOpDate"]), (1000.0, 1000.0))
        self.assertEqual(len(inv["uuid"]), 32)
        self.assertEqual(self.row("zone", inv["uuid"]), inv)

    def test_create_with_uuid(self) -> None:
        """
        A given uuid is the zone's.
        """
        self.assertEqual(self.zone("zone-a")["uuid"], "zone-a")

    def test_duplicate_uuid(self) -> None:
        """
        A taken uuid is ZONE.1002 naming the uuid field.
        """
        self.zone("z1")
        err = self.refused(CreateZoneMsg(service_id="zone", name="other", uuid="z1"),
                           ZONE.DUPLICATE)
        self.assertEqual((err.opaque["field"], err.opaque["value"]), ("uuid", "z1"))
        self.assertEqual(self.row("zone", "z1")["name"], "z1")

    def test_duplicate_name(self) -> None:
        """
        Zone names are unique (schema): a taken one is ZONE.1002 naming the name field.
        """
        self.zone("z1", name="same")
        err = self.refused(CreateZoneMsg(service_id="zone", name="same", uuid="z2"),
                           ZONE.DUPLICATE)
        self.assertEqual((err.opaque["field"], err.opaque["value"]), ("name", "same"))
        self.assertIsNone(self.row("zone", "z2"))

    def test_invalid_fields(self) -> None:
        """
        Each field is checked: SYS.1007 naming it, and nothing is created.
        """
        self.invalid(CreateZoneMsg(service_id="zone", name=""), "name")
        self.invalid(CreateZoneMsg(service_id="zone", name="  "), "name")
        self.invalid(CreateZoneMsg(service_id="zone", name=7), "name")
        self.invalid(CreateZoneMsg(service_id="zone", name="x" * 256), "name")
        self.invalid(CreateZoneMsg(service_id="zone", name="a\x00b"), "name")
        self.invalid(CreateZoneMsg(service_id="zone", name="z", description="d" * 2049),
                     "description")
        self.invalid(CreateZoneMsg(service_id="zone", name="z", uuid="a b"), "uuid")
        self.invalid(CreateZoneMsg(service_id="zone", name="z", uuid=""), "uuid")
        self.invalid(CreateZoneMsg(service_id="zone", name="z", uuid="u" * 65), "uuid")
        self.assertEqual(self.count("zone"), 0)


class UpdateZoneTests(ServiceTestCase):
    """
    UpdateZoneMsg.
    """

    def test_update(self) -> None:
        """
        Name and description change; lastOpDate moves, createDate does not.
        """
        self.zone("z1")
        self.clock.advance(5)
        inv = self.ok(UpdateZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1",
                                    name="renamed", description="new")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("renamed", "new"))
        self.assertEqual((inv["createDate"], inv["lastOpDate"]), (1000.0, 1005.0))
        self.assertEqual(self.row("zone", "z1"), inv)

    def test_update_one_field(self) -> None:
        """
        A field left None is unchanged; nothing given is a no-op returning the inventory.
        """
        self.ok(CreateZoneMsg(service_id="zone", name="n", description="keep", uuid="z1"))
        inv = self.ok(UpdateZoneMsg(service_id="zone", uuid="z1", name="m")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("m", "keep"))
        same = self.ok(UpdateZoneMsg(service_id="zone", uuid="z1")).inventory
        self.assertEqual(same, inv)

    def test_update_unknown(self) -> None:
        """
        An unknown zone is ZONE.1000 naming the uuid.
        """
        err = self.refused(UpdateZoneMsg(service_id="zone", uuid="nope", name="x"),
                           ZONE.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "uuid"))
        self.assertIn("nope", err.details)

    def test_update_invalid(self) -> None:
        """
        Bad fields are SYS.1007 naming them; the zone is unchanged.
        """
        self.zone("z1")
        self.invalid(UpdateZoneMsg(service_id="zone", uuid="z1", name=""), "name")
        self.invalid(UpdateZoneMsg(service_id="zone", uuid="z1", description=3), "description")
        self.invalid(UpdateZoneMsg(service_id="zone", uuid=None), "uuid")
        self.assertEqual(self.row("zone", "z1")["name"], "z1")

    def test_update_to_taken_name(self) -> None:
        """
        Renaming to another zone's name is ZONE.1002 naming the name.
        """
        self.zone("z1")
        self.zone("z2")
        err = self.refused(UpdateZoneMsg(service_id="zone", uuid="z2", name="z1"),
                           ZONE.DUPLICATE)
        self.assertEqual(err.opaque["field"], "name")
        self.assertEqual(self.row("zone", "z2")["name"], "z2")

    def test_concurrent_updates_serialised(self) -> None:
        """
        Two updates of one zone sent together both apply, in the order sent.
        """
        self.zone("z1")
        d1 = self.bus.send(UpdateZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1",
                                         name="first", description="one"))
        d2 = self.bus.send(UpdateZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1",
                                         name="second"))
        r1, r2 = self.result(d1), self.result(d2)
        self.assertTrue(r1.success and r2.success)
        self.assertEqual(r1.inventory["name"], "first")
        self.assertEqual((r2.inventory["name"], r2.inventory["description"]),
                         ("second", "one"))
        self.assertEqual(self.row("zone", "z1")["name"], "second")


class ZoneStateTests(ServiceTestCase):
    """
    ChangeZoneStateMsg.
    """

    def test_disable_enable(self) -> None:
        """
        disable -> Disabled, enable -> Enabled, each with an event; the same state again is
        a no-op without an event.
        """
        self.zone("z1")
        inv = self.ok(ChangeZoneStateMsg(service_id="zone", uuid="z1",
                                         state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        self.assertEqual(self.row("zone", "z1")["state"], "Disabled")
        self.ok(ChangeZoneStateMsg(service_id="zone", uuid="z1", state_event="disable"))
        inv = self.ok(ChangeZoneStateMsg(service_id="zone", uuid="z1",
                                         state_event="enable")).inventory
        self.assertEqual(inv["state"], "Enabled")
        self.pump()
        self.assertEqual([(e.zone_uuid, e.old_state, e.new_state)
                          for e in self.of_type(ZoneStateChangedEvent)],
                         [("z1", "Enabled", "Disabled"), ("z1", "Disabled", "Enabled")])

    def test_bad_event(self) -> None:
        """
        An unknown state event is SYS.1007 naming stateEvent.
        """
        self.zone("z1")
        for event in ("Disabled", "maintain", None, "ENABLE"):
            self.invalid(ChangeZoneStateMsg(service_id="zone", uuid="z1", state_event=event),
                         "stateEvent")
        self.assertEqual(self.row("zone", "z1")["state"], "Enabled")

    def test_unknown_zone(self) -> None:
        """
        ZONE.1000 naming the uuid.
        """
        err = self.refused(ChangeZoneStateMsg(service_id="zone", uuid="nope",
                                              state_event="disable"), ZONE.NOT_FOUND)
        self.assertEqual(err.opaque["uuid"], "nope")

    def test_disabled_zone_accepts_clusters(self) -> None:
        """
        As in ZStack, a Disabled zone still takes new clusters.
        """
        self.zone("z1")
        self.ok(ChangeZoneStateMsg(service_id="zone", uuid="z1", state_event="disable"))
        self.assertEqual(self.cluster("c1")["zoneUuid"], "z1")


class DeleteZoneTests(ServiceTestCase):
    """
    DeleteZoneMsg.
    """

    def test_delete(self) -> None:
        """
        An empty zone is deleted: the row is gone, an event published, the reply has no
        inventory.
        """
        self.zone("z1")
        reply = self.ok(DeleteZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1"))
        self.assertIsNone(reply.inventory)
        self.assertIsNone(self.row("zone", "z1"))
        self.assertEqual(self.count("zone"), 0)
        self.pump()
        self.assertEqual([e.zone_uuid for e in self.of_type(ZoneDeletedEvent)], ["z1"])

    def test_delete_unknown(self) -> None:
        """
        Deleting a zone that does not exist succeeds with no inventory (ZStack's
        C{successIfResourceNotExisting}: a retried delete whose reply was lost succeeds) and
        publishes nothing; a bad uuid is SYS.1007.
        """
        reply = self.ok(DeleteZoneMsg(service_id="zone", uuid="nope"))
        self.assertIsNone(reply.inventory)
        self.pump()
        self.assertEqual(self.of_type(ZoneDeletedEvent), [])
        self.invalid(DeleteZoneMsg(service_id="zone", uuid=""), "uuid")

    def test_refused_with_clusters(self) -> None:
        """
        A zone with clusters is ZONE.1001 naming them; nothing is deleted.
        """
        self.zone("z1")
        self.cluster("c1")
        self.cluster("c2")
        err = self.refused(DeleteZoneMsg(service_id="zone", uuid="z1"), ZONE.HAS_DEPENDENTS)
        self.assertEqual(err.opaque["zoneUuid"], "z1")
        self.assertEqual(err.opaque["dependents"],
                         {"cluster": {"count": 2, "uuids": ["c1", "c2"]}})
        self.assertIn("2 cluster(s) (c1, c2)", err.details)
        self.assertIsNotNone(self.row("zone", "z1"))
        self.assertEqual(self.count("cluster"), 2)

    def test_refused_with_networks_and_storage(self) -> None:
        """
        L2 networks, primary storages and attached backup storages are named by kind.
        """
        self.zone("z1")
        self.seed("l2Network", {"uuid": "l2", "name": "l2", "zoneUuid": "z1",
                                "physicalInterface": "eth0"})
        self.seed("primaryStorage", {"uuid": "ps", "name": "ps", "zoneUuid": "z1",
                                     "url": "/ps", "type": "NFS"})
        self.seed("backupStorage", {"uuid": "bs", "name": "bs", "url": "/bs", "type": "Sftp"})
        self.seed("backupStorageZoneRef", {"uuid": "ref", "backupStorageUuid": "bs",
                                           "zoneUuid": "z1"})
        err = self.refused(DeleteZoneMsg(service_id="zone", uuid="z1"), ZONE.HAS_DEPENDENTS)
        deps = err.opaque["dependents"]
        self.assertEqual({k: v["uuids"] for k, v in deps.items()},
                         {"l2Network": ["l2"], "primaryStorage": ["ps"],
                          "backupStorage": ["bs"]})
        self.assertIsNotNone(self.row("backupStorageZoneRef", "ref"))
        self.assertIsNotNone(self.row("zone", "z1"))

    def test_concurrent_deletes(self) -> None:
        """
        Two deletes of one zone sent together: the first deletes it, the second finds it
        gone and succeeds too (idempotent delete); one event.
        """
        self.zone("z1")
        d1 = self.bus.send(DeleteZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1"))
        d2 = self.bus.send(DeleteZoneMsg(service_id="zone", resource_uuid="z1", uuid="z1"))
        r1, r2 = self.result(d1), self.result(d2)
        self.assertTrue(r1.success, r1.error)
        self.assertTrue(r2.success, r2.error)
        self.assertIsNone(r2.inventory)
        self.pump()
        self.assertEqual(len(self.of_type(ZoneDeletedEvent)), 1)

    def test_dependent_committed_after_check(self) -> None:
        """
        A dependent that makes the store's DELETE fail on its foreign key (another node
        added it after the check) is still ZONE.1001 naming it, never a raw DB.1001.
        """
        from twisted.internet.defer import fail

        from zcontrol.core.errors import OperationError
        from zcontrol.db.interfaces import DB

        self.zone("z1")
        self.cluster("c9")
        self.patch(self.store, "delete_zone", lambda uuid: fail(OperationError.of(
            DB.REFERENCE, "FOREIGN KEY constraint failed")))
        err = self.refused(DeleteZoneMsg(service_id="zone", uuid="z1"), ZONE.HAS_DEPENDENTS)
        self.assertEqual(err.opaque["dependents"]["cluster"]["uuids"], ["c9"])
        self.assertEqual(err.cause.code, DB.REFERENCE)


class RegistryTests(SynchronousTestCase):
    """
    The node runs the zone, cluster and offering services.
    """

    def test_registered(self) -> None:
        """
        Their factories are listed, and each builds its service from a node.
        """
        for dotted, klass in (("zcontrol.services.zone.make", ZoneService),
                              ("zcontrol.services.cluster.make", ClusterService),
                              ("zcontrol.services.offering.make", OfferingService)):
            self.assertIn(dotted, registry.SERVICE_FACTORIES)

            class Node:
                reactor = Clock()
                bus = object()
                store = object()
                agents = object()
                config = object()

            from twisted.python.reflect import namedAny
            service = namedAny(dotted)(Node)
            self.assertIsInstance(service, klass)
            self.assertIs(service.store, Node.store)


class BackendPathMixin:
    """
    zone -> cluster -> offerings, created then deleted through the services on a real
    backend (the bus is a LocalBus on the real reactor).
    """

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.store = open_store(self.store_url(), reactor, **self.store_options)
        await self.store.start()
        self.bus = LocalBus(reactor, node_id="mn-1")
        self.bus.start()
        self.services = [ZoneService(reactor, self.bus, self.store),
                         ClusterService(reactor, self.bus, self.store),
                         OfferingService(reactor, self.bus, self.store)]
        for s in self.services:
            s.start()

    @async_to_deferred
    async def tearDown(self) -> None:
        for s in self.services:
            await s.stop()
        await self.bus.stop()
        await self.store.stop()
        await self.tearDown_database()

    async def ok(self, msg: Any) -> Any:
        reply = await self.bus.send(msg, 30)
        self.assertTrue(reply.success, reply.error)
        return reply

    async def refused(self, msg: Any, code: str) -> ErrorCode:
        reply = await self.bus.send(msg, 30)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, code, str(reply.error))
        return reply.error

    @async_to_deferred
    async def test_create_and_delete_path(self) -> None:
        """
        Inventories after each step; the zone cannot go while its cluster is there; after
        the deletes the store holds none of them.
        """
        from zcontrol.services.cluster import CLUSTER

        zone = (await self.ok(CreateZoneMsg(service_id="zone", name="z", uuid="z1"))).inventory
        self.assertEqual((zone["uuid"], zone["state"]), ("z1", "Enabled"))
        await self.refused(CreateZoneMsg(service_id="zone", name="z", uuid="z2"),
                           ZONE.DUPLICATE)
        cluster = (await self.ok(CreateClusterMsg(service_id="cluster", zone_uuid="z1",
                                                  name="c", uuid="c1"))).inventory
        self.assertEqual((cluster["zoneUuid"], cluster["hypervisorType"]), ("z1", "KVM"))
        await self.refused(CreateClusterMsg(service_id="cluster", zone_uuid="nope",
                                            name="c"), ZONE.NOT_FOUND)
        await self.store.insert("host", {"uuid": "h1", "name": "h", "zoneUuid": "z1",
                                         "clusterUuid": "c1", "managementIp": "10.0.0.1",
                                         "hypervisorType": "KVM"})
        io = (await self.ok(CreateInstanceOfferingMsg(
            service_id="offering", name="small", cpu_num=2, memory_size=2**30,
            allocator_strategy="LeastVmPreferredHostAllocatorStrategy"))).inventory
        self.assertEqual((io["cpuNum"], io["memorySize"], io["cpuSpeed"]), (2, 2**30, 0))
        do = (await self.ok(CreateDiskOfferingMsg(service_id="offering", name="d",
                                                  disk_size=10 * 2**30))).inventory
        self.assertEqual(do["diskSize"], 10 * 2**30)
        err = await self.refused(DeleteZoneMsg(service_id="zone", uuid="z1"),
                                 ZONE.HAS_DEPENDENTS)
        self.assertEqual(set(err.opaque["dependents"]), {"cluster", "host"})
        err = await self.refused(DeleteClusterMsg(service_id="cluster", uuid="c1"),
                                 CLUSTER.HAS_DEPENDENTS)
        self.assertEqual(err.opaque["dependents"]["host"]["uuids"], ["h1"])
        await self.store.delete("host", "h1")
        await self.ok(DeleteInstanceOfferingMsg(service_id="offering", uuid=io["uuid"]))
        await self.ok(DeleteDiskOfferingMsg(service_id="offering", uuid=do["uuid"]))
        await self.ok(DeleteClusterMsg(service_id="cluster", uuid="c1"))
        await self.ok(DeleteZoneMsg(service_id="zone", uuid="z1"))
        for resource in ("zone", "cluster", "host", "instanceOffering", "diskOffering"):
            total = (await self.store.query(resource, Query(count=True))).total
            self.assertEqual(total, 0, resource)


class SQLitePathTests(SQLiteStoreFactory, BackendPathMixin, unittest.TestCase):
    """
    The path on SQLite.
    """


class PostgresPathTests(PostgresStoreFactory, BackendPathMixin, unittest.TestCase):
    """
    The path on PostgreSQL (fails when PostgreSQL is missing).
    """
