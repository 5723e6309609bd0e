"""
The audit of the VM invariants at rest (L{tests.vm_audit}): clean on a consistent world, and
catching each kind of leak planted in it, in the store or on the simulated agents.

The world is written straight into an in-memory store (no service runs) and a simulated
cluster, both on a L{Clock}: three VMs (Running on host 1 with a LocalStorage root volume
and an image cache there; Stopped with an NFS root volume; Destroyed with its volume kept
and its NIC's address given back), a NotInstantiated data volume, each NIC's address held
by the NIC.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent.hypervisor.interfaces import VmSpec
from agent.hypervisor.simulator import GiB, SimulatedCluster, SimulatorConfig
from tests.vm_audit import audit, host_key
from zcontrol.db.memory import MemoryStore

AGENT = "http://agent.example:7070"
H1, H2 = "host-1", "host-2"
LOCAL, NFS = "ps-local", "ps-nfs"
LOCAL_URL, NFS_URL = "/zstack_ps", "nfs.example:/export/audit"
NFS_MOUNT = "/opt/zstack/nfsprimarystorage/prim-ps-nfs"
L3 = "l3-1"
ROOT_SIZE = 10 * GiB
CACHE_SIZE = 2 * GiB
VM_RUN, VM_STOP, VM_GONE = "vm-run", "vm-stop", "vm-gone"
DATA = "vol-data"
MACS = {VM_RUN: "fa:16:3e:00:00:01", VM_STOP: "fa:16:3e:00:00:02",
        VM_GONE: "fa:16:3e:00:00:03"}


def volume_path(root: str, uuid: str) -> str:
    return f"{root}/rootVolumes/acct-admin/vol-{uuid}/{uuid}.qcow2"


CACHE_PATH = f"{LOCAL_URL}/imagecache/template/img-1/img-1.qcow2"


class HostKeyTests(SynchronousTestCase):
    """
    L{host_key}: the simulated host a management IP addresses.
    """

    def test_keys(self) -> None:
        """
        C{/hosts/<i>} is host C{i}; an agent URL without the prefix is host 0; no URL, none.
        """
        self.assertEqual(host_key(f"{AGENT}/hosts/3"), "3")
        self.assertEqual(host_key(f"{AGENT}/hosts/12/"), "12")
        self.assertEqual(host_key(AGENT), "0")
        self.assertEqual(host_key("192.168.0.1"), "0")
        self.assertIsNone(host_key(None))


class AuditTests(SynchronousTestCase):
    """
    L{audit} against a consistent world, then with one leak planted at a time.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock, shuffle=False)
        self.successResultOf(self.store.start())
        self.addCleanup(lambda: self.run_(self.store.stop()))
        self.cluster = SimulatedCluster(SimulatorConfig(clock=self.clock))
        self.run_(Deferred.fromCoroutine(self.build()))

    def run_(self, d: Deferred) -> Any:
        """
        Drive the store's queued operations until C{d} fires; its result.
        """
        for _ in range(10_000):
            if d.called:
                break
            self.store.flush()
            self.clock.advance(0)
        return self.successResultOf(d)

    def do(self, fn: Callable[[], Any]) -> Any:
        async def go() -> Any:
            return await fn()

        return self.run_(Deferred.fromCoroutine(go()))

    def audit(self, cluster: Any = True, **kw: Any) -> list[str]:
        return self.run_(Deferred.fromCoroutine(audit(
            self.store, self.cluster if cluster is True else cluster, **kw)))

    def only(self, *parts: str, cluster: Any = True, **kw: Any) -> list[str]:
        """
        The audit finds exactly one difference per part, each naming it.
        """
        found = self.audit(cluster, **kw)
        self.assertEqual(len(found), len(parts), found)
        for part in parts:
            self.assertTrue(any(part in line for line in found), (part, found))
        return found

    # --- the world ------------------------------------------------------------------------

    async def build(self) -> None:
        s = self.store
        await s.insert("zone", {"uuid": "z", "name": "z"})
        await s.insert("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z",
                                   "hypervisorType": "KVM"})
        for uuid, slot in ((H1, 1), (H2, 2)):
            await s.add_host({"uuid": uuid, "name": uuid, "zoneUuid": "z", "clusterUuid": "c",
                              "managementIp": f"{AGENT}/hosts/{slot}", "hypervisorType": "KVM",
                              "cpuNum": 32, "totalCpuCapacity": 32,
                              "totalMemoryCapacity": 128 * GiB, "status": "Connected"})
        await s.insert("primaryStorage", {"uuid": LOCAL, "name": "local", "zoneUuid": "z",
                                          "url": LOCAL_URL, "type": "LocalStorage",
                                          "status": "Connected"})
        for h in (H1, H2):
            await s.set_local_storage_host_capacity(LOCAL, h, 2048 * GiB, 2048 * GiB)
        await s.insert("primaryStorage", {"uuid": NFS, "name": "nfs", "zoneUuid": "z",
                                          "url": NFS_URL, "type": "NFS",
                                          "status": "Connected"})
        await s.set_primary_storage_capacity(NFS, 10240 * GiB, 10240 * GiB)
        await s.insert("l2Network", {"uuid": "l2", "name": "l2", "zoneUuid": "z",
                                     "physicalInterface": "eth0"})
        await s.insert("l3Network", {"uuid": L3, "name": "l3", "l2NetworkUuid": "l2",
                                     "zoneUuid": "z"})
        await s.insert("ipRange", {"uuid": "r", "l3NetworkUuid": L3, "startIp": "10.0.0.10",
                                   "endIp": "10.0.0.50", "netmask": "255.255.255.0",
                                   "gateway": "10.0.0.1"})
        await s.create_image_cache({"uuid": "cache-1", "primaryStorageUuid": LOCAL,
                                    "hostUuid": H1, "imageUuid": "img-1",
                                    "installUrl": CACHE_PATH, "size": CACHE_SIZE,
                                    "status": "Ready"})

        await self.vm(VM_RUN, "Running", H1, LOCAL)
        await self.vm(VM_STOP, "Stopped", None, NFS)
        await self.vm(VM_GONE, "Destroyed", None, NFS)
        await s.insert("volume", {"uuid": DATA, "name": "data", "type": "Data",
                                  "size": GiB, "status": "NotInstantiated"})

        # the agents: host 1 runs vm-run, host 2 has vm-stop's record stopped; the bits
        sim1 = self.cluster.backends("1")
        sim2 = self.cluster.backends("2")
        self.successResultOf(sim1.hypervisor.start_vm(VmSpec(VM_RUN, "run", 2, GiB)))
        self.successResultOf(sim2.hypervisor.start_vm(VmSpec(VM_STOP, "stop", 2, GiB)))
        self.successResultOf(sim2.hypervisor.stop_vm(VM_STOP))
        for sim in (sim1, sim2):
            self.successResultOf(sim.storage.local_init(LOCAL_URL))
            self.successResultOf(sim.storage.nfs_mount(NFS_URL, NFS_MOUNT))
        sim1.storage.local.create(CACHE_PATH, CACHE_SIZE)
        sim1.storage.local.create(volume_path(LOCAL_URL, f"{VM_RUN}-root"), ROOT_SIZE)
        export = self.cluster.nfs_export(NFS_URL)
        for vm in (VM_STOP, VM_GONE):
            export.create(volume_path(NFS_MOUNT, f"{vm}-root"), ROOT_SIZE)

    async def vm(self, uuid: str, state: str, host: str | None, ps: str) -> None:
        s = self.store
        root = f"{uuid}-root"
        await s.insert("vmInstance", {"uuid": uuid, "name": uuid, "zoneUuid": "z",
                                      "clusterUuid": "c", "hostUuid": host,
                                      "lastHostUuid": host or H2, "cpuNum": 2,
                                      "memorySize": GiB, "state": state,
                                      "rootVolumeUuid": root, "defaultL3NetworkUuid": L3})
        if host is not None:
            await s.reserve_host_capacity(host, 2, GiB, ("VmInstanceVO", uuid))
        nic = f"{uuid}-nic"
        values = {"uuid": nic, "vmInstanceUuid": uuid, "l3NetworkUuid": L3,
                  "mac": MACS[uuid], "deviceId": 0}
        if state != "Destroyed":
            used = await s.allocate_ip(L3, ("VmNicVO", nic))
            values.update(usedIpUuid=used["uuid"], ip=used["ip"])
        await s.insert("vmNic", values)
        root_dir = LOCAL_URL if ps == LOCAL else NFS_MOUNT
        await s.insert("volume", {"uuid": root, "name": "root", "type": "Root",
                                  "vmInstanceUuid": uuid, "primaryStorageUuid": ps,
                                  "installPath": volume_path(root_dir, root),
                                  "size": ROOT_SIZE, "status": "Ready", "deviceId": 0})
        await s.reserve_primary_storage_capacity(ps, ROOT_SIZE, ("VolumeVO", root),
                                                 host if ps == LOCAL else None)

    # --- clean ----------------------------------------------------------------------------

    def test_clean(self) -> None:
        """
        The consistent world audits clean, with and without the agents, and with the
        agents' VMs given as C{/vm/vmsync} would report them.
        """
        self.assertEqual(self.audit(), [])
        self.assertEqual(self.audit(None), [])
        self.assertEqual(self.audit(None, agent_vms={H1: {VM_RUN: "Running"},
                                                     H2: {VM_STOP: "Stopped"}}), [])

    # --- store leaks ----------------------------------------------------------------------

    def test_capacity_figure_drift(self) -> None:
        """
        A host's available CPU that its holders do not explain (store.audit_capacity).
        """
        self.do(lambda: self.store.update("host", H2, {"availableCpuCapacity": 30}))
        self.only(f"host {H2}: availableCpuCapacity is 30, its holders leave 32")

    def test_job_running(self) -> None:
        """
        A job left Running.
        """
        self.do(lambda: self.store.create_job("job-1", "CreateVm", {}, "mn-1", VM_STOP))
        self.only("job job-1 (CreateVm, resource vm-stop) is still Running")

    def test_vm_in_intermediate_state(self) -> None:
        """
        A VM left Starting (and Expunging, which is no state at rest either).
        """
        self.do(lambda: self.store.change_vm_state(VM_STOP, "Stopped", "Starting"))
        self.do(lambda: self.store.change_vm_state(VM_GONE, "Destroyed", "Expunging"))
        self.only(f"VM {VM_STOP} is Starting, not a state at rest",
                  f"VM {VM_GONE} is Expunging, not a state at rest")

    def test_orphan_host_holder(self) -> None:
        """
        Host capacity held for a VM that does not exist, and by a holder that is no VM.
        """
        self.do(lambda: self.store.reserve_host_capacity(H2, 1, GiB, ("VmInstanceVO", "ghost")))
        self.do(lambda: self.store.reserve_host_capacity(H2, 1, GiB, ("AllocationVO", "a")))
        self.only("held by VmInstanceVO ghost, which is no VM",
                  "held by AllocationVO a, which is no VM")

    def test_stopped_vm_holds_host(self) -> None:
        """
        A Stopped VM that still holds host capacity, and one that still names its host.
        """
        self.do(lambda: self.store.reserve_host_capacity(H2, 2, GiB, ("VmInstanceVO", VM_STOP)))
        self.do(lambda: self.store.update("vmInstance", VM_GONE, {"hostUuid": H2}))
        self.only(f"VM {VM_STOP} is Stopped and holds host capacity [('{H2}', 2, {GiB})]",
                  f"VM {VM_GONE} is Destroyed with hostUuid {H2}")

    def test_running_vm_without_capacity(self) -> None:
        """
        A Running VM whose host capacity was given back, or held with other amounts, or on
        another host.
        """
        self.do(lambda: self.store.release_host_capacity(H1, ("VmInstanceVO", VM_RUN)))
        self.only(f"VM {VM_RUN} (Running on {H1}) holds host capacity [], not [('{H1}', 2,")
        self.do(lambda: self.store.reserve_host_capacity(H1, 1, GiB, ("VmInstanceVO", VM_RUN)))
        self.only(f"holds host capacity [('{H1}', 1, {GiB})], not [('{H1}', 2, {GiB})]")
        self.do(lambda: self.store.release_host_capacity(H1, ("VmInstanceVO", VM_RUN)))
        self.do(lambda: self.store.reserve_host_capacity(H2, 2, GiB, ("VmInstanceVO", VM_RUN)))
        # the agent still runs it on host 1: the store moved it without the agent
        self.do(lambda: self.store.update("vmInstance", VM_RUN, {"hostUuid": H2}))
        self.only(f"VM {VM_RUN} runs on host {H1}'s agent: Running on host {H2} in the store",
                  f"VM {VM_RUN} is Running on host {H2} but its agent reports it absent")
        self.assertEqual(self.audit(None), [])

    def test_orphan_ip(self) -> None:
        """
        An address held by a NIC that does not exist; one held by another holder type.
        """
        self.do(lambda: self.store.allocate_ip(L3, ("VmNicVO", "ghost-nic")))
        self.do(lambda: self.store.allocate_ip(L3, ("VmInstanceVO", VM_RUN)))
        self.only("held by VmNicVO ghost-nic, which is no NIC",
                  f"held by VmInstanceVO {VM_RUN}, which is no NIC")

    def test_nic_without_address(self) -> None:
        """
        A Running VM's NIC whose address was given back; a Stopped VM's NIC may have none
        (a recovered VM takes one at its next start), but not name one it does not hold,
        nor hold one it does not name.
        """
        for vm in (VM_RUN, VM_STOP):
            nic = f"{vm}-nic"
            self.do(lambda nic=nic: self.store.update("vmNic", nic, {"usedIpUuid": None,
                                                                    "ip": None}))
            self.do(lambda nic=nic: self.store.release_ip(L3, ("VmNicVO", nic)))
        self.only(f"NIC {VM_RUN}-nic of Running VM {VM_RUN} holds no address")
        self.do(lambda: self.store.allocate_ip(L3, ("VmNicVO", f"{VM_STOP}-nic")))
        self.only(f"NIC {VM_RUN}-nic of Running VM {VM_RUN} holds no address",
                  f"NIC {VM_STOP}-nic of Stopped VM {VM_STOP} names no address but holds")
        self.do(lambda: self.store.update("vmNic", f"{VM_STOP}-nic", {"ip": "10.0.0.77"}))
        self.only(f"NIC {VM_RUN}-nic of Running VM {VM_RUN} holds no address",
                  f"NIC {VM_STOP}-nic of Stopped VM {VM_STOP} names ip 10.0.0.77, usedIp"
                  " None, which it does not hold",
                  f"NIC {VM_STOP}-nic holds other addresses")

    def test_nic_names_another_address(self) -> None:
        """
        A NIC whose C{ip} is not its usedIp's.
        """
        nic = f"{VM_STOP}-nic"
        self.do(lambda: self.store.update("vmNic", nic, {"ip": "10.0.0.99"}))
        self.only(f"NIC {nic} names 10.0.0.99 on L3 {L3} but usedIp")

    def test_destroyed_vm_nic_holds_address(self) -> None:
        """
        A Destroyed VM's NIC that still holds an address.
        """
        nic = f"{VM_GONE}-nic"
        used = self.do(lambda: self.store.allocate_ip(L3, ("VmNicVO", nic)))
        self.only(f"NIC {nic} of Destroyed VM {VM_GONE} names no address but holds")
        self.do(lambda: self.store.update("vmNic", nic, {"usedIpUuid": used["uuid"],
                                                        "ip": used["ip"]}))
        self.only(f"NIC {nic} of Destroyed VM {VM_GONE} still names address {used['ip']}")

    def test_orphan_volume_holders(self) -> None:
        """
        Primary storage held for a volume that does not exist, for a cache that does not
        exist, and by an unknown holder type.
        """
        self.do(lambda: self.store.reserve_primary_storage_capacity(
            NFS, GiB, ("VolumeVO", "ghost-vol")))
        self.do(lambda: self.store.reserve_primary_storage_capacity(
            LOCAL, GiB, ("ImageCacheVO", "ghost-cache"), H2))
        self.do(lambda: self.store.reserve_primary_storage_capacity(NFS, GiB, ("Snap", "s")))
        self.only("held by volume ghost-vol, which does not exist",
                  "held by image cache ghost-cache (host host-2), which is not there",
                  "held by Snap s, which is no volume or cache")

    def test_ready_volume_without_holder(self) -> None:
        """
        A Ready volume whose capacity was given back (the figures stay consistent).
        """
        root = f"{VM_STOP}-root"
        self.do(lambda: self.store.release_primary_storage_capacity(NFS, ("VolumeVO", root)))
        self.only(f"volume {root} (Ready) holds [], not [('{NFS}', {ROOT_SIZE})]")

    def test_not_instantiated_volume_holds(self) -> None:
        """
        A NotInstantiated volume that holds capacity.
        """
        self.do(lambda: self.store.reserve_primary_storage_capacity(
            NFS, GiB, ("VolumeVO", DATA)))
        self.only(f"volume {DATA} is NotInstantiated and holds [('{NFS}', {GiB})]")

    def test_volume_not_at_rest_and_orphan_root(self) -> None:
        """
        A volume left Creating; a root volume whose VM is gone; a VM naming a missing root.
        """
        self.do(lambda: self.store.update("volume", DATA, {"status": "Creating"}))
        self.do(lambda: self.store.insert("volume", {"uuid": "lost-root", "name": "r",
                                                     "type": "Root",
                                                     "status": "NotInstantiated"}))
        self.do(lambda: self.store.update("vmInstance", VM_STOP, {"rootVolumeUuid": "nope"}))
        self.only(f"volume {DATA} is Creating, not a status at rest",
                  "root volume lost-root belongs to no VM",
                  f"VM {VM_STOP} names root volume nope, which does not exist")

    # --- agent leaks ----------------------------------------------------------------------

    def test_vm_left_on_agent(self) -> None:
        """
        A VM running on an agent where the store has none; a Stopped VM still running.
        """
        hv2 = self.cluster.hypervisor("2")
        self.successResultOf(hv2.start_vm(VmSpec("ghost-vm", None, 1, GiB)))
        self.successResultOf(hv2.start_vm(VmSpec(VM_STOP, None, 2, GiB)))
        self.only(f"VM ghost-vm runs on host {H2}'s agent: no VM in the store",
                  f"VM {VM_STOP} runs on host {H2}'s agent: Stopped on host None in the store")

    def test_running_vm_not_on_agent(self) -> None:
        """
        A Running VM its agent has stopped, or never had (also through C{agent_vms}).
        """
        self.successResultOf(self.cluster.hypervisor("1").stop_vm(VM_RUN))
        self.only(f"VM {VM_RUN} is Running on host {H1} but its agent reports it Stopped")
        self.only(f"VM {VM_RUN} is Running on host {H1} but its agent reports it absent",
                  cluster=None, agent_vms={H1: {}})

    def test_unknown_vm_may_run(self) -> None:
        """
        An Unknown VM may or may not run on its host's agent.
        """
        self.do(lambda: self.store.change_vm_state(VM_RUN, "Running", "Unknown"))
        self.assertEqual(self.audit(), [])
        self.successResultOf(self.cluster.hypervisor("1").stop_vm(VM_RUN))
        self.assertEqual(self.audit(), [])

    def test_leaked_and_missing_bits(self) -> None:
        """
        A file on an NFS export that no volume owns; a Ready volume's file gone from the
        local disk; an image cache's file gone.
        """
        export = self.cluster.nfs_exports[NFS_URL]
        export.create(f"{NFS_MOUNT}/dataVolumes/acct-admin/vol-x/x.qcow2", GiB)
        local = self.cluster.storage("1").local
        del local.files[volume_path(LOCAL_URL, f"{VM_RUN}-root")]
        del local.files[CACHE_PATH]
        self.only(f"NFS export {NFS_URL}: {NFS_MOUNT}/dataVolumes/acct-admin/vol-x/x.qcow2"
                  " belongs to no Ready volume nor image cache",
                  f"local disk of host {H1}: {volume_path(LOCAL_URL, VM_RUN + '-root')} is"
                  " missing",
                  f"local disk of host {H1}: {CACHE_PATH} is missing")

    def test_bits_on_the_wrong_host(self) -> None:
        """
        A LocalStorage volume's bits on another host than the one its holder names.
        """
        path = volume_path(LOCAL_URL, f"{VM_RUN}-root")
        self.cluster.storage("1").local.files.pop(path)
        self.cluster.storage("2").local.create(path, ROOT_SIZE)
        self.only(f"local disk of host {H1}: {path} is missing",
                  f"local disk of host {H2}: {path} belongs to no Ready volume")

    def test_local_disk_use_reported_by_the_agent(self) -> None:
        """
        The bytes an agent reports used on a host's local disk must be what the store's
        holders on that host hold: a leaked file shows as more.
        """
        used = ROOT_SIZE + CACHE_SIZE
        self.assertEqual(self.audit(None, agent_local_used={H1: used, H2: 0}), [])
        self.only(f"local disk of host {H1}: its agent reports {used + GiB} bytes used, the"
                  f" store's volumes and caches there hold {used}",
                  f"local disk of host {H2}: its agent reports {GiB} bytes used",
                  cluster=None, agent_local_used={H1: used + GiB, H2: GiB})

    def test_not_instantiated_volume_has_no_bits(self) -> None:
        """
        A NotInstantiated volume whose bits exist (e.g. a create rolled back in the store
        but not on the agent).
        """
        self.do(lambda: self.store.update("volume", DATA, {
            "primaryStorageUuid": NFS, "installPath": f"{NFS_MOUNT}/data.qcow2"}))
        self.cluster.nfs_exports[NFS_URL].create(f"{NFS_MOUNT}/data.qcow2", GiB)
        self.only(f"NFS export {NFS_URL}: {NFS_MOUNT}/data.qcow2 belongs to no Ready volume")

