"""
Host-reported VM state (issue 10, deliverable 3): the host service reports, the VM service
decides in the VM's chain (L{zcontrol.services.vm.hoststate}); host maintenance migrates or
stops the VMs (Note [maintenance] of L{zcontrol.services.host.operations}).

Two layers:
 - deterministic tests on one L{Clock} (LocalBus, MemoryStore, the in-memory agent pair of
   L{tests.test_host_service}), for the orderings that need a clock to pin down: a report
   waits for the operation running in the VM's chain, a stale sync report, the decisions
   a maintenance takes;
 - the scenario end to end on a whole node (L{make_node}) and a real simulated agent over
   loopback HTTP (L{LoopbackTestCase}), on the embedded backends and on PostgreSQL +
   RabbitMQ (which fail, never skip, when missing). VMs are set up directly (rows, their
   capacity held by the VM holder, started on the simulated hypervisor), as the VM service
   would leave them; every step checks the store, the agent's simulated state and the
   capacity audit. No sleeps: syncs, pings and reconnects are triggered explicitly, and
   background work is waited for on the services' own in-flight counters and on events.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from agent.hypervisor.interfaces import VmSpec
from agent.hypervisor.simulator import GiB
from tests.test_agent_loopback import LoopbackTestCase
from tests.test_host_service import HostServiceTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends
from zcontrol.config import load_config
from zcontrol.core.errors import SYS, OperationError
from zcontrol.node import make_node
from zcontrol.scheduler.service import HostAllocatorService
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import (
    HOST,
    AddHostMsg,
    ChangeHostStateMsg,
    PingHostMsg,
    ReconnectHostMsg,
    VmStateChangedOnHostEvent,
)
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.vm.base import VM_HOLDER
from zcontrol.services.vm.hoststate import StrangerVmFoundEvent
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    MigrateVmMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
    VmInstanceReply,
    VmInstanceStateChangedEvent,
    VmStateChangedOnHostMsg,
)
from zcontrol.services.vm.service import VmService
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

#: one send's bound (seconds) in the end-to-end tests: a lost reply fails the test
TIMEOUT = 60
#: states whose VM holds capacity on its host
ON_HOST = ("Running", "Paused", "Unknown", "Crashed")


# --- deterministic ---------------------------------------------------------------------------


class OnClockTestCase(HostServiceTestCase):
    """
    The VM service and the host allocator on the host service's clock, bus and store; host
    h1 added (the agent's slot 1: 32 CPUs, 128 GiB).
    """

    def setUp(self) -> None:
        super().setUp()
        self.vms = VmService(self.clock, self.bus, self.store)
        self.allocator = HostAllocatorService(self.clock, self.bus, self.store)
        self.allocator.start()
        self.result(self.vms.start())
        reply = self.successResultOf(self.add(1))
        self.assertTrue(reply.success, reply.error)
        self.hv = self.pair.cluster.backends("1").hypervisor
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def place(self, uuid: str, host: str | None, state: str, cpu: int = 2,
              memory: int = 2 * GiB, running: bool | None = None) -> None:
        """
        A VM row as the VM service leaves it in C{state}; its capacity held when the state
        holds it; Running on the simulated host when C{running} (default: Running state).
        """
        self.seed("vmInstance", {"uuid": uuid, "name": uuid, "hostUuid": host,
                                 "lastHostUuid": host, "state": state, "cpuNum": cpu,
                                 "memorySize": memory})
        if state in ON_HOST:
            self.result(self.store.reserve_host_capacity(host, cpu, memory, (VM_HOLDER, uuid)))
        if running if running is not None else state == "Running":
            self.successResultOf(self.hv.start_vm(VmSpec(uuid=uuid, name=None, cpu_num=cpu,
                                                         memory_size=memory)))

    def report(self, uuid: str, state: str, host: str = "h1",
               expected: str | None = None) -> defer.Deferred:
        return self.bus.send(VmStateChangedOnHostMsg(
            service_id=VM_SERVICE, resource_uuid=uuid, vm_instance_uuid=uuid,
            host_uuid=host, state=state, vm_state_at_tracing_moment=expected))

    def held(self, host: str = "h1") -> dict[str, tuple[int, int]]:
        holders = self.result(self.store.host_capacity_holders(host))["holders"]
        return {h["holderUuid"]: (h["cpu"], h["memory"]) for h in holders}


class ReportsOnClockTests(OnClockTestCase):
    """
    Decisions on reports, on one clock.
    """

    def test_report_waits_for_the_operation(self) -> None:
        """
        A report sent while an operation runs in the VM's chain waits for it and is decided
        on what the operation left: here the operation stops the VM (as a stop job would),
        so the host's "Stopped" changes nothing more (no second capacity release, no
        event); before the operation ends, the report has not been answered.
        """
        self.place("vm-1", "h1", "Running")
        gate: defer.Deferred = defer.Deferred()

        async def stop_job() -> None:
            await self.store.change_vm_state("vm-1", "Running", "Stopping")
            await gate
            await self.store.release_host_capacity("h1", (VM_HOLDER, "vm-1"))
            await self.store.change_vm_state("vm-1", "Stopping", "Stopped",
                                             {"hostUuid": None, "lastHostUuid": "h1"})

        job = self.vms.in_vm_chain("vm-1", lambda: defer.Deferred.fromCoroutine(stop_job()))
        self.pump()
        self.successResultOf(self.hv.stop_vm("vm-1"))
        d = self.report("vm-1", "Stopped")
        self.pump()
        self.assertNoResult(d)
        self.assertEqual(self.row("vmInstance", "vm-1")["state"], "Stopping")
        gate.callback(None)
        self.pump()
        self.successResultOf(job)
        reply = self.successResultOf(d)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual((reply.changed, reply.state, reply.decision),
                         (False, "Stopped", "unchanged"))
        self.assertEqual(self.held(), {})
        self.assertEqual([e for e in self.events if isinstance(e, VmStateChangedOnHostEvent)],
                         [])
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_intermediate_state_is_left_to_its_operation(self) -> None:
        """
        A report about a VM in an intermediate state (an operation owns it) is ignored: the
        VM keeps its state and its capacity.
        """
        self.place("vm-1", "h1", "Running")
        self.result(self.store.change_vm_state("vm-1", "Running", "Migrating"))
        reply = self.result(self.report("vm-1", "Stopped"))
        self.assertEqual((reply.changed, reply.decision), (False, "busy"))
        self.assertEqual(self.row("vmInstance", "vm-1")["state"], "Migrating")
        self.assertEqual(self.held(), {"vm-1": (2, 2 * GiB)})

    def test_stale_sync_report(self) -> None:
        """
        A sync's report read while the VM was Running is stale once the VM is Stopped (an
        operation ran between the sync's two reads): ignored; the same report with the
        state the VM has is applied.
        """
        self.place("vm-1", None, "Stopped", running=True)
        reply = self.result(self.report("vm-1", "Running", expected="Running"))
        self.assertEqual((reply.changed, reply.decision), (False, "stale"))
        self.assertEqual(self.row("vmInstance", "vm-1")["state"], "Stopped")
        self.assertEqual(self.held(), {})
        reply = self.result(self.report("vm-1", "Running", expected="Stopped"))
        self.assertEqual((reply.changed, reply.state, reply.decision),
                         (True, "Running", "running"))
        self.assertEqual(self.row("vmInstance", "vm-1")["hostUuid"], "h1")
        self.assertEqual(self.held(), {"vm-1": (2, 2 * GiB)})
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_running_on_a_full_host(self) -> None:
        """
        A Stopped VM its host runs (started by hand) on a host with no room by the books is
        still recorded Running there (the host says so), holding nothing, with a warning
        naming it; the books stay consistent (no drift).
        """
        self.place("big", "h1", "Running", cpu=31, memory=GiB, running=False)
        self.place("vm-1", None, "Stopped", cpu=2, running=True)
        reply = self.result(self.report("vm-1", "Running"))
        self.assertEqual((reply.changed, reply.state), (True, "Running"))
        row = self.row("vmInstance", "vm-1")
        self.assertEqual((row["state"], row["hostUuid"]), ("Running", "h1"))
        self.assertNotIn("vm-1", self.held())
        warned = [formatEvent(e) for e in self.logged if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("vm-1" in w and "no room" in w for w in warned), warned)
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_unknown_vm_running_on_another_host_is_adopted(self) -> None:
        """
        An Unknown VM (its host h1 disconnected) that host h2 reports Running moves there:
        its capacity on h1 is given back and taken on h2; lastHostUuid names h1. A Running
        VM another host reports Running is not adopted (a stranger: reported).
        """
        self.successResultOf(self.add(2))
        self.place("vm-1", "h1", "Unknown", running=False)
        self.place("vm-2", "h1", "Running")
        strangers: list[Any] = []
        self.bus.subscribe(StrangerVmFoundEvent.topic, strangers.append)
        reply = self.result(self.report("vm-1", "Running", host="h2"))
        self.assertEqual((reply.changed, reply.decision), (True, "adopted"))
        row = self.row("vmInstance", "vm-1")
        self.assertEqual((row["state"], row["hostUuid"], row["lastHostUuid"]),
                         ("Running", "h2", "h1"))
        self.assertNotIn("vm-1", self.held("h1"))
        self.assertEqual(self.held("h2"), {"vm-1": (2, 2 * GiB)})
        reply = self.result(self.report("vm-2", "Running", host="h2"))
        self.assertEqual((reply.changed, reply.decision), (False, "stranger"))
        self.assertEqual(self.row("vmInstance", "vm-2")["hostUuid"], "h1")
        self.pump()
        self.assertEqual([(e.vm_uuid, e.host_uuid, e.known_state, e.known_host_uuid)
                          for e in strangers], [("vm-2", "h2", "Running", "h1")])
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_disconnect_after_reconnect_changes_nothing(self) -> None:
        """
        The Disconnected handling re-reads the host in each VM's chain: run for a host that
        is Connected again (a late event), it leaves the VMs Running.
        """
        self.place("vm-1", "h1", "Running")
        self.assertEqual(self.result(defer.Deferred.fromCoroutine(
            self.vms.host_disconnected("h1"))), 0)
        self.assertEqual(self.row("vmInstance", "vm-1")["state"], "Running")

    def test_bad_report(self) -> None:
        """
        A state a host cannot report is SYS.1007 naming the field.
        """
        reply = self.result(self.report("vm-1", "Starting"))
        self.assertEqual((reply.error.code, reply.error.opaque["field"]),
                         (SYS.INVALID_ARGUMENT_ERROR, "state"))


class FakeVmService:
    """
    A stand-in for the VM service's migrate and stop, recording what maintenance asks:
    C{migrate_ok} VMs migrate to h2 (store updated, capacity moved), the others fail; a stop
    succeeds (the VM Stopped, its capacity given back) except for C{unstoppable} VMs.
    """

    def __init__(self, test: OnClockTestCase, migrate_ok: set[str],
                 unstoppable: set[str]) -> None:
        self.test = test
        self.migrate_ok = migrate_ok
        self.unstoppable = unstoppable
        self.asked: list[tuple[str, str]] = []

    def handle(self, msg: Any) -> Any:
        return defer.Deferred.fromCoroutine(self._handle(msg))

    async def _handle(self, msg: Any) -> Any:
        store = self.test.store
        if isinstance(msg, MigrateVmMsg):
            vm = msg.vm_instance_uuid
            self.asked.append(("migrate", vm))
            if vm not in self.migrate_ok:
                raise OperationError.of(SYS.OPERATION_ERROR, f"no host to migrate {vm} to")
            row = await store.get("vmInstance", vm)
            await store.reserve_host_capacity("h2", row["cpuNum"], row["memorySize"],
                                              (VM_HOLDER, vm))
            await store.release_host_capacity("h1", (VM_HOLDER, vm))
            await store.update("vmInstance", vm, {"hostUuid": "h2"})
            return VmInstanceReply()
        if isinstance(msg, StopVmInstanceMsg):
            self.asked.append(("stop", msg.uuid))
            if msg.uuid in self.unstoppable:
                raise OperationError.of(SYS.OPERATION_ERROR, f"{msg.uuid} will not stop")
            await store.release_host_capacity("h1", (VM_HOLDER, msg.uuid))
            await store.change_vm_state(msg.uuid, ["Running", "Unknown"], "Stopped",
                                        {"hostUuid": None, "lastHostUuid": "h1"})
            return VmInstanceReply()
        raise OperationError.of(SYS.UNKNOWN_MESSAGE_ERROR, type(msg).__name__)


class MaintenanceOnClockTests(OnClockTestCase):
    """
    The decisions of a maintenance (Note [maintenance]) against a recording stand-in for the
    VM service's migrate and stop: what is asked of which VM, and where the host ends.
    This checks the host side's decisions, not a migration (see the end-to-end tests).
    """

    def setUp(self) -> None:
        super().setUp()
        self.result(self.vms.stop())
        self.successResultOf(self.add(2))
        self.seed("primaryStorage", {"uuid": "ps-local", "name": "local", "zoneUuid": "z",
                                     "type": "LocalStorage", "url": "/local"})
        self.seed("primaryStorage", {"uuid": "ps-nfs", "name": "nfs", "zoneUuid": "z",
                                     "type": "NFS", "url": "nfs:/export"})

    def vm_on(self, uuid: str, ps: str) -> None:
        self.place(uuid, "h1", "Running")
        self.seed("volume", {"uuid": f"root-{uuid}", "name": "root", "type": "Root",
                             "vmInstanceUuid": uuid, "primaryStorageUuid": ps})

    def maintain(self, fake: FakeVmService) -> Any:
        self.bus.register_service(VM_SERVICE, fake.handle)
        d = self.bus.send(ChangeHostStateMsg(service_id=HOST_SERVICE, resource_uuid="h1",
                                             uuid="h1", state_event="maintain"))
        self.pump()
        return self.successResultOf(d)

    def test_migrate_where_storage_allows_else_stop(self) -> None:
        """
        A VM on LocalStorage is stopped without a migration attempt; VMs on NFS are
        migrated, and one whose migration fails is stopped; the host ends in Maintenance
        with nothing on it.
        """
        self.vm_on("vm-local", "ps-local")
        self.vm_on("vm-nfs", "ps-nfs")
        self.vm_on("vm-nfs-stuck", "ps-nfs")
        fake = FakeVmService(self, migrate_ok={"vm-nfs"}, unstoppable=set())
        reply = self.maintain(fake)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.inventory["state"], "Maintenance")
        self.assertEqual(sorted(fake.asked), [("migrate", "vm-nfs"), ("migrate", "vm-nfs-stuck"),
                                              ("stop", "vm-local"), ("stop", "vm-nfs-stuck")])
        self.assertEqual(self.row("vmInstance", "vm-nfs")["hostUuid"], "h2")
        self.assertEqual({u: self.row("vmInstance", u)["state"]
                          for u in ("vm-local", "vm-nfs-stuck")},
                         {"vm-local": "Stopped", "vm-nfs-stuck": "Stopped"})
        self.assertEqual(self.held("h1"), {})
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_unmovable_vm_fails_the_maintenance(self) -> None:
        """
        A VM that can be neither migrated nor stopped makes maintain fail with HOST.1005
        naming it and both errors; the host returns to Enabled; the VMs that could be moved
        stay moved (as in ZStack).
        """
        self.vm_on("vm-local", "ps-local")
        self.vm_on("vm-stuck", "ps-nfs")
        fake = FakeVmService(self, migrate_ok=set(), unstoppable={"vm-stuck"})
        reply = self.maintain(fake)
        self.assertFalse(reply.success)
        err = reply.error
        self.assertEqual(err.code, HOST.HAS_VMS)
        self.assertEqual((err.opaque["vmUuids"], sorted(err.opaque["failures"])),
                         (["vm-stuck"], ["vm-stuck"]))
        self.assertIn("no host to migrate vm-stuck to", err.details)
        self.assertIn("vm-stuck will not stop", err.details)
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")
        self.assertEqual(self.row("vmInstance", "vm-local")["state"], "Stopped")
        self.assertEqual(self.row("vmInstance", "vm-stuck")["state"], "Running")


# --- end to end ------------------------------------------------------------------------------


class HostStateScenario:
    """
    The scenario, for a L{LoopbackTestCase} whose L{node_overrides} chooses the backends.
    """

    host_count = 4

    async def node_overrides(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- plumbing ---------------------------------------------------------------------

    async def start_node(self) -> None:
        data = os.path.abspath(self.mktemp())
        overrides: dict[str, Any] = {
            "node": {"id": f"mn-hs-{secrets.token_hex(3)}", "data_dir": data},
            "http": {"port": 0, "interface": "127.0.0.1"},
            # the tracker never fires during a test (pings are sent explicitly); a host that
            # stops answering stays Disconnected until the test reconnects it
            "host": {"ping_interval": 3600, "auto_reconnect": False, "ping_timeout": 5},
        }
        overrides.update(await self.node_overrides())
        self.node = make_node(load_config(None, overrides), reactor)
        self.addCleanup(lambda: self.node.running and self.node.stopService())
        await self.node.startService()
        inventory = [s for s in self.node if s.name == "inventory"][0]
        self.services = {s.service_id: s for s in inventory.services}
        self.hosts = [s for s in self.node if s.name == "host"][0].service
        self.vms = self.services[VM_SERVICE]
        self.store = self.node.store
        self.events: list[Any] = []
        for topic in (VmInstanceStateChangedEvent.topic, StrangerVmFoundEvent.topic):
            sub = self.node.bus.subscribe(topic, self.events.append)
            self.addCleanup(sub.cancel)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        reply = await self.node.bus.send(msg, TIMEOUT)
        self.assertTrue(reply.success, f"{type(msg).__name__}: {reply.error}")
        return reply

    async def settle(self) -> None:
        """
        Wait until the host and VM services have nothing in flight (background syncs and
        the decisions they wait for, the Disconnected handling).
        """
        await self.hosts._waiter.wait()
        await self.vms._waiter.wait()

    def seen(self, match: Any) -> defer.Deferred:
        """
        A Deferred firing with the first event (of those the test subscribed to) for which
        C{match(event)} is true, already seen or to come; failing after L{TIMEOUT}.
        """
        for event in self.events:
            if match(event):
                return defer.succeed(event)
        done: defer.Deferred = defer.Deferred()
        sub = None

        def check(event: Any) -> None:
            if not done.called and match(event):
                sub.cancel()
                done.callback(event)

        sub = self.node.bus.subscribe("vm.#", check)
        return done.addTimeout(TIMEOUT, reactor)

    def hv(self, slot: int) -> Any:
        return self.simulated.hypervisor(str(slot))

    async def place(self, uuid: str, host: str | None, slot: int | None, state: str,
                    cpu: int = 2, memory: int = 2 * GiB) -> None:
        """
        A VM as the VM service leaves it in C{state}: its row; its capacity held on its host
        when the state holds it; Running on the agent's host C{slot} when given.
        """
        await self.store.insert("vmInstance", {
            "uuid": uuid, "name": uuid, "hostUuid": host, "lastHostUuid": host,
            "state": state, "cpuNum": cpu, "memorySize": memory, "zoneUuid": self.zone,
            "clusterUuid": self.cluster})
        if state in ON_HOST:
            await self.store.reserve_host_capacity(host, cpu, memory, (VM_HOLDER, uuid))
        if slot is not None:
            await self.hv(slot).start_vm(VmSpec(uuid=uuid, name=None, cpu_num=cpu,
                                                memory_size=memory))

    async def vm(self, uuid: str) -> dict[str, Any] | None:
        return await self.store.get("vmInstance", uuid)

    async def where(self, uuid: str) -> tuple[str, str | None, str | None]:
        row = await self.vm(uuid)
        return row["state"], row["hostUuid"], row["lastHostUuid"]

    async def held(self, host: str) -> dict[str, tuple[int, int]]:
        holders = (await self.store.host_capacity_holders(host, 100))["holders"]
        return {h["holderUuid"]: (h["cpu"], h["memory"]) for h in holders}

    def on_agent(self, slot: int) -> dict[str, str]:
        return {u: vm.state for u, vm in self.hv(slot).vms.items()}

    async def no_drift(self) -> None:
        self.assertEqual(await self.store.audit_capacity(), [])

    async def sync(self, host: str) -> int:
        changed = await self.hosts.sync_vms(host)
        await self.settle()
        return changed

    # --- the scenario -----------------------------------------------------------------

    async def test_host_reports(self) -> None:
        """
        Reports and syncs through the VM service, on a node and a real agent: a guest that
        stopped on its own (the agent's report), a VM started by hand (a sync), strangers
        (unknown, Destroyed, Running elsewhere: reported once, never adopted), a host that
        disconnects (its VMs Unknown, capacity kept), a VM moved by hand meanwhile
        (adopted), and the reconnect's sync bringing the rest back.
        """
        await self.start_node()
        self.zone = (await self.ok(CreateZoneMsg(name="z"), ZONE_SERVICE)).inventory["uuid"]
        self.cluster = (await self.ok(CreateClusterMsg(zone_uuid=self.zone, name="c",
                                                       hypervisor_type="KVM"),
                                      CLUSTER_SERVICE)).inventory["uuid"]
        h1, h2 = [(await self.ok(AddHostMsg(name=f"h{slot}", zone_uuid=self.zone,
                                            cluster_uuid=self.cluster,
                                            management_ip=self.base(slot)),
                                 HOST_SERVICE)).inventory["uuid"] for slot in (1, 2)]
        await self.settle()  # whatever the connects started

        await self.place("vm-1", h1, 1, "Running")
        await self.place("vm-2", h1, 1, "Running")
        await self.place("vm-3", None, None, "Stopped")
        await self.place("vm-4", h2, 2, "Running")
        await self.place("vm-5", h1, 1, "Running")
        await self.no_drift()
        self.assertEqual(await self.sync(h1), 0)
        self.assertEqual(await self.where("vm-1"), ("Running", h1, h1))

        # a guest shuts down: the agent's report stops it and gives back its capacity
        await self.hv(1).stop_vm("vm-1")
        self.assertTrue(await self.agent.report_vm_state("1", "vm-1", "Stopped"))
        self.assertEqual(await self.where("vm-1"), ("Stopped", None, h1))
        self.assertNotIn("vm-1", await self.held(h1))
        event = await self.seen(lambda e: isinstance(e, VmInstanceStateChangedEvent)
                                and e.vm_uuid == "vm-1")
        self.assertEqual((event.old_state, event.new_state), ("Running", "Stopped"))
        await self.no_drift()

        # started by hand on h1: the sync records it Running there, holding its capacity
        await self.hv(1).start_vm(VmSpec(uuid="vm-3", name=None, cpu_num=2,
                                         memory_size=2 * GiB))
        self.assertEqual(await self.sync(h1), 1)
        self.assertEqual(await self.where("vm-3"), ("Running", h1, None))
        self.assertEqual((await self.held(h1))["vm-3"], (2, 2 * GiB))
        await self.no_drift()

        # strangers on h2: no such VM, a Destroyed one, one the store has on h1
        await self.store.insert("vmInstance", {"uuid": "vm-gone", "name": "gone",
                                               "state": "Destroyed", "cpuNum": 1,
                                               "memorySize": GiB})
        for uuid in ("ghost", "vm-gone", "vm-2"):
            await self.hv(2).start_vm(VmSpec(uuid=uuid, name=None, cpu_num=1,
                                             memory_size=GiB))
        before = await self.held(h2)
        self.assertEqual(await self.sync(h2), 0)
        self.assertEqual(await self.sync(h2), 0)  # reported once per VM and host
        await self.hv(2).start_vm(VmSpec(uuid="ghost-2", name=None, cpu_num=1,
                                         memory_size=GiB))
        self.assertEqual(await self.sync(h2), 0)
        await self.seen(lambda e: isinstance(e, StrangerVmFoundEvent)
                        and e.vm_uuid == "ghost-2")
        strangers = sorted((e.vm_uuid, e.known_state, e.known_host_uuid) for e in self.events
                           if isinstance(e, StrangerVmFoundEvent))
        self.assertEqual(strangers, [("ghost", None, None), ("ghost-2", None, None),
                                     ("vm-2", "Running", h1), ("vm-gone", "Destroyed", None)])
        self.assertIsNone(await self.vm("ghost"))
        self.assertEqual(await self.where("vm-gone"), ("Destroyed", None, None))
        self.assertEqual(await self.where("vm-2"), ("Running", h1, h1))
        self.assertEqual(await self.held(h2), before)
        for uuid in ("ghost", "ghost-2", "vm-gone", "vm-2"):
            await self.hv(2).destroy_vm(uuid)
        await self.no_drift()

        # h1 stops answering: three failed pings make it Disconnected, its VMs Unknown
        good_ip = (await self.store.get("host", h1))["managementIp"]
        await self.store.update("host", h1, {"managementIp": "http://127.0.0.1:1/hosts/1"})
        for _ in range(3):
            await self.ok(PingHostMsg(host_uuid=h1), HOST_SERVICE, h1)
        self.assertEqual((await self.store.get("host", h1))["status"], "Disconnected")
        await self.settle()
        for uuid in ("vm-2", "vm-3", "vm-5"):
            self.assertEqual(await self.where(uuid), ("Unknown", h1, h1 if uuid != "vm-3"
                                                      else None))
        self.assertEqual(await self.where("vm-4"), ("Running", h2, h2))
        self.assertEqual(set(await self.held(h1)), {"vm-2", "vm-3", "vm-5"})
        await self.no_drift()

        # meanwhile on the host: vm-2's guest stops; vm-5 is moved to h2 by hand
        await self.hv(1).stop_vm("vm-2")
        await self.hv(1).destroy_vm("vm-5")
        await self.hv(2).start_vm(VmSpec(uuid="vm-5", name=None, cpu_num=2,
                                         memory_size=2 * GiB))
        self.assertEqual(await self.sync(h2), 1)
        self.assertEqual(await self.where("vm-5"), ("Running", h2, h1))
        self.assertEqual((await self.held(h2))["vm-5"], (2, 2 * GiB))
        self.assertNotIn("vm-5", await self.held(h1))
        await self.no_drift()

        # h1 answers again: the reconnect's sync brings its VMs back to what it runs
        await self.store.update("host", h1, {"managementIp": good_ip})
        await self.ok(ReconnectHostMsg(uuid=h1), HOST_SERVICE, h1)
        await self.settle()
        self.assertEqual((await self.store.get("host", h1))["status"], "Connected")
        self.assertEqual(await self.where("vm-2"), ("Stopped", None, h1))
        self.assertEqual(await self.where("vm-3"), ("Running", h1, None))
        self.assertEqual(set(await self.held(h1)), {"vm-3"})
        self.assertEqual(self.on_agent(1), {"vm-1": "Stopped", "vm-2": "Stopped",
                                            "vm-3": "Running"})
        self.assertEqual(self.on_agent(2), {"vm-4": "Running", "vm-5": "Running"})
        await self.no_drift()
        changes = [(e.vm_uuid, e.old_state, e.new_state) for e in self.events
                   if isinstance(e, VmInstanceStateChangedEvent)]
        self.assertEqual(sorted(c for c in changes if c[0] == "vm-2"),
                         [("vm-2", "Running", "Unknown"), ("vm-2", "Unknown", "Stopped")])

    async def test_maintenance_fails_back_naming_the_vm(self) -> None:
        """
        Maintenance end to end with a VM that can be neither migrated nor stopped (stuck in
        Rebooting, a state that allows neither operation): maintain fails with HOST.1005
        naming it and the refusals, the host returns to Enabled, the VM and its capacity
        stay as they were, on the store and on the agent.
        """
        await self.start_node()
        self.zone = (await self.ok(CreateZoneMsg(name="z"), ZONE_SERVICE)).inventory["uuid"]
        self.cluster = (await self.ok(CreateClusterMsg(zone_uuid=self.zone, name="c",
                                                       hypervisor_type="KVM"),
                                      CLUSTER_SERVICE)).inventory["uuid"]
        h1 = (await self.ok(AddHostMsg(name="h1", zone_uuid=self.zone,
                                       cluster_uuid=self.cluster, management_ip=self.base(1)),
                            HOST_SERVICE)).inventory["uuid"]
        await self.settle()
        await self.place("vm-1", h1, 1, "Running")
        await self.store.change_vm_state("vm-1", "Running", "Rebooting")
        reply = await self.node.bus.send(ChangeHostStateMsg(
            service_id=HOST_SERVICE, resource_uuid=h1, uuid=h1, state_event="maintain"),
            TIMEOUT)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, HOST.HAS_VMS)
        self.assertEqual(reply.error.opaque["vmUuids"], ["vm-1"])
        self.assertEqual(list(reply.error.opaque["failures"]), ["vm-1"])
        self.assertIn("could neither migrate nor stop VM vm-1", reply.error.details)
        self.assertEqual((await self.store.get("host", h1))["state"], "Enabled")
        self.assertEqual(await self.where("vm-1"), ("Rebooting", h1, h1))
        self.assertEqual(await self.held(h1), {"vm-1": (2, 2 * GiB)})
        self.assertEqual(self.on_agent(1), {"vm-1": "Running"})
        await self.no_drift()


class RealVmScenario(CloudScenario):
    """
    The same decisions on VMs the VM service made (L{CloudScenario}: two hosts, NFS and
    LocalStorage, an image, an L3), checked with the cloud's invariants at rest
    (L{CloudScenario.consistent}: capacity held per VM, addresses per NIC, the agents
    agreeing with the store) after each step.
    """

    cloud_hosts = 2
    storage = "both"
    offering_cpu = 2
    offering_memory = 2 * GiB
    node_config = {"host": {"ping_interval": 3600, "auto_reconnect": False,
                            "ping_timeout": 5}}

    @property
    def hosts(self) -> Any:
        return [s for s in self.node if s.name == "host"][0].service

    async def settle(self) -> None:
        await self.hosts._waiter.wait()
        await self.vm_service._waiter.wait()

    async def where(self, uuid: str) -> tuple[str, str | None]:
        row = await self.node.store.get("vmInstance", uuid)
        return row["state"], row["hostUuid"]

    async def held_by(self, uuid: str) -> list[Any]:
        return await self.node.store.holder_reservations((VM_HOLDER, uuid))

    def hv_of(self, host: str) -> Any:
        return self.simulated.hypervisor(str(self.cloud.slots[host]))

    async def test_reports_and_maintenance(self) -> None:
        """
        A guest that shuts down on its own (the agent's report) and one stopped by hand
        (a sync) become Stopped with their capacity given back, and start again through the
        VM service; a maintenance stops the host's VMs on LocalStorage (they cannot migrate
        live) with StopVmInstanceMsg and reaches Maintenance; enabled again, the host takes
        them back.
        """
        cloud = await self.build_cloud()
        h1, h2 = cloud.hosts
        await self.settle()
        a = (await self.create("vm-a", host_uuid=h1,
                               primary_storage_uuid_for_root_volume=cloud.local))["uuid"]
        b = (await self.create("vm-b", host_uuid=h1,
                               primary_storage_uuid_for_root_volume=cloud.local))["uuid"]
        c = (await self.create("vm-c", host_uuid=h2,
                               primary_storage_uuid_for_root_volume=cloud.nfs))["uuid"]
        await self.settle()
        await self.consistent()
        self.assertEqual(await self.hosts.sync_vms(h1), 0)

        # vm-a's guest shuts down: the agent reports it
        await self.hv_of(h1).stop_vm(a)
        self.assertTrue(await self.agent.report_vm_state(str(cloud.slots[h1]), a, "Stopped"))
        self.assertEqual(await self.where(a), ("Stopped", None))
        self.assertEqual(await self.held_by(a), [])
        await self.consistent()

        # vm-c is stopped by hand on h2: the sync finds it
        await self.hv_of(h2).stop_vm(c)
        self.assertEqual(await self.hosts.sync_vms(h2), 1)
        self.assertEqual(await self.where(c), ("Stopped", None))
        await self.consistent()

        # both start again through the VM service, on the hosts they ran on
        for uuid, host in ((a, h1), (c, h2)):
            await self.vm(StartVmInstanceMsg(uuid=uuid, host_uuid=host), uuid)
            self.assertEqual(await self.where(uuid), ("Running", host))
        await self.consistent()

        # maintenance of h1: its VMs are on LocalStorage, so they are stopped
        reply = await self.ok(ChangeHostStateMsg(uuid=h1, state_event="maintain"),
                              HOST_SERVICE, h1)
        self.assertEqual(reply.inventory["state"], "Maintenance")
        self.assertEqual({u: await self.where(u) for u in (a, b)},
                         {a: ("Stopped", None), b: ("Stopped", None)})
        self.assertEqual(await self.node.store.host_capacity_holders(h1),
                         {"total": 0, "holders": []})
        self.assertEqual({u: vm.state for u, vm in self.hv_of(h1).vms.items()
                          if vm.state == "Running"}, {})
        self.assertEqual(await self.where(c), ("Running", h2))
        jobs = await self.rows("job", resourceUuid=a)
        self.assertNotIn("MigrateVm", [j["apiName"] for j in jobs])
        await self.consistent()

        # a maintained host takes no VM; enabled, it does
        refused = await self.send(StartVmInstanceMsg(uuid=a, host_uuid=h1), VM_SERVICE, a)
        self.assertFalse(refused.success)
        self.assertEqual(await self.where(a), ("Stopped", None))
        await self.consistent()
        await self.ok(ChangeHostStateMsg(uuid=h1, state_event="enable"), HOST_SERVICE, h1)
        await self.vm(StartVmInstanceMsg(uuid=a, host_uuid=h1), a)
        self.assertEqual(await self.where(a), ("Running", h1))
        await self.consistent()

    async def test_disconnect_and_back(self) -> None:
        """
        A host that stops answering (three failed pings) is Disconnected and its VM becomes
        Unknown, keeping its capacity and addresses; reconnected, the sync that follows
        brings it back to Running, and a VM whose guest stopped meanwhile to Stopped.
        """
        cloud = await self.build_cloud()
        h1 = cloud.hosts[0]
        await self.settle()
        a = (await self.create("vm-a", host_uuid=h1))["uuid"]
        b = (await self.create("vm-b", host_uuid=h1))["uuid"]
        await self.settle()
        await self.consistent()
        # The Disconnected handling reaches the VM service as an event (through the broker
        # on AMQP): wait for each VM's own state-change event, not only for work in flight.
        unknown = {u: defer.Deferred() for u in (a, b)}

        def on_state(event: Any) -> None:
            d = unknown.get(event.vm_uuid)
            if d is not None and not d.called and event.new_state == "Unknown":
                d.callback(None)

        subscription = self.node.bus.subscribe("vm.state", on_state)
        good_ip = (await self.node.store.get("host", h1))["managementIp"]
        await self.node.store.update("host", h1,
                                     {"managementIp": "http://127.0.0.1:1/hosts/1"})
        for _ in range(3):
            await self.ok(PingHostMsg(host_uuid=h1), HOST_SERVICE, h1)
        await defer.gatherResults([d.addTimeout(TIMEOUT, reactor) for d in unknown.values()])
        subscription.cancel()
        await self.settle()
        self.assertEqual((await self.node.store.get("host", h1))["status"], "Disconnected")
        for uuid in (a, b):
            self.assertEqual(await self.where(uuid), ("Unknown", h1))
            vm = await self.node.store.get("vmInstance", uuid)
            self.assertEqual(await self.held_by(uuid), [(h1, vm["cpuNum"], vm["memorySize"])])
        await self.no_drift()
        await self.hv_of(h1).stop_vm(b)
        await self.node.store.update("host", h1, {"managementIp": good_ip})
        await self.ok(ReconnectHostMsg(uuid=h1), HOST_SERVICE, h1)
        await self.settle()
        self.assertEqual(await self.where(a), ("Running", h1))
        self.assertEqual(await self.where(b), ("Stopped", None))
        await self.consistent()


class EmbeddedRealVmTests(RealVmScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On the embedded defaults.
    """


class RabbitPostgresRealVmTests(RealVmScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ (fails when either is missing).
    """


class EmbeddedHostStateTests(EmbeddedBackends, HostStateScenario, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """


class RabbitPostgresHostStateTests(RabbitPostgresBackends, HostStateScenario,
                                   LoopbackTestCase):
    """
    On PostgreSQL (a scratch database) and RabbitMQ (the AMQP bus on a random prefix).
    Fails when either is missing.
    """

