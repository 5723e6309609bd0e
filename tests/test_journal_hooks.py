"""
L{zcontrol.core.journal}: a kind's C{job_result} and C{job_error} hooks (the job row keeps
the operation's own outcome), live and at recovery, and the job's context (its trace id)
in every flow, also those started after an asynchronous step.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.journal import (
    JOB_NODE_RESTARTED,
    JobKind,
    JournaledFlow,
    JournaledFlowChain,
    recover_jobs,
)
from zcontrol.core.trace import current_trace_id, trace_scope
from zcontrol.db.memory import MemoryStore

NODE = "node-1"


class Step(JournaledFlow):
    """
    A flow that waits for a store round trip, notes the trace id it sees, and fails when
    told to.
    """

    def __init__(self, name: str, store: Any, seen: list, fail: bool = False) -> None:
        self.name = name
        self.store = store
        self.seen = seen
        self.fail = fail

    async def run(self, ctx: Any) -> dict:
        await self.store.get("zone", "nope")  # the next flow starts from a store callback
        self.seen.append((self.name, current_trace_id()))
        if self.fail:
            raise OperationError.of("TEST.1000", f"{self.name} failed")
        return {"step": self.name}


def own_error(ctx: Any, err: Any) -> Any:
    if err.code == SYS.OPERATION_ERROR:
        return err.cause
    return error_code("TEST.1001", "restarted", err)


class HookTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.drive(self.store.start())
        self.seen: list = []

    def tearDown(self) -> None:
        self.drive(self.store.stop())

    def drive(self, d: Any) -> Any:
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        for _ in range(50):
            self.store.flush()
            self.clock.advance(0)
        return self.successResultOf(d)

    def kind(self, fail: str | None = None, **hooks: Any) -> JobKind:
        return JobKind("Toy", [Step(n, self.store, self.seen, n == fail)
                               for n in ("a", "b", "c")], **hooks)

    def run_job(self, kind: JobKind, job: str) -> Deferred:
        d = trace_scope("trace-1", JournaledFlowChain(self.store, NODE, kind,
                                                      job_uuid=job).run)
        d.addErrback(lambda f: f.value)
        return d

    def test_trace_in_every_flow(self) -> None:
        """
        Each flow runs with the trace id current when the job started, though each starts
        from a store callback.
        """
        self.drive(self.run_job(self.kind(), "j1"))
        self.assertEqual(self.seen, [("a", "trace-1"), ("b", "trace-1"), ("c", "trace-1")])

    def test_hooks_live(self) -> None:
        """
        job_result is the Succeeded job's result; job_error the Failed job's error (the run
        itself still fails with the chain's SYS.1006); without hooks the journal's own.
        """
        self.drive(self.run_job(self.kind(job_result=lambda ctx: {"made": ctx["resource"]}),
                                "j1"))
        self.assertEqual(self.drive(self.store.get("job", "j1"))["result"], {"made": None})
        err = self.drive(self.run_job(self.kind(fail="b", job_error=own_error), "j2"))
        self.assertEqual((err.error.code, err.error.location), (SYS.OPERATION_ERROR, "b"))
        row = self.drive(self.store.get("job", "j2"))
        self.assertEqual((row["state"], row["error"]["code"]), ("Failed", "TEST.1000"))
        self.drive(self.run_job(self.kind(fail="b"), "j3"))
        self.assertEqual(self.drive(self.store.get("job", "j3"))["error"]["code"],
                         SYS.OPERATION_ERROR)

    def test_hook_that_raises(self) -> None:
        """
        A hook that raises is logged; the journal's own result or error is recorded.
        """
        def broken(*args: Any) -> Any:
            raise ValueError("broken hook")

        self.drive(self.run_job(self.kind(job_result=broken), "j1"))
        self.assertEqual(self.drive(self.store.get("job", "j1"))["result"],
                         {"flows": ["a", "b", "c"]})
        self.drive(self.run_job(self.kind(fail="a", job_error=broken), "j2"))
        self.assertEqual(self.drive(self.store.get("job", "j2"))["error"]["code"],
                         SYS.OPERATION_ERROR)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_hooks_at_recovery(self) -> None:
        """
        A job whose flows were all recorded gets job_result; one rolled back at recovery
        gets job_error of JOB.1000; the outcomes say the error recorded.
        """
        kind = self.kind(job_result=lambda ctx: {"done": sorted(ctx["took"])},
                         job_error=own_error)
        for job, flows in (("j1", ["a", "b", "c"]), ("j2", ["a"])):
            self.drive(self.store.create_job(job, "Toy", {}, NODE))
            for f in flows:
                self.drive(self.store.record_job_flow(job, NODE, f, {"step": f}))
        out = self.drive(recover_jobs(self.store, NODE, [kind], clock=self.clock))
        self.assertEqual([o["outcome"] for o in out], ["succeeded", "rolled-back"])
        self.assertEqual((out[1]["error"].code, out[1]["error"].cause.code),
                         ("TEST.1001", JOB_NODE_RESTARTED))
        j1, j2 = (self.drive(self.store.get("job", j)) for j in ("j1", "j2"))
        self.assertEqual((j1["state"], j1["result"]), ("Succeeded", {"done": ["a", "b", "c"]}))
        self.assertEqual((j2["state"], j2["error"]["code"]), ("Failed", "TEST.1001"))
