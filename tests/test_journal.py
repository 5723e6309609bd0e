"""
Journaled flow chains and their recovery (L{zcontrol.core.journal}), and the store's
C{record_job_flow} on the in-memory store, SQLite and PostgreSQL.

A toy job kind takes, for a holder C{("VmInstanceVO", <resource>)}: host capacity, an IP,
primary storage capacity, then a last flow succeeds or fails. Crashes are simulated in
process: a flow (or the final C{finish_job}) never returns, its chain is abandoned, and a
"restarted node" (a new store object on the same database, new kinds, the same node uuid)
runs L{recover_jobs}.
"""

from __future__ import annotations

import secrets
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.db_support import PostgresStoreFactory, SQLiteStoreFactory
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.journal import (
    JOB_NODE_RESTARTED,
    JOB_TAKEN_OVER,
    JobKind,
    JournaledFlow,
    JournaledFlowChain,
    recover_jobs,
)
from zcontrol.db import Query, open_store
from zcontrol.db.memory import MemoryStore

NODE = "node-1"
HOST, L3, PS = "host-1", "l3-1", "ps-1"
CPU, MEMORY, SIZE = 2, 64, 100
FLOWS = ["host", "ip", "storage", "finish"]
#: Every point a node can stop at: before a flow did anything, after its work but before its
#: record, and after the last record but before the job's finish.
CRASH_POINTS = [(f, p) for f in FLOWS for p in ("before", "after")] + [("finish_job", "-")]


def holder(ctx: Any) -> tuple[str, str]:
    return ("VmInstanceVO", ctx["resource"])


class Plan:
    """
    Faults of one run: C{fail} (a flow name that raises after its work), C{hang} (a crash
    point); C{reached} fires when the hang is reached.
    """

    def __init__(self, fail: str | None = None, hang: tuple[str, str] | None = None):
        self.fail = fail
        self.hang = hang
        self.reached: Deferred = Deferred()
        self.rollbacks: list[tuple[str, Any]] = []

    def point(self, name: str, phase: str) -> Deferred | None:
        if self.hang == (name, phase):
            self.reached.callback(None)
            return Deferred()  # never fires: the node "stopped" here
        return None


class _Step(JournaledFlow):
    def __init__(self, store: Any, plan: Plan):
        self.store = store
        self.plan = plan

    async def run(self, ctx: Any) -> dict:
        hang = self.plan.point(self.name, "before")
        if hang is not None:
            await hang
        took = await self.take(ctx)
        hang = self.plan.point(self.name, "after")
        if hang is not None:
            await hang
        if self.plan.fail == self.name:
            raise OperationError.of(SYS.OPERATION_ERROR, f"injected failure in {self.name}")
        return took

    async def rollback(self, ctx: Any, took: Any) -> None:
        self.plan.rollbacks.append((self.name, took))
        await self.give_back(ctx, took)


class HostFlow(_Step):
    name = "host"

    async def take(self, ctx: Any) -> dict:
        await self.store.reserve_host_capacity(HOST, CPU, MEMORY, holder(ctx))
        return {"host": HOST, "cpu": CPU, "memory": MEMORY}

    async def give_back(self, ctx: Any, took: Any) -> None:
        await self.store.release_host_capacity(took["host"] if took else HOST, holder(ctx))


class IpFlow(_Step):
    name = "ip"

    async def take(self, ctx: Any) -> dict:
        row = await self.store.allocate_ip(L3, holder(ctx))
        return {"l3": L3, "ip": row["ip"]}

    async def give_back(self, ctx: Any, took: Any) -> None:
        await self.store.release_ip(took["l3"] if took else L3, holder(ctx))

    async def probe(self, ctx: Any) -> bool:
        rows = (await self.store.query("usedIp", Query(
            conditions=[f"holderUuid={ctx['resource']}"]))).inventories
        return bool(rows)


class StorageFlow(_Step):
    name = "storage"

    async def take(self, ctx: Any) -> dict:
        await self.store.reserve_primary_storage_capacity(PS, SIZE, holder(ctx))
        return {"primaryStorage": PS, "size": SIZE}

    async def give_back(self, ctx: Any, took: Any) -> None:
        await self.store.release_primary_storage_capacity(PS, holder(ctx))


class FinishFlow(_Step):
    name = "finish"

    async def take(self, ctx: Any) -> dict:
        return {}

    async def give_back(self, ctx: Any, took: Any) -> None:
        return None


def toy_kind(store: Any, plan: Plan | None = None, **options: Any) -> JobKind:
    plan = plan or Plan()
    return JobKind("CreateToy", [cls(store, plan) for cls in
                                 (HostFlow, IpFlow, StorageFlow, FinishFlow)], **options)


class _HangingFinish:
    """
    A store whose C{finish_job} never returns (a crash after the last record).
    """

    def __init__(self, store: Any, plan: Plan):
        self._store = store
        self._plan = plan

    def finish_job(self, *args: Any, **kwargs: Any) -> Deferred:
        self._plan.reached.callback(None)
        return Deferred()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _KeepPlan(Plan):
    """
    A plan that keeps its hang's Deferred (C{hung}) so the "stopped" node can go on.
    """

    def point(self, name: str, phase: str) -> Deferred | None:
        if self.hang == (name, phase):
            self.reached.callback(None)
            self.hung: Deferred = Deferred()
            return self.hung
        return None


class _FailingRecord:
    """
    A store whose C{record_job_flow} of flow C{name} fails (a store error).
    """

    def __init__(self, store: Any, name: str):
        self._store = store
        self._name = name

    def record_job_flow(self, uuid: str, node: str, name: str, took: Any) -> Deferred:
        if name == self._name:
            from twisted.internet.defer import fail
            return fail(OperationError.of(SYS.INTERNAL, "database down"))
        return self._store.record_job_flow(uuid, node, name, took)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class JournalScenarios:
    """
    The scenarios, on C{self.store} (mixed with a store-opening base and a TestCase).
    """

    async def seed(self) -> None:
        s = self.store
        await s.insert("zone", {"uuid": "zone-1", "name": "zone1"})
        await s.insert("cluster", {"uuid": "cluster-1", "name": "c", "zoneUuid": "zone-1",
                                   "hypervisorType": "KVM"})
        await s.add_host({"uuid": HOST, "name": "h", "zoneUuid": "zone-1",
                          "clusterUuid": "cluster-1", "managementIp": "192.168.0.1",
                          "hypervisorType": "KVM", "cpuNum": 8, "totalCpuCapacity": 64,
                          "totalMemoryCapacity": 4096})
        await s.insert("primaryStorage", {"uuid": PS, "name": "ps", "zoneUuid": "zone-1",
                                          "url": "/ps", "type": "LocalStorage",
                                          "totalCapacity": 10000, "availableCapacity": 10000})
        await s.insert("l2Network", {"uuid": "l2-1", "name": "l2", "zoneUuid": "zone-1",
                                     "physicalInterface": "eth0"})
        await s.insert("l3Network", {"uuid": L3, "name": "l3", "l2NetworkUuid": "l2-1",
                                     "zoneUuid": "zone-1"})
        await s.insert("ipRange", {"uuid": "range-1", "l3NetworkUuid": L3,
                                   "startIp": "10.0.0.10", "endIp": "10.0.0.60",
                                   "netmask": "255.255.255.0", "gateway": "10.0.0.1"})

    async def holdings(self, store: Any = None) -> dict[str, Any]:
        """
        Who holds what: host and storage holders, IP holders, the available figures.
        """
        s = store or self.store
        host = await s.get("host", HOST)
        ps = await s.get("primaryStorage", PS)
        hh = await s.host_capacity_holders(HOST, limit=1000)
        ips = (await s.query("usedIp", Query(limit=1000))).inventories
        return {
            "host": sorted(h["holderUuid"] for h in hh["holders"]),
            "ips": sorted(i["holderUuid"] for i in ips),
            "availableMemory": host["availableMemoryCapacity"],
            "availableCpu": host["availableCpuCapacity"],
            "psAvailable": ps["availableCapacity"],
        }

    async def assert_held_by(self, vms: list[str], store: Any = None) -> None:
        """
        Exactly C{vms} hold capacity and IPs, and the recorded figures match the holders.
        """
        s = store or self.store
        self.assertEqual(await s.audit_capacity(), [])
        h = await self.holdings(s)
        self.assertEqual(h["host"], sorted(vms))
        self.assertEqual(h["ips"], sorted(vms))
        self.assertEqual(h["availableMemory"], 4096 - MEMORY * len(vms))
        self.assertEqual(h["psAvailable"], 10000 - SIZE * len(vms))

    async def job(self, uuid: str, store: Any = None) -> dict:
        return await (store or self.store).get("job", uuid)

    async def scenario_success(self) -> None:
        chain = JournaledFlowChain(self.store, NODE, toy_kind(self.store), job_uuid="job-ok")
        row = await chain.run({"name": "toy"}, resource_uuid="vm-ok")
        self.assertEqual(row["state"], "Succeeded")
        self.assertEqual(row["apiName"], "CreateToy")
        self.assertEqual([f["name"] for f in row["flows"]], FLOWS)
        self.assertEqual(row["flows"][0]["took"], {"host": HOST, "cpu": CPU, "memory": MEMORY})
        self.assertTrue(row["flows"][1]["took"]["ip"].startswith("10.0.0."))
        self.assertEqual(row["result"], {"flows": FLOWS})
        await self.assert_held_by(["vm-ok"])

    async def scenario_failure(self, k: int, held: tuple[str, ...] = ()) -> None:
        name = FLOWS[k]
        plan = Plan(fail=name)
        chain = JournaledFlowChain(self.store, NODE, toy_kind(self.store, plan),
                                   job_uuid=f"job-{k}")
        try:
            await chain.run(None, resource_uuid=f"vm-{k}")
        except OperationError as e:
            err = e.error
        else:
            self.fail("the chain succeeded")
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertEqual(err.location, name)
        # rolled back in reverse, the failing flow first with took=None
        self.assertEqual([r[0] for r in plan.rollbacks], list(reversed(FLOWS[: k + 1])))
        self.assertIsNone(plan.rollbacks[0][1])
        self.assertTrue(all(t is not None for _, t in plan.rollbacks[1:]))
        row = await self.job(f"job-{k}")
        self.assertEqual(row["state"], "Failed")
        self.assertEqual(row["error"]["location"], name)
        self.assertEqual([f["name"] for f in row["flows"]], FLOWS[:k])
        await self.assert_held_by(list(held))

    async def crash(self, point: tuple[str, str], vm: str) -> Deferred:
        """
        Start a job that stops at C{point}; return its abandoned Deferred.
        """
        plan = Plan(hang=point)
        store = _HangingFinish(self.store, plan) if point[0] == "finish_job" else self.store
        chain = JournaledFlowChain(store, NODE, toy_kind(self.store, plan),
                                   job_uuid=f"job-{vm}")
        d = chain.run(None, resource_uuid=vm)
        d.addErrback(lambda f: None if plan.reached.called else plan.reached.errback(f))
        await plan.reached
        self.assertFalse(d.called)
        return d

    async def restart_and_recover(self, points: list[tuple[str, str]]) -> None:
        """
        Crash one job at each of C{points}, restart, recover, check, recover again.
        """
        vms = [f"vm-{i}" for i in range(len(points))]
        for point, vm in zip(points, vms, strict=True):
            await self.crash(point, vm)
        other = await self.store.create_job("job-other", "FromANewerVersion", {}, NODE)
        self.assertEqual(other["flows"], [])
        store2 = await self.reopen()  # the restarted node: a new store object, new kinds
        kind = toy_kind(store2)
        results = await recover_jobs(store2, NODE, [kind])
        by_job = {r["job"]: r for r in results}
        done = [vm for p, vm in zip(points, vms, strict=True) if p[0] == "finish_job"]
        for point, vm in zip(points, vms, strict=True):
            row = await self.job(f"job-{vm}", store2)
            if point[0] == "finish_job":
                self.assertEqual(row["state"], "Succeeded", point)
                continue
            self.assertEqual(row["state"], "Failed", point)
            self.assertEqual(row["error"]["code"], JOB_NODE_RESTARTED, point)
            self.assertEqual(row["error"]["location"], point[0], point)
            self.assertIn(repr(point[0]), row["error"]["details"])
            self.assertEqual(by_job[f"job-{vm}"]["outcome"], "rolled-back")
        # the unknown kind is left alone, the rest resolved
        self.assertEqual(by_job["job-other"]["outcome"], "left-running")
        self.assertEqual([j["uuid"] for j in await store2.running_jobs(NODE)], ["job-other"])
        await self.assert_held_by(done, store2)
        before = (await self.holdings(store2),
                  (await store2.query("job", Query(sort="uuid"))).inventories)
        again = await recover_jobs(store2, NODE, [kind])
        self.assertEqual([r["outcome"] for r in again], ["left-running"])
        after = (await self.holdings(store2),
                 (await store2.query("job", Query(sort="uuid"))).inventories)
        self.assertEqual(after, before)

    async def scenario_record(self) -> None:
        s = self.store
        await s.create_job("j1", "CreateToy", {"a": 1}, NODE, "vm-1")
        row = await s.record_job_flow("j1", NODE, "host", {"host": HOST, "cpu": 1})
        self.assertEqual(row["flows"], [{"name": "host", "took": {"host": HOST, "cpu": 1}}])
        row = await s.record_job_flow("j1", NODE, "ip", {"ip": "10.0.0.1"})
        # a retry of the last record (lost acknowledgement) changes nothing
        again = await s.record_job_flow("j1", NODE, "ip", {"ip": "10.0.0.1"})
        self.assertEqual(again["flows"], row["flows"])
        self.assertEqual([f["name"] for f in again["flows"]], ["host", "ip"])
        # another node's record, a bad took, an unknown job
        await self.failure(s.record_job_flow("j1", "node-2", "x", {}),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        await self.failure(s.record_job_flow("j1", NODE, "x", [1]), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(s.record_job_flow("j1", NODE, "", {}), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(s.record_job_flow("nope", NODE, "x", {}), SYS.RESOURCE_NOT_FOUND)
        # claimed by another node: the old owner can neither record nor finish it
        claimed = await s.claim_jobs(NODE, "node-2")
        self.assertEqual([j["flows"] for j in claimed], [again["flows"]])
        await self.failure(s.record_job_flow("j1", NODE, "x", {}),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        await self.failure(s.finish_job("j1", management_node_uuid=NODE),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        await s.record_job_flow("j1", "node-2", "storage", {})
        done = await s.finish_job("j1", management_node_uuid="node-2")
        self.assertEqual(done["state"], "Succeeded")
        self.assertEqual(len(done["flows"]), 3)
        # a finished job records nothing more
        err = await self.failure(s.record_job_flow("j1", "node-2", "x", {}),
                                 SYS.CHANGE_RESOURCE_STATE_ERROR)
        self.assertEqual(err.opaque["actual"]["state"], "Succeeded")

    async def scenario_rollback_marker(self) -> None:
        s = self.store
        await s.create_job("j2", "CreateToy", {}, NODE, "vm-2")
        row = await s.record_job_flow("j2", NODE, "host", {"host": HOST})
        self.assertIsNone(row["rollbackError"])
        self.assertEqual(row["rolledBack"], [])
        first = error_code(SYS.OPERATION_ERROR, "first")
        row = await s.begin_job_rollback("j2", NODE, first)
        self.assertEqual(row["state"], "Running")
        self.assertEqual(row["rollbackError"]["details"], "first")
        # idempotent: the first error is kept
        row = await s.begin_job_rollback("j2", NODE, error_code(SYS.OPERATION_ERROR, "second"))
        self.assertEqual(row["rollbackError"]["details"], "first")
        row = await s.record_job_rollback("j2", NODE, "ip")
        row = await s.record_job_rollback("j2", NODE, "ip")
        row = await s.record_job_rollback("j2", NODE, "host")
        self.assertEqual(row["rolledBack"], ["ip", "host"])
        await self.failure(s.record_job_rollback("j2", NODE, ""), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(s.begin_job_rollback("nope", NODE, first), SYS.RESOURCE_NOT_FOUND)
        await self.failure(s.begin_job_rollback("j2", NODE, "not an error"),
                           SYS.INVALID_ARGUMENT_ERROR)
        # another node's writes are refused
        await self.failure(s.begin_job_rollback("j2", "node-2", first),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        await self.failure(s.record_job_rollback("j2", "node-2", "x"),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        await s.finish_job("j2", error=first, management_node_uuid=NODE)
        await self.failure(s.record_job_rollback("j2", NODE, "x"),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)

    async def failure(self, d: Deferred, code: str) -> Any:
        try:
            result = await d
        except OperationError as e:
            self.assertEqual(e.error.code, code, str(e.error))
            return e.error
        self.fail(f"expected {code}, got {result!r}")


class MemoryJournalTests(JournalScenarios, unittest.TestCase):
    """
    Deterministic: MemoryStore on a Clock, every coroutine driven to its end by C{flush}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.name = f"journal-{secrets.token_hex(4)}"
        self.stores: list[MemoryStore] = []
        self.store = self.open()
        self.go(self.seed())

    def tearDown(self) -> None:
        for s in self.stores:
            self.successResultOf(s.stop())

    def open(self) -> MemoryStore:
        s = MemoryStore(self.clock, name=self.name)
        self.stores.append(s)
        d = s.start()
        s.flush()
        self.successResultOf(d)
        return s

    async def reopen(self) -> MemoryStore:
        return self.open()

    def go(self, coro: Any) -> Any:
        d = Deferred.fromCoroutine(coro)
        for s in self.stores:
            s.flush()
        return self.successResultOf(d)

    def test_success(self) -> None:
        """
        Every flow recorded with what it took, the job Succeeded, the VM holds its share.
        """
        self.go(self.scenario_success())

    def test_failure_at_each_flow(self) -> None:
        """
        A failure at flow k: the k+1 flows rolled back in reverse, nothing held, the job
        Failed naming the flow.
        """
        for k in range(len(FLOWS)):
            self.go(self.scenario_failure(k))

    def test_crash_at_every_point(self) -> None:
        """
        A node stopped at any point (before a flow, after its work but before its record,
        after the last record): recovery finishes every job, nothing leaks, twice is once.
        """
        for point in CRASH_POINTS:
            self.tearDown()
            self.setUp()
            self.go(self.restart_and_recover([point]))

    def test_crash_at_every_point_at_once(self) -> None:
        """
        One job stopped at each point, all recovered together by the restarted node.
        """
        self.go(self.restart_and_recover(CRASH_POINTS))

    @settings(max_examples=40, deadline=None)
    @given(faults=st.lists(st.one_of(st.none(), st.sampled_from(FLOWS),
                                     st.sampled_from(CRASH_POINTS)), min_size=1, max_size=8),
           seed=st.integers(0, 2**16))
    def test_concurrent_jobs_property(self, faults: list, seed: int) -> None:
        """
        Property: jobs run concurrently (the store runs each turn's operations in a random
        order), each succeeding, failing at a flow or stopped at a crash point; after the
        restart's recovery no job is Running, exactly the succeeded ones (and those stopped
        after their last record) hold capacity and an IP, the audit finds no drift, and a
        second recovery changes nothing.
        """
        self.tearDown()
        self.clock = Clock()
        self.name = f"journal-{secrets.token_hex(4)}"
        self.stores = []
        self.store = MemoryStore(self.clock, name=self.name, seed=seed)
        self.stores.append(self.store)
        d = self.store.start()
        self.store.flush()
        self.successResultOf(d)
        self.go(self.seed())
        runs = []
        for i, fault in enumerate(faults):
            plan = Plan(fail=fault) if isinstance(fault, str) else Plan(hang=fault)
            store = (_HangingFinish(self.store, plan) if fault == ("finish_job", "-")
                     else self.store)
            chain = JournaledFlowChain(store, NODE, toy_kind(self.store, plan),
                                       job_uuid=f"job-{i}")
            runs.append((fault, plan, chain.run(None, resource_uuid=f"vm-{i}")))
        self.store.flush()
        for fault, plan, d in runs:
            if fault is None:
                self.assertEqual(self.successResultOf(d)["state"], "Succeeded")
            elif isinstance(fault, str):
                self.failureResultOf(d, OperationError)
            else:
                self.assertTrue(plan.reached.called)
                self.assertNoResult(d)

        async def recover() -> None:
            store2 = await self.reopen()
            await recover_jobs(store2, NODE, [toy_kind(store2)])
            self.assertEqual(await store2.running_jobs(NODE), [])
            held = [f"vm-{i}" for i, f in enumerate(faults) if f in (None, ("finish_job", "-"))]
            await self.assert_held_by(held, store2)
            before = (await store2.query("job", Query(sort="uuid"))).inventories
            self.assertEqual(await recover_jobs(store2, NODE, [toy_kind(store2)]), [])
            await self.assert_held_by(held, store2)
            self.assertEqual((await store2.query("job", Query(sort="uuid"))).inventories, before)

        self.go(recover())

    def test_in_flight_probe(self) -> None:
        """
        The in-flight flow is rolled back (took None) unless its probe says it did not
        happen.
        """
        async def scenario() -> list:
            await self.crash(("ip", "before"), "vm-a")
            await self.crash(("ip", "after"), "vm-b")
            plan = Plan()
            kind = toy_kind(self.store, plan)
            await recover_jobs(self.store, NODE, [kind])
            await self.assert_held_by([])
            return plan.rollbacks

        rollbacks = self.go(scenario())
        self.assertEqual([r[0] for r in rollbacks], ["host", "ip", "host"])
        self.assertIsNone(rollbacks[1][1])
        self.assertEqual(rollbacks[0][1], {"host": HOST, "cpu": CPU, "memory": MEMORY})

    def test_forward(self) -> None:
        """
        A kind that finishes forward resumes from the in-flight flow: the job Succeeds and
        holds its share once (the re-run reservation is idempotent by holder).
        """
        async def scenario() -> list:
            await self.crash(("storage", "after"), "vm-f")
            seen = []
            kind = toy_kind(self.store, forward=lambda ctx, rec, happened: seen.append(
                ([r["name"] for r in rec], happened)) or True)
            out = await recover_jobs(self.store, NODE, [kind])
            self.assertEqual(out, [{"job": "job-vm-f", "outcome": "forward"}])
            row = await self.job("job-vm-f")
            self.assertEqual(row["state"], "Succeeded")
            self.assertEqual([f["name"] for f in row["flows"]], FLOWS)
            await self.assert_held_by(["vm-f"])
            return seen

        self.assertEqual(self.go(scenario()), [(["host", "ip"], None)])

    def test_rollback_failure_leaves_running(self) -> None:
        """
        A rollback that fails at recovery leaves the job Running; the next recovery
        finishes it.
        """
        class Broken(StorageFlow):
            async def rollback(self, ctx: Any, took: Any) -> None:
                raise OperationError.of(SYS.OPERATION_ERROR, "storage unreachable")

        async def scenario() -> None:
            await self.crash(("finish", "before"), "vm-r")
            plan = Plan()
            broken = JobKind("CreateToy", [HostFlow(self.store, plan), IpFlow(self.store, plan),
                                           Broken(self.store, plan),
                                           FinishFlow(self.store, plan)])
            out = await recover_jobs(self.store, NODE, [broken])
            self.assertEqual(out[0]["outcome"], "left-running")
            self.assertEqual(out[0]["errors"][0]["flow"], "storage")
            self.assertEqual((await self.job("job-vm-r"))["state"], "Running")
            out = await recover_jobs(self.store, NODE, [toy_kind(self.store)])
            self.assertEqual(out[0]["outcome"], "rolled-back")
            await self.assert_held_by([])

        self.go(scenario())

    def test_record_job_flow(self) -> None:
        """
        The store operation: append, idempotent retry, refused once finished or claimed.
        """
        self.go(self.scenario_record())

    def test_rollback_marker(self) -> None:
        """
        begin_job_rollback / record_job_rollback: compare-and-swaps, idempotent.
        """
        self.go(self.scenario_rollback_marker())

    def test_duplicate_flow_names(self) -> None:
        """
        A kind's flow names are its journal's keys: duplicates are refused.
        """
        self.assertRaises(ValueError, JobKind, "K", [HostFlow(None, Plan()),
                                                     HostFlow(None, Plan())])

    def drive(self, coro: Any) -> Any:
        d = coro if isinstance(coro, Deferred) else Deferred.fromCoroutine(coro)
        self.flush()
        return self.successResultOf(d)

    def flush(self) -> None:
        for _ in range(5):
            for s in self.stores:
                s.flush()

    def hanging_rollback_kind(self, plan: Plan, reached: Deferred) -> JobKind:
        class HangHost(HostFlow):
            async def rollback(self, ctx: Any, took: Any) -> None:
                reached.callback(None)
                await Deferred()  # the node stops here

        return JobKind("CreateToy", [HangHost(self.store, plan), IpFlow(self.store, plan),
                                     StorageFlow(self.store, plan),
                                     FinishFlow(self.store, plan)])

    def test_taken_over_job_is_abandoned(self) -> None:
        """
        Node A, presumed dead, is claimed by B, which finishes the job forward; A's next
        record is refused (SYS.1005): A rolls nothing back, does not finish the job, and
        fails with JOB.1001; B's VM keeps what it holds.
        """
        plan = _KeepPlan(hang=("ip", "after"))
        d = JournaledFlowChain(self.store, NODE, toy_kind(self.store, plan),
                               job_uuid="job-c").run(None, "vm-c")
        self.flush()
        self.assertTrue(plan.reached.called)

        async def b() -> None:
            claimed = await self.store.claim_jobs(NODE, "node-2")
            out = await recover_jobs(self.store, "node-2",
                                     [toy_kind(self.store, forward=lambda c, r, h: True)],
                                     jobs=claimed, clock=self.clock)
            self.assertEqual([o["outcome"] for o in out], ["forward"])
        self.drive(b())
        plan.hung.callback(None)  # A wakes up
        self.flush()
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, JOB_TAKEN_OVER)
        self.assertEqual(plan.rollbacks, [])

        async def check() -> None:
            row = await self.job("job-c")
            self.assertEqual(row["state"], "Succeeded")
            self.assertEqual(row["managementNodeUuid"], "node-2")
            self.assertIsNone(row["rollbackError"])
            await self.assert_held_by(["vm-c"])
        self.drive(check())

    def test_crash_mid_rollback_is_never_forwarded(self) -> None:
        """
        A live chain fails at 'finish' and its node stops while rolling back (storage and
        ip given back, host's rollback in flight): recovery, even with a forward policy,
        finishes the rollbacks (not the recorded ones again) and fails the job with its
        real error, not JOB.1000.
        """
        plan = Plan(fail="finish")
        reached: Deferred = Deferred()
        JournaledFlowChain(self.store, NODE, self.hanging_rollback_kind(plan, reached),
                           job_uuid="job-x").run(None, "vm-x")
        self.flush()
        self.assertTrue(reached.called)
        self.assertEqual([r[0] for r in plan.rollbacks], ["finish", "storage", "ip"])

        async def recover() -> None:
            row = await self.job("job-x")
            self.assertEqual(row["state"], "Running")
            self.assertEqual(row["rollbackError"]["location"], "finish")
            self.assertEqual(row["rolledBack"], ["finish", "storage", "ip"])
            s2 = await self.reopen()
            plan2 = Plan()
            out = await recover_jobs(s2, NODE, [toy_kind(s2, plan2, forward=lambda c, r, h: True)],
                                     clock=self.clock)
            self.assertEqual([o["outcome"] for o in out], ["rolled-back"])
            self.assertEqual([r[0] for r in plan2.rollbacks], ["host"])
            row = await self.job("job-x", s2)
            self.assertEqual(row["state"], "Failed")
            self.assertEqual(row["error"]["code"], SYS.OPERATION_ERROR)
            self.assertEqual(row["error"]["location"], "finish")
            self.assertIn("injected failure in finish", str(row["error"]))
            await self.assert_held_by([], s2)
        self.drive(recover())

    def test_live_rollback_failure_is_retried_at_recovery(self) -> None:
        """
        A rollback that fails in a live run: the run fails with the error plus its
        rollback_errors, the job stays Running (rolling back), and recovery gives back what
        leaked and fails the job with the original error.
        """
        plan = Plan(fail="finish")

        class Broken(StorageFlow):
            async def rollback(self, ctx: Any, took: Any) -> None:
                raise OperationError.of(SYS.OPERATION_ERROR, "storage agent down")

        kind = JobKind("CreateToy", [HostFlow(self.store, plan), IpFlow(self.store, plan),
                                     Broken(self.store, plan), FinishFlow(self.store, plan)])
        d = JournaledFlowChain(self.store, NODE, kind, job_uuid="job-l").run(None, "vm-l")
        self.flush()
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual([e["flow"] for e in err.opaque["rollback_errors"]], ["storage"])

        async def check() -> None:
            row = await self.job("job-l")
            self.assertEqual(row["state"], "Running")
            self.assertEqual(row["rolledBack"], ["finish", "ip", "host"])
            s2 = await self.reopen()
            plan2 = Plan()
            out = await recover_jobs(s2, NODE, [toy_kind(s2, plan2)], clock=self.clock)
            self.assertEqual([o["outcome"] for o in out], ["rolled-back"])
            self.assertEqual([r[0] for r in plan2.rollbacks], ["storage"])
            row = await self.job("job-l", s2)
            self.assertEqual(row["state"], "Failed")
            self.assertEqual(row["error"]["location"], "finish")
            await self.assert_held_by([], s2)
        self.drive(check())

    def test_context_error_fails_the_job(self) -> None:
        """
        kind.context raising: run() fails with an OperationError and the job is Failed.
        """
        kind = toy_kind(self.store, context=lambda job: {"vm": job["apiMessage"]["vmUuid"]})
        d = JournaledFlowChain(self.store, NODE, kind, job_uuid="job-k").run({}, "vm-k")
        self.flush()
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        row = self.drive(self.job("job-k"))
        self.assertEqual(row["state"], "Failed")
        self.assertIn("KeyError", str(row["error"]))

    def test_took_in_context_when_its_record_fails(self) -> None:
        """
        A flow whose record fails is rolled back with what it took, not None.
        """
        plan = Plan()
        store = _FailingRecord(self.store, "ip")
        d = JournaledFlowChain(store, NODE, toy_kind(self.store, plan),
                               job_uuid="job-t").run(None, "vm-t")
        self.flush()
        self.failureResultOf(d, OperationError)
        self.assertEqual([r[0] for r in plan.rollbacks], ["ip", "host"])
        self.assertIsNotNone(plan.rollbacks[0][1])
        self.assertTrue(plan.rollbacks[0][1]["ip"].startswith("10.0.0."))
        self.drive(self.assert_held_by([]))

    def test_silent_probe_and_rollback_time_out(self) -> None:
        """
        A probe and a rollback that never answer: after their timeouts on the injected
        clock the probe "cannot tell" and the rollback failed (job left Running for the
        next recovery), the other jobs resolved meanwhile (concurrently).
        """
        class Silent(IpFlow):
            def probe(self, ctx: Any) -> Deferred:
                return Deferred()

            def rollback(self, ctx: Any, took: Any) -> Deferred:
                return Deferred()

        async def crash() -> None:
            await self.crash(("ip", "before"), "vm-p")   # in flight: ip (silent)
            await self.crash(("host", "before"), "vm-q")  # in flight: host
        self.drive(crash())
        p = Plan()
        kind = JobKind("CreateToy", [HostFlow(self.store, p), Silent(self.store, p),
                                     StorageFlow(self.store, p), FinishFlow(self.store, p)])
        d = Deferred.fromCoroutine(recover_jobs(self.store, NODE, [kind], clock=self.clock,
                                                probe_timeout=10, rollback_timeout=20))
        self.flush()
        self.assertEqual(self.drive(self.job("job-vm-q"))["state"], "Failed")
        self.assertFalse(d.called)
        self.clock.advance(10)
        self.flush()
        self.assertFalse(d.called)
        self.clock.advance(20)
        self.flush()
        out = self.successResultOf(d)
        self.assertEqual({o["job"]: o["outcome"] for o in out},
                         {"job-vm-p": "left-running", "job-vm-q": "rolled-back"})
        self.assertEqual(out[0]["errors"][0]["flow"], "ip")
        self.assertEqual(out[0]["errors"][0]["error"]["code"], SYS.TIMEOUT)
        row = self.drive(self.job("job-vm-p"))
        self.assertEqual(row["state"], "Running")
        self.assertEqual(row["rollbackError"]["code"], JOB_NODE_RESTARTED)
        # the next recovery (the agent answers now) finishes it, never probing again
        self.drive(recover_jobs(self.store, NODE, [toy_kind(self.store)], clock=self.clock))
        row = self.drive(self.job("job-vm-p"))
        self.assertEqual(row["state"], "Failed")
        self.assertEqual(row["error"]["code"], JOB_NODE_RESTARTED)
        self.drive(self.assert_held_by([]))


class _RealBackend(JournalScenarios):
    """
    The same scenarios on a real backend (the reactor, a pool of threads).
    """

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.stores: list[Any] = []
        self.store = await self.reopen()
        await self.seed()

    @async_to_deferred
    async def tearDown(self) -> None:
        for s in self.stores:
            await s.stop()
        await self.tearDown_database()

    async def reopen(self) -> Any:
        s = open_store(self.store_url(), reactor, **self.store_options)
        self.stores.append(s)
        await s.start()
        return s

    @async_to_deferred
    async def test_record_job_flow(self) -> None:
        """
        The store operation: append, idempotent retry, refused once finished or claimed.
        """
        await self.scenario_record()

    @async_to_deferred
    async def test_rollback_marker(self) -> None:
        """
        begin_job_rollback / record_job_rollback on this backend.
        """
        await self.scenario_rollback_marker()

    @async_to_deferred
    async def test_success_and_failure(self) -> None:
        """
        A job succeeds; one fails at its last flow and gives everything back.
        """
        await self.scenario_success()
        await self.scenario_failure(3, held=("vm-ok",))

    @async_to_deferred
    async def test_crash_at_every_point_at_once(self) -> None:
        """
        One job stopped at each point, recovered by a node on a new connection pool.
        """
        await self.restart_and_recover(CRASH_POINTS)


class SQLiteJournalTests(_RealBackend, SQLiteStoreFactory, unittest.TestCase):
    pass


class PostgresJournalTests(_RealBackend, PostgresStoreFactory, unittest.TestCase):
    pass
