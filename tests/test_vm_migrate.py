"""
Live migration end to end (issue 10): a whole management node (L{zcontrol.node.make_node})
and a real simulated agent over loopback HTTP serving KVM hosts that mount one NFS primary
storage, driven through the node's bus with L{MigrateVmMsg}.

After each migration the store (state, C{hostUuid}, C{lastHostUuid}, the job row), the
simulated hypervisors (where the guest runs) and the capacity accounting (who holds what on
each host; C{store.audit_capacity()} finds no drift) are checked. A failure is injected at
each flow in turn (the VM service's state swap, the allocator finding no room, the agent
failing C{/vm/migrate}, the source's return, the final swap) and the migration is rolled
back: the VM Running on its source, nothing held on the destination. The scenario runs on
the embedded backends and on PostgreSQL + RabbitMQ (failing, never skipping, when either is
missing). No sleeps: every wait is a reply.
"""

from __future__ import annotations

import os
import secrets
import uuid as uuidlib
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.defer import fail

from agent import protocol as p
from agent.console import ConsolePlugin
from agent.hypervisor.interfaces import HypervisorError
from agent.hypervisor.simulator import GiB
from agent.kvm import KvmPlugin
from agent.sftpbackupstorage import SftpBackupStoragePlugin
from agent.storage import StoragePlugin
from agent.vrouter import VRouterPlugin
from tests.db_support import pg_create_database_sync, pg_drop_database_sync, pg_dsn
from tests.test_agent_loopback import LoopbackTestCase
from zcontrol.config import load_config
from zcontrol.core.errors import SYS, OperationError
from zcontrol.node import make_node
from zcontrol.scheduler.messages import ALLOCATOR, ReturnHostCapacityMsg
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import HOST, AddHostMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.network.messages import (
    L2_SERVICE_ID,
    L3_SERVICE_ID,
    AddIpRangeMsg,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
)
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.offering.messages import CreateInstanceOfferingMsg
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.primarystorage.messages import (
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
)
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import MigrateVmMsg
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

#: one send's bound (seconds): a lost reply fails the test instead of hanging it
TIMEOUT = 60
#: agent slots: hosts 1..3 in cluster A (NFS + LocalStorage + the L2), 4 in cluster B
SLOTS_A, SLOT_B = (1, 2, 3), 4
VM_CPU, VM_MEMORY, ROOT_SIZE = 2, 2 * GiB, 10 * GiB


class VmScenario:
    """
    A node, an agent and a small cloud for VM operations; a L{LoopbackTestCase} mixin
    whose L{node_overrides} chooses the backends.

    @ivar hosts: slot -> host uuid.
    """

    host_count = 8

    def agent_plugins(self) -> list[Any]:
        return [KvmPlugin(), ConsolePlugin(), VRouterPlugin(), StoragePlugin(),
                SftpBackupStoragePlugin()]

    async def node_overrides(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- plumbing ---------------------------------------------------------------------

    async def start_node(self) -> None:
        data = os.path.abspath(self.mktemp())
        overrides = {"node": {"id": f"mn-vm-{secrets.token_hex(3)}", "data_dir": data},
                     "http": {"port": 0, "interface": "127.0.0.1"}}
        overrides.update(await self.node_overrides())
        self.node = make_node(load_config(None, overrides), reactor)
        self.addCleanup(lambda: self.node.running and self.node.stopService())
        await self.node.startService()
        inventory = [s for s in self.node if s.name == "inventory"][0]
        self.services = {s.service_id: s for s in inventory.services}
        self.vms = self.services[VM_SERVICE]
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
        C{msg} fails with C{code}, and its error (text, details, causes) names C{named}.
        """
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertFalse(reply.success, f"{type(msg).__name__} was not refused")
        self.assertEqual(reply.error.code, code, reply.error)
        said = f"{reply.error} {reply.error.opaque} {reply.error.to_dict()}"
        for name in named:
            self.assertIn(name, said)
        return reply.error

    async def no_drift(self) -> None:
        self.assertEqual(await self.store.audit_capacity(), [])

    def hv(self, host_uuid: str) -> Any:
        """
        The simulated hypervisor of a host.
        """
        slot = {u: s for s, u in self.hosts.items()}[host_uuid]
        return self.simulated.hypervisor(str(slot))

    async def held(self, vm_uuid: str) -> dict[str, tuple[int, int]]:
        """
        Host uuid -> (cpu, memory) the VM holds there.
        """
        rows = await self.store.holder_reservations(("VmInstanceVO", vm_uuid))
        return {h: (c, m) for h, c, m in rows}

    async def jobs(self, vm_uuid: str, api_name: str) -> list[dict[str, Any]]:
        page = await self.store.query("job", _query(f"resourceUuid={vm_uuid}",
                                                    f"apiName={api_name}"))
        return sorted(page.inventories, key=lambda j: j["createDate"])

    # --- the cloud --------------------------------------------------------------------

    async def build(self) -> None:
        """
        Zone; cluster A with hosts 1..3, NFS and LocalStorage, the L2 and two L3s; cluster
        B with host 4 and nothing attached; a 2-CPU 2 GiB offering.
        """
        await self.start_node()
        z = (await self.ok(CreateZoneMsg(name="zone-vm"), ZONE_SERVICE)).inventory["uuid"]
        self.zone = z
        self.cluster_a = (await self.ok(CreateClusterMsg(
            zone_uuid=z, name="a", hypervisor_type="KVM"), CLUSTER_SERVICE)).inventory["uuid"]
        self.cluster_b = (await self.ok(CreateClusterMsg(
            zone_uuid=z, name="b", hypervisor_type="KVM"), CLUSTER_SERVICE)).inventory["uuid"]
        self.hosts: dict[int, str] = {}
        for slot in (*SLOTS_A, SLOT_B):
            cluster = self.cluster_a if slot in SLOTS_A else self.cluster_b
            host = (await self.ok(AddHostMsg(name=f"host-{slot}", zone_uuid=z,
                                             cluster_uuid=cluster,
                                             management_ip=self.base(slot)),
                                  HOST_SERVICE)).inventory
            self.hosts[slot] = host["uuid"]
        self.nfs_url = f"nfs.example:/export/vm-{secrets.token_hex(3)}"
        self.nfs = (await self.ok(AddNfsPrimaryStorageMsg(name="nfs", zone_uuid=z,
                                                          url=self.nfs_url),
                                  PRIMARY)).inventory["uuid"]
        await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=self.nfs,
                                                       cluster_uuid=self.cluster_a),
                      PRIMARY, self.nfs)
        self.local = (await self.ok(AddLocalPrimaryStorageMsg(name="local", zone_uuid=z,
                                                              url="/zstack_ps"),
                                    PRIMARY)).inventory["uuid"]
        await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=self.local,
                                                       cluster_uuid=self.cluster_a),
                      PRIMARY, self.local)
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid=z,
                                                     physical_interface="eth0"),
                            L2_SERVICE_ID)).inventory["uuid"]
        self.l2 = l2
        await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid=l2,
                                                  cluster_uuid=self.cluster_a),
                      L2_SERVICE_ID, l2)
        self.l3s = []
        for i in range(2):
            l3 = (await self.ok(CreateL3NetworkMsg(name=f"l3-{i}", l2_network_uuid=l2),
                                L3_SERVICE_ID)).inventory["uuid"]
            await self.ok(AddIpRangeMsg(l3_network_uuid=l3, name="r",
                                        start_ip=f"10.0.{i}.10", end_ip=f"10.0.{i}.200",
                                        netmask="255.255.255.0", gateway=f"10.0.{i}.1"),
                          L3_SERVICE_ID, l3)
            self.l3s.append(l3)
        self.offering = (await self.ok(CreateInstanceOfferingMsg(
            name="small", cpu_num=VM_CPU, memory_size=VM_MEMORY),
            OFFERING_SERVICE)).inventory["uuid"]
        await self.no_drift()

    async def seed_vm(self, slot: int | None, ps: str | None = None,
                      l3s: list[str] | None = None) -> str:
        """
        A VM as a create leaves it, made directly: Running on the host of C{slot} (its
        capacity held by the VM, started on the agent) or Stopped (C{slot} None); a root
        volume on C{ps} (default NFS) holding its size; one NIC with an address on each of
        C{l3s} (default the first L3).
        """
        store = self.store
        vm = uuidlib.uuid4().hex
        host = None if slot is None else self.hosts[slot]
        ps = ps or self.nfs
        l3s = [self.l3s[0]] if l3s is None else l3s
        root = uuidlib.uuid4().hex
        await store.insert("vmInstance", {
            "uuid": vm, "name": f"vm-{vm[:6]}", "zoneUuid": self.zone,
            "clusterUuid": self.cluster_a, "hostUuid": host, "lastHostUuid": host,
            "instanceOfferingUuid": self.offering, "rootVolumeUuid": root,
            "defaultL3NetworkUuid": l3s[0] if l3s else None, "type": "UserVm",
            "hypervisorType": "KVM", "cpuNum": VM_CPU, "memorySize": VM_MEMORY,
            "state": "Running" if host else "Stopped"})
        local_host = self.hosts[slot or SLOTS_A[0]] if ps == self.local else None
        await store.reserve_primary_storage_capacity(ps, ROOT_SIZE, ("VolumeVO", root),
                                                     host_uuid=local_host)
        await store.insert("volume", {
            "uuid": root, "name": f"root-{vm[:6]}", "primaryStorageUuid": ps,
            "vmInstanceUuid": vm, "type": "Root", "size": ROOT_SIZE, "deviceId": 0,
            "status": "Ready", "installPath": f"/rootVolumes/{root}.qcow2"})
        nics = []
        for i, l3 in enumerate(l3s):
            nic = uuidlib.uuid4().hex
            ip = await store.allocate_ip(l3, ("VmNicVO", nic))
            row = await store.insert("vmNic", {
                "uuid": nic, "vmInstanceUuid": vm, "l3NetworkUuid": l3,
                "usedIpUuid": ip["uuid"], "ip": ip["ip"], "netmask": ip["netmask"],
                "gateway": ip["gateway"], "mac": f"fa:00:{secrets.token_hex(4)[:2]}:"
                f"{secrets.token_hex(1)}:{secrets.token_hex(1)}:{i:02x}", "deviceId": i})
            nics.append(row)
        if host is not None:
            await store.reserve_host_capacity(host, VM_CPU, VM_MEMORY, ("VmInstanceVO", vm))
            await self.vms.host_call(host, p.StartVmCmd(
                vm_instance_uuid=vm, cpu_num=VM_CPU, memory_size=VM_MEMORY,
                nics=[p.NicTO(mac=n["mac"], ip=n["ip"], device_id=n["deviceId"])
                      for n in nics], root_volume_install_path=f"/rootVolumes/{root}.qcow2"))
        await self.no_drift()
        return vm

    async def assert_running_on(self, vm: str, host: str, last: str | None = None) -> None:
        """
        The VM is Running on C{host} in the store (C{lastHostUuid} C{last} when given) and
        on that host's agent only, holds its CPUs and memory on that host only, and the
        audit finds no drift.
        """
        row = await self.store.get("vmInstance", vm)
        self.assertEqual((row["state"], row["hostUuid"]), ("Running", host))
        if last is not None:
            self.assertEqual(row["lastHostUuid"], last)
        for other in self.hosts.values():
            there = self.hv(other).vms.get(vm)
            if other == host:
                self.assertIsNotNone(there, f"the VM is not on its host {host}'s agent")
                self.assertEqual(there.state, p.VmState.RUNNING)
            else:
                self.assertIsNone(there, f"the VM is also on host {other}'s agent")
        self.assertEqual(await self.held(vm), {host: (VM_CPU, VM_MEMORY)})
        await self.no_drift()

    # --- fault injection ------------------------------------------------------------------

    def fail_once(self, method: str, when: Any, text: str) -> None:
        """
        Make the VM service's C{method} fail (C{SYS.1006}, C{text}) the first time
        C{when(*args)} holds.
        """
        real = getattr(self.vms, method)
        fired = []

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not fired and when(*args, **kwargs):
                fired.append(True)
                raise OperationError.of(SYS.OPERATION_ERROR, text)
            return real(*args, **kwargs)

        setattr(self.vms, method, wrapper)
        self.addCleanup(delattr, self.vms, method)

    def fail_send_once(self, when: Any, text: str) -> None:
        """
        Make the first message the VM service sends for which C{when(msg)} holds fail.
        """
        real = self.vms.send
        fired = []

        def send(msg: Any, timeout: float | None = None) -> Any:
            if not fired and when(msg):
                fired.append(True)
                return fail(OperationError.of(SYS.OPERATION_ERROR, text))
            return real(msg, timeout)

        self.vms.send = send
        self.addCleanup(delattr, self.vms, "send")

    def migrate(self, vm: str, host: str | None = None) -> MigrateVmMsg:
        return MigrateVmMsg(vm_instance_uuid=vm, host_uuid=host)


def _query(*conditions: str) -> Any:
    from zcontrol.db.query import Query

    return Query(conditions=list(conditions))


class MigrateScenario(VmScenario):
    """
    The migration tests, for a backend chosen by L{node_overrides}.
    """

    async def test_migrate_designated_and_allocated(self) -> None:
        """
        A Running VM on NFS moves to the host given, then to one the allocator picks (not
        its source, in its cluster): Running there in the store and on that agent only,
        capacity held there only, C{lastHostUuid} the source, the job Succeeded with every
        flow recorded; the reply carries the inventory and the job uuid.
        """
        await self.build()
        h1, h2 = self.hosts[1], self.hosts[2]
        vm = await self.seed_vm(1)
        reply = await self.ok(self.migrate(vm, h2), VM_SERVICE, vm)
        self.assertEqual((reply.inventory["uuid"], reply.inventory["hostUuid"],
                          reply.inventory["state"]), (vm, h2, "Running"))
        self.assertEqual([n["l3NetworkUuid"] for n in reply.inventory["vmNics"]],
                         [self.l3s[0]])
        await self.assert_running_on(vm, h2, last=h1)
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual((job["uuid"], job["state"]), (reply.job_uuid, "Succeeded"))
        self.assertEqual([f["name"] for f in job["flows"]],
                         ["vm-migrating", "allocate-destination", "migrate-on-hypervisor",
                          "return-source", "vm-migrated"])
        self.assertEqual(job["flows"][1]["took"], {"host": h2, "cpu": VM_CPU,
                                                   "memory": VM_MEMORY})

        reply = await self.ok(self.migrate(vm), VM_SERVICE, vm)
        dest = reply.inventory["hostUuid"]
        self.assertIn(dest, (self.hosts[1], self.hosts[3]))
        await self.assert_running_on(vm, dest, last=h2)

    async def test_refusals(self) -> None:
        """
        Refused at once, before any job, nothing changed: a Stopped VM (C{VM.1010} naming
        the state); a VM whose root volume is on LocalStorage (C{VM.1008} naming the volume
        and the storage); the source itself, a host in a cluster without the VM's storage
        and L2, a Disconnected host, a Disabled one (C{VM.1008} saying why); an unknown host
        (C{HOST.1003} naming C{hostUuid}); an unknown VM (C{VM.1100}).
        """
        await self.build()
        h1, h2 = self.hosts[1], self.hosts[2]
        running = await self.seed_vm(1)
        stopped = await self.seed_vm(None)
        await self.refused(self.migrate(stopped), VM_SERVICE, stopped,
                           VM.NOT_IN_CORRECT_STATE, "Stopped")
        local = await self.seed_vm(1, ps=self.local)
        [root] = (await self.store.query("volume", _query(f"vmInstanceUuid={local}"))
                  ).inventories
        await self.refused(self.migrate(local, h2), VM_SERVICE, local, VM.MIGRATE_ERROR,
                           "LocalStorage", root["uuid"], self.local)
        await self.refused(self.migrate(running, h1), VM_SERVICE, running, VM.MIGRATE_ERROR,
                           "already runs there")
        await self.refused(self.migrate(running, self.hosts[SLOT_B]), VM_SERVICE, running,
                           VM.MIGRATE_ERROR, self.nfs, self.l2)
        await self.store.update_host_status(h2, "Disconnected")
        await self.refused(self.migrate(running, h2), VM_SERVICE, running, VM.MIGRATE_ERROR,
                           "Disconnected")
        await self.store.update_host_status(h2, "Connected")
        await self.store.update("host", h2, {"state": "Disabled"})
        await self.refused(self.migrate(running, h2), VM_SERVICE, running, VM.MIGRATE_ERROR,
                           "Disabled")
        await self.store.update("host", h2, {"state": "Enabled"})
        await self.refused(self.migrate(running, "no-such-host"), VM_SERVICE, running,
                           HOST.NOT_FOUND, "hostUuid")
        await self.refused(self.migrate("no-such-vm"), VM_SERVICE, "no-such-vm",
                           VM.NOT_FOUND, "no-such-vm")
        for vm in (running, stopped, local):
            self.assertEqual(await self.jobs(vm, "MigrateVm"), [])
        await self.assert_running_on(running, h1)
        self.assertEqual((await self.store.get("vmInstance", stopped))["state"], "Stopped")

    # --- a failure at each flow ---------------------------------------------------------

    async def rolled_back(self, vm: str, source: str, location: str, *named: str) -> None:
        """
        The migration of C{vm} failed at flow C{location}: C{VM.1008} whose cause chain
        names C{named}; the VM Running on its source and nothing held elsewhere; the job
        Failed at that flow with every flow that ran rolled back.
        """
        err = await self.refused(self.migrate(vm), VM_SERVICE, vm, VM.MIGRATE_ERROR, *named)
        self.assertEqual((err.cause.code, err.cause.location),
                         (SYS.OPERATION_ERROR, location))
        await self.assert_running_on(vm, source)
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual((job["state"], job["error"]["location"]), ("Failed", location))
        names = ["vm-migrating", "allocate-destination", "migrate-on-hypervisor",
                 "return-source", "vm-migrated"]
        upto = names.index(location)
        self.assertEqual(sorted(job["rolledBack"] or []), sorted(names[: upto + 1]))

    async def test_fail_vm_migrating(self) -> None:
        """
        Fault at C{vm-migrating}: its state swap fails; nothing else ran.
        """
        await self.build()
        vm = await self.seed_vm(1)
        self.fail_once("change_state", lambda *a, **k: a[1] == "migrating",
                       "injected: the state swap failed")
        await self.rolled_back(vm, self.hosts[1], "vm-migrating", "injected: the state swap")

    async def test_fail_allocate_no_room(self) -> None:
        """
        Fault at C{allocate-destination}: every other host of the cluster is full; the
        allocator's reasoned error is in the cause chain; nothing was reserved.
        """
        await self.build()
        vm = await self.seed_vm(1)
        for slot in (2, 3):
            host = await self.store.get("host", self.hosts[slot])
            await self.store.reserve_host_capacity(
                host["uuid"], host["availableCpuCapacity"], host["availableMemoryCapacity"],
                ("Test", f"filler-{slot}"))
        await self.rolled_back(vm, self.hosts[1], "allocate-destination",
                               ALLOCATOR.NO_AVAILABLE_HOST, "capacity")
        for slot in (2, 3):
            await self.store.release_host_capacity(self.hosts[slot], ("Test", f"filler-{slot}"))
        await self.no_drift()

    async def test_fail_allocate_destination_disconnected(self) -> None:
        """
        Fault at C{allocate-destination}: the only other hosts are Disconnected (the
        allocator's C{state} filter); nothing was reserved.
        """
        await self.build()
        vm = await self.seed_vm(1)
        for slot in (2, 3):
            await self.store.update_host_status(self.hosts[slot], "Disconnected")
        await self.rolled_back(vm, self.hosts[1], "allocate-destination",
                               ALLOCATOR.NO_AVAILABLE_HOST, "Connected")

    async def test_fail_migrate_on_hypervisor(self) -> None:
        """
        Fault at C{migrate-on-hypervisor}: the source's agent fails C{/vm/migrate}; its
        error text is in the cause chain; the destination's reservation is given back.
        """
        await self.build()
        vm = await self.seed_vm(1)
        hv = self.hv(self.hosts[1])
        hv.migrate_vm = lambda uuid, dest: fail(HypervisorError("injected migrate failure"))
        await self.rolled_back(vm, self.hosts[1], "migrate-on-hypervisor",
                               "injected migrate failure")

    async def test_fail_return_source(self) -> None:
        """
        Fault at C{return-source}: giving back the source fails after the guest moved; the
        rollback migrates it back to the source and gives back the destination.
        """
        await self.build()
        vm = await self.seed_vm(1)
        source = self.hosts[1]
        self.fail_send_once(lambda m: isinstance(m, ReturnHostCapacityMsg)
                            and m.host_uuid == source, "injected: return failed")
        await self.rolled_back(vm, source, "return-source", "injected: return failed")

    async def test_fail_vm_migrated(self) -> None:
        """
        Fault at C{vm-migrated}: the last swap fails; the source's capacity is taken again,
        the guest migrated back, the destination given back.
        """
        await self.build()
        vm = await self.seed_vm(1)
        self.fail_once("change_state", lambda *a, **k: a[1] == "migrated",
                       "injected: the last swap failed")
        await self.rolled_back(vm, self.hosts[1], "vm-migrated", "injected: the last swap")

    async def test_stranded_then_recovered(self) -> None:
        """
        Note [migration rollback]: the last swap fails and the guest cannot be migrated
        back; the job stays Running (rolling back), the VM Migrating with capacity on both
        hosts (the audit still finds no drift: the holders say so). Recovering the job once
        the destination's agent works again moves the guest back and finishes the rollback.
        """
        await self.build()
        vm = await self.seed_vm(1)
        h1 = self.hosts[1]
        self.fail_once("change_state", lambda *a, **k: a[1] == "migrated",
                       "injected: the last swap failed")
        original = {}

        def stuck_everywhere() -> None:
            for host in self.hosts.values():
                hv = self.hv(host)
                original[host] = hv.migrate_vm
                hv.migrate_vm = lambda uuid, dest: fail(HypervisorError("injected: stuck"))

        # the guest moves (the real migrate), then every migrate back fails
        real = self.hv(h1).migrate_vm

        def once(uuid: str, dest: str) -> Any:
            d = real(uuid, dest)
            d.addCallback(lambda r: (stuck_everywhere(), r)[1])
            return d

        self.hv(h1).migrate_vm = once
        err = await self.refused(self.migrate(vm), VM_SERVICE, vm, VM.MIGRATE_ERROR,
                                 "could not be migrated back")
        self.assertIn("rollback_errors", err.cause.opaque)
        row = await self.store.get("vmInstance", vm)
        self.assertEqual(row["state"], "Migrating")
        held = await self.held(vm)
        self.assertEqual(len(held), 2)
        self.assertIn(h1, held)
        [dest] = [h for h in held if h != h1]
        self.assertEqual(self.hv(dest).vms[vm].state, p.VmState.RUNNING)
        await self.no_drift()
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual(job["state"], "Running")
        self.assertIsNotNone(job["rollbackError"])

        original[h1] = real
        for host, fn in original.items():
            self.hv(host).migrate_vm = fn
        outcomes = await self.vms.recover_job(job)
        self.assertEqual([o["outcome"] for o in outcomes], ["rolled-back"])
        await self.assert_running_on(vm, h1)
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual(job["state"], "Failed")

    async def test_recovery_forward_after_the_move(self) -> None:
        """
        A node that stopped after C{migrate-on-hypervisor} was recorded: the recovery
        finishes the migration forward (the guest is on the destination), giving back the
        source and marking the VM Running there.
        """
        await self.build()
        vm = await self.seed_vm(1)
        h1 = self.hosts[1]
        kind = self.vms.kinds["MigrateVm"]
        ctx: dict[str, Any] = {"resource": vm, "message": {"vmInstanceUuid": vm,
                                                            "hostUuid": None},
                               "took": {}, "job": "j"}
        job_uuid = uuidlib.uuid4().hex
        await self.store.create_job(job_uuid, "MigrateVm", {"vmInstanceUuid": vm},
                                    self.vms.node_id, vm)
        for flow in kind.flows[:3]:
            took = await defer.ensureDeferred(flow.run(ctx))
            ctx["took"][flow.name] = took
            await self.store.record_job_flow(job_uuid, self.vms.node_id, flow.name, took)
        dest = ctx["took"]["allocate-destination"]["host"]
        self.assertEqual(sorted(await self.held(vm)), sorted([h1, dest]))
        [job] = await self.jobs(vm, "MigrateVm")
        outcomes = await self.vms.recover_job(job)
        self.assertEqual([o["outcome"] for o in outcomes], ["forward"])
        await self.assert_running_on(vm, dest, last=h1)


class EmbeddedMigrateTests(MigrateScenario, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """

    async def node_overrides(self) -> dict[str, Any]:
        return {}


class RabbitPostgres:
    """
    On PostgreSQL (a scratch database, dropped at cleanup) and RabbitMQ (the AMQP bus on a
    random prefix, its exchanges deleted at cleanup). Fails when either is missing.
    """

    async def node_overrides(self) -> dict[str, Any]:
        name = await threads.deferToThread(pg_create_database_sync)
        self.addCleanup(threads.deferToThread, pg_drop_database_sync, name)
        prefix = f"vm{secrets.token_hex(5)}."
        self.addCleanup(self.delete_exchanges, prefix)
        return {"store": {"url": pg_dsn(name)},
                "bus": {"backend": "amqp", "prefix": prefix}}

    async def delete_exchanges(self, prefix: str) -> None:
        from tests.test_bus_amqp import Admin
        from zcontrol.bus.amqp import Topology

        admin = await Admin.connect()
        try:
            topo = Topology(prefix)
            await admin.ch.queue_delete(queue=topo.no_route_queue)
            for exchange in (topo.p2p, topo.broadcast, topo.no_route):
                await admin.ch.exchange_delete(exchange=exchange)
        finally:
            await admin.close()


class RabbitPostgresMigrateTests(RabbitPostgres, MigrateScenario, LoopbackTestCase):
    """
    The migration tests on PostgreSQL and RabbitMQ.
    """


__all__ = ["MigrateScenario", "RabbitPostgres", "VmScenario"]
