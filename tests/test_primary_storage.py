"""
The primary storage service, deterministically: LocalBus, the host service, the in-memory
agent pair (simulated hosts with their local disks and NFS exports) and the in-memory store
on one task.Clock. After every test the capacity audit finds no drift.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.agent_fakes import InMemoryPair, base
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS
from zcontrol.db.memory import MemoryStore
from zcontrol.db.query import Query
from zcontrol.services.host import SERVICE_ID as HOST_SERVICE_ID
from zcontrol.services.host import AddHostMsg, HostConfig, HostService
from zcontrol.services.image.messages import ImageDeletedEvent
from zcontrol.services.inventory import QueryInventoryMsg, QueryService
from zcontrol.services.primarystorage import (
    PS,
    SERVICE_ID,
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AllocatePrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
    ChangePrimaryStorageStateMsg,
    DeletePrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
    DownloadImageToPrimaryStorageCacheMsg,
    InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
    PrimaryStorageService,
    ReconnectPrimaryStorageMsg,
    RemoveHostFromPrimaryStorageMsg,
    ReturnPrimaryStorageCapacityMsg,
    UpdatePrimaryStorageMsg,
)

GiB = 1024**3
TiB = 1024 * GiB
NFS_URL = "nfs.example:/export/ps"
IMAGE = {"uuid": "img-x", "size": 10 * GiB, "actualSize": 2 * GiB, "format": "qcow2",
         "mediaType": "RootVolumeTemplate", "backupStorageUuid": "bs-1",
         "installPath": "/bs/templates/img-x.qcow2", "backupStorageHostname": "10.0.0.9"}


class PrimaryStorageTestCase(SynchronousTestCase):
    """
    Zone C{z} with clusters C{c} and C{c2}, zone C{z2} with cluster C{c3}; hosts are added
    through the host service on simulated agent hosts.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = InMemoryPair(host_count=8, clock=self.clock)
        self.sim = self.pair.cluster
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)
        for zone in ("z", "z2"):
            self.seed("zone", {"uuid": zone, "name": zone})
        for cluster, zone in (("c", "z"), ("c2", "z"), ("c3", "z2")):
            self.seed("cluster", {"uuid": cluster, "name": cluster, "zoneUuid": zone,
                                  "hypervisorType": "KVM"})
        for image in ("img-x", "img-big"):  # the image service's rows (a cache re-reads them)
            self.seed("image", {"uuid": image, "name": image, "status": "Ready"})
        self.hosts = HostService(self.clock, self.bus, self.store, self.pair.client,
                                 HostConfig(command_timeout=30, vm_sync_on_ping=False))
        self.hosts.start(track=False)
        self.service = PrimaryStorageService(self.clock, self.bus, self.store)
        self.service.start()
        self.query_service = QueryService(self.clock, self.bus, self.store)
        self.query_service.start()
        self.addCleanup(self.no_drift)

    # --- plumbing -------------------------------------------------------------------------

    def pump(self) -> None:
        for _ in range(30):
            self.pair.flush()
            self.clock.advance(0)

    def stop_store(self) -> None:
        self.pump()
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def result(self, d: Deferred) -> Any:
        self.pump()
        return self.successResultOf(d)

    def seed(self, resource: str, values: dict[str, Any]) -> dict[str, Any]:
        return self.result(self.store.insert(resource, values))

    def no_drift(self) -> None:
        """
        After every test: the available figures match the holders.
        """
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def send(self, msg: Any) -> Any:
        msg.service_id = SERVICE_ID
        return self.result(self.bus.send(msg))

    def ok(self, msg: Any) -> Any:
        reply = self.send(msg)
        self.assertTrue(reply.success, reply.error)
        return reply

    def refused(self, msg: Any, code: str) -> Any:
        reply = self.send(msg)
        self.assertFalse(reply.success, f"{type(msg).__name__} succeeded")
        self.assertEqual(reply.error.code, code, reply.error)
        return reply.error

    def add_host(self, i: int, cluster: str = "c") -> None:
        zone = "z2" if cluster == "c3" else "z"
        reply = self.result(self.bus.send(AddHostMsg(
            service_id=HOST_SERVICE_ID, name=f"h{i}", zone_uuid=zone, cluster_uuid=cluster,
            uuid=f"h{i}", management_ip=base(i))))
        self.assertTrue(reply.success, reply.error)
        self.pump()

    def rows(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        return self.result(self.store.query(resource, Query(conditions=list(conditions),
                                                            limit=10000))).inventories

    def ps(self, uuid: str) -> dict[str, Any]:
        return self.result(self.store.get("primaryStorage", uuid))

    def add_local(self, uuid: str = "ls", zone: str = "z") -> dict[str, Any]:
        return self.ok(AddLocalPrimaryStorageMsg(name=uuid, zone_uuid=zone, url="/zstack_ps",
                                                 uuid=uuid)).inventory

    def add_nfs(self, uuid: str = "nfs", url: str = NFS_URL) -> dict[str, Any]:
        return self.ok(AddNfsPrimaryStorageMsg(name=uuid, zone_uuid="z", url=url,
                                               uuid=uuid)).inventory

    def attach(self, ps: str, cluster: str = "c") -> dict[str, Any]:
        return self.ok(AttachPrimaryStorageToClusterMsg(
            primary_storage_uuid=ps, cluster_uuid=cluster, resource_uuid=ps)).inventory

    def instantiate(self, ps: str, volume: str, host: str | None = "h0",
                    image: dict[str, Any] = IMAGE) -> Deferred:
        return self.bus.send(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
            service_id=SERVICE_ID, resource_uuid=ps, primary_storage_uuid=ps,
            volume_uuid=volume, host_uuid=host, image=dict(image)))

    def holders(self, ps: str) -> list[dict[str, Any]]:
        return self.result(self.store.primary_storage_holders(ps))


class AddAttachTests(PrimaryStorageTestCase):
    """
    Adding, attaching and detaching LocalStorage and NFS, with their inventories.
    """

    def test_add(self) -> None:
        """
        A new storage is Connected with zero capacity and no clusters.
        """
        for inv, kind in ((self.add_local(), "LocalStorage"), (self.add_nfs(), "NFS")):
            self.assertEqual((inv["type"], inv["status"], inv["state"]),
                             (kind, "Connected", "Enabled"))
            self.assertEqual((inv["totalCapacity"], inv["availableCapacity"]), (0, 0))
            self.assertEqual(inv["attachedClusterUuids"], [])
        reply = self.result(self.bus.send(QueryInventoryMsg(
            service_id="query", resource="primaryStorage", conditions=["type=NFS"])))
        self.assertEqual([(i["uuid"], i["attachedClusterUuids"]) for i in reply.inventories],
                         [("nfs", [])])

    def test_attach_local(self) -> None:
        """
        LocalStorage initialises each Connected host: a ref per host with the host's disk,
        the storage's totals the sums.
        """
        self.add_host(0)
        self.add_host(1)
        self.add_local()
        inv = self.attach("ls")
        self.assertEqual(inv["attachedClusterUuids"], ["c"])
        self.assertEqual((inv["totalCapacity"], inv["availableCapacity"]), (4 * TiB, 4 * TiB))
        refs = self.rows("localStorageHostRef", "primaryStorageUuid=ls")
        self.assertEqual(sorted((r["hostUuid"], r["totalCapacity"], r["availableCapacity"])
                                for r in refs), [("h0", 2 * TiB, 2 * TiB),
                                                 ("h1", 2 * TiB, 2 * TiB)])
        self.assertEqual(self.sim.storage("0").local_paths, {"/zstack_ps"})

    def test_attach_nfs(self) -> None:
        """
        NFS mounts on each Connected host (a Connected host ref each); the capacity is the
        export's, once.
        """
        self.add_host(0)
        self.add_host(1)
        self.add_nfs()
        inv = self.attach("nfs")
        self.assertEqual((inv["totalCapacity"], inv["availableCapacity"]),
                         (10 * TiB, 10 * TiB))
        refs = self.rows("primaryStorageHostRef", "primaryStorageUuid=nfs")
        self.assertEqual(sorted((r["hostUuid"], r["status"]) for r in refs),
                         [("h0", "Connected"), ("h1", "Connected")])
        for key in ("0", "1"):
            self.assertEqual(self.sim.storage(key).mounts,
                             {NFS_URL: "/opt/zstack/nfsprimarystorage/prim-nfs"})

    def test_host_added_later(self) -> None:
        """
        A host that connects after the attach initialises / mounts the attached storages.
        """
        self.add_host(0)
        self.add_local()
        self.add_nfs()
        self.attach("ls")
        self.attach("nfs")
        self.assertEqual(self.ps("ls")["totalCapacity"], 2 * TiB)
        self.add_host(1)
        self.assertEqual(self.ps("ls")["totalCapacity"], 4 * TiB)
        self.assertEqual(sorted(r["hostUuid"] for r in self.rows(
            "localStorageHostRef", "primaryStorageUuid=ls")), ["h0", "h1"])
        self.assertEqual(sorted(r["hostUuid"] for r in self.rows(
            "primaryStorageHostRef", "primaryStorageUuid=nfs")), ["h0", "h1"])
        self.assertIn(NFS_URL, self.sim.storage("1").mounts)
        # A reconnect is idempotent.
        inv = self.ok(ReconnectPrimaryStorageMsg(uuid="ls", resource_uuid="ls")).inventory
        self.assertEqual(inv["totalCapacity"], 4 * TiB)

    def test_attach_rolls_back(self) -> None:
        """
        When one host cannot mount, the attach fails with PS.1001 and leaves nothing: no
        cluster ref, no host refs, no mount on the hosts that did mount, zero capacity.
        """
        self.add_host(0)
        self.add_host(1)
        self.add_nfs()
        from twisted.internet.defer import fail

        from agent.hypervisor.interfaces import HypervisorError

        self.sim.storage("1").nfs_mount = lambda url, path: fail(
            HypervisorError(f"mount {url} on {path}: permission denied"))
        err = self.refused(AttachPrimaryStorageToClusterMsg(
            primary_storage_uuid="nfs", cluster_uuid="c", resource_uuid="nfs"), PS.ATTACH_ERROR)
        self.assertTrue(err.has_code(PS.HOST_ERROR))
        self.assertEqual(self.rows("primaryStorageClusterRef"), [])
        self.assertEqual(self.rows("primaryStorageHostRef"), [])
        self.assertEqual(self.sim.storage("0").mounts, {})
        self.assertEqual(self.ps("nfs")["totalCapacity"], 0)

    def test_detach_and_delete(self) -> None:
        """
        Detach forgets the hosts (unmounts, drops refs, caches and their capacity); delete
        then leaves no row of the storage anywhere.
        """
        self.add_host(0)
        self.add_local()
        self.add_nfs()
        self.attach("ls")
        self.attach("nfs")
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                      image=IMAGE, resource_uuid="ls"))
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="nfs", image=IMAGE,
                                                      resource_uuid="nfs"))
        for ps in ("ls", "nfs"):
            inv = self.ok(DetachPrimaryStorageFromClusterMsg(
                primary_storage_uuid=ps, cluster_uuid="c", resource_uuid=ps)).inventory
            self.assertEqual(inv["attachedClusterUuids"], [])
        self.assertEqual(self.ps("ls")["totalCapacity"], 0)
        self.assertEqual(self.rows("localStorageHostRef"), [])
        self.assertEqual(self.rows("primaryStorageHostRef"), [])
        self.assertEqual(self.sim.storage("0").mounts, {})
        self.assertEqual(self.sim.storage("0").local.files, {})
        self.assertEqual(self.rows("imageCache", "primaryStorageUuid=ls"), [])
        for ps in ("ls", "nfs"):
            self.ok(DeletePrimaryStorageMsg(uuid=ps, resource_uuid=ps))
            self.assertIsNone(self.ps(ps))
        for resource in ("imageCache", "primaryStorageClusterRef", "localStorageHostRef",
                         "primaryStorageHostRef", "primaryStorage"):
            self.assertEqual(self.rows(resource), [], resource)

    def test_update_and_state(self) -> None:
        """
        Update changes name and description; a Disabled storage refuses new volumes.
        """
        self.add_host(0)
        self.add_local()
        self.attach("ls")
        inv = self.ok(UpdatePrimaryStorageMsg(uuid="ls", name="renamed", description="d",
                                              resource_uuid="ls")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("renamed", "d"))
        inv = self.ok(ChangePrimaryStorageStateMsg(uuid="ls", state_event="disable",
                                                   resource_uuid="ls")).inventory
        self.assertEqual(inv["state"], "Disabled")
        reply = self.result(self.instantiate("ls", "v1"))
        self.assertEqual(reply.error.code, PS.WRONG_STATE)
        self.assertEqual(reply.error.opaque["state"], "Disabled")
        self.ok(ChangePrimaryStorageStateMsg(uuid="ls", state_event="enable",
                                             resource_uuid="ls"))
        self.assertTrue(self.result(self.instantiate("ls", "v1")).success)


class VolumeTests(PrimaryStorageTestCase):
    """
    Image caches and volumes: one download however many ask, capacity per holder.
    """

    def setUp(self) -> None:
        super().setUp()
        self.add_host(0)
        self.add_host(1)
        self.add_local()
        self.add_nfs()
        self.attach("ls")
        self.attach("nfs")

    def test_100_concurrent_local(self) -> None:
        """
        100 concurrent InstantiateVolume from one image on one LocalStorage host make one
        download and 100 volumes; the host's and the storage's capacity drop by the cache
        and the volumes.
        """
        ds = [self.instantiate("ls", f"v{i}") for i in range(100)]
        replies = self.result(gatherResults(ds))
        self.assertTrue(all(r.success for r in replies), [r.error for r in replies][:3])
        self.assertEqual(self.sim.downloads[("local:0", "img-x")], 1)
        self.assertEqual(sum(self.sim.downloads.values()), 1)
        files = self.sim.storage("0").local.files
        self.assertEqual(len([p for p in files if "/rootVolumes/" in p]), 100)
        used = 100 * 10 * GiB + 2 * GiB
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB - used)
        ref = self.rows("localStorageHostRef", "hostUuid=h0")[0]
        self.assertEqual(ref["availableCapacity"], 2 * TiB - used)
        caches = self.rows("imageCache", "primaryStorageUuid=ls")
        self.assertEqual([(c["hostUuid"], c["status"], c["size"]) for c in caches],
                         [("h0", "Ready", 2 * GiB)])
        self.assertEqual(replies[0].host_uuid, "h0")
        self.assertTrue(replies[0].install_path.startswith("/zstack_ps/rootVolumes/"))

    def test_100_concurrent_nfs(self) -> None:
        """
        The same on NFS: one download into the shared cache, whatever host is used.
        """
        ds = [self.instantiate("nfs", f"v{i}", host=None if i % 2 else "h1")
              for i in range(100)]
        replies = self.result(gatherResults(ds))
        self.assertTrue(all(r.success for r in replies), [r.error for r in replies][:3])
        self.assertEqual(self.sim.downloads[(f"nfs:{NFS_URL}", "img-x")], 1)
        export = self.sim.nfs_exports[NFS_URL]
        self.assertEqual(len([p for p in export.files if "/rootVolumes/" in p]), 100)
        self.assertEqual(self.ps("nfs")["availableCapacity"], 10 * TiB - 100 * 10 * GiB - 2 * GiB)
        self.assertEqual(len(self.rows("imageCache", "primaryStorageUuid=nfs")), 1)

    def test_failed_download(self) -> None:
        """
        A failed download leaves no cache row and holds no capacity; the next request
        downloads again and succeeds.
        """
        self.sim.config.error_rate = 1.0
        reply = self.result(self.instantiate("ls", "v1"))
        self.assertEqual(reply.error.code, PS.DOWNLOAD_ERROR)
        self.assertTrue(reply.error.has_code(PS.HOST_ERROR))
        self.assertEqual(self.rows("imageCache"), [])
        self.assertEqual(self.holders("ls"), [])
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB)
        self.sim.config.error_rate = 0.0
        self.assertTrue(self.result(self.instantiate("ls", "v1")).success)
        self.assertEqual(self.sim.downloads[("local:0", "img-x")], 1)

    def test_failed_volume_creation_releases(self) -> None:
        """
        When the agent cannot create the volume (the cache is gone under it), the
        reservation is given back.
        """
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                      image=IMAGE, resource_uuid="ls"))
        self.sim.storage("0").local.files.clear()
        reply = self.result(self.instantiate("ls", "v1"))
        self.assertEqual(reply.error.code, PS.VOLUME_ERROR)
        self.assertNotIn("v1", [h["holderUuid"] for h in self.holders("ls")])

    def test_empty_volume_and_delete_bits(self) -> None:
        """
        An empty volume takes its size on the host; deleting its bits gives it back.
        """
        reply = self.ok(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="d1", size=5 * GiB, host_uuid="h1",
            resource_uuid="ls"))
        self.assertIn(reply.install_path, self.sim.storage("1").local.files)
        self.assertEqual(self.rows("localStorageHostRef", "hostUuid=h1")[0]
                         ["availableCapacity"], 2 * TiB - 5 * GiB)
        self.ok(DeleteVolumeBitsOnPrimaryStorageMsg(primary_storage_uuid="ls",
                                                    volume_uuid="d1",
                                                    install_path=reply.install_path,
                                                    resource_uuid="ls"))
        self.assertEqual(self.sim.storage("1").local.files, {})
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB)
        nfs = self.ok(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="nfs", volume_uuid="d2", size=GiB, resource_uuid="nfs"))
        self.ok(DeleteVolumeBitsOnPrimaryStorageMsg(primary_storage_uuid="nfs",
                                                    volume_uuid="d2",
                                                    install_path=nfs.install_path,
                                                    resource_uuid="nfs"))
        self.assertEqual(self.ps("nfs")["availableCapacity"], 10 * TiB)

    def test_allocate_and_return(self) -> None:
        """
        AllocatePrimaryStorage reserves for a holder (idempotently) on a storage attached
        to the host's cluster; Return gives it back.
        """
        reply = self.ok(AllocatePrimaryStorageMsg(size=GiB, holder_uuid="v9",
                                                  required_host_uuid="h0",
                                                  required_primary_storage_uuid="ls"))
        self.assertEqual((reply.primary_storage_uuid, reply.host_uuid), ("ls", "h0"))
        self.ok(AllocatePrimaryStorageMsg(size=GiB, holder_uuid="v9", required_host_uuid="h0",
                                          required_primary_storage_uuid="ls"))
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB - GiB)
        self.refused(AllocatePrimaryStorageMsg(size=3 * TiB, holder_uuid="v10",
                                               required_host_uuid="h0",
                                               required_primary_storage_uuid="ls"),
                     PS.CAPACITY)
        self.ok(ReturnPrimaryStorageCapacityMsg(primary_storage_uuid="ls", holder_uuid="v9",
                                                resource_uuid="ls"))
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB)
        any_ps = self.ok(AllocatePrimaryStorageMsg(size=GiB, holder_uuid="v11",
                                                   required_host_uuid="h1"))
        self.assertIn(any_ps.primary_storage_uuid, ("ls", "nfs"))
        self.ok(ReturnPrimaryStorageCapacityMsg(primary_storage_uuid=any_ps.primary_storage_uuid,
                                                holder_uuid="v11"))

    def test_volumes_refuse_detach_delete_remove_host(self) -> None:
        """
        While a volume holds capacity on a host: detach, delete and RemoveHost are refused
        with PS.1004 naming it; after its bits are deleted they succeed.
        """
        reply = self.ok(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="v1", host_uuid="h0", image=IMAGE,
            resource_uuid="ls"))
        err = self.refused(DetachPrimaryStorageFromClusterMsg(
            primary_storage_uuid="ls", cluster_uuid="c", resource_uuid="ls"), PS.IN_USE)
        self.assertEqual(err.opaque["volumeUuids"], ["v1"])
        err = self.refused(RemoveHostFromPrimaryStorageMsg(
            primary_storage_uuid="ls", host_uuid="h0", resource_uuid="ls"), PS.IN_USE)
        self.assertIn("v1", err.details)
        err = self.refused(DeletePrimaryStorageMsg(uuid="ls", resource_uuid="ls"), PS.IN_USE)
        self.assertEqual(err.opaque["clusterUuids"], ["c"])
        # Another host's removal is fine: its share of the capacity goes.
        self.ok(RemoveHostFromPrimaryStorageMsg(primary_storage_uuid="ls", host_uuid="h1",
                                                resource_uuid="ls"))
        self.assertEqual(self.ps("ls")["totalCapacity"], 2 * TiB)
        self.ok(DeleteVolumeBitsOnPrimaryStorageMsg(primary_storage_uuid="ls", volume_uuid="v1",
                                                    install_path=reply.install_path,
                                                    resource_uuid="ls"))
        self.ok(RemoveHostFromPrimaryStorageMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                resource_uuid="ls"))
        self.assertEqual(self.rows("imageCache", "primaryStorageUuid=ls"), [])
        self.assertEqual(self.ps("ls")["totalCapacity"], 0)
        self.assertEqual(self.sim.storage("0").local.files, {})

    def test_nfs_last_cluster_detach_refused_with_volumes(self) -> None:
        """
        NFS cannot leave its last cluster while volumes are on it.
        """
        self.ok(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="nfs", volume_uuid="d1", size=GiB, resource_uuid="nfs"))
        err = self.refused(DetachPrimaryStorageFromClusterMsg(
            primary_storage_uuid="nfs", cluster_uuid="c", resource_uuid="nfs"), PS.IN_USE)
        self.assertEqual(err.opaque["volumeUuids"], ["d1"])

    def test_image_deleted_drops_caches(self) -> None:
        """
        ImageDeletedEvent: the caches of the image go, with their capacity and bits.
        """
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="ls", host_uuid="h0",
                                                      image=IMAGE, resource_uuid="ls"))
        self.ok(DownloadImageToPrimaryStorageCacheMsg(primary_storage_uuid="nfs", image=IMAGE,
                                                      resource_uuid="nfs"))
        self.assertEqual(len(self.rows("imageCache")), 2)
        self.result(self.bus.publish(ImageDeletedEvent(image_uuid="img-x")))
        self.pump()
        self.assertEqual(self.rows("imageCache"), [])
        self.assertEqual(self.ps("ls")["availableCapacity"], 4 * TiB)
        self.assertEqual(self.ps("nfs")["availableCapacity"], 10 * TiB)
        self.assertEqual(self.sim.storage("0").local.files, {})
        self.assertEqual(self.sim.nfs_exports[NFS_URL].files, {})

    def test_cache_too_big(self) -> None:
        """
        An image bigger than the host's free disk: PS.1008 (no room), nothing held.
        """
        big = dict(IMAGE, uuid="img-big", size=3 * TiB, actualSize=3 * TiB)
        reply = self.result(self.instantiate("ls", "v1", image=big))
        self.assertEqual(reply.error.code, PS.DOWNLOAD_ERROR)
        self.assertEqual(self.holders("ls"), [])
        self.assertEqual(self.rows("imageCache"), [])


class RefusalTests(PrimaryStorageTestCase):
    """
    Bad input and wrong states.
    """

    def test_bad_fields(self) -> None:
        """
        Every malformed field is SYS.1007 naming it.
        """
        for msg, field in (
            (AddLocalPrimaryStorageMsg(name="", zone_uuid="z", url="/p"), "name"),
            (AddLocalPrimaryStorageMsg(name="a", zone_uuid="z", url="relative"), "url"),
            (AddLocalPrimaryStorageMsg(name="a", zone_uuid="z", url="/"), "url"),
            (AddNfsPrimaryStorageMsg(name="a", zone_uuid="z", url="/no/server"), "url"),
            (AddNfsPrimaryStorageMsg(name="a", zone_uuid="z", url="srv:relative"), "url"),
            (ChangePrimaryStorageStateMsg(uuid="x", state_event="explode"), "stateEvent"),
            (InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
                primary_storage_uuid="x", volume_uuid="v", image={}),
             "image.uuid"),
            (InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
                primary_storage_uuid="x", volume_uuid="v", image=dict(IMAGE, size=-1)),
             "image.size"),
            (InstantiateVolumeOnPrimaryStorageMsg(
                primary_storage_uuid="x", volume_uuid="v", size=0), "size"),
        ):
            err = self.refused(msg, SYS.INVALID_ARGUMENT_ERROR)
            self.assertEqual(err.opaque["field"], field, err)

    def test_not_found(self) -> None:
        """
        Unknown uuids are PS.1003 naming the uuid.
        """
        err = self.refused(AddLocalPrimaryStorageMsg(name="a", zone_uuid="nope", url="/p"),
                           PS.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "zoneUuid"))
        self.add_local()
        err = self.refused(AttachPrimaryStorageToClusterMsg(primary_storage_uuid="ls",
                                                            cluster_uuid="nope"), PS.NOT_FOUND)
        self.assertEqual(err.opaque["uuid"], "nope")
        # A delete of what does not exist succeeds (ZStack's successIfResourceNotExisting).
        self.assertTrue(self.ok(DeletePrimaryStorageMsg(uuid="ghost")).success)
        for msg in (ReconnectPrimaryStorageMsg(uuid="ghost"),
                    DetachPrimaryStorageFromClusterMsg(primary_storage_uuid="ghost",
                                                       cluster_uuid="c")):
            self.assertEqual(self.refused(msg, PS.NOT_FOUND).opaque["uuid"], "ghost")

    def test_attach_refusals(self) -> None:
        """
        Another zone's cluster, attaching twice, a second LocalStorage on one cluster,
        detaching from a cluster it is not attached to.
        """
        self.add_local()
        self.add_local("ls2")
        self.refused(AttachPrimaryStorageToClusterMsg(primary_storage_uuid="ls",
                                                      cluster_uuid="c3"), PS.ATTACH_ERROR)
        self.attach("ls")
        self.refused(AttachPrimaryStorageToClusterMsg(primary_storage_uuid="ls",
                                                      cluster_uuid="c"), PS.ATTACH_ERROR)
        err = self.refused(AttachPrimaryStorageToClusterMsg(primary_storage_uuid="ls2",
                                                            cluster_uuid="c"), PS.ATTACH_ERROR)
        self.assertEqual(err.opaque["localStorageUuid"], "ls")
        self.refused(DetachPrimaryStorageFromClusterMsg(primary_storage_uuid="ls",
                                                        cluster_uuid="c2"), PS.DETACH_ERROR)
        # LocalStorage and NFS on one cluster are fine (as ZStack).
        self.add_nfs()
        self.attach("nfs")

    def test_volume_refusals(self) -> None:
        """
        LocalStorage needs a host it is on; NFS needs a host that mounts it.
        """
        self.add_host(0)
        self.add_local()
        self.add_nfs()
        self.attach("ls")
        err = self.refused(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="v", image=IMAGE), SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "hostUuid")
        self.refused(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="v", host_uuid="h7", image=IMAGE),
            PS.WRONG_STATE)
        self.refused(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="nfs", volume_uuid="v", size=GiB), PS.WRONG_STATE)
        self.refused(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid="ls", volume_uuid="v", host_uuid="h0", size=3 * TiB), PS.CAPACITY)
        self.assertEqual(self.holders("ls"), [])
