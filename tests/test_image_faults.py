"""
Regression tests of the image and backup storage services' faults: an add interrupted by a
restart of its management node (the image must not stay Downloading), and a delete routed
to the image's (backup storage's) owner node while its add ran on another node.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from agent import protocol as p
from tests.test_agent_sftp import bs_base
from tests.test_backup_storage import ServicesTestCase
from zcontrol.bus.local import LocalBus
from zcontrol.db.query import Condition, Query
from zcontrol.services.backupstorage import (
    SERVICE_ID,
    AddSftpBackupStorageMsg,
    DeleteBackupStorageMsg,
    DeleteBitsOnBackupStorageMsg,
)
from zcontrol.services.backupstorage.service import BackupStorageConfig, BackupStorageService
from zcontrol.services.image import IMAGE, AddImageMsg, DeleteImageMsg
from zcontrol.services.image import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.service import ADD_IMAGE_JOB, RESTARTED, ImageService


class GatedAgents:
    """
    The agent client, except that the commands of one type to one agent wait until
    L{release} (forever unless released): a download that outlives its management node.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gates: dict[tuple[str, type], list[Callable[[], None]] | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def hold(self, base: str, cmd_type: type) -> None:
        self.gates[(base, cmd_type)] = []

    def release(self, base: str, cmd_type: type) -> None:
        for go in self.gates.pop((base, cmd_type)) or []:
            go()

    def call(self, base: str, cmd: Any, **kw: Any) -> Deferred:
        waiting = self.gates.get((base, type(cmd)))
        if waiting is None:
            return self.real.call(base, cmd, **kw)
        d: Deferred = Deferred()
        waiting.append(lambda: self.real.call(base, cmd, **kw).chainDeferred(d))
        return d


class FaultsTestCase(ServicesTestCase):
    def jobs(self, resource_uuid: str) -> list[dict]:
        page = self.result(self.store.query("job", Query(
            conditions=[Condition("resourceUuid", "=", resource_uuid)], limit=100)))
        return page.inventories

    def image(self, uuid: str) -> dict:
        [row] = [r for r in self.rows("image") if r["uuid"] == uuid]
        return row


class RestartTests(FaultsTestCase):
    """
    An add whose management node stops mid-download is resolved when the node starts
    again (ZSTACK_FACTS section 8: no stuck task).
    """

    def setUp(self) -> None:
        super().setUp()
        self.agents = GatedAgents(self.pair.client)
        self.bs_service.agents = self.agents
        self.add_bs("bs1", 0)
        self.add_bs("bs2", 1)
        self.deletes: list[DeleteBitsOnBackupStorageMsg] = []

    def restart(self) -> ImageService:
        """
        The image service dies with its downloads in flight (it never runs again); a new
        one starts on the same store as the same node.
        """
        self.bus.unregister_service(IMAGE_SERVICE)
        bs_handle = self.bus._services[SERVICE_ID]

        def spy(msg: Any) -> Any:
            if isinstance(msg, DeleteBitsOnBackupStorageMsg):
                self.deletes.append(msg)
            return bs_handle(msg)

        self.bus.register_service(SERVICE_ID, spy)
        service = ImageService(self.clock, self.bus, self.store)
        service.start()
        self.result(service.recovered)
        self.pump()
        return service

    def test_add_job(self) -> None:
        """
        An add is a job of its node: Succeeded when the add succeeded, Failed with the
        add's error when it failed; the job records the message's fields.
        """
        self.assertTrue(self.add_image("i1", ["bs1"]).success)
        [job] = self.jobs("i1")
        self.assertEqual((job["apiName"], job["managementNodeUuid"], job["state"],
                          job["apiMessage"]["backup_storage_uuids"], job["result"]),
                         (ADD_IMAGE_JOB, "mn-1", "Succeeded", ["bs1"], {"imageUuid": "i1"}))
        reply = self.add_image("i2", ["bs1"], url="http://h/x?fail=gone")
        [job] = self.jobs("i2")
        self.assertEqual((job["state"], job["error"]["code"]),
                         ("Failed", reply.error.code))

    def test_restart_mid_download_error(self) -> None:
        """
        The only download was in flight: after the restart the image is Error, its ref
        Error with lastError saying why, the job Failed, the partial bits deleted, and the
        backup storage can be deleted.
        """
        self.agents.hold(bs_base(0), p.SftpDownloadCmd)
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        self.pump(60)
        self.assertNoResult(d)
        self.assertEqual(self.image("i1")["status"], "Downloading")
        self.assertEqual([j["state"] for j in self.jobs("i1")], ["Running"])
        self.restart()
        row = self.image("i1")
        self.assertEqual(row["status"], "Error")
        self.assertEqual([(r["status"], r["lastError"]) for r in row["backupStorageRefs"]],
                         [("Error", RESTARTED)])
        [job] = self.jobs("i1")
        self.assertEqual((job["state"], job["error"]["code"]), ("Failed", IMAGE.ADD_ERROR))
        self.assertIn(RESTARTED, job["error"]["details"])
        self.assertEqual([(m.backup_storage_uuid, m.install_path) for m in self.deletes],
                         [("bs1", "/zstack_bs/rootVolumeTemplates/i1/i1.template")])
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1"))
        self.assertEqual(self.image("i1")["status"], "Deleted")

    def test_restart_after_one_download_ready(self) -> None:
        """
        One download ended before the restart, the other did not: the image is Ready with
        the copy that arrived, the other ref Error, the job Succeeded; both backup storages
        can be deleted.
        """
        self.agents.hold(bs_base(1), p.SftpDownloadCmd)
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url="http://h/i?size=3000&actualSize=1000",
                                      backup_storage_uuids=["bs1", "bs2"]))
        self.pump(60)
        self.assertNoResult(d)
        self.assertEqual(self.image("i1")["status"], "Downloading")
        self.restart()
        row = self.image("i1")
        self.assertEqual((row["status"], row["size"], row["actualSize"]), ("Ready", 3000, 1000))
        self.assertEqual([(r["backupStorageUuid"], r["status"], r["lastError"])
                          for r in row["backupStorageRefs"]],
                         [("bs1", "Ready", None), ("bs2", "Error", RESTARTED)])
        [job] = self.jobs("i1")
        self.assertEqual((job["state"], job["result"]), ("Succeeded", {"imageUuid": "i1"}))
        self.assertEqual([m.backup_storage_uuid for m in self.deletes], ["bs2"])
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs2"))
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid="bs1"))
        self.assert_clean()

    def test_restart_leaves_other_jobs(self) -> None:
        """
        Only this node's Running add jobs are resolved: another node's, and jobs of other
        operations, stay Running.
        """
        for job, api, node in [("j1", ADD_IMAGE_JOB, "mn-2"), ("j2", "StartVmInstanceMsg",
                                                                 "mn-1")]:
            self.result(self.store.create_job(job, api, {}, node, resource_uuid=job))
        self.restart()
        for job in ("j1", "j2"):
            self.assertEqual(self.jobs(job)[0]["state"], "Running")


class DeleteDuringAddTests(FaultsTestCase):
    """
    A delete while the image downloads, on one node.
    """

    def setUp(self) -> None:
        super().setUp()
        self.add_bs("bs1", 0)

    def test_delete_downloading_refused(self) -> None:
        """
        A delete of an image still Downloading is refused (IMAGE.1005 naming the status);
        the add ends Ready.
        """
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        self.pump()
        err = self.refused(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1",
                                          resource_uuid="i1"), IMAGE.WRONG_STATUS)
        self.assertEqual(err.opaque["status"], "Downloading")
        self.assertIn("Downloading", err.details)
        self.assertTrue(self.result(d, 5).success)
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1", resource_uuid="i1"))

    def test_rows_gone_at_the_end(self) -> None:
        """
        The rows went while the image downloaded (whatever deleted them): the add deletes
        the bits it downloaded and fails with IMAGE.1001 naming the image, never SYS.1003.
        """
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        self.pump()
        self.result(self.store.delete_image("i1"))
        reply = self.result(d, 5)
        self.assertEqual((reply.error.code, reply.error.opaque["uuid"]),
                         (IMAGE.NOT_FOUND, "i1"))
        self.assertEqual(self.pair.bs(0).images, {})
        self.assertEqual(self.jobs("i1")[0]["state"], "Failed")


class TwoNodesTests(FaultsTestCase):
    """
    Two management nodes on one ring and one store: the adds run on the owner of the new
    resource's uuid, in its chain, whichever node received them.
    """

    def setUp(self) -> None:
        super().setUp()
        self.bus2 = LocalBus(self.clock, node_id="mn-2", broker=self.bus._broker)
        self.bus2.start()
        self.agents = GatedAgents(self.pair.client)
        self.bs_service.agents = self.agents
        config = BackupStorageConfig(echo_interval=1, connect_timeout=10, echo_timeout=2)
        self.bs2 = BackupStorageService(self.clock, self.bus2, self.store, self.agents, config)
        self.image2 = ImageService(self.clock, self.bus2, self.store)
        for s in (self.bs2, self.image2):
            s.start()

    def owned_by(self, node: str, prefix: str) -> str:
        for i in range(1000):
            if self.bus.owner_of(f"{prefix}-{i}") == node:
                return f"{prefix}-{i}"
        raise AssertionError(node)

    def test_add_image_runs_on_owner(self) -> None:
        """
        An add received by mn-1 for an image that mn-2 owns runs on mn-2 (its job is mn-2's),
        so a delete (routed to mn-2) meanwhile is refused instead of removing the rows under
        the add; the add ends Ready.
        """
        self.add_bs("bs1", 0)
        uuid = self.owned_by("mn-2", "img")
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid=uuid,
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        self.pump()
        self.assertEqual([(j["managementNodeUuid"], j["state"]) for j in self.jobs(uuid)],
                         [("mn-2", "Running")])
        self.refused(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid=uuid, resource_uuid=uuid),
                     IMAGE.WRONG_STATUS)
        reply = self.result(d, 5)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.inventory["status"], "Ready")
        self.assertEqual(self.jobs(uuid)[0]["state"], "Succeeded")
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid=uuid, resource_uuid=uuid))
        self.assertEqual(self.pair.bs(0).images, {})

    def test_add_image_without_uuid_forwarded(self) -> None:
        """
        An add without a uuid gets one on the node that received it, and runs on its owner:
        adds are sent until one was given a uuid the other node owns (each uuid is either
        node's with probability 1/2: 64 adds all owned by mn-1 would happen once in 2**63
        runs), and every add ran on its uuid's owner.
        """
        self.add_bs("bs1", 0)
        nodes = set()
        for i in range(64):
            reply = self.send(AddImageMsg(service_id=IMAGE_SERVICE, name=f"i{i}",
                                          url="http://h/i", backup_storage_uuids=["bs1"]), 5)
            self.assertTrue(reply.success, reply.error)
            [job] = self.jobs(reply.inventory["uuid"])
            self.assertEqual(job["managementNodeUuid"],
                             self.bus.owner_of(reply.inventory["uuid"]))
            nodes.add(job["managementNodeUuid"])
            if nodes == {"mn-1", "mn-2"}:
                break
        self.assertEqual(nodes, {"mn-1", "mn-2"})

    def test_add_backup_storage_runs_on_owner(self) -> None:
        """
        A backup storage added through mn-1 that mn-2 owns is added on mn-2 in its chain: a
        delete (routed to mn-2) during the connect waits for the add, which ends Connected,
        then deletes it.
        """
        uuid = self.owned_by("mn-2", "bs")
        self.agents.hold(bs_base(0), p.SftpConnectCmd)
        add = self.bus.send(AddSftpBackupStorageMsg(
            service_id=SERVICE_ID, name="b", url="/zstack_bs", hostname=bs_base(0),
            username="root", password="secret", uuid=uuid))
        self.pump()
        delete = self.bus.send(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid=uuid,
                                                      resource_uuid=uuid))
        self.pump()
        self.assertNoResult(delete)
        self.agents.release(bs_base(0), p.SftpConnectCmd)
        reply = self.result(add)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.inventory["status"], "Connected")
        reply = self.result(delete)
        self.assertTrue(reply.success, reply.error)
        self.assert_clean()
