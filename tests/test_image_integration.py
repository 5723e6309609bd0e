"""
The backup storage and image services against the real pieces: a real Sftp agent over
loopback HTTP (klein, listenTCP), the real agent client and its callback endpoint, the
LocalBus, and the store on SQLite and on PostgreSQL, on the real reactor.
"""

from __future__ import annotations

import random

from twisted.internet import defer, reactor
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase

from agent import protocol as p
from agent.app import AgentApp, CallbackPolicy
from agent.http import QuietSite, make_http_client, make_pool
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig, parse_latency
from agent.sftpbackupstorage import SftpBackupStoragePlugin
from tests.db_support import PostgresStoreFactory, SQLiteStoreFactory
from tests.test_agent_loopback import _drain
from zcontrol.agentclient import AgentClient, CallbackEndpoint
from zcontrol.agentclient import callback_site as callback_site_for
from zcontrol.bus.local import LocalBus
from zcontrol.db import open_store
from zcontrol.services.backupstorage import (
    BS,
    SERVICE_ID,
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
    DeleteBackupStorageMsg,
)
from zcontrol.services.backupstorage.service import BackupStorageConfig, BackupStorageService
from zcontrol.services.image import IMAGE, AddImageMsg, DeleteImageMsg
from zcontrol.services.image import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.service import ADD_IMAGE_JOB, RESTARTED, ImageService
from zcontrol.services.inventory import inventory


class _Integration:
    """
    Add BS, attach, add images (ok, partial, failed), delete all, on a real backend.
    """

    def setUp(self) -> defer.Deferred:
        rng = random.Random(3)
        self.cluster = SimulatedCluster(SimulatorConfig(clock=reactor, rng=rng, latency={
            "/sftpbackupstorage/download": parse_latency("const:0.05")}))
        agent_pool = make_pool(reactor, 100)
        self.agent = AgentApp(clock=reactor, http=make_http_client(reactor, agent_pool),
                              backend_factory=self.cluster.backends,
                              plugins=[SftpBackupStoragePlugin()], host_count=4,
                              policy=CallbackPolicy(max_attempts=3, initial_delay=0.05),
                              rng=rng)
        agent_site = WrappingFactory(QuietSite(self.agent.app.resource()))
        agent_port = reactor.listenTCP(0, agent_site, interface="127.0.0.1")
        self.agent_url = f"http://127.0.0.1:{agent_port.getHost().port}"
        self.client = AgentClient.create(reactor, "", pool_size=100, default_timeout=30)
        endpoint = CallbackEndpoint(self.client)
        callback_site = WrappingFactory(callback_site_for(endpoint))
        callback_port = reactor.listenTCP(0, callback_site, interface="127.0.0.1")
        self.client.callback_url = (
            f"http://127.0.0.1:{callback_port.getHost().port}{endpoint.path}")
        self.addCleanup(agent_port.stopListening)
        self.addCleanup(callback_port.stopListening)
        self.addCleanup(_drain, agent_site)
        self.addCleanup(_drain, callback_site)
        self.addCleanup(agent_pool.closeCachedConnections)
        self.addCleanup(self.client.close)
        self.addCleanup(self.agent.drain)
        self.bus = LocalBus(reactor, node_id="mn-1")

        async def start() -> None:
            await self.setUp_database()
            self.store = open_store(self.store_url(), reactor, **self.store_options)
            await self.store.start()
            await self.bus.start()
            self.bs = BackupStorageService(reactor, self.bus, self.store, self.client,
                                           BackupStorageConfig(echo_interval=0.05,
                                                               connect_timeout=5))
            self.images = ImageService(reactor, self.bus, self.store)
            self.bs.start()
            self.images.start()
            await self.store.insert("zone", {"uuid": "z", "name": "zone"})

        async def stop() -> None:
            await self.images.stop()
            await self.bs.stop()
            await self.bus.stop()
            await self.store.stop()
            await self.tearDown_database()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return defer.Deferred.fromCoroutine(start())

    def test_lifecycle(self) -> defer.Deferred:
        """
        Two backup storages on one agent (two slots) are Connected with the agent's
        capacity; a second one on a taken slot is BS.1004; an image goes Ready on both with
        the agent's sizes, a partially failing one Ready on one, a failing one Error with
        the agent's reason; deleting everything leaves the tables empty.
        """

        async def go() -> None:
            for uuid, slot in (("bs1", 1), ("bs2", 2)):
                reply = await self.bus.send(AddSftpBackupStorageMsg(
                    service_id=SERVICE_ID, name=uuid, url="/zstack_bs", uuid=uuid,
                    hostname=p.host_base_url(self.agent_url, slot), password="pw"))
                self.assertTrue(reply.success, reply.error)
                self.assertEqual(reply.inventory["status"], "Connected")
                reply = await self.bus.send(AttachBackupStorageToZoneMsg(
                    service_id=SERVICE_ID, resource_uuid=uuid, backup_storage_uuid=uuid,
                    zone_uuid="z"))
                self.assertEqual(reply.inventory["attachedZoneUuids"], ["z"])
            reply = await self.bus.send(AddSftpBackupStorageMsg(
                service_id=SERVICE_ID, name="dup", url="/x",
                hostname=p.host_base_url(self.agent_url, 1) + "/"))
            self.assertEqual(reply.error.code, BS.DUPLICATE_HOSTNAME)
            reply = await self.bus.send(AddImageMsg(
                service_id=IMAGE_SERVICE, name="i", uuid="i1", url="http://h/i?size=99&"
                "actualSize=33", backup_storage_uuids=["bs1", "bs2"]))
            self.assertTrue(reply.success, reply.error)
            self.assertEqual((reply.inventory["status"], reply.inventory["size"],
                              reply.inventory["actualSize"],
                              len(reply.inventory["backupStorageRefs"])), ("Ready", 99, 33, 2))
            self.cluster.backends("2").backup_storage.failing_urls.add("http://h/half")
            reply = await self.bus.send(AddImageMsg(
                service_id=IMAGE_SERVICE, name="h", uuid="i2", url="http://h/half",
                backup_storage_uuids=["bs1", "bs2"]))
            self.assertEqual([r["backupStorageUuid"]
                              for r in reply.inventory["backupStorageRefs"]], ["bs1"])
            reply = await self.bus.send(AddImageMsg(
                service_id=IMAGE_SERVICE, name="f", uuid="i3", url="http://h/fail?fail=gone",
                backup_storage_uuids=["bs1"]))
            self.assertEqual(reply.error.code, IMAGE.ADD_ERROR)
            inv = await inventory(self.store, "image", "i3")
            self.assertEqual(inv["status"], "Error")
            self.assertIn("gone", inv["backupStorageRefs"][0]["lastError"])
            bs1 = await self.store.get("backupStorage", "bs1")
            self.assertEqual(bs1["totalCapacity"] - bs1["availableCapacity"], 33 + 1024**3)  # i1, i2 (default 1 GiB)
            for uuid in ("i1", "i2", "i3"):
                reply = await self.bus.send(DeleteImageMsg(service_id=IMAGE_SERVICE,
                                                           uuid=uuid))
                self.assertTrue(reply.success, reply.error)
            self.assertEqual(self.cluster.backends("1").backup_storage.images, {})
            for uuid in ("bs1", "bs2"):
                reply = await self.bus.send(DeleteBackupStorageMsg(service_id=SERVICE_ID,
                                                                   uuid=uuid))
                self.assertTrue(reply.success, reply.error)
            from zcontrol.db.query import Query
            for resource in ("backupStorage", "backupStorageZoneRef", "image",
                             "imageBackupStorageRef"):
                page = await self.store.query(resource, Query(count=True))
                self.assertEqual(page.total, 0, resource)

        return defer.Deferred.fromCoroutine(go())

    def test_restart_resolution(self) -> defer.Deferred:
        """
        The store steps of an add interrupted by a restart, on the real backend: a download
        recorded as it ended, then the resolution: the image Ready with it, the other ref
        Error saying why, the job Succeeded; a job whose image was never inserted Failed
        with IMAGE.1001; the end of an add whose rows are gone changes nothing.
        """

        async def go() -> None:
            for uuid in ("bs1", "bs2"):
                await self.store.insert("backupStorage", {
                    "uuid": uuid, "name": uuid, "url": "/zstack_bs", "type": "SftpBackupStorage",
                    "hostname": p.host_base_url(self.agent_url, 3), "status": "Disconnected"})
            await self.store.create_job("j1", ADD_IMAGE_JOB, {"uuid": "i1"}, "mn-1",
                                        resource_uuid="i1")
            await self.store.add_image({
                "uuid": "i1", "name": "i", "url": "http://h/i", "status": "Downloading",
                "mediaType": "RootVolumeTemplate", "format": "qcow2", "platform": "Linux",
                "system": False}, ["bs1", "bs2"])
            done = {"backupStorageUuid": "bs1", "installPath": "/zstack_bs/x", "size": 99,
                    "actualSize": 33, "md5sum": "m"}
            self.assertTrue(await self.store.record_image_ref_download("i1", done))
            self.assertFalse(await self.store.record_image_ref_download(
                "i1", {"backupStorageUuid": "bs1", "error": "late"}))
            await self.store.create_job("j2", ADD_IMAGE_JOB, {"uuid": "i2"}, "mn-1",
                                        resource_uuid="i2")
            await self.images.resolve_add_image_jobs(await self.store.running_jobs("mn-1"))
            inv = await inventory(self.store, "image", "i1")
            self.assertEqual((inv["status"], inv["size"], inv["actualSize"], inv["md5sum"]),
                             ("Ready", 99, 33, "m"))
            self.assertEqual([(r["backupStorageUuid"], r["status"], r["lastError"])
                              for r in inv["backupStorageRefs"]],
                             [("bs1", "Ready", None), ("bs2", "Error", RESTARTED)])
            j1, j2 = [await self.store.get("job", j) for j in ("j1", "j2")]
            self.assertEqual((j1["state"], j2["state"], j2["error"]["code"]),
                             ("Succeeded", "Failed", IMAGE.NOT_FOUND))
            self.assertEqual(await self.store.running_jobs("mn-1"), [])
            self.assertIsNone(await self.store.finish_image_download("i2", [done]))

        return defer.Deferred.fromCoroutine(go())


class SQLiteImageIntegrationTests(_Integration, SQLiteStoreFactory, TestCase):
    """
    On SQLite.
    """


class PostgresImageIntegrationTests(_Integration, PostgresStoreFactory, TestCase):
    """
    On PostgreSQL.
    """
