"""
Live migration end to end (issue 10): a whole management node and a real simulated agent
over loopback HTTP (the cloud of L{tests.vm_scenario}: hosts sharing one NFS primary
storage, plus LocalStorage), driven through the node's bus with L{MigrateVmMsg} on VMs made
by L{CreateVmInstanceMsg}.

After each migration the store (state, C{hostUuid}, C{lastHostUuid}, the job row), the
simulated hypervisors (where the guest runs) and the capacity accounting (who holds what on
each host; the invariants at rest and C{store.audit_capacity()}, L{CloudScenario.consistent})
are checked. A failure is injected at each flow in turn (the VM service's state swap, the
allocator finding no room or no Connected host, the agent failing C{/vm/migrate}, the
source's return, the final swap) and the migration is rolled back: the VM Running on its
source, nothing held on the destination. On the embedded backends and on PostgreSQL +
RabbitMQ (failing, never skipping, when either is missing). No sleeps: every wait is a reply.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import fail

from agent import protocol as p
from agent.hypervisor.interfaces import HypervisorError
from agent.hypervisor.simulator import GiB
from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.query import Query
from zcontrol.scheduler.messages import ALLOCATOR, ReturnHostCapacityMsg
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import HOST, AddHostMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.network.messages import L3_SERVICE_ID, AddIpRangeMsg, CreateL3NetworkMsg
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import MigrateVmMsg

#: the VMs' offering
VM_CPU, VM_MEMORY = 2, 2 * GiB
#: the agent slot of the host in the second cluster (nothing attached to it)
SLOT_B = 4


class VmScenario(CloudScenario):
    """
    The cloud of L{CloudScenario} (3 hosts, NFS and LocalStorage, a 2-CPU 2 GiB offering)
    plus a second L3 network on the same L2 and a second cluster with one host and nothing
    attached; helpers to look at the agents and the holders, and to inject faults.

    @ivar hosts: agent slot -> host uuid.
    """

    cloud_hosts = 3
    storage = "both"
    offering_cpu = VM_CPU
    offering_memory = VM_MEMORY

    @property
    def store(self) -> Any:
        return self.node.store

    async def build(self) -> None:
        cloud = await self.build_cloud()
        self.hosts = {slot: host for host, slot in cloud.slots.items()}
        cluster_b = (await self.ok(CreateClusterMsg(zone_uuid=cloud.zone, name="b",
                                                    hypervisor_type="KVM"),
                                   CLUSTER_SERVICE)).inventory["uuid"]
        host_b = (await self.ok(AddHostMsg(name="host-b", zone_uuid=cloud.zone,
                                           cluster_uuid=cluster_b,
                                           management_ip=self.base(SLOT_B)),
                                HOST_SERVICE)).inventory["uuid"]
        self.hosts[SLOT_B] = host_b
        cloud.slots[host_b] = SLOT_B
        l3b = (await self.ok(CreateL3NetworkMsg(name="l3-b", l2_network_uuid=cloud.l2),
                             L3_SERVICE_ID)).inventory["uuid"]
        await self.ok(AddIpRangeMsg(l3_network_uuid=l3b, name="r", start_ip="10.1.0.10",
                                    end_ip="10.1.0.200", netmask="255.255.255.0",
                                    gateway="10.1.0.1"), L3_SERVICE_ID, l3b)
        self.l3s = [cloud.l3, l3b]
        await self.consistent()

    async def running_vm(self, slot: int = 1, ps: str | None = None,
                         l3s: list[str] | None = None, **fields: Any) -> str:
        """
        Create a VM on the host of C{slot} with its root volume on C{ps} (default NFS) and
        a NIC on each of C{l3s} (default the first L3); its uuid.
        """
        inventory = await self.create(
            host_uuid=self.hosts[slot], primary_storage_uuid_for_root_volume=ps or self.cloud.nfs,
            l3_network_uuids=l3s or [self.l3s[0]], **fields)
        return inventory["uuid"]

    async def stopped_vm(self, **fields: Any) -> str:
        """
        Create a Stopped VM (strategy C{CreateStopped}) on NFS; its uuid.
        """
        return await self.running_vm(strategy="CreateStopped", **fields)

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
        await self.consistent()

    # --- fault injection ------------------------------------------------------------------

    def fail_once(self, method: str, when: Any, text: str) -> None:
        """
        Make the VM service's C{method} fail (C{SYS.1006}, C{text}) the first time
        C{when(*args)} holds.
        """
        real = getattr(self.vm_service, method)
        fired = []

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not fired and when(*args, **kwargs):
                fired.append(True)
                raise OperationError.of(SYS.OPERATION_ERROR, text)
            return real(*args, **kwargs)

        setattr(self.vm_service, method, wrapper)
        self.addCleanup(delattr, self.vm_service, method)

    def fail_send_once(self, when: Any, text: str) -> None:
        """
        Make the first message the VM service sends for which C{when(msg)} holds fail.
        """
        real = self.vm_service.send
        fired = []

        def send(msg: Any, timeout: float | None = None) -> Any:
            if not fired and when(msg):
                fired.append(True)
                return fail(OperationError.of(SYS.OPERATION_ERROR, text))
            return real(msg, timeout)

        self.vm_service.send = send
        self.addCleanup(delattr, self.vm_service, "send")

    def migrate(self, vm: str, host: str | None = None) -> MigrateVmMsg:
        return MigrateVmMsg(vm_instance_uuid=vm, host_uuid=host)


def _query(*conditions: str) -> Query:
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
        vm = await self.running_vm(1)
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
        running = await self.running_vm(1)
        stopped = await self.stopped_vm()
        await self.refused(self.migrate(stopped), VM_SERVICE, stopped,
                           VM.NOT_IN_CORRECT_STATE, "Stopped")
        local = await self.running_vm(1, ps=self.cloud.local)
        [root] = (await self.store.query("volume", _query(f"vmInstanceUuid={local}"))
                  ).inventories
        await self.refused(self.migrate(local, h2), VM_SERVICE, local, VM.MIGRATE_ERROR,
                           "LocalStorage", root["uuid"], self.cloud.local)
        await self.refused(self.migrate(running, h1), VM_SERVICE, running, VM.MIGRATE_ERROR,
                           "already runs there")
        await self.refused(self.migrate(running, self.hosts[SLOT_B]), VM_SERVICE, running,
                           VM.MIGRATE_ERROR, self.cloud.nfs, self.cloud.l2)
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
        vm = await self.running_vm(1)
        self.fail_once("change_state", lambda *a, **k: a[1] == "migrating",
                       "injected: the state swap failed")
        await self.rolled_back(vm, self.hosts[1], "vm-migrating", "injected: the state swap")

    async def test_fail_allocate_no_room(self) -> None:
        """
        Fault at C{allocate-destination}: every other host of the cluster is full; the
        allocator's reasoned error is in the cause chain; nothing was reserved.
        """
        await self.build()
        vm = await self.running_vm(1)
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
        vm = await self.running_vm(1)
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
        vm = await self.running_vm(1)
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
        vm = await self.running_vm(1)
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
        vm = await self.running_vm(1)
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
        vm = await self.running_vm(1)
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
        outcomes = await self.vm_service.recover_job(job)
        self.assertEqual([o["outcome"] for o in outcomes], ["rolled-back"])
        await self.assert_running_on(vm, h1)
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual(job["state"], "Failed")

    async def interrupted(self, vm: str, flows: int) -> tuple[dict, dict]:
        """
        A C{MigrateVm} job of C{vm} whose first C{flows} flows ran and were recorded, as a
        node that stopped then leaves it; its row and the context its flows ran with.
        """
        svc = self.vm_service
        kind = svc.kinds["MigrateVm"]
        body = await svc.migrate_body(self.migrate(vm))
        job_uuid = uuidlib.uuid4().hex
        await self.store.create_job(job_uuid, "MigrateVm", body, svc.node_id, vm)
        ctx: dict[str, Any] = {"resource": vm, "message": body, "took": {}, "job": job_uuid}
        for flow in kind.flows[:flows]:
            took = await defer.ensureDeferred(flow.run(ctx))
            ctx["took"][flow.name] = took
            await self.store.record_job_flow(job_uuid, svc.node_id, flow.name, took)
        [job] = await self.jobs(vm, "MigrateVm")
        return job, ctx

    async def test_recovery_forward_after_the_move(self) -> None:
        """
        A node that stopped after C{migrate-on-hypervisor} was recorded: the recovery
        finishes the migration forward (the guest is on the destination), giving back the
        source and marking the VM Running there.
        """
        await self.build()
        vm = await self.running_vm(1)
        h1 = self.hosts[1]
        job, ctx = await self.interrupted(vm, 3)
        dest = ctx["took"]["allocate-destination"]["host"]
        self.assertEqual(sorted(await self.held(vm)), sorted([h1, dest]))
        outcomes = await self.vm_service.recover_job(job)
        self.assertEqual([o["outcome"] for o in outcomes], ["forward"])
        await self.assert_running_on(vm, dest, last=h1)
        [job] = await self.jobs(vm, "MigrateVm")
        self.assertEqual(job["state"], "Succeeded")

    async def test_recovery_back_before_the_move(self) -> None:
        """
        A node that stopped while C{migrate-on-hypervisor} was in flight and the guest had
        not moved (the probe: Running on the source, not on the destination): the recovery
        rolls the job back (C{JOB.1000}), the VM Running on its source, the destination's
        reservation given back.
        """
        await self.build()
        vm = await self.running_vm(1)
        h1 = self.hosts[1]
        job, ctx = await self.interrupted(vm, 2)
        self.assertEqual(len(await self.held(vm)), 2)
        self.assertEqual((await self.store.get("vmInstance", vm))["state"], "Migrating")
        outcomes = await self.vm_service.recover_job(job)
        self.assertEqual([(o["outcome"], o["error"].code) for o in outcomes],
                         [("rolled-back", "JOB.1000")])
        await self.assert_running_on(vm, h1)


class EmbeddedMigrateTests(MigrateScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """


class RabbitPostgresMigrateTests(MigrateScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """
