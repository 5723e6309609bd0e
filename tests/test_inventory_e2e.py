"""
The cloud's inventory end to end (issue 9, "Tests"): a whole management node
(L{zcontrol.node.make_node}, every service of L{zcontrol.services.registry}) and a real
simulated agent over loopback HTTP serving KVM hosts (with their local disks and NFS mounts)
and an Sftp backup storage. Every step goes through the node's bus with the services'
messages, as the REST API will send them, and checks the reply and the inventory
(L{QueryInventoryMsg}) afterwards; the capacity audit finds no drift at every stage.

The scenario runs twice: on the embedded backends (SQLite in a temp data dir, LocalBus) and
on PostgreSQL (a scratch database) with RabbitMQ (an AMQP bus on a random prefix). The
second fails, never skips, when either server is missing.

Waiting for work a service does in the background (a host that connects prepares the
storages attached to its cluster; a deleted image's caches are dropped) uses the event that
triggers it: a subscription made after the services' own sees the event after them, and then
waits until the primary storage service has nothing in flight. No sleeps.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase

from agent.console import ConsolePlugin
from agent.hypervisor.simulator import GiB, parse_latency
from agent.kvm import KvmPlugin
from agent.sftpbackupstorage import DOWNLOAD_PATH, SftpBackupStoragePlugin
from agent.storage import StoragePlugin
from agent.vrouter import VRouterPlugin
from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import EmbeddedBackends, RabbitPostgresBackends
from zcontrol.bus.message import registry
from zcontrol.config import load_config
from zcontrol.db.query import RESOURCES, Query
from zcontrol.node import make_node
from zcontrol.scheduler.messages import SERVICE_ID as ALLOCATOR
from zcontrol.scheduler.messages import AllocateHostMsg, ReturnHostCapacityMsg
from zcontrol.services.backupstorage.messages import SERVICE_ID as BACKUP
from zcontrol.services.backupstorage.messages import (
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
    DeleteBackupStorageMsg,
)
from zcontrol.services.cluster.messages import CLUSTER, CreateClusterMsg, DeleteClusterMsg
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.host.messages import HOST, AddHostMsg, DeleteHostMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.messages import AddImageMsg, DeleteImageMsg, SelectBackupStorageMsg
from zcontrol.services.inventory import QueryInventoryMsg
from zcontrol.services.network.messages import (
    L2,
    L2_SERVICE_ID,
    L3_SERVICE_ID,
    AddDnsToL3NetworkMsg,
    AddIpRangeMsg,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
    DeleteL2NetworkMsg,
    DeleteL3NetworkMsg,
)
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.offering.messages import (
    CreateDiskOfferingMsg,
    CreateInstanceOfferingMsg,
    DeleteDiskOfferingMsg,
    DeleteInstanceOfferingMsg,
)
from zcontrol.services.primarystorage.messages import (
    PS,
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
    DeletePrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
    InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg,
)
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import ZONE, CreateZoneMsg, DeleteZoneMsg

TiB = 1024 * GiB
#: the image's virtual size and its size on disk (bytes), as the simulated agent derives
#: them from the URL's query
IMAGE_SIZE, IMAGE_ACTUAL = 10 * GiB, 2 * GiB
#: agent slots: KVM hosts 1..3, the Sftp backup storage 7
HOST_SLOTS, BS_SLOT = (1, 2, 3), 7
VOLUMES = 100
#: resources the inventory does not own (the node's own rows, identity)
NOT_INVENTORY = {"managementNode", "job", "account", "user", "session"}
#: the capacity holder tables (not resources of the query language)
HOLDER_TABLES = ("host_capacity_holders", "primary_storage_capacity_holders")
#: one send's bound (seconds): a lost reply fails the test instead of hanging it
TIMEOUT = 60


class InventoryScenario:
    """
    The scenario, for a L{LoopbackTestCase} whose L{node_overrides} chooses the backends.
    """

    host_count = 8
    latency = {
        # slow enough that the image is seen Downloading, and that the 100 concurrent
        # requests all arrive while the first cache fill is still running
        DOWNLOAD_PATH: parse_latency("const:0.5"),
        "/localstorage/sftp/download": parse_latency("const:0.2"),
        "/nfsprimarystorage/downloadfromsftpbackupstorage": parse_latency("const:0.2"),
    }

    def agent_plugins(self) -> list[Any]:
        return [KvmPlugin(), ConsolePlugin(), VRouterPlugin(), StoragePlugin(),
                SftpBackupStoragePlugin()]

    async def node_overrides(self) -> dict[str, Any]:
        """
        The configuration of the backends (C{store}, C{bus}); may set up servers' state
        and register its cleanup.
        """
        raise NotImplementedError

    # --- plumbing ---------------------------------------------------------------------

    async def start_node(self) -> None:
        data = os.path.abspath(self.mktemp())
        overrides = {"node": {"id": f"mn-e2e-{secrets.token_hex(3)}", "data_dir": data},
                     "http": {"port": 0, "interface": "127.0.0.1"}}
        overrides.update(await self.node_overrides())
        self.node = make_node(load_config(None, overrides), reactor)
        self.addCleanup(lambda: self.node.running and self.node.stopService())
        await self.node.startService()
        inventory = [s for s in self.node if s.name == "inventory"][0]
        self.services = {s.service_id: s for s in inventory.services}

    async def send(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        return await self.node.bus.send(msg, TIMEOUT)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertTrue(reply.success, f"{type(msg).__name__}: {reply.error}")
        return reply

    async def refused(self, msg: Any, service_id: str, resource_uuid: str | None,
                      code: str, *named: str) -> Any:
        """
        C{msg} fails with C{code}, and the error (its text or details) names each of
        C{named}.
        """
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertFalse(reply.success, f"{type(msg).__name__} was not refused")
        self.assertEqual(reply.error.code, code, reply.error)
        said = f"{reply.error} {reply.error.opaque}"
        for name in named:
            self.assertIn(name, said)
        return reply.error

    async def query(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        reply = await self.ok(QueryInventoryMsg(resource=resource, conditions=list(conditions)),
                              "query")
        return reply.inventories

    async def inv(self, resource: str, uuid: str) -> dict[str, Any]:
        [found] = await self.query(resource, f"uuid={uuid}")
        return found

    async def no_drift(self) -> None:
        self.assertEqual(await self.node.store.audit_capacity(), [])

    def settled(self, topic: str, match: Any) -> defer.Deferred:
        """
        A Deferred firing once an event of C{topic} for which C{match(event)} is true has
        been seen (after the services' own subscriptions) and the primary storage service
        has no work in flight.
        """
        done: defer.Deferred = defer.Deferred()
        subscription = None

        def seen(event: Any) -> None:
            if done.called or not match(event):
                return
            subscription.cancel()
            self.services[PRIMARY]._waiter.wait().chainDeferred(done)

        subscription = self.node.bus.subscribe(topic, seen)
        return done.addTimeout(TIMEOUT, reactor)

    # --- the scenario -----------------------------------------------------------------

    async def test_build_use_and_tear_down(self) -> None:
        """
        Zone, cluster, hosts, LocalStorage and NFS, Sftp backup storage, image, offerings,
        L2 / L3 with a range and DNS, one allocation; a host added after the attach gets its
        storage; 100 concurrent volumes from one image on each storage type make one download
        each; wrong-order deletes are refused naming the dependents; everything deleted in
        reverse order leaves every inventory table empty.
        """
        await self.start_node()
        sim = self.simulated

        # zone, cluster
        zone = (await self.ok(CreateZoneMsg(name="zone-e2e"), ZONE_SERVICE)).inventory
        self.assertEqual((zone["name"], zone["state"]), ("zone-e2e", "Enabled"))
        self.assertEqual(await self.query("zone"), [zone])
        z = zone["uuid"]
        cluster = (await self.ok(CreateClusterMsg(zone_uuid=z, name="cluster-e2e",
                                                  hypervisor_type="KVM"),
                                 CLUSTER_SERVICE)).inventory
        self.assertEqual((cluster["zoneUuid"], cluster["hypervisorType"], cluster["state"]),
                         (z, "KVM", "Enabled"))
        self.assertEqual(await self.inv("cluster", cluster["uuid"]), cluster)
        c = cluster["uuid"]

        # two hosts, Connected with the agent's capacity
        hosts = []
        for slot in HOST_SLOTS[:2]:
            host = (await self.ok(AddHostMsg(name=f"host-{slot}", zone_uuid=z, cluster_uuid=c,
                                             management_ip=self.base(slot)),
                                  HOST_SERVICE)).inventory
            hosts.append(host["uuid"])
            found = await self.inv("host", host["uuid"])
            self.assertEqual((found["status"], found["clusterUuid"], found["zoneUuid"]),
                             ("Connected", c, z))
            self.assertGreater(found["totalCpuCapacity"], 0)
            self.assertGreater(found["totalMemoryCapacity"], 0)
            self.assertEqual((found["availableCpuCapacity"], found["availableMemoryCapacity"]),
                             (found["totalCpuCapacity"], found["totalMemoryCapacity"]))
        h1, h2 = hosts
        await self.no_drift()

        # LocalStorage: a ref per host with its disk; the totals are the sums
        local = (await self.ok(AddLocalPrimaryStorageMsg(name="local", zone_uuid=z,
                                                         url="/zstack_ps"),
                               PRIMARY)).inventory
        self.assertEqual((local["type"], local["status"], local["totalCapacity"],
                          local["attachedClusterUuids"]), ("LocalStorage", "Connected", 0, []))
        ls = local["uuid"]
        local = (await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ls,
                                                                cluster_uuid=c),
                               PRIMARY, ls)).inventory
        self.assertEqual(local["attachedClusterUuids"], [c])
        refs = await self.query("localStorageHostRef", f"primaryStorageUuid={ls}")
        self.assertEqual(sorted((r["hostUuid"], r["totalCapacity"], r["availableCapacity"])
                                for r in refs),
                         sorted((h, 2 * TiB, 2 * TiB) for h in hosts))
        self.assertEqual((local["totalCapacity"], local["availableCapacity"]),
                         (sum(r["totalCapacity"] for r in refs),
                          sum(r["availableCapacity"] for r in refs)))
        self.assertEqual(await self.inv("primaryStorage", ls), local)

        # NFS: mounted on both hosts, the export's capacity once
        nfs_url = f"nfs.example:/export/e2e-{secrets.token_hex(3)}"
        nfs = (await self.ok(AddNfsPrimaryStorageMsg(name="nfs", zone_uuid=z, url=nfs_url),
                             PRIMARY)).inventory
        ns = nfs["uuid"]
        nfs = (await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ns,
                                                              cluster_uuid=c),
                             PRIMARY, ns)).inventory
        self.assertEqual((nfs["type"], nfs["attachedClusterUuids"], nfs["totalCapacity"],
                          nfs["availableCapacity"]), ("NFS", [c], 10 * TiB, 10 * TiB))
        refs = await self.query("primaryStorageHostRef", f"primaryStorageUuid={ns}")
        self.assertEqual(sorted((r["hostUuid"], r["status"]) for r in refs),
                         sorted((h, "Connected") for h in hosts))
        for slot in HOST_SLOTS[:2]:
            self.assertIn(nfs_url, sim.storage(str(slot)).mounts)
        await self.no_drift()

        # Sftp backup storage, attached to the zone
        backup = (await self.ok(AddSftpBackupStorageMsg(name="sftp", url="/zstack_bs",
                                                        hostname=self.base(BS_SLOT),
                                                        password="password"),
                                BACKUP)).inventory
        bs = backup["uuid"]
        self.assertEqual((backup["type"], backup["status"]), ("SftpBackupStorage", "Connected"))
        self.assertGreater(backup["totalCapacity"], 0)
        self.assertEqual(backup["availableCapacity"], backup["totalCapacity"])
        backup = (await self.ok(AttachBackupStorageToZoneMsg(backup_storage_uuid=bs,
                                                             zone_uuid=z),
                                BACKUP, bs)).inventory
        self.assertEqual(backup["attachedZoneUuids"], [z])
        self.assertEqual(await self.inv("backupStorage", bs), backup)

        # image: Downloading while the agent downloads, then Ready with the agent's sizes
        downloading = self.accepted(DOWNLOAD_PATH)
        added = defer.ensureDeferred(self.ok(AddImageMsg(
            name="image-e2e", url=f"http://images.example/e2e.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[bs]), IMAGE_SERVICE))
        await downloading
        [image] = await self.query("image")
        self.assertEqual(image["status"], "Downloading")
        image = (await added).inventory
        img = image["uuid"]
        self.assertEqual((image["status"], image["size"], image["actualSize"]),
                         ("Ready", IMAGE_SIZE, IMAGE_ACTUAL))
        self.assertEqual([(r["backupStorageUuid"], r["status"])
                          for r in image["backupStorageRefs"]], [(bs, "Ready")])
        self.assertEqual(await self.inv("image", img), image)
        backup = await self.inv("backupStorage", bs)
        self.assertEqual(backup["totalCapacity"] - backup["availableCapacity"], IMAGE_ACTUAL)

        # offerings
        offering = (await self.ok(CreateInstanceOfferingMsg(
            name="small", cpu_num=2, memory_size=2 * GiB, cpu_speed=1000),
            OFFERING_SERVICE)).inventory
        self.assertEqual((offering["cpuNum"], offering["memorySize"], offering["state"]),
                         (2, 2 * GiB, "Enabled"))
        self.assertEqual(await self.inv("instanceOffering", offering["uuid"]), offering)
        disk = (await self.ok(CreateDiskOfferingMsg(name="data", disk_size=20 * GiB),
                              OFFERING_SERVICE)).inventory
        self.assertEqual((disk["diskSize"], disk["state"]), (20 * GiB, "Enabled"))
        self.assertEqual(await self.inv("diskOffering", disk["uuid"]), disk)

        # L2 on the cluster, L3 with a range and DNS
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid=z,
                                                     physical_interface="eth0"),
                            L2_SERVICE_ID)).inventory
        l2 = (await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid=l2["uuid"],
                                                        cluster_uuid=c),
                            L2_SERVICE_ID, l2["uuid"])).inventory
        self.assertEqual((l2["type"], l2["physicalInterface"], l2["attachedClusterUuids"]),
                         ("L2NoVlanNetwork", "eth0", [c]))
        self.assertEqual(await self.inv("l2Network", l2["uuid"]), l2)
        l3 = (await self.ok(CreateL3NetworkMsg(name="l3", l2_network_uuid=l2["uuid"]),
                            L3_SERVICE_ID)).inventory
        self.assertEqual((l3["zoneUuid"], l3["ipRanges"], l3["dns"]), (z, [], []))
        await self.ok(AddIpRangeMsg(l3_network_uuid=l3["uuid"], name="r", start_ip="10.0.0.10",
                                    end_ip="10.0.0.200", netmask="255.255.255.0",
                                    gateway="10.0.0.1"), L3_SERVICE_ID, l3["uuid"])
        await self.ok(AddDnsToL3NetworkMsg(l3_network_uuid=l3["uuid"], dns="8.8.8.8"),
                      L3_SERVICE_ID, l3["uuid"])
        l3 = await self.inv("l3Network", l3["uuid"])
        self.assertEqual([(r["startIp"], r["endIp"], r["gateway"]) for r in l3["ipRanges"]],
                         [("10.0.0.10", "10.0.0.200", "10.0.0.1")])
        self.assertEqual(l3["dns"], ["8.8.8.8"])

        # the allocator: a host of the cluster for the offering on the L3; given back
        reply = await self.ok(AllocateHostMsg(
            vm_instance_uuid="vm-e2e", cpu_num=offering["cpuNum"],
            memory_size=offering["memorySize"], cpu_speed=offering["cpuSpeed"],
            disk_size=IMAGE_SIZE, l3_network_uuids=[l3["uuid"]]), ALLOCATOR)
        chosen = reply.inventory
        self.assertIn(chosen["uuid"], hosts)
        self.assertEqual(chosen["clusterUuid"], c)
        self.assertEqual(sorted(reply.primary_storage_uuids), sorted([ls, ns]))
        self.assertEqual(chosen["totalMemoryCapacity"] - chosen["availableMemoryCapacity"],
                         2 * GiB)
        await self.no_drift()
        back = (await self.ok(ReturnHostCapacityMsg(host_uuid=chosen["uuid"],
                                                    vm_instance_uuid="vm-e2e"),
                              ALLOCATOR)).inventory
        self.assertEqual((back["availableCpuCapacity"], back["availableMemoryCapacity"]),
                         (back["totalCpuCapacity"], back["totalMemoryCapacity"]))

        # a third host, added after the attach: its local ref and its NFS mount on connect
        prepared = self.settled("host.status", lambda e: e.new_status == "Connected"
                                and e.host_uuid not in hosts)
        h3 = (await self.ok(AddHostMsg(name="host-3", zone_uuid=z, cluster_uuid=c,
                                       management_ip=self.base(HOST_SLOTS[2])),
                            HOST_SERVICE)).inventory["uuid"]
        await prepared
        hosts.append(h3)
        [ref] = await self.query("localStorageHostRef", f"hostUuid={h3}")
        self.assertEqual((ref["primaryStorageUuid"], ref["totalCapacity"]), (ls, 2 * TiB))
        self.assertEqual((await self.inv("primaryStorage", ls))["totalCapacity"], 6 * TiB)
        [ref] = await self.query("primaryStorageHostRef", f"hostUuid={h3}")
        self.assertEqual((ref["primaryStorageUuid"], ref["status"]), (ns, "Connected"))
        self.assertIn(nfs_url, sim.storage(str(HOST_SLOTS[2])).mounts)
        await self.no_drift()

        # 100 concurrent volumes from the image on NFS, then on one host's LocalStorage
        select = await self.ok(SelectBackupStorageMsg(image_uuid=img, zone_uuid=z),
                               IMAGE_SERVICE, img)
        self.assertEqual(select.backup_storage_uuid, bs)
        spec = {"uuid": img, "size": image["size"], "actualSize": image["actualSize"],
                "format": image["format"], "mediaType": image["mediaType"],
                "backupStorageUuid": bs, "installPath": select.install_path,
                "backupStorageHostname": select.hostname}
        volumes: dict[str, list[tuple[str, str]]] = {}
        for ps, host, location in ((ns, None, f"nfs:{nfs_url}"),
                                   (ls, h1, f"local:{HOST_SLOTS[0]}")):
            before = await self.inv("primaryStorage", ps)
            uuids = [f"vol-{ps[:8]}-{i}" for i in range(VOLUMES)]
            replies = await defer.gatherResults([
                defer.ensureDeferred(self.send(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
                    primary_storage_uuid=ps, volume_uuid=v, image=dict(spec), host_uuid=host),
                    PRIMARY, ps)) for v in uuids])
            failed = [r.error for r in replies if not r.success]
            self.assertEqual(failed, [])
            self.assertEqual(sim.downloads[(location, img)], 1)
            paths = {r.install_path for r in replies}
            self.assertEqual(len(paths), VOLUMES)
            if host is not None:
                self.assertEqual({r.host_uuid for r in replies}, {host})
            volumes[ps] = [(v, r.install_path) for v, r in zip(uuids, replies, strict=True)]
            after = await self.inv("primaryStorage", ps)
            self.assertEqual(before["availableCapacity"] - after["availableCapacity"],
                             VOLUMES * IMAGE_SIZE + IMAGE_ACTUAL)
            [cache] = await self.query("imageCache", f"primaryStorageUuid={ps}")
            self.assertEqual((cache["imageUuid"], cache["status"], cache["hostUuid"]),
                             (img, "Ready", host))
            await self.no_drift()
        self.assertEqual(sum(sim.downloads.values()), 2)
        export = sim.nfs_exports[nfs_url]
        self.assertEqual(len([p for p in export.files if "/rootVolumes/" in p]), VOLUMES)

        # deleting in the wrong order is refused, naming what depends
        a_volume = volumes[ls][0][0]
        await self.refused(DeleteHostMsg(uuid=h1), HOST_SERVICE, h1, HOST.DELETE_ERROR,
                           a_volume)
        await self.refused(DeletePrimaryStorageMsg(uuid=ls), PRIMARY, ls, PS.IN_USE, c)
        await self.refused(DetachPrimaryStorageFromClusterMsg(primary_storage_uuid=ls,
                                                              cluster_uuid=c),
                           PRIMARY, ls, PS.IN_USE, a_volume)
        await self.refused(DeleteZoneMsg(uuid=z), ZONE_SERVICE, z, ZONE.HAS_DEPENDENTS, c, bs)
        await self.refused(DeleteClusterMsg(uuid=c), CLUSTER_SERVICE, c,
                           CLUSTER.HAS_DEPENDENTS, *hosts)
        await self.refused(DeleteL2NetworkMsg(uuid=l2["uuid"]), L2_SERVICE_ID, l2["uuid"],
                           L2.DELETE_ERROR, l3["uuid"])

        # the volumes' bits go, and their capacity with them
        await defer.gatherResults([
            defer.ensureDeferred(self.ok(DeleteVolumeBitsOnPrimaryStorageMsg(
                primary_storage_uuid=ps, volume_uuid=v, install_path=path), PRIMARY, ps))
            for ps, vols in volumes.items() for v, path in vols])
        for ps in (ls, ns):
            holders = await self.node.store.primary_storage_holders(ps)
            self.assertEqual([(h["holderType"], h["size"]) for h in holders],
                             [("ImageCacheVO", IMAGE_ACTUAL)])  # the cache alone
            storage = await self.inv("primaryStorage", ps)
            self.assertEqual(storage["totalCapacity"] - storage["availableCapacity"],
                             IMAGE_ACTUAL)  # the cache
        self.assertEqual([p for p in export.files if "/rootVolumes/" in p], [])
        await self.no_drift()

        # the image (its caches are dropped when the deletion is announced)
        dropped = self.settled("image.deleted", lambda e: e.image_uuid == img)
        await self.ok(DeleteImageMsg(uuid=img), IMAGE_SERVICE, img)
        await dropped
        self.assertEqual(await self.query("image"), [])
        self.assertEqual(await self.query("imageCache"), [])
        for ps in (ls, ns):
            storage = await self.inv("primaryStorage", ps)
            self.assertEqual(storage["availableCapacity"], storage["totalCapacity"])
        backup = await self.inv("backupStorage", bs)
        self.assertEqual(backup["availableCapacity"], backup["totalCapacity"])
        await self.no_drift()

        # offerings, L3, L2
        await self.ok(DeleteInstanceOfferingMsg(uuid=offering["uuid"]), OFFERING_SERVICE,
                      offering["uuid"])
        await self.ok(DeleteDiskOfferingMsg(uuid=disk["uuid"]), OFFERING_SERVICE, disk["uuid"])
        self.assertEqual(await self.query("instanceOffering") + await self.query("diskOffering"),
                         [])
        await self.ok(DeleteL3NetworkMsg(uuid=l3["uuid"]), L3_SERVICE_ID, l3["uuid"])
        self.assertEqual(await self.query("ipRange") + await self.query("l3NetworkDns"), [])
        await self.ok(DeleteL2NetworkMsg(uuid=l2["uuid"]), L2_SERVICE_ID, l2["uuid"])
        self.assertEqual(await self.query("l2NetworkClusterRef"), [])

        # primary storages: detached (unmounted on every host), then deleted
        for ps in (ls, ns):
            inv = (await self.ok(DetachPrimaryStorageFromClusterMsg(
                primary_storage_uuid=ps, cluster_uuid=c), PRIMARY, ps)).inventory
            self.assertEqual(inv["attachedClusterUuids"], [])
            await self.ok(DeletePrimaryStorageMsg(uuid=ps), PRIMARY, ps)
        for slot in HOST_SLOTS:
            self.assertEqual(sim.storage(str(slot)).mounts, {})
        self.assertEqual(await self.query("primaryStorage"), [])
        await self.no_drift()

        # backup storage (deleting detaches it), hosts, cluster, zone
        await self.ok(DeleteBackupStorageMsg(uuid=bs), BACKUP, bs)
        self.assertEqual(await self.query("backupStorageZoneRef"), [])
        await self.refused(DeleteZoneMsg(uuid=z), ZONE_SERVICE, z, ZONE.HAS_DEPENDENTS, c)
        for h in hosts:
            await self.ok(DeleteHostMsg(uuid=h), HOST_SERVICE, h)
        await self.ok(DeleteClusterMsg(uuid=c), CLUSTER_SERVICE, c)
        await self.ok(DeleteZoneMsg(uuid=z), ZONE_SERVICE, z)

        # the store is clean
        for resource in sorted(set(RESOURCES) - NOT_INVENTORY):
            page = await self.node.store.query(resource, Query(count=True))
            self.assertEqual(page.total, 0, resource)
        for table in HOLDER_TABLES:
            [(count,)] = await self.node.store._run(
                lambda db, table=table: db.all(f"SELECT COUNT(*) FROM {table}"))
            self.assertEqual(count, 0, table)
        await self.no_drift()
        await self.node.stopService()

    def accepted(self, path: str) -> defer.Deferred:
        """
        A Deferred firing when the agent accepts the next command on C{path}.
        """
        fired: defer.Deferred = defer.Deferred()
        accept = self.agent._accepted

        def accepting(definition: Any, *rest: Any) -> None:
            accept(definition, *rest)
            if definition.path == path and not fired.called:
                self.agent._accepted = accept
                fired.callback(None)

        self.agent._accepted = accepting
        return fired.addTimeout(TIMEOUT, reactor)


class EmbeddedInventoryTests(EmbeddedBackends, InventoryScenario, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """


class RabbitPostgresInventoryTests(RabbitPostgresBackends, InventoryScenario,
                                   LoopbackTestCase):
    """
    On PostgreSQL (a scratch database, dropped at cleanup) and RabbitMQ (the AMQP bus on a
    random prefix, its exchanges deleted at cleanup). Fails when either is missing.
    """


class MessageCodecTests(SynchronousTestCase):
    """
    Every inventory message crosses the bus's codec (an AMQP bus encodes what a LocalBus
    hands over as it is).
    """

    def test_field_named_type(self) -> None:
        """
        Fault: a message with a field named C{type} (C{CreateClusterMsg},
        C{AddSftpBackupStorageMsg}, C{CreateInstanceOfferingMsg}, C{CreateL3NetworkMsg}) could
        not be encoded: the codec resolved the C{ClassVar[type[Reply]]} annotation with the
        class's namespace first, where C{type} is the field's slot, not the builtin. On an
        AMQP bus those creates failed with SYS.1007. Each now round-trips with its C{type}.
        """
        for msg in (CreateClusterMsg(zone_uuid="z", name="c", type="zstack"),
                    AddSftpBackupStorageMsg(name="b", url="/bs", hostname="h"),
                    CreateInstanceOfferingMsg(name="o", cpu_num=1, memory_size=GiB,
                                              type="UserVm"),
                    CreateL3NetworkMsg(name="l3", l2_network_uuid="l2")):
            msg.service_id = "s"
            again = registry.decode(registry.encode(msg))
            self.assertEqual((type(again), again.type, again.name),
                             (type(msg), msg.type, msg.name))
