"""
The L2 network service, deterministically: LocalBus and the in-memory store (the real
schema and SQL) on one task.Clock, the L2 and L3 services registered on the bus.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.agent_fakes import seed_zone_and_cluster
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS, ErrorCode, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.db.memory import MemoryStore
from zcontrol.db.query import Query
from zcontrol.services import inventory as inv
from zcontrol.services.network import (
    L2,
    L2_SERVICE_ID,
    L3_SERVICE_ID,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL2VlanNetworkMsg,
    CreateL3NetworkMsg,
    DeleteL2NetworkMsg,
    DetachL2NetworkFromClusterMsg,
    UpdateL2NetworkMsg,
)
from zcontrol.services.network.l2 import L2NetworkService
from zcontrol.services.network.l3 import L3NetworkService


class NetworkTestCase(SynchronousTestCase):
    """
    One clock, one LocalBus, the in-memory store with zone C{z} (cluster C{c}, C{c2}) and
    zone C{z2} (cluster C{c3}), the L2 and L3 network services.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)
        self.result(Deferred.fromCoroutine(seed_zone_and_cluster(self.store)))
        self.seed("cluster", {"uuid": "c2", "name": "c2", "zoneUuid": "z",
                              "hypervisorType": "KVM"})
        self.seed("zone", {"uuid": "z2", "name": "zone2"})
        self.seed("cluster", {"uuid": "c3", "name": "c3", "zoneUuid": "z2",
                              "hypervisorType": "KVM"})
        self.l2_service = L2NetworkService(self.clock, self.bus, self.store)
        self.l3_service = L3NetworkService(self.clock, self.bus, self.store)
        self.l2_service.start()
        self.l3_service.start()
        self.query = inv.QueryService(self.clock, self.bus, self.store)
        self.query.start()

    def stop_store(self) -> None:
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def pump(self) -> None:
        for _ in range(50):
            self.store.flush()
            self.clock.advance(0)

    def result(self, d: Deferred) -> Any:
        self.pump()
        return self.successResultOf(d)

    def seed(self, resource: str, values: dict[str, Any]) -> dict[str, Any]:
        return self.result(self.store.insert(resource, values))

    def send(self, msg: Any) -> Any:
        """
        Send C{msg} to its service (by the module of its type) and return the reply.
        """
        if not msg.service_id:
            name = type(msg).__name__
            msg.service_id = L2_SERVICE_ID if "L2" in name else L3_SERVICE_ID
        return self.result(self.bus.send(msg))

    def ok(self, msg: Any) -> Any:
        reply = self.send(msg)
        self.assertTrue(reply.success, reply.error)
        return reply

    def refused(self, msg: Any, code: str, field: str | None = None) -> ErrorCode:
        """
        Send C{msg}, assert it failed with C{code} (and the error names C{field}).
        """
        reply = self.send(msg)
        self.assertFalse(reply.success, f"{type(msg).__name__} succeeded: {reply}")
        self.assertEqual(reply.error.code, code, str(reply.error))
        if field is not None:
            self.assertEqual(reply.error.opaque.get("field"), field, str(reply.error))
        return reply.error

    def rows(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        return self.result(self.store.query(
            resource, Query(conditions=list(conditions), limit=100_000))).inventories

    def novlan(self, uuid: str = "l2a", iface: str = "eth0", zone: str = "z") -> dict:
        return self.ok(CreateL2NoVlanNetworkMsg(name=uuid, zone_uuid=zone,
                                                physical_interface=iface, uuid=uuid)).inventory

    def vlan(self, uuid: str, vlan: int, iface: str = "eth0", zone: str = "z") -> dict:
        return self.ok(CreateL2VlanNetworkMsg(name=uuid, zone_uuid=zone, vlan=vlan,
                                              physical_interface=iface, uuid=uuid)).inventory

    def attach(self, l2: str, cluster: str = "c") -> Any:
        return self.send(AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=cluster))

    def l3(self, uuid: str = "l3a", l2: str = "l2a", **kw: Any) -> dict:
        return self.ok(CreateL3NetworkMsg(name=uuid, l2_network_uuid=l2, uuid=uuid,
                                          **kw)).inventory

    def seed_vm_nic(self, vm: str, l3: str, cluster: str = "c") -> None:
        """
        A VM of C{cluster} with a NIC on C{l3} (as the VM service would write them).
        """
        self.seed("vmInstance", {"uuid": vm, "name": vm, "cpuNum": 1, "memorySize": 64,
                                 "clusterUuid": cluster, "zoneUuid": "z", "state": "Running"})
        self.seed("vmNic", {"uuid": f"nic-{vm}", "vmInstanceUuid": vm, "l3NetworkUuid": l3,
                            "mac": f"fa:16:3e:00:00:{len(vm):02x}", "deviceId": 0})


class CreateL2Tests(NetworkTestCase):
    """
    CreateL2NoVlanNetworkMsg, CreateL2VlanNetworkMsg, UpdateL2NetworkMsg.
    """

    def test_create_novlan(self) -> None:
        """
        The reply carries ZStack's L2NetworkInventory: the row and no attached clusters.
        """
        l2 = self.novlan()
        self.assertEqual((l2["uuid"], l2["zoneUuid"], l2["physicalInterface"], l2["type"],
                          l2["vlan"], l2["attachedClusterUuids"]),
                         ("l2a", "z", "eth0", "L2NoVlanNetwork", None, []))
        self.assertIsInstance(l2["createDate"], float)

    def test_create_vlan(self) -> None:
        """
        A Vlan network keeps its vlan id and type L2VlanNetwork.
        """
        l2 = self.vlan("v1", 100)
        self.assertEqual((l2["type"], l2["vlan"]), ("L2VlanNetwork", 100))

    def test_bad_fields(self) -> None:
        """
        Each bad field is SYS.1007 naming it.
        """
        for kw, field in [
            ({"physical_interface": ""}, "physicalInterface"),
            ({"physical_interface": "eth 0"}, "physicalInterface"),
            ({"physical_interface": "e" * 256}, "physicalInterface"),
            ({"name": " "}, "name"),
            ({"zone_uuid": ""}, "zoneUuid"),
        ]:
            args = {"name": "n", "zone_uuid": "z", "physical_interface": "eth0", **kw}
            self.refused(CreateL2NoVlanNetworkMsg(**args), SYS.INVALID_ARGUMENT_ERROR, field)
        for bad in (0, 4095, -1, "7", True):
            self.refused(CreateL2VlanNetworkMsg(name="n", zone_uuid="z",
                                                physical_interface="eth0", vlan=bad),
                         SYS.INVALID_ARGUMENT_ERROR, "vlan")
        self.assertEqual(self.rows("l2Network"), [])

    def test_unknown_zone(self) -> None:
        """
        An unknown zone is L2.1000 naming zoneUuid and the uuid.
        """
        err = self.refused(CreateL2NoVlanNetworkMsg(name="n", zone_uuid="nope",
                                                    physical_interface="eth0"),
                           L2.NOT_FOUND, "zoneUuid")
        self.assertEqual(err.opaque["uuid"], "nope")

    def test_duplicate_vlan(self) -> None:
        """
        A second Vlan network with the same vlan on the same interface of the zone is
        L2.1001 naming the existing network; another interface, another zone or another
        vlan is fine.
        """
        self.vlan("v1", 10)
        err = self.refused(CreateL2VlanNetworkMsg(name="x", zone_uuid="z", vlan=10,
                                                  physical_interface="eth0", uuid="v2"),
                           L2.DUPLICATE_VLAN, "vlan")
        self.assertEqual(err.opaque["existingL2NetworkUuid"], "v1")
        self.assertIn("v1", err.details)
        self.vlan("v3", 10, iface="eth1")
        self.vlan("v4", 10, zone="z2")
        self.vlan("v5", 11)
        self.assertEqual(sorted(r["uuid"] for r in self.rows("l2Network")),
                         ["v1", "v3", "v4", "v5"])

    def test_duplicate_vlan_race(self) -> None:
        """
        Two concurrent creates of the same vlan: one wins, the other is L2.1001 naming the
        winner (the unique index decides; the loser's check ran before the insert).
        """
        msgs = [CreateL2VlanNetworkMsg(name=u, zone_uuid="z", vlan=7, physical_interface="eth0",
                                       uuid=u, service_id=L2_SERVICE_ID) for u in ("r1", "r2")]
        ds = [self.bus.send(m) for m in msgs]
        self.pump()
        replies = [self.successResultOf(d) for d in ds]
        self.assertEqual(sorted(r.success for r in replies), [False, True])
        winner = next(m.uuid for m, r in zip(msgs, replies, strict=True) if r.success)
        loser = next(r for r in replies if not r.success)
        self.assertEqual(loser.error.code, L2.DUPLICATE_VLAN)
        self.assertEqual(loser.error.opaque["existingL2NetworkUuid"], winner)
        # Both checks ran before either insert: the unique index refused the loser.
        self.assertEqual(loser.error.cause.code, "DB.1000")

    def test_update(self) -> None:
        """
        UpdateL2NetworkMsg renames; an unknown uuid is L2.1000 naming uuid.
        """
        self.novlan()
        inv_ = self.ok(UpdateL2NetworkMsg(uuid="l2a", name="renamed",
                                          description="d")).inventory
        self.assertEqual((inv_["name"], inv_["description"]), ("renamed", "d"))
        self.refused(UpdateL2NetworkMsg(uuid="nope", name="x"), L2.NOT_FOUND, "uuid")
        self.refused(UpdateL2NetworkMsg(uuid="l2a", name=""), SYS.INVALID_ARGUMENT_ERROR,
                     "name")


class AttachL2Tests(NetworkTestCase):
    """
    AttachL2NetworkToClusterMsg and DetachL2NetworkFromClusterMsg.
    """

    def test_attach_detach(self) -> None:
        """
        Attaching adds the cluster to attachedClusterUuids (also in a query); detaching
        removes it.
        """
        self.novlan()
        self.assertEqual(self.attach("l2a").inventory["attachedClusterUuids"], ["c"])
        reply = self.attach("l2a", "c2")
        self.assertEqual(reply.inventory["attachedClusterUuids"], ["c", "c2"])
        page = self.send(inv.QueryInventoryMsg(service_id=inv.SERVICE_ID,
                                               resource="l2Network"))
        self.assertEqual(page.inventories[0]["attachedClusterUuids"], ["c", "c2"])
        reply = self.ok(DetachL2NetworkFromClusterMsg(l2_network_uuid="l2a", cluster_uuid="c"))
        self.assertEqual(reply.inventory["attachedClusterUuids"], ["c2"])
        # Detaching again is a no-op.
        self.ok(DetachL2NetworkFromClusterMsg(l2_network_uuid="l2a", cluster_uuid="c"))

    def test_attach_refusals(self) -> None:
        """
        Unknown L2 or cluster: L2.1000 naming the field; a cluster of another zone or an
        attach twice: L2.1002 naming clusterUuid.
        """
        self.novlan()
        self.assertEqual(self.attach("nope").error.opaque["field"], "l2NetworkUuid")
        self.assertEqual(self.attach("l2a", "nope").error.code, L2.NOT_FOUND)
        err = self.attach("l2a", "c3").error
        self.assertEqual((err.code, err.opaque["field"]), (L2.ATTACH_ERROR, "clusterUuid"))
        self.assertTrue(self.attach("l2a").success)
        err = self.attach("l2a").error
        self.assertEqual(err.code, L2.ATTACH_ERROR)
        self.assertIn("already attached", err.details)

    def test_same_interface_rules(self) -> None:
        """
        A cluster takes one NoVlan network per interface and one Vlan network per
        interface and vlan (ZStack's L2NetworkApiInterceptor); the refusal names the L2
        already there.
        """
        self.novlan("n1")
        self.novlan("n2")
        self.novlan("n3", iface="eth1")
        self.vlan("v1", 5)
        self.vlan("v2", 5, iface="eth1")
        self.vlan("v3", 6)
        for l2 in ("n1", "v1", "n3", "v2", "v3"):
            self.assertTrue(self.attach(l2).success, l2)
        err = self.attach("n2").error
        self.assertEqual(err.code, L2.ATTACH_ERROR)
        self.assertEqual(err.opaque["conflictingL2NetworkUuids"], ["n1"])
        self.assertTrue(self.attach("n2", "c2").success)
        # Same vlan on one interface of a zone cannot even be created; a vlan network next
        # to a NoVlan one on the same interface is fine (checked above).
        self.assertEqual(sorted(r["l2NetworkUuid"] for r in self.rows(
            "l2NetworkClusterRef", "clusterUuid=c")), ["n1", "n3", "v1", "v2", "v3"])

    def test_detach_refused_while_vm_nics(self) -> None:
        """
        Detaching is refused while VMs of the cluster have NICs on the L2's L3 networks
        (L2.1003 naming the VMs); VMs of another cluster do not count.
        """
        self.novlan()
        self.attach("l2a")
        self.attach("l2a", "c2")
        self.l3()
        self.seed_vm_nic("vm1", "l3a", cluster="c")
        err = self.refused(DetachL2NetworkFromClusterMsg(l2_network_uuid="l2a",
                                                         cluster_uuid="c"), L2.DETACH_ERROR)
        self.assertEqual(err.opaque["vmInstanceUuids"], ["vm1"])
        self.assertIn("vm1", err.details)
        self.ok(DetachL2NetworkFromClusterMsg(l2_network_uuid="l2a", cluster_uuid="c2"))

    def test_concurrent_conflicting_attaches(self) -> None:
        """
        Two NoVlan networks on one interface attached to one cluster at the same time: one
        wins.
        """
        self.novlan("n1")
        self.novlan("n2")
        ds = [self.bus.send(AttachL2NetworkToClusterMsg(
            l2_network_uuid=u, cluster_uuid="c", service_id=L2_SERVICE_ID, resource_uuid=u))
            for u in ("n1", "n2")]
        self.pump()
        self.assertEqual(sorted(self.successResultOf(d).success for d in ds), [False, True])
        self.assertEqual(len(self.rows("l2NetworkClusterRef")), 1)


class AttachRaceTests(NetworkTestCase):
    """
    Fault (review 2, item 6): AttachL2NetworkToCluster racing DeleteCluster answered the
    store's raw C{DB.1001}.
    """

    def racing(self, delete_first: bool) -> None:
        """
        The cluster is deleted between the service's look-up and the store's attach:
        before the store's check under the lock (C{delete_first}), or after it (the
        ref's foreign key refuses, as when another node deletes it concurrently).
        """
        orig = MemoryStore.attach_l2_to_cluster.__get__(self.store)

        def racing(l2: str, cluster: str) -> Deferred:
            async def go() -> Any:
                if delete_first:
                    await self.store.delete_cluster(cluster)
                    return await orig(l2, cluster)
                result = await orig(l2, cluster)
                await self.store.delete("l2NetworkClusterRef", result["ref"]["uuid"])
                await self.store.delete_cluster(cluster)
                raise OperationError.of(DB.REFERENCE, "FOREIGN KEY constraint failed")
            return Deferred.fromCoroutine(go())

        self.store.attach_l2_to_cluster = racing

    def test_cluster_deleted_meanwhile(self) -> None:
        """
        L2.1000 naming clusterUuid, whichever check sees it gone; nothing attached.
        """
        self.novlan()
        for delete_first, cluster in ((True, "c2"), (False, "c")):
            self.racing(delete_first)
            err = self.refused(AttachL2NetworkToClusterMsg(l2_network_uuid="l2a",
                                                           cluster_uuid=cluster),
                               L2.NOT_FOUND, "clusterUuid")
            self.assertEqual(err.opaque["uuid"], cluster)
            self.assertIn(cluster, err.details)
            self.assertEqual(self.rows("l2NetworkClusterRef"), [])


class DeleteL2Tests(NetworkTestCase):
    """
    DeleteL2NetworkMsg.
    """

    def test_delete(self) -> None:
        """
        Deleting removes the network and its cluster refs; deleting again is a no-op.
        """
        self.novlan()
        self.attach("l2a")
        self.ok(DeleteL2NetworkMsg(uuid="l2a"))
        self.assertEqual(self.rows("l2Network"), [])
        self.assertEqual(self.rows("l2NetworkClusterRef"), [])
        self.ok(DeleteL2NetworkMsg(uuid="l2a"))

    def test_delete_refused_while_l3(self) -> None:
        """
        An L2 with L3 networks is not deleted: L2.1004 naming them.
        """
        self.novlan()
        self.l3("l3a")
        self.l3("l3b")
        err = self.refused(DeleteL2NetworkMsg(uuid="l2a"), L2.DELETE_ERROR)
        self.assertEqual(err.opaque["l3NetworkUuids"], ["l3a", "l3b"])
        self.assertEqual(len(self.rows("l2Network")), 1)

    def test_vlan_free_after_delete(self) -> None:
        """
        A deleted Vlan network's vlan can be used again.
        """
        self.vlan("v1", 9)
        self.ok(DeleteL2NetworkMsg(uuid="v1"))
        self.vlan("v2", 9)
