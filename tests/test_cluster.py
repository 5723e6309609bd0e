"""
The cluster service on MemoryStore + LocalBus + Clock.
"""

from __future__ import annotations

from twisted.internet.defer import fail

from tests.test_zone import ServiceTestCase
from zcontrol.core.errors import OperationError
from zcontrol.db.interfaces import DB
from zcontrol.services.cluster import (
    CLUSTER,
    ChangeClusterStateMsg,
    ClusterDeletedEvent,
    ClusterStateChangedEvent,
    CreateClusterMsg,
    DeleteClusterMsg,
    UpdateClusterMsg,
)
from zcontrol.services.zone import ZONE

CLUSTER_FIELDS = {"uuid", "name", "description", "zoneUuid", "hypervisorType", "type",
                  "state", "createDate", "lastOpDate"}


class ClusterTestCase(ServiceTestCase):
    """
    With zone C{z1}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.zone("z1")


class CreateClusterTests(ClusterTestCase):
    """
    CreateClusterMsg.
    """

    def test_create(self) -> None:
        """
        A KVM cluster of type zstack, Enabled; the inventory is its row.
        """
        inv = self.ok(CreateClusterMsg(service_id="cluster", zone_uuid="z1", name="c",
                                       description="d")).inventory
        self.assertEqual(set(inv), CLUSTER_FIELDS)
        self.assertEqual((inv["zoneUuid"], inv["hypervisorType"], inv["type"], inv["state"],
                          inv["description"], inv["createDate"]),
                         ("z1", "KVM", "zstack", "Enabled", "d", 1000.0))
        self.assertEqual(self.row("cluster", inv["uuid"]), inv)

    def test_unknown_zone(self) -> None:
        """
        The zone's NOT_FOUND code naming zoneUuid; nothing created.
        """
        err = self.refused(CreateClusterMsg(service_id="cluster", zone_uuid="nope",
                                            name="c"), ZONE.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "zoneUuid"))
        self.assertEqual(self.count("cluster"), 0)

    def test_zone_deleted_meanwhile(self) -> None:
        """
        A zone deleted between the check and the insert (the insert's foreign key fails)
        is still ZONE.1000 naming zoneUuid.
        """
        real_insert = self.store.insert
        self.patch(self.store, "insert", lambda resource, values: fail(OperationError.of(
            DB.REFERENCE, "FOREIGN KEY constraint failed")) if resource == "cluster"
            else real_insert(resource, values))
        err = self.refused(CreateClusterMsg(service_id="cluster", zone_uuid="z1", name="c"),
                           ZONE.NOT_FOUND)
        self.assertEqual(err.opaque["field"], "zoneUuid")

    def test_invalid_fields(self) -> None:
        """
        Each field: SYS.1007 naming it (only KVM clusters; only type zstack).
        """
        def msg(**kw):
            values = dict(service_id="cluster", zone_uuid="z1", name="c")
            values.update(kw)
            return CreateClusterMsg(**values)

        err = self.invalid(msg(hypervisor_type="XenServer"), "hypervisorType")
        self.assertEqual(err.opaque["value"], "XenServer")
        self.invalid(msg(hypervisor_type="kvm"), "hypervisorType")
        self.invalid(msg(type="vmware"), "type")
        self.invalid(msg(name=""), "name")
        self.invalid(msg(description="x" * 3000), "description")
        self.invalid(msg(zone_uuid=""), "zoneUuid")
        self.invalid(msg(zone_uuid=None), "zoneUuid")
        self.invalid(msg(uuid="a b"), "uuid")
        self.assertEqual(self.count("cluster"), 0)

    def test_duplicate_uuid(self) -> None:
        """
        CLUSTER.1002 naming the uuid.
        """
        self.cluster("c1")
        err = self.refused(CreateClusterMsg(service_id="cluster", zone_uuid="z1", name="x",
                                            uuid="c1"), CLUSTER.DUPLICATE)
        self.assertEqual(err.opaque["field"], "uuid")
        self.assertEqual(self.row("cluster", "c1")["name"], "c1")


class UpdateAndStateTests(ClusterTestCase):
    """
    UpdateClusterMsg and ChangeClusterStateMsg.
    """

    def test_update(self) -> None:
        """
        Name and description change.
        """
        self.cluster("c1")
        inv = self.ok(UpdateClusterMsg(service_id="cluster", uuid="c1", name="n",
                                       description="d")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("n", "d"))
        self.assertEqual(self.row("cluster", "c1"), inv)

    def test_update_unknown_and_invalid(self) -> None:
        """
        CLUSTER.1000 naming the uuid; SYS.1007 naming the field.
        """
        err = self.refused(UpdateClusterMsg(service_id="cluster", uuid="nope", name="n"),
                           CLUSTER.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "uuid"))
        self.cluster("c1")
        self.invalid(UpdateClusterMsg(service_id="cluster", uuid="c1", name=""), "name")

    def test_state(self) -> None:
        """
        disable/enable with events; unknown event SYS.1007; unknown cluster CLUSTER.1000.
        """
        self.cluster("c1")
        inv = self.ok(ChangeClusterStateMsg(service_id="cluster", uuid="c1",
                                            state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        self.ok(ChangeClusterStateMsg(service_id="cluster", uuid="c1", state_event="disable"))
        self.ok(ChangeClusterStateMsg(service_id="cluster", uuid="c1", state_event="enable"))
        self.assertEqual(self.row("cluster", "c1")["state"], "Enabled")
        self.invalid(ChangeClusterStateMsg(service_id="cluster", uuid="c1",
                                           state_event="maintain"), "stateEvent")
        self.refused(ChangeClusterStateMsg(service_id="cluster", uuid="x",
                                           state_event="enable"), CLUSTER.NOT_FOUND)
        self.pump()
        self.assertEqual([(e.cluster_uuid, e.zone_uuid, e.old_state, e.new_state)
                          for e in self.of_type(ClusterStateChangedEvent)],
                         [("c1", "z1", "Enabled", "Disabled"),
                          ("c1", "z1", "Disabled", "Enabled")])


class DeleteClusterTests(ClusterTestCase):
    """
    DeleteClusterMsg.
    """

    def seed_host(self, uuid: str) -> None:
        self.seed("host", {"uuid": uuid, "name": uuid, "zoneUuid": "z1", "clusterUuid": "c1",
                           "managementIp": f"10.0.0.{len(uuid)}{uuid[-1]}",
                           "hypervisorType": "KVM"})

    def test_delete(self) -> None:
        """
        An empty cluster goes; an event; the reply has no inventory.
        """
        self.cluster("c1")
        reply = self.ok(DeleteClusterMsg(service_id="cluster", resource_uuid="c1", uuid="c1"))
        self.assertIsNone(reply.inventory)
        self.assertIsNone(self.row("cluster", "c1"))
        self.pump()
        [event] = self.of_type(ClusterDeletedEvent)
        self.assertEqual((event.cluster_uuid, event.zone_uuid), ("c1", "z1"))

    def test_refused_with_hosts(self) -> None:
        """
        CLUSTER.1001 naming the hosts; nothing deleted.
        """
        self.cluster("c1")
        self.seed_host("h1")
        self.seed_host("h2")
        err = self.refused(DeleteClusterMsg(service_id="cluster", uuid="c1"),
                           CLUSTER.HAS_DEPENDENTS)
        self.assertEqual(err.opaque["dependents"],
                         {"host": {"count": 2, "uuids": ["h1", "h2"]}})
        self.assertEqual(err.opaque["clusterUuid"], "c1")
        self.assertIn("h1, h2", err.details)
        self.assertIsNotNone(self.row("cluster", "c1"))

    def test_host_added_after_check(self) -> None:
        """
        The store's DB.1001 (a host committed after the check) becomes CLUSTER.1001
        naming it.
        """
        self.cluster("c1")
        self.seed_host("h7")
        self.patch(self.store, "delete_cluster", lambda uuid: fail(OperationError.of(
            DB.REFERENCE, "FOREIGN KEY constraint failed")))
        err = self.refused(DeleteClusterMsg(service_id="cluster", uuid="c1"),
                           CLUSTER.HAS_DEPENDENTS)
        self.assertEqual(err.opaque["dependents"]["host"]["uuids"], ["h7"])

    def test_delete_detaches(self) -> None:
        """
        The cluster's primary storage and L2 network refs go with it (the storages and
        networks stay); the event lists what was attached.
        """
        self.cluster("c1")
        self.seed("primaryStorage", {"uuid": "ps", "name": "ps", "zoneUuid": "z1",
                                     "url": "/ps", "type": "NFS"})
        self.seed("primaryStorageClusterRef", {"uuid": "r1", "primaryStorageUuid": "ps",
                                               "clusterUuid": "c1"})
        self.seed("l2Network", {"uuid": "l2", "name": "l2", "zoneUuid": "z1",
                                "physicalInterface": "eth0"})
        self.seed("l2NetworkClusterRef", {"uuid": "r2", "l2NetworkUuid": "l2",
                                          "clusterUuid": "c1"})
        self.ok(DeleteClusterMsg(service_id="cluster", uuid="c1"))
        self.assertEqual(self.count("primaryStorageClusterRef"), 0)
        self.assertEqual(self.count("l2NetworkClusterRef"), 0)
        self.assertIsNotNone(self.row("primaryStorage", "ps"))
        self.assertIsNotNone(self.row("l2Network", "l2"))
        self.pump()
        [event] = self.of_type(ClusterDeletedEvent)
        self.assertEqual((event.primary_storage_uuids, event.l2_network_uuids),
                         (["ps"], ["l2"]))

    def test_delete_unknown(self) -> None:
        """
        Deleting a cluster that does not exist succeeds with no inventory (ZStack's
        C{successIfResourceNotExisting}).
        """
        reply = self.ok(DeleteClusterMsg(service_id="cluster", uuid="nope"))
        self.assertIsNone(reply.inventory)

    def test_concurrent_deletes(self) -> None:
        """
        Two deletes together: both succeed (the second finds it gone), one deletes it.
        """
        self.cluster("c1")
        d1 = self.bus.send(DeleteClusterMsg(service_id="cluster", resource_uuid="c1",
                                            uuid="c1"))
        d2 = self.bus.send(DeleteClusterMsg(service_id="cluster", resource_uuid="c1",
                                            uuid="c1"))
        r1, r2 = self.result(d1), self.result(d2)
        self.assertTrue(r1.success, r1.error)
        self.assertTrue(r2.success, r2.error)
        self.assertIsNone(r2.inventory)
        self.assertEqual(self.count("cluster"), 0)
