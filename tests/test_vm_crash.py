"""
Crash at every point (issue 10, "Tests"): a management node stopped in process after the
k-th flow record or agent call of a VM operation, for every k, then restarted; every job is
resolved, every VM in a final state, and the audit (L{tests.vm_audit}) finds nothing leaked,
in the store or on the simulated agents. Also: the trace id of one create in the bus
messages, the agent's command headers and both sides' log lines.

Note [simulated crash]: a node is one I{life} (L{Life}): its own L{Clock}, its own store
object on the shared in-memory database, its own LocalBus, agent client, callback endpoint
and services. The agent (simulated hosts and disks, on its own clock) and the database are
shared by the lives, as a real agent and PostgreSQL outlive a management node. The node dies
at a crash point (L{CrashPlan}): the call that reached it never returns (its Deferred never
fires) and the life's clock is never advanced again, so nothing of it runs any more: no
rollback, no finish, no queued store write, no timer; what it had in memory is lost. What
it had written (job rows, holders, VM rows) and what the agent had done stay. A new life
with the same node id then starts: its host service reconnects the hosts, its VM service
resolves the interrupted jobs (L{zcontrol.services.vm.base.VmServiceBase.start}).

Crash points (L{CrashPlan}), counted over one operation from the moment it is sent (its
preparation is not counted), or over a recovery from the moment the VM service starts:
 - C{("before-record", k)}: the k-th C{record_job_flow} is never written (the flow did its
   work; its record is lost: the flow is in flight at recovery);
 - C{("after-record", k)}: the k-th C{record_job_flow} is written, then the node dies;
 - C{("before-rollback", k)}, C{("after-rollback", k)}: the same for C{record_job_rollback};
 - C{("before-agent", k)}: the k-th agent command (the agent client's C{call}, whoever sends
   it: the VM service or the primary storage service) is never sent;
 - C{("after-agent", k)}: it is done by the agent, then the node dies before it learns the
   answer.
The worlds are warmed (a VM on every host, so the image is in every host's cache): every
create makes the same agent calls, and a crash during a cache download is not among the
points.

Cost: about 40 s of CPU for the four sweeps and the ten double crashes (each crash point
restarts a node: its host reconnects go through the in-memory HTTP stack).
"""

from __future__ import annotations

import secrets
import uuid as uuidlib
from typing import Any, Callable

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.hypervisor.simulator import GiB
from tests.agent_fakes import CALLBACK_URL, base, make_agent
from tests.vm_audit import audit
from zcontrol.agentclient import AgentClient, CallbackEndpoint
from zcontrol.bus.local import LocalBus
from zcontrol.config import load_config
from zcontrol.core.journal import JOB_NODE_RESTARTED
from zcontrol.core.tracelog import install_node_trace_observer
from zcontrol.db.memory import MemoryStore
from zcontrol.db.query import Query
from zcontrol.services.backupstorage.messages import SERVICE_ID as BACKUP
from zcontrol.services.backupstorage.messages import (
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
)
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host import AddHostMsg, HostService
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.messages import AddImageMsg
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
from zcontrol.services.registry import SERVICE_FACTORIES
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    CreateVmInstanceMsg,
    DestroyVmInstanceMsg,
    MigrateVmMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)
from zcontrol.services.vm.states import FINAL_STATES
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

NODE = "mn-crash"
#: simulated agent slots: KVM hosts 0..2, the Sftp backup storage 7
HOST_SLOTS, BS_SLOT = (0, 1, 2), 7
NFS_URL = "nfs.example:/export/crash"
IMAGE_SIZE, IMAGE_ACTUAL = 4 * GiB, GiB


class NodeDied(Exception):
    """
    Raised by L{World.result} when the life died before the Deferred it waits for fired.
    """


@attrs.define
class CrashPlan:
    """
    Where one life dies: C{point} is C{(kind, k)} (see the module docstring), or None to
    count the points of a whole run in C{counts}.
    """

    point: tuple[str, int] | None = None
    counts: dict[str, int] = attrs.Factory(lambda: {"record": 0, "rollback": 0, "agent": 0})
    armed: bool = False
    dead: bool = False
    #: arm when the life starts the service of this id (its recovery is then counted)
    arm_at: str | None = None

    def died(self) -> Deferred:
        self.dead = True
        return Deferred()  # never fires: the node is gone

    def points(self) -> list[tuple[str, int]]:
        """
        Every crash point of a run that counted C{counts}.
        """
        return [(f"{when}-{kind}", k) for kind in ("record", "rollback", "agent")
                for k in range(1, self.counts[kind] + 1) for when in ("before", "after")]


class Life:
    """
    One life of the management node (Note [simulated crash]).
    """

    def __init__(self, world: World, plan: CrashPlan | None = None,
                 wait_reconnect: bool = True):
        self.world = world
        self.plan = plan
        #: whether L{start} returns only once the hosts are reconnected
        self.wait_reconnect = wait_reconnect
        self.clock = Clock()
        self.store = MemoryStore(self.clock, name=world.db_name)
        self.bus = LocalBus(self.clock, node_id=NODE)
        self.config = load_config(None, {"vm": {"probe_timeout": 10.0,
                                                "rollback_timeout": 30.0,
                                                "command_timeout": 30.0}})
        self.agents = AgentClient(self.clock, world.to_agent, CALLBACK_URL,
                                  default_timeout=60.0)
        self.endpoint = CallbackEndpoint(self.agents, clock=self.clock)
        world.to_endpoint.stub = StubTreq(self.endpoint.resource())
        self.services: list[Any] = []
        self.vm: Any = None
        self.hosts: Any = None
        self.reconnected: Deferred | None = None
        self.reactor = self.clock  # for the services' make(node)

    def getServiceNamed(self, name: str) -> Any:
        """
        The node's parts as C{make(node)} asks for them: only C{host} (its C{reconnected}).
        """
        assert name == "host", name
        return self

    @property
    def dead(self) -> bool:
        return self.plan is not None and self.plan.dead

    def start(self) -> None:
        """
        Start the store, the bus, the host service (reconnecting the hosts) and every
        service of the registry (the VM service resolves the interrupted jobs); stop there
        if the life dies meanwhile.
        """
        try:
            self._start()
        except NodeDied:
            pass

    def _start(self) -> None:
        w = self.world
        if self.plan is not None:
            self._inject()
        w.result(self, self.store.start())
        self.bus.start()
        self.hosts = HostService(self.clock, self.bus, self.store, self.agents,
                                 self.config.host)
        for path, handler in self.hosts.report_handlers().items():
            self.endpoint.on_report(path, handler)
        self.hosts.start(track=False)
        # As the node does (zcontrol.node.HostComponent): the reconnect runs in the
        # background while the services start (the VM service's recovery among them).
        self.reconnected = self.hosts.reconnect_all()
        for dotted in SERVICE_FACTORIES:
            service = namedAny(dotted)(self)
            if self.plan is not None and self.plan.arm_at == service.service_id:
                self.plan.armed = True
            w.result(self, maybeDeferred(service.start))
            self.services.append(service)
            if getattr(service, "service_id", None) == "vmInstance":
                self.vm = service
        if self.wait_reconnect:
            w.result(self, self.reconnected)

    def _inject(self) -> None:
        """
        Count (and die at) the points of L{CrashPlan} while it is armed: the store's
        C{record_job_flow} and C{record_job_rollback} (flows recorded, rollbacks
        journaled) and the agent client's C{call} (every agent command of the node: the VM
        service's, and the primary storage's through the host service).
        """
        plan = self.plan
        assert plan is not None

        def counted(kind: str, fn: Callable[..., Deferred]) -> Callable[..., Deferred]:
            def call(*args: Any, **kw: Any) -> Deferred:
                if not plan.armed or plan.dead:
                    return fn(*args, **kw)
                plan.counts[kind] += 1
                k = plan.counts[kind]
                if plan.point == (f"before-{kind}", k):
                    return plan.died()
                d = fn(*args, **kw)
                if plan.point == (f"after-{kind}", k):
                    return d.addBoth(lambda _: plan.died())
                return d

            return call

        self.store.record_job_flow = counted(  # type: ignore[method-assign]
            "record", self.store.record_job_flow)
        self.store.record_job_rollback = counted(  # type: ignore[method-assign]
            "rollback", self.store.record_job_rollback)
        self.agents.call = counted("agent", self.agents.call)  # type: ignore[method-assign]


class World:
    """
    The shared database and agent, and the lives of the node.
    """

    def __init__(self) -> None:
        self.db_name = f"crash-{secrets.token_hex(6)}"
        self.agent_clock = Clock()
        self.to_endpoint = _LateStub()
        self.agent, self.cluster = make_agent(self.to_endpoint, self.agent_clock,
                                              host_count=8)
        self.to_agent = _Unreachable(StubTreq(self.agent.app.resource()))
        self.lives: list[Life] = []
        #: a reader of the database on its own clock (for a dead life's leftovers)
        self.inspector = MemoryStore(Clock(), name=self.db_name, shuffle=False)
        self.inspector.start()

    def inspect(self, fn: Callable[[MemoryStore], Deferred]) -> Any:
        """
        C{fn(inspector)}'s result, read at once.
        """
        d = fn(self.inspector)
        self.inspector.flush()
        result: list[Any] = []
        d.addBoth(result.append)
        if hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def life(self, plan: CrashPlan | None = None, wait_reconnect: bool = True) -> Life:
        life = Life(self, plan, wait_reconnect)
        self.lives.append(life)
        life.start()
        return life

    def pump(self, life: Life, rounds: int = 40) -> None:
        """
        Run what is ready on the agent and on C{life} (nothing once it is dead).
        """
        for _ in range(rounds):
            if life.dead:
                return
            self.agent_clock.advance(0)
            self.to_agent.flush()
            self.to_endpoint.stub.flush()
            life.clock.advance(0)

    def result(self, life: Life, d: Deferred, bound: int = 200) -> Any:
        """
        Pump until C{d} fired (at most C{bound} times); its result.
        """
        for _ in range(bound):
            if d.called or life.dead:
                break
            self.pump(life, 5)
        if not d.called:
            if life.dead:
                raise NodeDied()
            raise AssertionError(f"{d!r} did not fire")
        result: list[Any] = []
        d.addBoth(result.append)
        if isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def send(self, life: Life, msg: Any, service_id: str, resource_uuid: str | None = None
             ) -> Deferred:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        return life.bus.send(msg, 300)

    def ok(self, life: Life, msg: Any, service_id: str, resource_uuid: str | None = None
           ) -> Any:
        reply = self.result(life, self.send(life, msg, service_id, resource_uuid))
        if not reply.success:
            raise AssertionError(f"{type(msg).__name__}: {reply.error}")
        return reply

    def rows(self, life: Life, resource: str, *conditions: str) -> list[dict]:
        return self.result(life, life.store.query(
            resource, Query(conditions=list(conditions), limit=10_000))).inventories

    def build_inventory(self, life: Life, storage: str = "LocalStorage") -> dict[str, Any]:
        """
        Zone, cluster, three hosts, LocalStorage (or NFS), an Sftp backup storage with an
        image, an instance offering, an L2/L3 with a range.
        """
        z = self.ok(life, CreateZoneMsg(name="z"), ZONE_SERVICE).inventory["uuid"]
        c = self.ok(life, CreateClusterMsg(zone_uuid=z, name="c", hypervisor_type="KVM"),
                    CLUSTER_SERVICE).inventory["uuid"]
        hosts = [self.ok(life, AddHostMsg(name=f"h{i}", zone_uuid=z, cluster_uuid=c,
                                          management_ip=base(i)),
                         HOST_SERVICE).inventory["uuid"] for i in HOST_SLOTS]
        if storage == "LocalStorage":
            ps = self.ok(life, AddLocalPrimaryStorageMsg(name="local", zone_uuid=z,
                                                         url="/zstack_ps"),
                         PRIMARY).inventory["uuid"]
        else:
            ps = self.ok(life, AddNfsPrimaryStorageMsg(name="nfs", zone_uuid=z,
                                                       url=NFS_URL),
                         PRIMARY).inventory["uuid"]
        self.ok(life, AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ps,
                                                       cluster_uuid=c), PRIMARY, ps)
        bs = self.ok(life, AddSftpBackupStorageMsg(name="bs", url="/zstack_bs",
                                                   hostname=base(BS_SLOT),
                                                   password="password"),
                     BACKUP).inventory["uuid"]
        self.ok(life, AttachBackupStorageToZoneMsg(backup_storage_uuid=bs, zone_uuid=z),
                BACKUP, bs)
        image = self.ok(life, AddImageMsg(
            name="img", url=f"http://images.example/c.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[bs]),
            IMAGE_SERVICE).inventory
        if image["status"] != "Ready":
            raise AssertionError(f"image not Ready: {image}")
        offering = self.ok(life, CreateInstanceOfferingMsg(
            name="small", cpu_num=1, memory_size=GiB, cpu_speed=1000),
            OFFERING_SERVICE).inventory["uuid"]
        l2 = self.ok(life, CreateL2NoVlanNetworkMsg(name="l2", zone_uuid=z,
                                                    physical_interface="eth0"),
                     L2_SERVICE_ID).inventory["uuid"]
        self.ok(life, AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=c),
                L2_SERVICE_ID, l2)
        l3 = self.ok(life, CreateL3NetworkMsg(name="l3", l2_network_uuid=l2),
                     L3_SERVICE_ID).inventory["uuid"]
        self.ok(life, AddIpRangeMsg(l3_network_uuid=l3, name="r", start_ip="10.0.0.10",
                                    end_ip="10.0.0.250", netmask="255.255.255.0",
                                    gateway="10.0.0.1"), L3_SERVICE_ID, l3)
        return {"zone": z, "cluster": c, "hosts": hosts, "ps": ps, "image": image["uuid"],
                "offering": offering, "l3": l3}

    def audit(self, life: Life) -> list[str]:
        return self.result(life, Deferred.fromCoroutine(audit(life.store, self.cluster)))


#: An operation under test: C{prepare(world, life, inv, vm)} brings VM C{vm} to the state
#: the operation starts from (not counted, never crashed), C{message(inv, vm)} is the
#: operation's message (sent to the VM service, routed by the VM uuid).
@attrs.frozen
class Operation:
    name: str
    prepare: Callable[[World, Life, dict, str], None]
    message: Callable[[dict, str], Any]
    #: the VM's states after a recovery (None: removed): finished forward or rolled back
    ends: frozenset = frozenset()


def _create_msg(inv: dict, vm: str, strategy: str = "InstantStart") -> Any:
    return CreateVmInstanceMsg(name=f"vm-{vm[:6]}", instance_offering_uuid=inv["offering"],
                               image_uuid=inv["image"], l3_network_uuids=[inv["l3"]],
                               uuid=vm, strategy=strategy)


def _created(world: World, life: Life, inv: dict, vm: str, strategy: str = "InstantStart"
             ) -> None:
    world.ok(life, _create_msg(inv, vm, strategy), VM_SERVICE, vm)


def _stopped(world: World, life: Life, inv: dict, vm: str) -> None:
    _created(world, life, inv, vm)
    world.ok(life, StopVmInstanceMsg(uuid=vm), VM_SERVICE, vm)


OPERATIONS = {
    "create": Operation("create", lambda *a: None, _create_msg,
                        frozenset({"Running", None})),
    "start": Operation("start", _stopped, lambda inv, vm: StartVmInstanceMsg(uuid=vm),
                       frozenset({"Running", "Stopped"})),
    "stop": Operation("stop", _created, lambda inv, vm: StopVmInstanceMsg(uuid=vm),
                      frozenset({"Running", "Stopped"})),
    # on shared storage only (CrashAtEveryPointTests.test_migrate runs on NFS): the VM ends
    # Running, on its source (rolled back) or on its destination (forward)
    "migrate": Operation("migrate", _created,
                         lambda inv, vm: MigrateVmMsg(vm_instance_uuid=vm),
                         frozenset({"Running"})),
    # destroys always finish forward (each flow is idempotent)
    "destroy": Operation("destroy", _created, lambda inv, vm: DestroyVmInstanceMsg(uuid=vm),
                         frozenset({"Destroyed"})),
}


class Scenario:
    """
    One world (one inventory) through which crash points are tried one after the other:
    each on a new VM, each followed by a restart; the world must audit clean after each.
    """

    def __init__(self, test: SynchronousTestCase, storage: str = "LocalStorage"):
        self.test = test
        self.world = World()
        self.life = self.world.life(CrashPlan())
        self.inv = self.world.build_inventory(self.life, storage)
        # one VM per host first: the image is in every host's cache, so that every create
        # makes the same agent calls (the first one on a host also downloads the image)
        for host in self.inv["hosts"]:
            vm = uuidlib.uuid4().hex
            msg = _create_msg(self.inv, vm)
            msg.host_uuid = host
            self.world.ok(self.life, msg, VM_SERVICE, vm)
        self.outcomes: list[tuple[Any, ...]] = []
        self._points: dict[str, list[tuple[str, int]]] = {}

    def points(self, op: Operation) -> list[tuple[str, int]]:
        """
        The crash points of C{op} (counted once per scenario).
        """
        if op.name not in self._points:
            self._points[op.name] = self.count(op).points()
        return self._points[op.name]

    def count(self, op: Operation) -> CrashPlan:
        """
        Run C{op} once without a crash, counting its points.
        """
        plan = self.life.plan
        vm = uuidlib.uuid4().hex
        op.prepare(self.world, self.life, self.inv, vm)
        plan.counts = {k: 0 for k in plan.counts}
        plan.armed = True
        try:
            self.world.ok(self.life, op.message(self.inv, vm), VM_SERVICE, vm)
        finally:
            plan.armed = False
        self.check(f"{op.name} without a crash")
        return attrs.evolve(plan, counts=dict(plan.counts), armed=False)

    def crash(self, op: Operation, point: tuple[str, int],
              again: tuple[str, int] | None = None) -> dict:
        """
        Run C{op} on a new VM and kill the node at C{point}; restart it (killing that life
        too at C{again} of its recovery, and restarting once more), wait for the recovery,
        check. The VM's row (or None) after the recovery.
        """
        world = self.world
        vm = uuidlib.uuid4().hex
        op.prepare(world, self.life, self.inv, vm)
        plan = self.life.plan
        plan.counts = {k: 0 for k in plan.counts}
        plan.point, plan.armed = point, True
        sent = world.send(self.life, op.message(self.inv, vm), VM_SERVICE, vm)
        world.pump(self.life, 400)
        what = f"{op.name} killed at {point}" + (f", recovery killed at {again}" if again
                                                 else "")
        self.test.assertTrue(plan.dead, f"{what}: the point was never reached"
                             f" (reply: {sent.result if sent.called else None})")
        self.test.assertFalse(sent.called, f"{what}: the dead node replied")
        job = self.job_of(vm)
        if again is not None:
            # killed again during its recovery, if the recovery gets that far
            second = world.life(CrashPlan(point=again, arm_at=VM_SERVICE))
            world.pump(second, 400)
        self.life = world.life(CrashPlan())
        outcomes = world.result(self.life, self.life.vm.recovered)
        retries = self.settle()
        row = world.result(self.life, self.life.store.get("vmInstance", vm))
        job_row = world.result(self.life, self.life.store.get("job", job)) if job else None
        self.outcomes.append((op.name, point, again, [o["outcome"] for o in outcomes],
                              retries, row and row["state"], job_row and job_row["state"]))
        self.check(what)
        self.test.assertIn(row and row["state"], op.ends, f"{what}: the VM's state")
        if job_row is not None:
            self.test.assertIn(job_row["state"], ("Succeeded", "Failed"), what)
            if job_row["state"] == "Failed":
                self.test.assertEqual(job_row["error"]["code"], JOB_NODE_RESTARTED, what)
        return row

    def settle(self, rounds: int = 3) -> int:
        """
        Let the VM service retry the jobs its recovery left C{Running} (a rollback that
        could not reach an agent yet: L{VmServiceBase.retry_interrupted} runs every
        C{vm.recovery_interval} seconds), at most C{rounds} times. How many rounds it took.
        """
        life, world = self.life, self.world
        for i in range(rounds + 1):
            if not world.rows(life, "job", "state=Running"):
                return i
            life.clock.advance(life.config.vm.recovery_interval)
            world.pump(life, 200)
        return rounds + 1

    def job_of(self, vm: str) -> str | None:
        """
        The job left Running for C{vm} (read by the world's inspector: the life is dead).
        """
        jobs = [j for j in self.world.inspect(lambda s: s.query(
            "job", Query(conditions=[f"resourceUuid={vm}", "state=Running"]))).inventories]
        return jobs[0]["uuid"] if jobs else None

    def check(self, what: str) -> None:
        """
        No job Running, every VM in a final state, the audit clean.
        """
        world, life = self.world, self.life
        running = [(j["apiName"], j["resourceUuid"]) for j in world.rows(life, "job")
                   if j["state"] == "Running"]
        self.test.assertEqual(running, [], f"{what}: jobs left Running")
        moving = [(v["uuid"], v["state"]) for v in world.rows(life, "vmInstance")
                  if v["state"] not in FINAL_STATES]
        self.test.assertEqual(moving, [], f"{what}: VMs not in a final state")
        self.test.assertEqual(world.audit(life), [], f"{what}: the audit")


class CrashAtEveryPointTests(SynchronousTestCase):
    """
    For each operation, every crash point in turn (Note [simulated crash]).
    """

    def sweep(self, name: str, storage: str = "LocalStorage") -> None:
        scenario = Scenario(self, storage)
        op = OPERATIONS[name]
        points = scenario.count(op).points()
        self.assertGreater(len(points), 2, f"{name}: {points}")
        for point in points:
            scenario.crash(op, point)
        self.outcomes = scenario.outcomes

    def test_create(self) -> None:
        """
        A create killed at each of its points ends Running (finished at recovery) or
        rolled back (the VM removed or Error), nothing leaked.
        """
        self.sweep("create")

    def test_start(self) -> None:
        """
        A start of a Stopped VM killed at each point.
        """
        self.sweep("start")

    def test_stop(self) -> None:
        """
        A stop of a Running VM killed at each point.
        """
        self.sweep("stop")

    def test_destroy(self) -> None:
        """
        A destroy of a Running VM killed at each point.
        """
        self.sweep("destroy")

    def test_migrate(self) -> None:
        """
        A live migration (NFS) of a Running VM killed at each point.
        """
        self.sweep("migrate", "NFS")


class CrashDuringRecoveryTests(SynchronousTestCase):
    """
    A node killed during an operation, restarted, killed again during its recovery,
    restarted again: the second recovery finishes what the first began.
    """

    @settings(max_examples=10)
    @given(st.data())
    def test_killed_twice(self, data: Any) -> None:
        """
        Any operation, any crash point, then any point of the recovery (a rollback record,
        before or after; an agent call, before or after): every job resolved, every VM in
        a final state, the audit clean. Each example on a world of its own.
        """
        name = data.draw(st.sampled_from(sorted(set(OPERATIONS) - {"migrate"})),
                         label="operation")
        point = data.draw(st.sampled_from(_points(name)), label="point")
        again = (data.draw(st.sampled_from(["before-rollback", "after-rollback",
                                            "before-agent", "after-agent"]), label="again"),
                 data.draw(st.integers(1, 3), label="k"))
        Scenario(self).crash(OPERATIONS[name], point, again)


_POINTS: dict[str, list[tuple[str, int]]] = {}


def _points(name: str) -> list[tuple[str, int]]:
    """
    The crash points of operation C{name} on a warm world (counted once per process).
    """
    if name not in _POINTS:
        class Counting(SynchronousTestCase):
            def runTest(self) -> None:
                pass

        _POINTS[name] = Scenario(Counting()).points(OPERATIONS[name])
    return _POINTS[name]


class TraceTests(SynchronousTestCase):
    """
    One trace id per job (issue 10, "Deliver" 5): the job uuid of a create rides every
    bus message the job sends, every agent command it causes (the C{X-Trace-Id} header),
    and every log line it causes on the node and on the agent.
    """

    def test_one_create(self) -> None:
        """
        Everything a create sends or logs carries its job uuid; nothing else does.
        """
        world = World()
        life = world.life()
        inv = world.build_inventory(life)

        # the messages as the services receive them, and the events published
        sent: list[Any] = []
        handle, publish = life.bus._handle, life.bus.publish

        def handling(handler: Any, msg: Any) -> Any:
            sent.append(msg)
            return handle(handler, msg)

        def publishing(event: Any, *a: Any, **kw: Any) -> Any:
            sent.append(event)
            return publish(event, *a, **kw)

        life.bus._handle = handling  # type: ignore[method-assign]
        life.bus.publish = publishing  # type: ignore[method-assign]
        headers: list[tuple[str, str | None]] = []
        post = world.to_agent.post

        def posting(url: str, *a: Any, **kw: Any) -> Any:
            h = kw.get("headers") or {}
            value = h.get(p.TRACE_ID_HEADER) or h.get(p.TRACE_ID_HEADER.encode())
            if isinstance(value, list):
                value = value[0]
            if isinstance(value, bytes):
                value = value.decode()
            headers.append((url, value))
            return post(url, *a, **kw)

        world.to_agent.post = posting  # type: ignore[method-assign]
        observer = install_node_trace_observer()
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        vm = uuidlib.uuid4().hex
        reply = world.ok(life, _create_msg(inv, vm), VM_SERVICE, vm)
        globalLogPublisher.removeObserver(events.append)
        job = reply.job_uuid
        self.assertRegex(job or "", r"^[0-9a-f]{32}$")
        self.assertEqual(world.result(life, life.store.get("job", job))["resourceUuid"], vm)

        # bus: every message after the create itself, sent by the job
        create, *caused = sent
        self.assertIsInstance(create, CreateVmInstanceMsg)
        self.assertEqual([(type(m).__name__, m.trace_id) for m in caused
                          if m.trace_id != job], [])
        kinds = {type(m).__name__ for m in caused}
        self.assertIn("KVMHostAsyncHttpCallMsg", kinds)
        self.assertIn("VmInstanceStateChangedEvent", kinds)
        # agent: every command the create caused carries the header
        self.assertGreaterEqual(len(headers), 2)
        self.assertEqual([(u, t) for u, t in headers if t != job], [])
        # logs: node lines and agent lines of the job end in [trace=<job>]
        traced = [e for e in events if e.get("trace_id") == job]
        node_lines = [e for e in traced
                      if not str(e.get("log_namespace", "")).startswith("agent")]
        agent_lines = [e for e in traced
                       if str(e.get("log_namespace", "")).startswith("agent")]
        self.assertTrue(node_lines, [e.get("log_format") for e in events])
        self.assertTrue(agent_lines, [e.get("log_format") for e in events])
        for e in traced:
            self.assertTrue(formatEventAsClassicLogText(e).rstrip().endswith(
                f"[trace={job}]"), e)
        self.assertEqual(world.audit(life), [])


class _Unreachable:
    """
    The node's HTTP client to the agent; the base URLs in C{down} are unreachable (their
    requests fail as a refused connection would).
    """

    def __init__(self, stub: StubTreq):
        self.stub = stub
        self.down: set[str] = set()

    def post(self, url: str, *args: Any, **kwargs: Any) -> Deferred:
        if any(url.startswith(b + "/") for b in self.down):
            return fail(ConnectionRefusedError(f"{url} is down"))
        return self.stub.post(url, *args, **kwargs)

    def flush(self) -> None:
        self.stub.flush()


class AgentUnreachableAtRestartTests(SynchronousTestCase):
    """
    A node killed during a create restarts while the agent is unreachable: its recovery
    cannot roll back what the agent made (the job stays Running); once the agent is back,
    the retry finishes the rollback and nothing is left.
    """

    def test_create_rolled_back_when_the_agent_is_back(self) -> None:
        """
        Killed with the root volume made on the agent but not recorded: the recovery rolls
        back every flow but that one; the retry deletes the bits; the audit is clean (no
        volume row, capacity or bits left).
        """
        scenario = Scenario(self)
        world = scenario.world
        op = OPERATIONS["create"]
        # flow 5 is instantiate-volumes: the bits are made, the record is lost
        point = ("before-record", 5)
        vm = uuidlib.uuid4().hex
        plan = scenario.life.plan
        plan.counts = {k: 0 for k in plan.counts}
        plan.point, plan.armed = point, True
        world.send(scenario.life, op.message(scenario.inv, vm), VM_SERVICE, vm)
        world.pump(scenario.life, 400)
        self.assertTrue(plan.dead)
        made = world.inspect(lambda s: s.query("volume", Query(
            conditions=[f"vmInstanceUuid={vm}"]))).inventories
        self.assertEqual([v["status"] for v in made], ["Ready"])

        world.to_agent.down = {base(i) for i in HOST_SLOTS}
        life = scenario.life = world.life(CrashPlan(), wait_reconnect=False)
        # the hosts stay Connecting; the recovery waits for them probe_timeout, then goes on
        life.clock.advance(life.config.vm.probe_timeout)
        outcomes = world.result(life, life.vm.recovered)
        self.assertEqual([o["outcome"] for o in outcomes], ["left-running"])
        self.assertEqual([e["flow"] for e in outcomes[0]["errors"]], ["instantiate-volumes"])

        world.to_agent.down = set()
        for _ in range(5):
            life.clock.advance(life.config.host.echo_interval)
            world.pump(life, 100)
        world.result(life, life.reconnected)
        self.assertEqual(len(world.rows(life, "host", "status=Connected")), len(HOST_SLOTS))
        self.assertEqual(scenario.settle(), 1)
        self.assertIsNone(world.result(life, life.store.get("vmInstance", vm)))
        scenario.check(f"create killed at {point}, recovered with the agent back")
        self.assertEqual(world.rows(life, "volume", f"uuid={made[0]['uuid']}"), [])


class _LateStub:
    """
    The agent's HTTP client for callbacks: the current life's endpoint.
    """

    stub: Any = None

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return self.stub.post(*args, **kwargs)


class WorldTests(SynchronousTestCase):
    """
    The harness itself: a life builds the inventory, dies, and the next life serves it.
    """

    def test_inventory_and_restart(self) -> None:
        """
        The inventory built by one life audits clean; a second life (same node id, same
        database and agent) reconnects the hosts and audits clean too.
        """
        world = World()
        first = world.life()
        inv = world.build_inventory(first)
        self.assertEqual(world.audit(first), [])
        self.assertEqual(len(world.rows(first, "host", "status=Connected")), 3)
        second = world.life()
        self.assertEqual(len(world.rows(second, "host", "status=Connected")), 3)
        self.assertEqual(world.audit(second), [])
        self.assertTrue(inv["l3"])

