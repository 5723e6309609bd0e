"""
The backup storage and image services, deterministically: LocalBus, the in-memory Sftp agent
(L{tests.test_agent_sftp.SftpPair}) and the in-memory store on one task.Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent.hypervisor.backup_sim import DEFAULT_CAPACITY
from agent.hypervisor.simulator import parse_latency
from tests.test_agent_sftp import SftpPair, bs_base
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS
from zcontrol.db.memory import MemoryStore
from zcontrol.services.backupstorage import (
    BS,
    SERVICE_ID,
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
    ChangeBackupStorageStateMsg,
    DeleteBackupStorageMsg,
    DetachBackupStorageFromZoneMsg,
    ReconnectBackupStorageMsg,
    UpdateBackupStorageMsg,
)
from zcontrol.services.backupstorage.service import BackupStorageConfig, BackupStorageService
from zcontrol.services.image import (
    IMAGE,
    AddImageMsg,
    ChangeImageStateMsg,
    DeleteImageMsg,
    SelectBackupStorageMsg,
    UpdateImageMsg,
)
from zcontrol.services.image import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.service import ImageService
from zcontrol.services.inventory import QueryInventoryMsg, QueryService

TABLES = ("backupStorage", "backupStorageZoneRef", "image", "imageBackupStorageRef")


class ServicesTestCase(SynchronousTestCase):
    """
    One clock, one LocalBus, the in-memory store (zones C{z}, C{z2}), a 4-slot Sftp agent
    whose downloads take 5 s, the backup storage, image and query services.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = SftpPair(self.clock, latency={
            "/sftpbackupstorage/download": parse_latency("const:5")})
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)
        for z in ("z", "z2"):
            self.result(self.store.insert("zone", {"uuid": z, "name": z}))
        self.bs_service = BackupStorageService(
            self.clock, self.bus, self.store, self.pair.client,
            BackupStorageConfig(echo_interval=1, connect_timeout=10, echo_timeout=2))
        self.image_service = ImageService(self.clock, self.bus, self.store)
        self.query = QueryService(self.clock, self.bus, self.store)
        for s in (self.bs_service, self.image_service, self.query):
            s.start()
        self.events: list[Any] = []
        self.bus.subscribe("image.#", self.events.append)
        self.bus.subscribe("backupstorage.#", self.events.append)

    def pump(self, seconds: float = 0.0) -> None:
        for _ in range(30):
            self.pair.flush()
            self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
            for _ in range(30):
                self.pair.flush()
                self.clock.advance(0)

    def stop_store(self) -> None:
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def result(self, d: Deferred, seconds: float = 0.0) -> Any:
        self.pump(seconds)
        return self.successResultOf(d)

    def send(self, msg: Any, seconds: float = 0.0) -> Any:
        """
        The reply to C{msg} (successful or not) after C{seconds} of clock.
        """
        return self.result(self.bus.send(msg), seconds)

    def ok(self, msg: Any, seconds: float = 0.0) -> Any:
        reply = self.send(msg, seconds)
        self.assertTrue(reply.success, reply.error)
        return reply

    def refused(self, msg: Any, code: str, seconds: float = 0.0) -> Any:
        reply = self.send(msg, seconds)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, code, reply.error)
        return reply.error

    def add_bs(self, uuid: str, slot: int, zone: str | None = "z", **kw: Any) -> dict:
        reply = self.ok(AddSftpBackupStorageMsg(
            service_id=SERVICE_ID, name=uuid, url="/zstack_bs", hostname=bs_base(slot),
            username="root", password="secret", uuid=uuid, **kw))
        if zone is not None:
            reply = self.ok(AttachBackupStorageToZoneMsg(
                service_id=SERVICE_ID, resource_uuid=uuid, backup_storage_uuid=uuid,
                zone_uuid=zone))
        return reply.inventory

    def add_image(self, uuid: str, bs: list[str], url: str = "http://h/i.qcow2?size=3000&"
                  "actualSize=1000", seconds: float = 5, **kw: Any) -> Any:
        return self.send(AddImageMsg(service_id=IMAGE_SERVICE, name=uuid, url=url,
                                     backup_storage_uuids=bs, uuid=uuid, **kw), seconds)

    def rows(self, resource: str) -> list[dict]:
        reply = self.ok(QueryInventoryMsg(service_id="query", resource=resource, limit=1000))
        return reply.inventories

    def assert_clean(self) -> None:
        for t in TABLES:
            self.assertEqual(self.rows(t), [], t)


class BackupStorageTests(ServicesTestCase):
    """
    Add, attach, detach, state, update, reconnect, delete.
    """

    def test_add_attach_detach_delete(self) -> None:
        """
        An added backup storage is Connected with the agent's capacity, never stores the
        password; attach/detach change attachedZoneUuids; delete leaves nothing and
        publishes BackupStorageDeletedEvent.
        """
        inv = self.add_bs("bs1", 0, zone=None)
        self.assertEqual((inv["status"], inv["state"], inv["type"]),
                         ("Connected", "Enabled", "SftpBackupStorage"))
        self.assertEqual((inv["totalCapacity"], inv["availableCapacity"]),
                         (DEFAULT_CAPACITY, DEFAULT_CAPACITY))
        self.assertEqual((inv["attachedZoneUuids"], inv["url"], inv["sshPort"]),
                         ([], "/zstack_bs", 22))
        self.assertNotIn("secret", repr(inv))
        self.assertEqual(self.pair.bs(0).storage_path, "/zstack_bs")
        for z in ("z2", "z"):
            inv = self.ok(AttachBackupStorageToZoneMsg(
                service_id=SERVICE_ID, resource_uuid="bs1", backup_storage_uuid="bs1",
                zone_uuid=z)).inventory
        self.assertEqual(inv["attachedZoneUuids"], ["z", "z2"])
        err = self.refused(AttachBackupStorageToZoneMsg(
            service_id=SERVICE_ID, backup_storage_uuid="bs1", zone_uuid="z"), BS.ATTACH_ERROR)
        self.assertEqual(err.opaque["zoneUuid"], "z")
        inv = self.ok(DetachBackupStorageFromZoneMsg(
            service_id=SERVICE_ID, backup_storage_uuid="bs1", zone_uuid="z2")).inventory
        self.assertEqual(inv["attachedZoneUuids"], ["z"])
        self.refused(DetachBackupStorageFromZoneMsg(
            service_id=SERVICE_ID, backup_storage_uuid="bs1", zone_uuid="z2"), BS.NOT_ATTACHED)
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1"))
        self.assert_clean()
        self.assertEqual([type(e).__name__ for e in self.events], ["BackupStorageDeletedEvent"])

    def test_add_refusals(self) -> None:
        """
        Bad fields are SYS.1007 naming the field; a second backup storage on one agent is
        BS.1004 (any spelling); an unknown zone is SYS.1003 naming zoneUuid.
        """
        def add(**kw: Any) -> Any:
            fields = dict(service_id=SERVICE_ID, name="b", url="/bs", hostname=bs_base(1))
            fields.update(kw)
            return self.send(AddSftpBackupStorageMsg(**fields))

        for kw, field in [({"name": " "}, "name"), ({"url": "relative"}, "url"),
                          ({"hostname": "ftp://x"}, "hostname"), ({"ssh_port": 0}, "sshPort"),
                          ({"type": "Ceph"}, "type"), ({"hostname": 5}, "hostname")]:
            reply = add(**kw)
            self.assertEqual((reply.error.code, reply.error.opaque.get("field")),
                             (SYS.INVALID_ARGUMENT_ERROR, field), kw)
        self.add_bs("bs1", 0)
        spelling = bs_base(0).replace("bs-agent.example", "BS-AGENT.example") + "/"
        reply = add(hostname=spelling)
        self.assertEqual(reply.error.code, BS.DUPLICATE_HOSTNAME)
        self.assertEqual(reply.error.opaque["existingBackupStorageUuid"], "bs1")
        reply = self.refused(AttachBackupStorageToZoneMsg(
            service_id=SERVICE_ID, backup_storage_uuid="bs1", zone_uuid="nope"),
            SYS.RESOURCE_NOT_FOUND)
        self.assertEqual(reply.opaque["field"], "zoneUuid")
        err = self.refused(AttachBackupStorageToZoneMsg(
            service_id=SERVICE_ID, backup_storage_uuid="nope", zone_uuid="z"), BS.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "backupStorageUuid"))
        self.assertEqual([r["uuid"] for r in self.rows("backupStorage")], ["bs1"])

    def test_add_unreachable_removed(self) -> None:
        """
        An agent that never answers: the add fails with BS.1000 caused by the connect's
        BS.1001, and no row remains.
        """
        d = self.bus.send(AddSftpBackupStorageMsg(
            service_id=SERVICE_ID, name="b", url="/bs", hostname="http://127.0.0.9:1/hosts/9"))
        self.pump()
        for _ in range(12):
            self.pump(1)
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, BS.ADD_ERROR)
        self.assertEqual(reply.error.cause.code, BS.CONNECT_ERROR)
        self.assertEqual(self.rows("backupStorage"), [])

    def test_state_update_reconnect(self) -> None:
        """
        disable/enable, update of name/sshPort, reconnect after the agent forgot it.
        """
        self.add_bs("bs1", 0)
        inv = self.ok(ChangeBackupStorageStateMsg(service_id=SERVICE_ID, uuid="bs1",
                                                  state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        self.refused(ChangeBackupStorageStateMsg(service_id=SERVICE_ID, uuid="bs1",
                                                 state_event="maintain"),
                     SYS.INVALID_ARGUMENT_ERROR)
        inv = self.ok(UpdateBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1", name="new",
                                             ssh_port=2222)).inventory
        self.assertEqual((inv["name"], inv["sshPort"], inv["state"]), ("new", 2222, "Disabled"))
        self.pair.agent.crash_host("0")
        inv = self.ok(ReconnectBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1")).inventory
        self.assertEqual(inv["status"], "Connected")
        self.assertEqual(self.pair.bs(0).uuid, "bs1")


class ImageTests(ServicesTestCase):
    """
    Add (Downloading -> Ready / Error), delete, state, update, select.
    """

    def setUp(self) -> None:
        super().setUp()
        self.add_bs("bs1", 0)
        self.add_bs("bs2", 1)

    def test_downloading_then_ready(self) -> None:
        """
        The image is Downloading while the agents work, then Ready with the agent's sizes,
        refs Ready with their install paths; the capacity of each BS drops.
        """
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="img", uuid="i1",
                                      url="http://h/i.qcow2?size=3000&actualSize=1000",
                                      backup_storage_uuids=["bs1", "bs2"]))
        self.pump()
        self.assertNoResult(d)
        [row] = self.rows("image")
        self.assertEqual(row["status"], "Downloading")
        self.assertEqual({r["status"] for r in row["backupStorageRefs"]}, {"Downloading"})
        reply = self.result(d, 5)
        self.assertTrue(reply.success, reply.error)
        inv = reply.inventory
        self.assertEqual((inv["status"], inv["size"], inv["actualSize"], inv["state"]),
                         ("Ready", 3000, 1000, "Enabled"))
        self.assertEqual([(r["backupStorageUuid"], r["status"], r["installPath"], r["size"])
                          for r in inv["backupStorageRefs"]],
                         [("bs1", "Ready", "/zstack_bs/rootVolumeTemplates/i1/i1.template",
                           1000),
                          ("bs2", "Ready", "/zstack_bs/rootVolumeTemplates/i1/i1.template",
                           1000)])
        for bs in self.rows("backupStorage"):
            self.assertEqual(bs["availableCapacity"], DEFAULT_CAPACITY - 1000)

    def test_all_failed_error(self) -> None:
        """
        All downloads failed: the image is Error, each ref's lastError is the agent's
        reason, the reply is IMAGE.1000 caused by the agent's reason; it can be deleted.
        """
        reply = self.add_image("i1", ["bs1", "bs2"], url="http://h/x?fail=host+unreachable")
        self.assertEqual(reply.error.code, IMAGE.ADD_ERROR)
        self.assertEqual(reply.error.cause.code, BS.DOWNLOAD_ERROR)
        self.assertIn("host unreachable", reply.error.cause.opaque["reason"])
        self.assertIn("host unreachable", reply.error.details)
        [row] = self.rows("image")
        self.assertEqual(row["status"], "Error")
        self.assertEqual([r["status"] for r in row["backupStorageRefs"]], ["Error", "Error"])
        for r in row["backupStorageRefs"]:
            self.assertIn("host unreachable", r["lastError"])
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.assertEqual(self.rows("image"), [])
        self.assertEqual(self.rows("imageBackupStorageRef"), [])

    def test_partial_failure_ready(self) -> None:
        """
        One storage failed: the image is Ready with the good ref only.
        """
        url = "http://h/i.qcow2"
        self.pair.bs(1).failing_urls.add(url)
        reply = self.add_image("i1", ["bs1", "bs2"], url=url)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual([r["backupStorageUuid"] for r in reply.inventory["backupStorageRefs"]],
                         ["bs1"])
        self.assertEqual(reply.inventory["status"], "Ready")

    def test_concurrent_adds(self) -> None:
        """
        Twenty concurrent adds all end Ready, each with its own copy; the capacity is the
        agent's after all of them.
        """
        ds = [self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name=f"i{i}", uuid=f"i{i}",
                                        url=f"http://h/{i}?actualSize=10",
                                        backup_storage_uuids=["bs1"])) for i in range(20)]
        self.pump(5)
        for d in ds:
            reply = self.successResultOf(d)
            self.assertTrue(reply.success, reply.error)
        self.assertEqual({r["status"] for r in self.rows("image")}, {"Ready"})
        self.assertEqual(len(self.pair.bs(0).images), 20)
        [bs1] = [r for r in self.rows("backupStorage") if r["uuid"] == "bs1"]
        self.assertEqual(bs1["availableCapacity"], DEFAULT_CAPACITY - 200)

    def test_add_refusals(self) -> None:
        """
        Every field checked; unknown backup storage BS.1003 naming it; a BS Disconnected,
        Disabled or in no zone IMAGE.1002 naming it; nothing inserted.
        """
        for kw, field in [({"name": ""}, "name"), ({"url": "nfs://x/y"}, "url"),
                          ({"media_type": "Disk"}, "mediaType"), ({"format": "vmdk"}, "format"),
                          ({"format": "iso"}, "format"), ({"platform": "BeOS"}, "platform"),
                          ({"backup_storage_uuids": []}, "backupStorageUuids"),
                          ({"backup_storage_uuids": ["bs1", "bs1"]}, "backupStorageUuids"),
                          ({"system": "yes"}, "system")]:
            fields = dict(service_id=IMAGE_SERVICE, name="i", url="http://h/i",
                          backup_storage_uuids=["bs1"])
            fields.update(kw)
            reply = self.send(AddImageMsg(**fields))
            self.assertEqual((reply.error.code, reply.error.opaque.get("field")),
                             (SYS.INVALID_ARGUMENT_ERROR, field), kw)
        reply = self.add_image("i", ["bs1", "nope"])
        self.assertEqual((reply.error.code, reply.error.opaque["uuid"]), (BS.NOT_FOUND, "nope"))
        self.add_bs("bs3", 2, zone=None)
        reply = self.add_image("i", ["bs3"])
        self.assertEqual(reply.error.code, IMAGE.BACKUP_STORAGE_UNUSABLE)
        self.assertIn("no zone", reply.error.details)
        self.ok(ChangeBackupStorageStateMsg(service_id=SERVICE_ID, uuid="bs2",
                                            state_event="disable"))
        reply = self.add_image("i", ["bs2"])
        self.assertEqual((reply.error.code, reply.error.opaque["backupStorageUuid"]),
                         (IMAGE.BACKUP_STORAGE_UNUSABLE, "bs2"))
        self.result(self.store.update("backupStorage", "bs1", {"status": "Disconnected"}))
        reply = self.add_image("i", ["bs1"])
        self.assertEqual(reply.error.code, IMAGE.BACKUP_STORAGE_UNUSABLE)
        self.assertIn("Disconnected", reply.error.details)
        self.assertEqual(self.rows("image"), [])

    def test_iso(self) -> None:
        """
        An ISO goes under iso/ with format iso.
        """
        reply = self.add_image("i1", ["bs1"], url="file:///isos/x.iso", media_type="ISO",
                               format="iso")
        self.assertEqual(reply.inventory["backupStorageRefs"][0]["installPath"],
                         "/zstack_bs/iso/i1/i1.iso")

    def test_delete_in_use(self) -> None:
        """
        An image used by a live VM is not deleted (IMAGE.1003 naming it); once the VM is
        Destroyed it is: bits gone on the agent, rows gone, ImageDeletedEvent published.
        """
        self.assertTrue(self.add_image("i1", ["bs1", "bs2"]).success)
        self.result(self.store.insert("vmInstance", {"uuid": "vm1", "name": "vm", "cpuNum": 1,
                                                     "memorySize": 1, "imageUuid": "i1",
                                                     "state": "Running"}))
        err = self.refused(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"), IMAGE.IN_USE)
        self.assertEqual(err.opaque["vmInstanceUuids"], ["vm1"])
        self.result(self.store.update("vmInstance", "vm1", {"state": "Destroyed"}))
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.assertEqual((self.pair.bs(0).images, self.pair.bs(1).images), ({}, {}))
        self.assertEqual({r["availableCapacity"] for r in self.rows("backupStorage")},
                         {DEFAULT_CAPACITY})
        self.assertEqual([(type(e).__name__, e.image_uuid) for e in self.events],
                         [("ImageDeletedEvent", "i1")])
        self.assertEqual((self.rows("image"), self.rows("imageBackupStorageRef")), ([], []))
        # Deleting it again succeeds (idempotent) and publishes nothing more.
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.assertEqual(len(self.events), 1)

    def test_delete_with_disconnected_bs(self) -> None:
        """
        A Disconnected backup storage does not stop the delete: its ref goes all the same.
        """
        self.assertTrue(self.add_image("i1", ["bs1", "bs2"]).success)
        self.result(self.store.update("backupStorage", "bs2", {"status": "Disconnected"}))
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.assertEqual(self.pair.bs(0).images, {})
        self.assertEqual(len(self.pair.bs(1).images), 1)
        self.assertEqual(self.rows("imageBackupStorageRef"), [])

    def test_state_update(self) -> None:
        """
        disable, update of name/platform; a bad platform is SYS.1007.
        """
        self.add_image("i1", ["bs1"])
        inv = self.ok(ChangeImageStateMsg(service_id=IMAGE_SERVICE, uuid="i1",
                                          state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        inv = self.ok(UpdateImageMsg(service_id=IMAGE_SERVICE, uuid="i1", name="n",
                                     platform="Windows")).inventory
        self.assertEqual((inv["name"], inv["platform"]), ("n", "Windows"))
        self.refused(UpdateImageMsg(service_id=IMAGE_SERVICE, uuid="i1", platform="x"),
                     SYS.INVALID_ARGUMENT_ERROR)
        self.refused(UpdateImageMsg(service_id=IMAGE_SERVICE, uuid="nope", name="x"),
                     IMAGE.NOT_FOUND)

    def test_select_backup_storage(self) -> None:
        """
        The selection picks a Connected BS of the zone holding the image Ready; none in
        another zone; none once the only one is Disconnected.
        """
        self.add_image("i1", ["bs1"])
        reply = self.ok(SelectBackupStorageMsg(service_id=IMAGE_SERVICE, image_uuid="i1",
                                               zone_uuid="z"))
        self.assertEqual((reply.backup_storage_uuid, reply.install_path, reply.hostname,
                          reply.size), ("bs1", "/zstack_bs/rootVolumeTemplates/i1/i1.template",
                                        bs_base(0), 3000))
        self.refused(SelectBackupStorageMsg(service_id=IMAGE_SERVICE, image_uuid="i1",
                                            zone_uuid="z2"), IMAGE.NO_BACKUP_STORAGE)
        self.result(self.store.update("backupStorage", "bs1", {"status": "Disconnected"}))
        self.refused(SelectBackupStorageMsg(service_id=IMAGE_SERVICE, image_uuid="i1",
                                            zone_uuid="z"), IMAGE.NO_BACKUP_STORAGE)

    def test_delete_backup_storage_releases(self) -> None:
        """
        Deleting a BS drops its refs: an image still on another BS stays Ready, one left
        with no copy becomes Deleted; deleting the images and BSes leaves the store clean.
        """
        self.add_image("both", ["bs1", "bs2"])
        self.add_image("only1", ["bs1"])
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1"))
        images = {r["uuid"]: r for r in self.rows("image")}
        self.assertEqual(images["both"]["status"], "Ready")
        self.assertEqual([r["backupStorageUuid"] for r in images["both"]["backupStorageRefs"]],
                         ["bs2"])
        self.assertEqual((images["only1"]["status"], images["only1"]["backupStorageRefs"]),
                         ("Deleted", []))
        for uuid in ("both", "only1"):
            self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid=uuid))
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs2"))
        self.assert_clean()

    def test_delete_backup_storage_while_downloading_refused(self) -> None:
        """
        A BS an image is downloading to is not deleted (BS.1009 caused by IMAGE.1005).
        """
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        self.pump()
        err = self.refused(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1"),
                           BS.DELETE_ERROR)
        self.assertEqual(err.cause.code, IMAGE.WRONG_STATUS)
        self.assertTrue(self.result(d, 5).success)
