"""
Data volumes end to end (issue 10, deliverable 1: create, attach, detach, delete): a whole
management node (L{zcontrol.node.make_node}) and a real simulated agent over loopback HTTP
serving KVM hosts with their local disks and an NFS export. Every step goes through the
node's bus and is checked in the store, in the simulated agent (the volume's bits on the
disks, the volumes hot-plugged into each VM) and in the capacity accounting (the primary
storage holders, C{audit_capacity}) by L{VolumeScenario.audit}.

A failure injected in each flow of an attach and of a detach, two ways (the agent or the
storage agent refusing; a flow whose work was done but whose run then failed, as when its
reply is lost, so that its rollback gets C{took=None}), rolls back with nothing leaked.

The scenario runs on the embedded backends (SQLite, LocalBus) and on PostgreSQL with
RabbitMQ (failing, never skipping, when either is missing). No sleeps.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.internet import defer, reactor

from agent.hypervisor.interfaces import HypervisorError, VmSpec
from agent.hypervisor.simulator import GiB
from agent.kvm import KvmPlugin
from agent.storage import StoragePlugin
from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends
from zcontrol.config import load_config
from zcontrol.core.errors import SYS
from zcontrol.core.journal import JOB_NODE_RESTARTED, JOB_TAKEN_OVER, recover_jobs
from zcontrol.db.query import Query
from zcontrol.node import make_node
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import AddHostMsg
from zcontrol.services.offering.messages import OFFERING, CreateDiskOfferingMsg
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.primarystorage.messages import (
    PS,
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
)
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import (
    SERVICE_ID as VM_SERVICE,
)
from zcontrol.services.vm.messages import (
    VOLUME,
    VOLUME_SERVICE_ID,
    AttachDataVolumeToVmMsg,
    CreateDataVolumeMsg,
    DeleteDataVolumeMsg,
    DestroyVmInstanceMsg,
    DetachDataVolumeFromVmMsg,
    ExpungeDataVolumeMsg,
    ExpungeVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)
from zcontrol.services.vm.volumes import (
    ATTACH_KIND,
    DETACH_KIND,
    LOCAL_STORAGE_HOST_TAG,
    data_volume_tos,
)
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

#: agent slots of the KVM hosts
HOST_SLOTS = (1, 2)
#: one send's bound (seconds): a lost reply fails the test instead of hanging it
TIMEOUT = 60
DISK = 20 * GiB


class VolumeChecks:
    """
    The checks and helpers both scenarios share: the store's rows, the simulated agent's
    view (the volumes plugged into a VM, the files on a disk) and L{audit}. Needs
    C{self.store}, C{self.slots} (host uuid -> agent slot), C{self.storages} (primary
    storage uuid -> its row) and C{self.simulated}.
    """

    async def stored(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        return (await self.store.query(resource, Query(conditions=list(conditions),
                                                       limit=1000))).inventories

    async def attach(self, volume: str, vm: str) -> Any:
        return await self.send(AttachDataVolumeToVmMsg(vm_instance_uuid=vm, volume_uuid=volume),
                               VM_SERVICE, vm)

    async def detach(self, volume: str, vm: str | None) -> Any:
        return await self.send(DetachDataVolumeFromVmMsg(uuid=volume, vm_uuid=vm),
                               VM_SERVICE, vm)

    def hv(self, host_uuid: str) -> Any:
        return self.simulated.hypervisor(self.slots[host_uuid])

    async def plugged(self, vm: str, host_uuid: str) -> dict[str, int]:
        """
        The data volumes the simulated host has plugged into VM C{vm}: uuid -> device id.
        """
        found = await self.hv(host_uuid).attached_volumes(vm)
        return {u: v.device_id for u, v in found.items()}

    def bits(self, ps: dict[str, Any], host_uuid: str | None) -> dict[str, int]:
        """
        The files on a primary storage as the simulated agent has them: LocalStorage, on
        the host's disk; NFS, on the export.
        """
        if ps["type"] == "LocalStorage":
            return self.simulated.storage(self.slots[host_uuid]).local.files
        return self.simulated.nfs_exports[ps["url"]].files

    async def audit(self) -> None:
        """
        The store against the agents: no capacity drift; every C{Ready} volume holds its
        size on its primary storage (on its host for LocalStorage) and has its bits there,
        every C{NotInstantiated} volume holds nothing; no C{VolumeVO} holder without its
        volume; every Running VM has exactly its attached Ready data volumes plugged in at
        their device ids; no job left Running.
        """
        self.assertEqual(await self.store.audit_capacity(), [])
        volumes = {v["uuid"]: v for v in await self.stored("volume")}
        held: dict[str, tuple[str, int, str | None]] = {}
        for ps in await self.stored("primaryStorage"):
            for h in await self.store.primary_storage_holders(ps["uuid"]):
                if h["holderType"] == "VolumeVO":
                    self.assertIn(h["holderUuid"], volumes, f"leaked holder {h}")
                    held[h["holderUuid"]] = (ps["uuid"], h["size"], h["hostUuid"])
        for v in volumes.values():
            if v["status"] == "Ready":
                ps_uuid, size, host = held[v["uuid"]]
                self.assertEqual((ps_uuid, size), (v["primaryStorageUuid"], v["size"]))
                ps = self.storages[ps_uuid]
                self.assertEqual(self.bits(ps, host).get(v["installPath"]), v["size"],
                                 f"bits of {v['uuid']}")
            elif v["status"] == "NotInstantiated":
                self.assertNotIn(v["uuid"], held)
                self.assertIsNone(v["primaryStorageUuid"])
                self.assertIsNone(v["installPath"])
        for vm in await self.stored("vmInstance", "state=Running"):
            want = {v["uuid"]: v["deviceId"] for v in volumes.values()
                    if v["vmInstanceUuid"] == vm["uuid"] and v["type"] == "Data"}
            self.assertEqual(await self.plugged(vm["uuid"], vm["hostUuid"]), want)
        self.assertEqual(await self.stored("job", "state=Running"), [])

    async def row(self, uuid: str) -> dict[str, Any] | None:
        return await self.store.get("volume", uuid)


class VolumeScenario(VolumeChecks):
    """
    The scenario, for a L{LoopbackTestCase} whose L{node_overrides} chooses the backends.
    """

    host_count = 4

    def agent_plugins(self) -> list[Any]:
        return [KvmPlugin(), StoragePlugin()]

    async def node_overrides(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- plumbing ---------------------------------------------------------------------

    async def start_node(self) -> None:
        data = os.path.abspath(self.mktemp())
        overrides = {"node": {"id": f"mn-vol-{secrets.token_hex(3)}", "data_dir": data},
                     "http": {"port": 0, "interface": "127.0.0.1"}}
        overrides.update(await self.node_overrides())
        self.node = make_node(load_config(None, overrides), reactor)
        self.addCleanup(lambda: self.node.running and self.node.stopService())
        await self.node.startService()
        inventory = [s for s in self.node if s.name == "inventory"][0]
        self.services = {s.service_id: s for s in inventory.services}
        self.store = self.node.store

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
        C{msg} fails with C{code}, and the error (its text, details or causes) names each
        of C{named}.
        """
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertFalse(reply.success, f"{type(msg).__name__} was not refused")
        self.assertEqual(reply.error.code, code, reply.error)
        said = _said(reply.error)
        for name in named:
            self.assertIn(name, said)
        return reply.error

    # --- the cloud --------------------------------------------------------------------

    async def build(self) -> None:
        """
        A zone, a cluster with two Connected hosts, LocalStorage and NFS attached to it, a
        disk offering of L{DISK} bytes.
        """
        await self.start_node()
        z = (await self.ok(CreateZoneMsg(name="z"), ZONE_SERVICE)).inventory["uuid"]
        c = (await self.ok(CreateClusterMsg(zone_uuid=z, name="c", hypervisor_type="KVM"),
                           CLUSTER_SERVICE)).inventory["uuid"]
        self.zone, self.cluster = z, c
        self.slots: dict[str, str] = {}
        self.hosts: list[str] = []
        for slot in HOST_SLOTS:
            h = (await self.ok(AddHostMsg(name=f"h{slot}", zone_uuid=z, cluster_uuid=c,
                                          management_ip=self.base(slot)),
                               HOST_SERVICE)).inventory["uuid"]
            self.slots[h] = str(slot)
            self.hosts.append(h)
        local = (await self.ok(AddLocalPrimaryStorageMsg(name="local", zone_uuid=z,
                                                         url="/zstack_ps"),
                               PRIMARY)).inventory
        nfs = (await self.ok(AddNfsPrimaryStorageMsg(
            name="nfs", zone_uuid=z, url=f"nfs.example:/vol-{secrets.token_hex(3)}"),
            PRIMARY)).inventory
        for ps in (local, nfs):
            await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ps["uuid"],
                                                           cluster_uuid=c),
                          PRIMARY, ps["uuid"])
        self.local, self.nfs = local["uuid"], nfs["uuid"]
        self.storages = {ps["uuid"]: ps for ps in (local, nfs)}
        self.offering = (await self.ok(CreateDiskOfferingMsg(name="d", disk_size=DISK),
                                       OFFERING_SERVICE)).inventory["uuid"]
        await self.audit()

    async def vm(self, host_uuid: str, root_ps: str, state: str = "Running") -> str:
        """
        A VM on C{host_uuid} with its root volume (1 GiB, instantiated on C{root_ps}),
        made as the create of the VM service leaves one: Running (holding its CPU and
        memory, started on the simulated host) or Stopped (C{lastHostUuid} only).
        """
        vm_uuid, root = secrets.token_hex(16), secrets.token_hex(16)
        reply = await self.ok(InstantiateVolumeOnPrimaryStorageMsg(
            primary_storage_uuid=root_ps, volume_uuid=root, size=GiB,
            host_uuid=host_uuid), PRIMARY, root_ps)
        running = state == "Running"
        if running:
            await self.store.reserve_host_capacity(host_uuid, 1, GiB, ("VmInstanceVO", vm_uuid))
            await self.hv(host_uuid).start_vm(VmSpec(uuid=vm_uuid, name="vm", cpu_num=1,
                                                     memory_size=GiB))
        await self.store.insert("vmInstance", {
            "uuid": vm_uuid, "name": "vm", "zoneUuid": self.zone, "clusterUuid": self.cluster,
            "hostUuid": host_uuid if running else None, "lastHostUuid": host_uuid,
            "rootVolumeUuid": root, "cpuNum": 1, "memorySize": GiB, "state": state})
        await self.store.insert("volume", {
            "uuid": root, "name": "root", "type": "Root", "size": GiB, "status": "Ready",
            "primaryStorageUuid": root_ps, "installPath": reply.install_path,
            "vmInstanceUuid": vm_uuid, "deviceId": 0})
        return vm_uuid

    async def volume(self, **kw: Any) -> dict[str, Any]:
        kw.setdefault("name", "data")
        if "disk_size" not in kw:
            kw.setdefault("disk_offering_uuid", self.offering)
        return (await self.ok(CreateDataVolumeMsg(**kw), VOLUME_SERVICE_ID)).inventory

    # --- the scenarios ----------------------------------------------------------------

    async def test_create_attach_detach_delete(self) -> None:
        """
        Bad creates are refused naming the field; volumes are created NotInstantiated or at
        once on NFS or a host's LocalStorage; attached to a Running VM (instantiated next to
        its root volume first, hot-plugged at device 1, 2, 3) and to a Stopped one (no
        agent call); refused when attached, unreachable, or the VM's state forbids it;
        detached (the root volume never); deleted (refused while attached, idempotent).
        The store, the agent and the accounting agree after every step.
        """
        await self.build()
        h1, h2 = self.hosts

        # bad creates
        await self.refused(CreateDataVolumeMsg(name="d", disk_offering_uuid="nope"),
                           VOLUME_SERVICE_ID, None, OFFERING.DISK_OFFERING_NOT_FOUND,
                           "diskOfferingUuid", "nope")
        for size in (0, -1):
            await self.refused(CreateDataVolumeMsg(name="d", disk_size=size),
                               VOLUME_SERVICE_ID, None, SYS.INVALID_ARGUMENT_ERROR, "diskSize")
        for size in ("big", True):  # an AMQP bus's codec refuses these first, naming disk_size
            err = await self.refused(CreateDataVolumeMsg(name="d", disk_size=size),
                                     VOLUME_SERVICE_ID, None, SYS.INVALID_ARGUMENT_ERROR)
            self.assertRegex(_said(err), "diskSize|disk_size")
        await self.refused(CreateDataVolumeMsg(name="d"), VOLUME_SERVICE_ID, None,
                           SYS.INVALID_ARGUMENT_ERROR, "diskSize")
        await self.refused(CreateDataVolumeMsg(name="d", disk_size=GiB,
                                               primary_storage_uuid="nope"),
                           VOLUME_SERVICE_ID, None, PS.NOT_FOUND, "primaryStorageUuid")
        await self.refused(CreateDataVolumeMsg(name="d", disk_size=GiB,
                                               primary_storage_uuid=self.local),
                           VOLUME_SERVICE_ID, None, SYS.INVALID_ARGUMENT_ERROR, "systemTags",
                           LOCAL_STORAGE_HOST_TAG)
        self.assertEqual(await self.stored("volume"), [])

        # created: NotInstantiated (nothing held), on NFS, on h1's LocalStorage
        v1 = await self.volume()
        self.assertEqual((v1["status"], v1["type"], v1["size"], v1["diskOfferingUuid"],
                          v1["primaryStorageUuid"], v1["vmInstanceUuid"]),
                         ("NotInstantiated", "Data", DISK, self.offering, None, None))
        self.assertEqual(await self.row(v1["uuid"]), v1)
        v2 = await self.volume(disk_size=3 * GiB, primary_storage_uuid=self.nfs)
        self.assertEqual((v2["status"], v2["size"], v2["primaryStorageUuid"]),
                         ("Ready", 3 * GiB, self.nfs))
        v3 = await self.volume(primary_storage_uuid=self.local,
                               system_tags=[f"{LOCAL_STORAGE_HOST_TAG}{h1}"])
        self.assertEqual((v3["status"], v3["primaryStorageUuid"]), ("Ready", self.local))
        [held] = [h for h in await self.store.primary_storage_holders(self.local)
                  if h["holderUuid"] == v3["uuid"]]
        self.assertEqual((held["hostUuid"], held["size"]), (h1, DISK))
        await self.audit()

        # a Running VM on h1 (root on LocalStorage), a Stopped one on h2 (root on NFS)
        vm1 = await self.vm(h1, self.local)
        vm2 = await self.vm(h2, self.nfs, state="Stopped")
        await self.audit()

        # attach the NotInstantiated volume: instantiated on h1's LocalStorage, device 1
        reply = await self.attach(v1["uuid"], vm1)
        self.assertTrue(reply.success, reply.error)
        att = reply.inventory
        self.assertEqual((att["vmInstanceUuid"], att["deviceId"], att["status"],
                          att["primaryStorageUuid"]), (vm1, 1, "Ready", self.local))
        self.assertEqual(await self.row(v1["uuid"]), att)
        job = await self.store.get("job", reply.job_uuid)
        self.assertEqual((job["apiName"], job["state"], job["resourceUuid"]),
                         (ATTACH_KIND, "Succeeded", vm1))
        self.assertEqual(await self.plugged(vm1, h1), {v1["uuid"]: 1})
        await self.audit()
        # then the Ready ones: h1's local one, the NFS one
        for vol, device in ((v3, 2), (v2, 3)):
            reply = await self.attach(vol["uuid"], vm1)
            self.assertTrue(reply.success, reply.error)
            self.assertEqual(reply.inventory["deviceId"], device)
        self.assertEqual(await self.plugged(vm1, h1),
                         {v1["uuid"]: 1, v3["uuid"]: 2, v2["uuid"]: 3})
        # what a start of the VM must define it with: the same, as the agent wants them
        tos = await data_volume_tos(self.store, vm1)
        self.assertEqual([(t.volume_uuid, t.device_id) for t in tos],
                         [(v1["uuid"], 1), (v3["uuid"], 2), (v2["uuid"], 3)])
        self.assertEqual(tos[2].install_path, (await self.row(v2["uuid"]))["installPath"])
        await self.audit()

        # refusals: attached already, delete while attached, the VM's state, unknowns,
        # a LocalStorage volume of another host, the root volume
        await self.refused(AttachDataVolumeToVmMsg(vm_instance_uuid=vm2,
                                                   volume_uuid=v1["uuid"]),
                           VM_SERVICE, vm2, VOLUME.ATTACHED, vm1)
        await self.refused(DeleteDataVolumeMsg(uuid=v1["uuid"]), VOLUME_SERVICE_ID,
                           v1["uuid"], VOLUME.ATTACHED, vm1)
        await self.refused(ExpungeDataVolumeMsg(uuid=v2["uuid"]), VOLUME_SERVICE_ID,
                           v2["uuid"], VOLUME.ATTACHED, vm1)
        await self.refused(AttachDataVolumeToVmMsg(vm_instance_uuid="ghost",
                                                   volume_uuid=v1["uuid"]),
                           VM_SERVICE, "ghost", VM.NOT_FOUND, "ghost")
        await self.refused(AttachDataVolumeToVmMsg(vm_instance_uuid=vm2, volume_uuid="ghost"),
                           VM_SERVICE, vm2, VOLUME.NOT_FOUND, "volumeUuid")
        vm3 = await self.vm(h2, self.nfs)
        await self.store.change_vm_state(vm3, ["Running"], "Unknown")
        await self.refused(AttachDataVolumeToVmMsg(vm_instance_uuid=vm3,
                                                   volume_uuid=(await self.volume())["uuid"]),
                           VM_SERVICE, vm3, VM.NOT_IN_CORRECT_STATE, "Unknown")
        await self.store.change_vm_state(vm3, ["Unknown"], "Running")
        other = await self.volume(primary_storage_uuid=self.local,
                                  system_tags=[f"{LOCAL_STORAGE_HOST_TAG}{h2}"])
        await self.refused(AttachDataVolumeToVmMsg(vm_instance_uuid=vm1,
                                                   volume_uuid=other["uuid"]),
                           VM_SERVICE, vm1, VM.ATTACH_VOLUME_ERROR, h1, h2)
        root1 = (await self.store.get("vmInstance", vm1))["rootVolumeUuid"]
        await self.refused(DetachDataVolumeFromVmMsg(uuid=root1, vm_uuid=vm1), VM_SERVICE,
                           vm1, VM.DETACH_VOLUME_ERROR, "root volume")
        await self.refused(DeleteDataVolumeMsg(uuid=root1), VOLUME_SERVICE_ID, root1,
                           VOLUME.NOT_IN_CORRECT_STATE, "root volume")
        await self.refused(DetachDataVolumeFromVmMsg(uuid=v1["uuid"], vm_uuid=vm2),
                           VM_SERVICE, vm2, VM.DETACH_VOLUME_ERROR, vm1)
        self.assertEqual(await self.plugged(vm1, h1),
                         {v1["uuid"]: 1, v3["uuid"]: 2, v2["uuid"]: 3})
        await self.audit()

        # the Stopped VM: recorded only, the agent untouched; its NotInstantiated volume
        # goes next to its root volume (NFS)
        fresh = await self.volume()
        reply = await self.attach(fresh["uuid"], vm2)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual((reply.inventory["deviceId"], reply.inventory["primaryStorageUuid"]),
                         (1, self.nfs))
        self.assertEqual(await self.hv(h2).vm_states(), {vm3: "Running"})
        await self.audit()

        # detach: unplugged, the row released, its bits and capacity kept
        reply = await self.detach(v3["uuid"], vm1)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual((reply.inventory["vmInstanceUuid"], reply.inventory["deviceId"],
                          reply.inventory["status"]), (None, None, "Ready"))
        self.assertEqual((await self.store.get("job", reply.job_uuid))["apiName"], DETACH_KIND)
        self.assertEqual(await self.plugged(vm1, h1), {v1["uuid"]: 1, v2["uuid"]: 3})
        await self.audit()
        # again, and without naming the VM: nothing to do, success
        for vm in (vm1, None):
            reply = await self.detach(v3["uuid"], vm)
            self.assertTrue(reply.success, reply.error)
            self.assertIsNone(reply.inventory["vmInstanceUuid"])
        # without naming the VM, of an attached one: sent on to its VM
        reply = await self.detach(v1["uuid"], None)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(await self.plugged(vm1, h1), {v2["uuid"]: 3})
        # a freed device id is used again
        reply = await self.attach(v3["uuid"], vm1)
        self.assertEqual(reply.inventory["deviceId"], 1)
        await self.audit()

        # delete: the bits and capacity go with the row; again: success
        ready = await self.row(v1["uuid"])
        files = self.bits(self.storages[self.local], h1)
        self.assertIn(ready["installPath"], files)
        reply = await self.ok(DeleteDataVolumeMsg(uuid=v1["uuid"]), VOLUME_SERVICE_ID,
                              v1["uuid"])
        self.assertIsNone(reply.inventory)
        self.assertIsNone(await self.row(v1["uuid"]))
        self.assertNotIn(ready["installPath"], files)
        for msg in (DeleteDataVolumeMsg(uuid=v1["uuid"]), ExpungeDataVolumeMsg(uuid="ghost")):
            self.assertIsNone((await self.ok(msg, VOLUME_SERVICE_ID, msg.uuid)).inventory)
        nothing = await self.volume()
        await self.ok(DeleteDataVolumeMsg(uuid=nothing["uuid"]), VOLUME_SERVICE_ID,
                      nothing["uuid"])
        self.assertIsNone(await self.row(nothing["uuid"]))
        await self.audit()

    async def test_attach_and_detach_roll_back(self) -> None:
        """
        A failure in each flow of an attach (the storage agent refusing to create the
        volume, the hypervisor refusing to plug it in, and every flow failing after its
        work was done) rolls back everything: the volume NotInstantiated and unattached
        again, no bits, no capacity held, nothing plugged in; the reply says which flow
        failed and why. The same for a detach: the volume stays attached and plugged in.
        """
        await self.build()
        h1, _ = self.hosts
        vm = await self.vm(h1, self.local)
        hv = self.hv(h1)
        storage = self.simulated.storage(self.slots[h1])
        volume = (await self.volume())["uuid"]
        before = await self.row(volume)
        local_before = (await self.store.get("primaryStorage", self.local))

        async def rolled_back(reply: Any, flow: str, *named: str) -> None:
            self.assertFalse(reply.success)
            self.assertEqual(reply.error.code, VM.ATTACH_VOLUME_ERROR, reply.error)
            self.assertEqual(_location(reply.error), flow)
            for name in named:
                self.assertIn(name, _said(reply.error))
            self.assertEqual(await self.row(volume), {**before,
                                                      "lastOpDate": (await self.row(volume))
                                                      ["lastOpDate"]})
            self.assertEqual(await self.plugged(vm, h1), {})
            now = await self.store.get("primaryStorage", self.local)
            self.assertEqual(now["availableCapacity"], local_before["availableCapacity"])
            self.assertEqual([f for f in storage.local.files if volume in f], [])
            job = await self.store.get("job", reply.error.opaque["job"])
            self.assertEqual((job["apiName"], job["state"], job["rolledBack"][-1]),
                             (ATTACH_KIND, "Failed", "take-volume"))
            self.assertEqual(job["rollbackError"]["location"], flow)
            await self.audit()

        # the storage agent refuses to create the volume
        create = storage.local_create_empty
        storage.local_create_empty = lambda *a: defer.fail(HypervisorError("disk on fire"))
        try:
            await rolled_back(await self.attach(volume, vm), "instantiate-volume",
                              "disk on fire")
        finally:
            storage.local_create_empty = create
        # the hypervisor refuses to plug it in
        plug = hv.attach_volume
        hv.attach_volume = lambda *a: defer.fail(HypervisorError("no free PCI slot"))
        try:
            await rolled_back(await self.attach(volume, vm), "attach-on-hypervisor",
                              "no free PCI slot")
        finally:
            hv.attach_volume = plug
        # each flow does its work, then fails (as when its reply is lost): its rollback
        # gets took=None and must still give back what it did
        kind = self.services[VM_SERVICE].kinds[ATTACH_KIND]
        for flow in kind.flows:
            with _fails_after(flow):
                await rolled_back(await self.attach(volume, vm), flow.name, "injected")

        # attached at last; then a detach failing at each flow leaves it attached
        reply = await self.attach(volume, vm)
        self.assertTrue(reply.success, reply.error)
        attached = await self.row(volume)
        self.assertEqual(await self.plugged(vm, h1), {volume: 1})

        async def still_attached(reply: Any, flow: str, *named: str) -> None:
            self.assertFalse(reply.success)
            self.assertEqual(reply.error.code, VM.DETACH_VOLUME_ERROR, reply.error)
            self.assertEqual(_location(reply.error), flow)
            for name in named:
                self.assertIn(name, _said(reply.error))
            row = await self.row(volume)
            self.assertEqual(row, {**attached, "lastOpDate": row["lastOpDate"]})
            self.assertEqual(await self.plugged(vm, h1), {volume: 1})
            await self.audit()

        unplug = hv.detach_volume
        hv.detach_volume = lambda *a: defer.fail(HypervisorError("guest holds the disk"))
        try:
            await still_attached(await self.detach(volume, vm), "detach-on-hypervisor",
                                 "guest holds the disk")
        finally:
            hv.detach_volume = unplug
        for flow in self.services[VM_SERVICE].kinds[DETACH_KIND].flows:
            with _fails_after(flow):
                await still_attached(await self.detach(volume, vm), flow.name, "injected")
        reply = await self.detach(volume, vm)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(await self.plugged(vm, h1), {})
        await self.audit()

    async def test_create_on_storage_rolls_back(self) -> None:
        """
        A create on a primary storage whose agent fails leaves no row, no bits and no
        capacity held (C{VOLUME.1000}, the agent's text in the cause chain); so does every
        flow of the create failing after its work was done.
        """
        await self.build()
        h1, _ = self.hosts
        storage = self.simulated.storage(self.slots[h1])
        create = storage.local_create_empty
        storage.local_create_empty = lambda *a: defer.fail(HypervisorError("disk on fire"))
        try:
            err = await self.refused(
                CreateDataVolumeMsg(name="d", disk_size=GiB, primary_storage_uuid=self.local,
                                    system_tags=[f"{LOCAL_STORAGE_HOST_TAG}{h1}"]),
                VOLUME_SERVICE_ID, None, VOLUME.CREATE_ERROR, "disk on fire")
            self.assertEqual(_location(err), "instantiate-volume")
        finally:
            storage.local_create_empty = create
        self.assertEqual(await self.stored("volume"), [])
        await self.audit()
        for flow in self.services[VOLUME_SERVICE_ID].kinds["CreateDataVolume"].flows:
            with _fails_after(flow):
                err = await self.refused(
                    CreateDataVolumeMsg(name="d", disk_size=GiB, primary_storage_uuid=self.nfs),
                    VOLUME_SERVICE_ID, None, VOLUME.CREATE_ERROR, "injected")
                self.assertEqual(_location(err), flow.name)
            self.assertEqual(await self.stored("volume"), [])
            self.assertEqual(self.simulated.nfs_exports[self.storages[self.nfs]["url"]].files,
                             {})
            await self.audit()

    async def test_recovery_resolves_interrupted_jobs(self) -> None:
        """
        Crash at every flow: a node that stops during any flow of an attach, a detach or a
        create on a primary storage (the flow's work done, its record never written) resolves
        the job at recovery (L{recover_jobs} with the services' own kinds, the context
        rebuilt from the job row): the job C{Failed} with C{JOB.1000} naming the flow, and
        everything it took given back. The interrupted run, when it finally fails, finds the
        job taken over and touches nothing.
        """
        await self.build()
        h1, _ = self.hosts
        self.assertEqual(await self.services[VOLUME_SERVICE_ID].recovered, [])
        vm = await self.vm(h1, self.local)
        vm_service = self.services[VM_SERVICE]
        volume_service = self.services[VOLUME_SERVICE_ID]
        volume = (await self.volume())["uuid"]

        async def crash(kind: Any, service: Any, flow: Any, request: Any) -> Any:
            with _hangs_after(flow) as hung:
                reply = defer.ensureDeferred(request())
                await hung.reached
                [job] = await self.stored("job", f"apiName={kind.name}", "state=Running")
                [outcome] = await recover_jobs(self.store, service.node_id, service.kinds,
                                               [job], clock=reactor)
                self.assertEqual(outcome["outcome"], "rolled-back", outcome)
                self.assertEqual((outcome["error"].code, outcome["error"].location),
                                 (JOB_NODE_RESTARTED, flow.name))
                job = await self.store.get("job", job["uuid"])
                self.assertEqual(job["state"], "Failed")
                hung.release()
                reply = await reply
            self.assertFalse(reply.success)
            self.assertIn(JOB_TAKEN_OVER, _said(reply.error))
            return job

        before = await self.row(volume)
        kind = vm_service.kinds[ATTACH_KIND]
        for flow in kind.flows:
            await crash(kind, vm_service, flow, lambda: self.attach(volume, vm))
            row = await self.row(volume)
            self.assertEqual(row, {**before, "lastOpDate": row["lastOpDate"]})
            self.assertEqual(await self.plugged(vm, h1), {})
            await self.audit()

        self.assertTrue((await self.attach(volume, vm)).success)
        attached = await self.row(volume)
        kind = vm_service.kinds[DETACH_KIND]
        for flow in kind.flows:
            await crash(kind, vm_service, flow, lambda: self.detach(volume, vm))
            row = await self.row(volume)
            self.assertEqual(row, {**attached, "lastOpDate": row["lastOpDate"]})
            self.assertEqual(await self.plugged(vm, h1), {volume: 1})
            await self.audit()

        kind = volume_service.kinds["CreateDataVolume"]
        for flow in kind.flows:
            uuid = secrets.token_hex(16)
            await crash(kind, volume_service, flow, lambda uuid=uuid: self.send(
                CreateDataVolumeMsg(name="d", disk_size=GiB, primary_storage_uuid=self.local,
                                    system_tags=[f"{LOCAL_STORAGE_HOST_TAG}{h1}"], uuid=uuid),
                VOLUME_SERVICE_ID, uuid))
            self.assertIsNone(await self.row(uuid))
            self.assertEqual([f for f in self.bits(self.storages[self.local], h1) if uuid in f],
                             [])
            await self.audit()


def _said(err: Any) -> str:
    """
    Everything an error says: its description and details, and its causes'.
    """
    out = []
    while err is not None:
        out.append(f"{err.code} {err.description} {err.details} {err.opaque}")
        err = err.cause
    return " | ".join(out)


def _location(err: Any) -> str | None:
    """
    The failing flow's name: the location of the first error in the chain that has one.
    """
    while err is not None:
        if err.location:
            return err.location
        err = err.cause
    return None


class _fails_after:
    """
    Within the C{with} block, C{flow}'s run does its work and then fails, as when its
    reply is lost: the chain rolls it back with C{took=None}.
    """

    def __init__(self, flow: Any) -> None:
        self.flow = flow

    def __enter__(self) -> None:
        self.run = run = self.flow._run

        async def failing(ctx: Any) -> dict:
            await run(ctx)
            raise HypervisorError(f"injected failure after {self.flow.name}")

        self.flow._run = failing

    def __exit__(self, *exc: Any) -> None:
        self.flow._run = self.run


class _hangs_after:
    """
    Within the C{with} block, C{flow}'s run does its work and then never reports, as when
    its node stops: C{reached} fires then; C{release()} fails the run at last.
    """

    def __init__(self, flow: Any) -> None:
        self.flow = flow
        self.reached: defer.Deferred = defer.Deferred()
        self._hang: defer.Deferred = defer.Deferred()

    def __enter__(self) -> _hangs_after:
        self.run = run = self.flow._run

        async def hanging(ctx: Any) -> dict:
            await run(ctx)
            self.reached.callback(None)
            return await self._hang

        self.flow._run = hanging
        self.reached.addTimeout(TIMEOUT, reactor)
        return self

    def release(self) -> None:
        self._hang.errback(HypervisorError("the node stopped"))

    def __exit__(self, *exc: Any) -> None:
        self.flow._run = self.run
        if not self._hang.called:
            self.release()
            self._hang.addErrback(lambda _: None)


class RealVmScenario(VolumeChecks, CloudScenario):
    """
    Data volumes on VMs made by the VM service (L{tests.vm_scenario}): created, stopped,
    started, destroyed and expunged through its messages.
    """

    storage = "both"

    async def build(self) -> None:
        await self.build_cloud()
        self.store = self.node.store
        self.slots = {h: str(s) for h, s in self.cloud.slots.items()}
        self.storages = {ps["uuid"]: ps for ps in await self.stored("primaryStorage")}

    async def check(self) -> None:
        await self.audit()
        await self.consistent()

    async def new_volume(self, **kw: Any) -> str:
        kw.setdefault("name", "data")
        if "disk_size" not in kw:
            kw.setdefault("disk_offering_uuid", self.cloud.disk_offering)
        return (await self.ok(CreateDataVolumeMsg(**kw), VOLUME_SERVICE_ID)).inventory["uuid"]

    async def test_volumes_of_a_real_vm(self) -> None:
        """
        A VM created on LocalStorage gets a NotInstantiated volume (instantiated on its
        host's disk, plugged in at device 1) and an NFS one (device 2); stopped, it gets a
        third (on its last host's disk, no agent call); started again, the agent defines it
        with all three at their device ids; a detach while it runs unplugs one; destroyed
        and expunged, its data volumes are kept, unattached, and then deleted. A VM created
        with a data disk offering starts with that disk plugged in. The store, the agents
        and the accounting agree after every step.
        """
        await self.build()
        vm = await self.create(primary_storage_uuid_for_root_volume=self.cloud.local)
        self.assertEqual(vm["state"], "Running")
        v, host = vm["uuid"], vm["hostUuid"]
        await self.check()

        local = await self.new_volume()
        reply = await self.attach(local, v)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual((reply.inventory["primaryStorageUuid"], reply.inventory["deviceId"]),
                         (self.cloud.local, 1))
        [held] = [h for h in await self.store.primary_storage_holders(self.cloud.local)
                  if h["holderUuid"] == local]
        self.assertEqual(held["hostUuid"], host)
        nfs = await self.new_volume(disk_size=GiB, primary_storage_uuid=self.cloud.nfs)
        self.assertTrue((await self.attach(nfs, v)).success)
        self.assertEqual(await self.plugged(v, host), {local: 1, nfs: 2})
        await self.check()

        await self.vm(StopVmInstanceMsg(uuid=v), v)
        await self.check()
        third = await self.new_volume()
        reply = await self.attach(third, v)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.inventory["deviceId"], 3)
        [held] = [h for h in await self.store.primary_storage_holders(self.cloud.local)
                  if h["holderUuid"] == third]
        self.assertEqual(held["hostUuid"], host)
        await self.check()

        started = (await self.vm(StartVmInstanceMsg(uuid=v), v)).inventory
        self.assertEqual(started["hostUuid"], host)  # its root volume is on that disk
        self.assertEqual(await self.plugged(v, host), {local: 1, nfs: 2, third: 3})
        await self.check()

        reply = await self.detach(nfs, v)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(await self.plugged(v, host), {local: 1, third: 3})
        await self.check()

        await self.vm(DestroyVmInstanceMsg(uuid=v), v)
        await self.check()
        await self.refused(DeleteDataVolumeMsg(uuid=local), VOLUME_SERVICE_ID, local,
                           VOLUME.ATTACHED, v)
        await self.vm(ExpungeVmInstanceMsg(uuid=v), v)
        for vol in (local, third, nfs):
            row = await self.row(vol)
            self.assertEqual((row["vmInstanceUuid"], row["deviceId"], row["status"]),
                             (None, None, "Ready"))
        await self.check()
        for vol in (local, third, nfs):
            await self.ok(DeleteDataVolumeMsg(uuid=vol), VOLUME_SERVICE_ID, vol)
        self.assertEqual(await self.stored("volume"), [])
        await self.check()

        with_disk = await self.create(data_disk_offering_uuids=[self.cloud.disk_offering])
        [data] = [x for x in await self.stored("volume", f"vmInstanceUuid={with_disk['uuid']}")
                  if x["type"] == "Data"]
        self.assertEqual(await self.plugged(with_disk["uuid"], with_disk["hostUuid"]),
                         {data["uuid"]: 1})
        await self.check()


class EmbeddedRealVmTests(RealVmScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On the embedded defaults.
    """


class RabbitPostgresRealVmTests(RealVmScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """


class EmbeddedVolumeTests(EmbeddedBackends, VolumeScenario, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """


class RabbitPostgresVolumeTests(RabbitPostgresBackends, VolumeScenario, LoopbackTestCase):
    """
    On PostgreSQL (a scratch database) and RabbitMQ (a random prefix); fails when either is
    missing.
    """
