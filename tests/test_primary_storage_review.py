"""
Regressions of the primary storage service found in review: image caches under live volumes,
resent volume creations, detach / host removal racing volume creation and cache fills, caches
of deleted images, and validation (deterministic: LocalBus, simulated agents, MemoryStore).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from agent.hypervisor.simulator import parse_latency
from tests.test_primary_storage import IMAGE, GiB, PrimaryStorageTestCase, TiB
from zcontrol.core.errors import SYS
from zcontrol.services.host.messages import KVMHostAsyncHttpCallMsg
from zcontrol.services.image.messages import ImageDeletedEvent
from zcontrol.services.primarystorage import (
    PS,
    SERVICE_ID,
    AddLocalPrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
    DownloadImageToPrimaryStorageCacheMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
    RemoveHostFromPrimaryStorageMsg,
)

CACHE = "/zstack_ps/imagecache/template/img-x/img-x.qcow2"


def _root(volume: str) -> str:
    return f"/zstack_ps/rootVolumes/acct-admin/vol-{volume}/{volume}.qcow2"


class ReviewTestCase(PrimaryStorageTestCase):
    """
    Hosts h0, h1 in cluster c; LocalStorage C{ls} and NFS C{nfs} attached to it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.add_host(0)
        self.add_host(1)
        self.add_local()
        self.add_nfs()
        self.attach("ls")
        self.attach("nfs")

    def delete_image(self, uuid: str = "img-x") -> None:
        """
        As the image service does: the row goes, then the event.
        """
        self.result(self.store.delete("image", uuid))
        self.result(self.bus.publish(ImageDeletedEvent(image_uuid=uuid)))
        self.pump()

    def delete_bits(self, volume: str, host: str | None = "h0", ps: str = "ls") -> Any:
        return (DeleteVolumeBitsOnPrimaryStorageMsg(
            primary_storage_uuid=ps, volume_uuid=volume, host_uuid=host,
            install_path=_root(volume).replace("/zstack_ps", "/zstack_ps" if ps == "ls" else
                                               "/opt/zstack/nfsprimarystorage/prim-nfs"),
            resource_uuid=ps))

    def files(self, host: str = "0") -> list[str]:
        return sorted(self.sim.storage(host).local.files)

    def state(self) -> Any:
        return (sorted((r["primaryStorageUuid"], r["clusterUuid"])
                       for r in self.rows("primaryStorageClusterRef")),
                sorted((r["hostUuid"], r["totalCapacity"], r["availableCapacity"])
                       for r in self.rows("localStorageHostRef")),
                sorted((c["hostUuid"], c["imageUuid"], c["status"])
                       for c in self.rows("imageCache")),
                self.holders("ls"),
                (self.ps("ls")["totalCapacity"], self.ps("ls")["availableCapacity"]))


class CacheVolumeRefTests(ReviewTestCase):
    """
    Fix 1 and 5: a cache goes with its image only when no volume references it
    (ZStack's ImageCacheVolumeRefVO); no cache is made of a deleted image.
    """

    def test_image_delete_keeps_caches_under_live_volumes(self) -> None:
        """
        Deleting the image drops the unreferenced cache (h1) and keeps the one volume v1
        was made from (h0); deleting v1's bits then drops it.
        """
        self.assertTrue(self.result(self.instantiate("ls", "v1")).success)
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h1",
                                                      image=IMAGE, resource_uuid="ls"))
        refs = self.rows("imageCacheVolumeRef")
        self.assertEqual([(r["volumeUuid"], r["primaryStorageUuid"]) for r in refs],
                         [("v1", "ls")])
        self.delete_image()
        self.assertEqual([(c["hostUuid"], c["uuid"]) for c in self.rows("imageCache")],
                         [("h0", refs[0]["imageCacheUuid"])])
        self.assertIn(CACHE, self.files("0"))
        self.assertNotIn(CACHE, self.files("1"))
        self.ok(self.delete_bits("v1"))
        self.assertEqual(self.rows("imageCache"), [])
        self.assertEqual(self.rows("imageCacheVolumeRef"), [])
        self.assertEqual(self.files("0"), [])
        self.assertEqual(self.holders("ls"), [])

    def test_cache_of_live_image_stays_after_last_volume(self) -> None:
        """
        The last volume's bits going drops only the ref while the image lives.
        """
        self.assertTrue(self.result(self.instantiate("ls", "v1")).success)
        self.assertTrue(self.result(self.instantiate("ls", "v2")).success)
        self.ok(self.delete_bits("v1"))
        self.ok(self.delete_bits("v2"))
        self.assertEqual(self.rows("imageCacheVolumeRef"), [])
        self.assertEqual(len(self.rows("imageCache")), 1)

    def test_failed_volume_leaves_no_ref(self) -> None:
        """
        A volume creation that fails leaves no ref (so the image's deletion drops the cache).
        """
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                      image=IMAGE, resource_uuid="ls"))
        self.sim.config.error_rate = 1.0
        reply = self.result(self.instantiate("ls", "v1"))
        self.sim.config.error_rate = 0.0
        self.assertEqual(reply.error.code, PS.VOLUME_ERROR)
        self.assertEqual(self.rows("imageCacheVolumeRef"), [])
        self.delete_image()
        self.assertEqual(self.rows("imageCache"), [])

    def test_no_cache_for_a_deleted_image(self) -> None:
        """
        An instantiate after (racing with) the image's deletion makes no cache: PS.1008
        naming the image; a Deleted image likewise.
        """
        self.delete_image()
        reply = self.result(self.instantiate("ls", "v1"))
        self.assertEqual(reply.error.code, PS.DOWNLOAD_ERROR)
        self.assertEqual(reply.error.opaque["imageUuid"], "img-x")
        self.result(self.store.update("image", "img-big", {"status": "Deleted"}))
        reply = self.result(self.instantiate("nfs", "v2", image=dict(
            IMAGE, uuid="img-big", size=GiB, actualSize=GiB)))
        self.assertEqual(reply.error.code, PS.DOWNLOAD_ERROR)
        self.assertEqual(reply.error.opaque["imageUuid"], "img-big")
        self.assertEqual(self.rows("imageCache"), [])
        self.assertEqual(self.holders("ls") + self.holders("nfs"), [])
        self.assertEqual(self.files("0"), [])


class ResendTests(ReviewTestCase):
    """
    Fix 2: volume creation is idempotent per volume uuid.
    """

    def test_resent_instantiate(self) -> None:
        """
        A resend succeeds with the same install path; a resend that fails on the agent keeps
        the first volume's capacity.
        """
        first = self.result(self.instantiate("ls", "v1"))
        self.assertTrue(first.success, first.error)
        again = self.result(self.instantiate("ls", "v1"))
        self.assertTrue(again.success, again.error)
        self.assertEqual((again.install_path, again.size), (first.install_path, first.size))
        self.sim.config.error_rate = 1.0
        failed = self.result(self.instantiate("ls", "v1"))
        self.sim.config.error_rate = 0.0
        self.assertEqual(failed.error.code, PS.VOLUME_ERROR)
        self.assertEqual([(h["holderUuid"], h["size"], h["hostUuid"])
                          for h in self.holders("ls") if h["holderType"] == "VolumeVO"],
                         [("v1", 10 * GiB, "h0")])
        self.assertEqual(len(self.rows("imageCacheVolumeRef")), 1)

    def test_resent_create_empty(self) -> None:
        """
        The same for an empty volume, on LocalStorage and NFS; another size is PS.1009
        naming the volume (not the store's DB.1000), the first volume untouched.
        """
        for ps, host in (("ls", "h0"), ("nfs", None)):
            msg = {"primary_storage_uuid": ps, "volume_uuid": f"d-{ps}", "size": GiB,
                   "host_uuid": host, "resource_uuid": ps}
            first = self.ok(InstantiateVolumeOnPrimaryStorageMsg(**msg))
            again = self.ok(InstantiateVolumeOnPrimaryStorageMsg(**msg))
            self.assertEqual(again.install_path, first.install_path)
            err = self.refused(InstantiateVolumeOnPrimaryStorageMsg(**dict(msg, size=2 * GiB)),
                               PS.VOLUME_ERROR)
            self.assertEqual(err.opaque["volumeUuid"], f"d-{ps}")
            self.assertEqual([h["size"] for h in self.holders(ps)
                              if h["holderUuid"] == f"d-{ps}"], [GiB])


class DetachRaceTests(ReviewTestCase):
    """
    Fix 3 and 4: detach / host removal decide in one store transaction before any agent
    call; a host removed during a download fails the fill cleanly.
    """

    def test_refused_detach_changes_nothing(self) -> None:
        """
        A volume on h1 only: the detach is refused with PS.1004 naming it and h0's ref, the
        caches and the totals are as they were (before, h0 was forgotten first).
        """
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                      image=IMAGE, resource_uuid="ls"))
        self.assertTrue(self.result(self.instantiate("ls", "v1", host="h1")).success)
        before = self.state()
        err = self.refused(DetachPrimaryStorageFromClusterMsg(
            primary_storage_uuid="ls", cluster_uuid="c", resource_uuid="ls"), PS.IN_USE)
        self.assertEqual(err.opaque["volumeUuids"], ["v1"])
        self.assertEqual(self.state(), before)
        self.assertIn(CACHE, self.files("0"))

    def test_detach_racing_volume_creation(self) -> None:
        """
        A volume created on h1 while the detach deletes h0's cache: the volume finds its
        host gone (PS error) and the detach completes; nothing is half done.
        """
        for h in ("h0", "h1"):
            self.assertTrue(self.result(self.instantiate("ls", "w" + h, host=h)).success)
            self.ok(self.delete_bits("w" + h, host=h))
        self.sim.config.latency["/localstorage/delete"] = parse_latency("const:5")
        det = self.bus.send(DetachPrimaryStorageFromClusterMsg(
            service_id=SERVICE_ID, primary_storage_uuid="ls", cluster_uuid="c",
            resource_uuid="ls"))
        self.pump()
        vol = self.instantiate("ls", "v2", host="h1")
        for _ in range(3):
            self.clock.advance(6)
            self.pump()
        rd, rv = self.successResultOf(det), self.successResultOf(vol)
        self.assertTrue(rd.success, rd.error)
        self.assertFalse(rv.success)
        self.assertTrue(rv.error.code.startswith("PS."), rv.error)
        self.assertEqual(self.state(), ([("nfs", "c")], [], [], [], (0, 0)))
        self.assertEqual(self.files("0") + self.files("1"), [])

    def test_remove_refused_names_volumes(self) -> None:
        """
        RemoveHostFromPrimaryStorage with a volume on the host: PS.1004 naming it, nothing
        changed (the caches were deleted on the agent first, before).
        """
        self.assertTrue(self.result(self.instantiate("ls", "v1")).success)
        before = self.state()
        err = self.refused(RemoveHostFromPrimaryStorageMsg(
            primary_storage_uuid="ls", host_uuid="h0", resource_uuid="ls"), PS.IN_USE)
        self.assertEqual(err.opaque["volumeUuids"], ["v1"])
        self.assertEqual(self.state(), before)
        self.assertIn(CACHE, self.files("0"))

    def test_host_removed_during_download(self) -> None:
        """
        The Downloading row went with the host: PS.1008 naming the host, the downloaded
        file deleted, nothing held.
        """
        self.sim.config.latency["/localstorage/sftp/download"] = parse_latency("const:10")
        d = self.instantiate("ls", "v1")
        self.pump()
        self.assertEqual([c["status"] for c in self.rows("imageCache")], ["Downloading"])
        self.ok(RemoveHostFromPrimaryStorageMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                resource_uuid="ls"))
        self.clock.advance(11)
        self.pump()
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, PS.DOWNLOAD_ERROR)
        self.assertEqual(reply.error.opaque["hostUuid"], "h0")
        self.assertEqual((self.rows("imageCache"), self.holders("ls")), ([], []))
        self.assertEqual(self.files("0"), [])
        self.assertEqual(self.ps("ls")["totalCapacity"], 2 * TiB)


class ValidationTests(ReviewTestCase):
    """
    Fix 6: every uuid field checked; store errors mapped to PS codes.
    """

    def test_bad_host_uuids(self) -> None:
        """
        hostUuid True / ["h0"] / 123 / "" is SYS.1007 naming the field (not SYS.1000, and
        nothing sent to an agent).
        """
        for ps in ("ls", "nfs"):
            for bad in (123, True, ["h0"], "", " "):
                err = self.refused(DeleteVolumeBitsOnPrimaryStorageMsg(
                    primary_storage_uuid=ps, volume_uuid="v1", install_path="/zstack_ps/x",
                    host_uuid=bad, resource_uuid=ps), SYS.INVALID_ARGUMENT_ERROR)
                self.assertEqual(err.opaque["field"], "hostUuid", err)
        err = self.refused(DownloadImageToPrimaryStorageCacheMsg(
            primary_storage_uuid="ls", host_uuid="h0", resource_uuid="ls",
            image=dict(IMAGE, backupStorageUuid=7)), SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "image.backupStorageUuid")
        err = self.refused(DetachPrimaryStorageFromClusterMsg(
            primary_storage_uuid="l s", cluster_uuid="c"), SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "primaryStorageUuid")

    def test_zone_deleted_meanwhile(self) -> None:
        """
        The zone goes between the check and the insert: PS.1003 naming zoneUuid.
        """
        must_get = self.service.must_get

        async def racing(resource: str, uuid: Any, *a: Any, **kw: Any) -> Any:
            row = await must_get(resource, uuid, *a, **kw)
            if resource == "zone":
                await self.store.delete("zone", uuid)
            return row

        self.patch(self.service, "must_get", racing)
        self.seed("zone", {"uuid": "z9", "name": "z9"})
        err = self.refused(AddLocalPrimaryStorageMsg(name="x", zone_uuid="z9",
                                                     url="/zstack_ps"), PS.NOT_FOUND)
        self.assertEqual((err.opaque["field"], err.opaque["zoneUuid"]), ("zoneUuid", "z9"))

    def test_malformed_agent_response(self) -> None:
        """
        An agent answer that does not decode is PS.1006 naming the command.
        """
        send = self.service.send

        async def garbled(msg: Any, *a: Any) -> Any:
            reply = await send(msg, *a)
            if isinstance(msg, KVMHostAsyncHttpCallMsg):
                reply.response = {"success": True, "installPath": ["not", "a", "path"],
                                  "size": "big"}
            return reply

        self.patch(self.service, "send", lambda msg, *a: Deferred.fromCoroutine(
            garbled(msg, *a)))
        reply = self.send(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="d1", size=GiB, host_uuid="h0",
            resource_uuid="ls"))
        self.assertEqual(reply.error.code, PS.VOLUME_ERROR)
        self.assertTrue(reply.error.has_code(PS.HOST_ERROR))
        self.assertIn("/localstorage/volume/createempty", str(reply.error))
        self.assertEqual(self.holders("ls"), [])
