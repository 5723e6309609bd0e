"""
Tests for L{zcontrol.core.chain}: per-signature FIFO chain-task queues.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.bus._pending import current_deadline, deadline_scope
from zcontrol.core.chain import CHAIN_QUEUE_FULL, DEFAULT_MAX_PENDING, ChainTaskQueue
from zcontrol.core.errors import SYS, OperationError


class Recorder:
    """
    Makes tasks that record when they start and return a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.deferreds: dict[Any, Deferred] = {}

    def task(self, name: Any):
        def fn() -> Deferred:
            self.started.append(name)
            d: Deferred = Deferred()
            self.deferreds[name] = d
            return d

        return fn


class ChainTaskQueueTests(SynchronousTestCase):
    """
    Behaviour of L{ChainTaskQueue.run}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = ChainTaskQueue(self.clock)
        self.rec = Recorder()

    def test_plain_value(self) -> None:
        """
        A task returning a plain value fires the caller's Deferred with it and leaves no
        bookkeeping behind.
        """
        d = self.queue.run("s", lambda: 42)
        self.assertEqual(self.successResultOf(d), 42)
        self.assertEqual(len(self.queue), 0)

    def test_coroutine(self) -> None:
        """
        A task may be an C{async def}; its coroutine is driven to completion.
        """
        gate: Deferred = Deferred()

        async def fn() -> str:
            value = await gate
            return value + "!"

        d = self.queue.run("s", fn)
        self.assertNoResult(d)
        self.assertEqual(self.queue.running("s"), 1)
        gate.callback("ok")
        self.assertEqual(self.successResultOf(d), "ok!")
        self.assertEqual(len(self.queue), 0)

    def test_fifo_level_one(self) -> None:
        """
        Tasks of one signature at level 1 run one at a time in submission order.
        """
        ds = [self.queue.run("vm-1", self.rec.task(i)) for i in range(3)]
        self.assertEqual(self.rec.started, [0])
        self.assertEqual(self.queue.pending("vm-1"), 2)
        self.assertEqual(self.queue.running("vm-1"), 1)
        self.rec.deferreds[0].callback("a")
        self.assertEqual(self.successResultOf(ds[0]), "a")
        self.assertEqual(self.rec.started, [0, 1])
        self.rec.deferreds[1].callback("b")
        self.rec.deferreds[2].callback("c")
        self.assertEqual([self.successResultOf(d) for d in ds[1:]], ["b", "c"])
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.queue.pending("vm-1"), 0)
        self.assertEqual(self.queue.running("vm-1"), 0)

    def test_different_signatures_concurrent(self) -> None:
        """
        Tasks of different signatures do not wait for each other.
        """
        self.queue.run("a", self.rec.task("a"))
        self.queue.run("b", self.rec.task("b"))
        self.assertEqual(self.rec.started, ["a", "b"])
        self.assertEqual(len(self.queue), 2)

    def test_sync_level(self) -> None:
        """
        At most C{sync_level} tasks of a signature run at once; they start in FIFO order as
        slots free up (in any order).
        """
        for i in range(5):
            self.queue.run("host-1", self.rec.task(i), sync_level=2)
        self.assertEqual(self.rec.started, [0, 1])
        self.rec.deferreds[1].callback(None)
        self.assertEqual(self.rec.started, [0, 1, 2])
        self.assertEqual(self.queue.running("host-1"), 2)
        self.assertEqual(self.queue.pending("host-1"), 2)
        self.assertEqual(self.queue.sync_level("host-1"), 2)

    def test_level_raised(self) -> None:
        """
        A later task with a higher level raises the queue's level (as ZStack does), which
        immediately lets waiting tasks start.
        """
        for i in range(3):
            self.queue.run("s", self.rec.task(i))
        self.assertEqual(self.rec.started, [0])
        self.queue.run("s", self.rec.task(3), sync_level=3)
        self.assertEqual(self.rec.started, [0, 1, 2])
        self.assertEqual(self.queue.sync_level("s"), 3)

    def test_raise_releases_slot(self) -> None:
        """
        A task that raises synchronously fails its caller and releases its slot.
        """

        def boom() -> None:
            raise ValueError("boom")

        self.queue.run("s", self.rec.task("first"))
        d1 = self.queue.run("s", boom)
        d2 = self.queue.run("s", self.rec.task("second"))
        self.rec.deferreds["first"].callback(None)
        self.failureResultOf(d1, ValueError)
        self.assertEqual(self.rec.started, ["first", "second"])
        self.assertNoResult(d2)

    def test_failing_deferred_releases_slot(self) -> None:
        """
        A task whose Deferred fails passes the failure to its caller and releases its slot.
        """
        d1 = self.queue.run("s", self.rec.task(1))
        d2 = self.queue.run("s", lambda: fail(OperationError.of(SYS.IO_ERROR, "disk")))
        self.rec.deferreds[1].errback(RuntimeError("x"))
        self.failureResultOf(d1, RuntimeError)
        f = self.failureResultOf(d2, OperationError)
        self.assertEqual(f.value.error.code, SYS.IO_ERROR)
        self.assertEqual(len(self.queue), 0)

    def test_cancel_pending(self) -> None:
        """
        Cancelling a waiting task drops it (it never runs) and fails it with C{SYS.1017}; the
        next task takes its place.
        """
        self.queue.run("s", self.rec.task(0))
        d1 = self.queue.run("s", self.rec.task(1))
        d2 = self.queue.run("s", self.rec.task(2))
        d1.cancel()
        f = self.failureResultOf(d1, OperationError)
        self.assertEqual(f.value.error.code, SYS.CANCEL)
        self.assertEqual(self.queue.pending("s"), 1)
        self.rec.deferreds[0].callback(None)
        self.assertEqual(self.rec.started, [0, 2])
        self.rec.deferreds[2].callback("two")
        self.assertEqual(self.successResultOf(d2), "two")
        self.assertEqual(len(self.queue), 0)

    def test_cancel_running(self) -> None:
        """
        Cancelling a running task forwards C{cancel()} to the task's own Deferred; the
        caller gets C{SYS.1017} and the slot is released.
        """
        cancelled = []
        inner: Deferred = Deferred(lambda d: cancelled.append(True))
        d = self.queue.run("s", lambda: inner)
        d2 = self.queue.run("s", self.rec.task("next"))
        d.cancel()
        self.assertEqual(cancelled, [True])
        f = self.failureResultOf(d, OperationError)
        self.assertEqual(f.value.error.code, SYS.CANCEL)
        self.assertEqual(self.rec.started, ["next"])
        self.assertNoResult(d2)

    def test_cancel_running_ignored(self) -> None:
        """
        If the running task survives the cancel (a coroutine that catches it), the caller
        is still answered with C{SYS.1017} at once, but the slot stays held until the task
        really ends.
        """
        first: Deferred = Deferred()
        second: Deferred = Deferred()

        async def stubborn() -> None:
            try:
                await first
            except CancelledError:
                await second

        d = self.queue.run("s", stubborn)
        self.queue.run("s", self.rec.task("next"))
        d.cancel()
        f = self.failureResultOf(d, OperationError)
        self.assertEqual(f.value.error.code, SYS.CANCEL)
        self.assertEqual(self.rec.started, [])
        self.assertEqual(self.queue.running("s"), 1)
        second.callback(None)
        self.assertEqual(self.rec.started, ["next"])

    def test_pending_timeout(self) -> None:
        """
        A task still waiting after C{timeout} seconds is dropped with C{SYS.1001}; a task
        that started in time is not limited, and its timer is cancelled.
        """
        self.queue.run("s", self.rec.task(0), timeout=5)
        d1 = self.queue.run("s", self.rec.task(1), timeout=5)
        d2 = self.queue.run("s", self.rec.task(2), timeout=10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(5)
        f = self.failureResultOf(d1, OperationError)
        self.assertEqual(f.value.error.code, SYS.TIMEOUT)
        self.assertIn("'s'", f.value.error.details)
        self.rec.deferreds[0].callback(None)
        self.assertEqual(self.rec.started, [0, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertNoResult(d2)

    def test_timeout_needs_clock(self) -> None:
        """
        A pending timeout on a queue without a clock is a programming error.
        """
        self.assertRaises(ValueError, ChainTaskQueue().run, "s", lambda: None, timeout=1)

    def test_bad_level(self) -> None:
        """
        C{sync_level} must be at least 1.
        """
        self.assertRaises(ValueError, self.queue.run, "s", lambda: None, sync_level=0)

    def test_max_pending(self) -> None:
        """
        Over C{max_pending} waiting tasks, a new task is refused at once with C{CHAIN.1000}
        whose details name the signature and the limit; the running task does not count.
        """
        self.queue.run("vm-9", self.rec.task(0), max_pending=1)
        self.queue.run("vm-9", self.rec.task(1), max_pending=1)
        d = self.queue.run("vm-9", self.rec.task(2), max_pending=1)
        f = self.failureResultOf(d, OperationError)
        self.assertEqual(f.value.error.code, CHAIN_QUEUE_FULL)
        self.assertEqual(CHAIN_QUEUE_FULL, "CHAIN.1000")
        self.assertIn("'vm-9'", f.value.error.details)
        self.assertIn("1", f.value.error.details)
        self.assertEqual(f.value.error.opaque["max_pending"], 1)
        self.assertEqual(self.queue.pending("vm-9"), 1)
        self.assertEqual(self.rec.started, [0])

    def test_default_bound(self) -> None:
        """
        Fault (issue 8 item 6): a signature's queue had no bound unless each caller passed
        C{max_pending}, so a hung task let its queue grow without limit. Now every queue is
        bounded by default: past C{DEFAULT_MAX_PENDING} waiting tasks a new one is refused at
        once with C{CHAIN.1000}; a queue built with a smaller bound applies it.
        """
        self.queue.run("s", self.rec.task("first"))
        for _ in range(DEFAULT_MAX_PENDING):
            self.queue.run("s", lambda: None)
        f = self.failureResultOf(self.queue.run("s", lambda: None), OperationError)
        self.assertEqual(f.value.error.code, CHAIN_QUEUE_FULL)
        self.assertEqual(self.queue.pending("s"), DEFAULT_MAX_PENDING)

        small = ChainTaskQueue(self.clock, max_pending=2)
        small.run("t", self.rec.task("t0"))
        small.run("t", lambda: None)
        small.run("t", lambda: None)
        f = self.failureResultOf(small.run("t", lambda: None), OperationError)
        self.assertEqual(f.value.error.opaque["max_pending"], 2)
        self.assertRaises(ValueError, ChainTaskQueue, self.clock, max_pending=-1)

    def test_waiting_task_keeps_submitter_deadline(self) -> None:
        """
        Fault (issue 8 item 6): a task that waited ran in the context of whoever released the
        slot, so the bus deadline of the message that queued it was lost (its agent calls and
        child sends ran without a deadline, or with the releaser's). Now it runs in its
        submitter's context.
        """
        seen: list[Any] = []
        self.queue.run("s", self.rec.task("first"))
        d = deadline_scope(
            50.0, self.queue.run, "s", lambda: seen.append(current_deadline()) or "ok"
        )
        # The slot is freed outside any deadline scope (e.g. an agent callback).
        self.assertIsNone(current_deadline())
        self.clock.advance(10)
        self.rec.deferreds["first"].callback(None)
        self.assertEqual(seen, [50.0])
        self.assertEqual(self.successResultOf(d), "ok")

    def test_time_queued_counts_against_deadline(self) -> None:
        """
        Fault (issue 8 item 6): time spent waiting in the queue did not count against the
        submitter's deadline; a task whose caller had given up still ran later. Now a task
        still waiting at its submitter's deadline fails with C{SYS.1001} and never runs, and
        one submitted after its deadline fails at once.
        """
        self.queue.run("s", self.rec.task("first"))
        d = deadline_scope(5.0, self.queue.run, "s", self.rec.task("late"))
        explicit = self.queue.run("s", self.rec.task("explicit"), deadline=3.0)
        self.clock.advance(3)
        self.assertEqual(
            self.failureResultOf(explicit, OperationError).value.error.code, SYS.TIMEOUT)
        self.assertNoResult(d)
        self.clock.advance(2)
        f = self.failureResultOf(d, OperationError)
        self.assertEqual(f.value.error.code, SYS.TIMEOUT)
        self.assertIn("did not run", f.value.error.details)
        self.rec.deferreds["first"].callback(None)
        self.assertEqual(self.rec.started, ["first"])
        self.assertEqual(len(self.queue), 0)
        # Already past its deadline: refused without waiting or running.
        passed = deadline_scope(1.0, self.queue.run, "s", self.rec.task("never"))
        self.assertEqual(
            self.failureResultOf(passed, OperationError).value.error.code, SYS.TIMEOUT)
        self.assertEqual(self.rec.started, ["first"])

    def test_deadline_needs_clock(self) -> None:
        """
        An explicit deadline on a queue without a clock is a programming error.
        """
        self.assertRaises(ValueError, ChainTaskQueue().run, "s", lambda: None, deadline=1)

    def test_close(self) -> None:
        """
        Fault (issue 8 item 9): nothing could fail the work of a queue at shutdown, so a stop
        waited for every queued and running task. C{close} fails the waiting tasks (they
        never run) and cancels the running ones, each with C{SYS.1017}, and refuses new ones.
        """
        running = self.queue.run("s", self.rec.task("running"))
        waiting = self.queue.run("s", self.rec.task("waiting"))
        self.queue.close("the node is stopping")
        for d in (running, waiting):
            f = self.failureResultOf(d, OperationError)
            self.assertEqual(f.value.error.code, SYS.CANCEL)
            if d is waiting:
                self.assertIn("the node is stopping", f.value.error.details)
        self.assertEqual(self.rec.started, ["running"])
        later = self.queue.run("t", self.rec.task("later"))
        self.assertEqual(self.failureResultOf(later, OperationError).value.error.code,
                         SYS.CANCEL)
        self.assertEqual(self.rec.started, ["running"])
        self.assertEqual(len(self.queue), 0)

    def test_million_signatures_no_growth(self) -> None:
        """
        After a million distinct signatures ran to completion, no bookkeeping remains.
        """
        queue = ChainTaskQueue()
        done = succeed(None)
        for i in range(1_000_000):
            queue.run(i, lambda: done)
        self.assertEqual(len(queue), 0)
        self.assertEqual(queue._queues, {})

    def test_no_recursion_synchronous_tasks(self) -> None:
        """
        100k tasks on one signature that complete synchronously once the first (hanging)
        task ends run without a C{RecursionError}.
        """
        gate: Deferred = Deferred()
        self.queue = ChainTaskQueue(self.clock, max_pending=100_000)
        self.queue.run("s", lambda: gate)
        ds = [self.queue.run("s", lambda i=i: i) for i in range(100_000)]
        gate.callback(None)
        self.assertEqual(self.successResultOf(ds[0]), 0)
        self.assertEqual(self.successResultOf(ds[-1]), 99_999)
        self.assertEqual(len(self.queue), 0)

    def test_no_recursion_chained_submission(self) -> None:
        """
        A caller that submits the next task from the previous one's callback, 100k times,
        does not recurse either.
        """
        results = []
        gate: Deferred = Deferred()
        self.queue = ChainTaskQueue(self.clock, max_pending=100_000)
        self.queue.run("s", lambda: gate)
        for i in range(100_000):
            self.queue.run("s", lambda i=i: i).addCallback(results.append)
        gate.callback(None)
        self.assertEqual(len(results), 100_000)
        self.assertEqual(results[:3], [0, 1, 2])

    def test_submit_from_callback_keeps_fifo(self) -> None:
        """
        A task submitted from a finished task's callback goes behind those already waiting.
        """
        d0 = self.queue.run("s", self.rec.task(0))
        self.queue.run("s", self.rec.task(1))
        d0.addCallback(lambda _: self.queue.run("s", self.rec.task("late")))
        self.rec.deferreds[0].callback(None)
        self.assertEqual(self.rec.started, [0, 1])
        self.rec.deferreds[1].callback(None)
        self.assertEqual(self.rec.started, [0, 1, "late"])


# -- property ---------------------------------------------------------------------------

BEHAVIOURS = ["succeed", "fail", "raise", "hang_ok", "hang_fail"]

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.integers(min_value=0, max_value=2),
            st.sampled_from(BEHAVIOURS),
            st.booleans(),  # cancel this task right after submitting?
        ),
        st.tuples(st.just("fire"), st.integers(min_value=0, max_value=1000)),
    ),
    max_size=60,
)


class ChainTaskPropertyTests(SynchronousTestCase):
    """
    Properties of L{ChainTaskQueue} under random mixes of task behaviours.
    """

    @given(
        ops=_ops,
        levels=st.lists(st.integers(min_value=1, max_value=3), min_size=3, max_size=3),
        final_order=st.randoms(use_true_random=False),
    )
    def test_level_fifo_and_completion(self, ops, levels, final_order) -> None:
        """
        Whatever the tasks do (succeed, fail, raise, hang then fire in random order, or get
        cancelled), per signature never more than C{sync_level} run at once, tasks start in
        submission order (skipping cancelled ones), every caller's Deferred fires, and the
        queue ends empty.
        """
        queue = ChainTaskQueue()
        active = [0, 0, 0]
        started: list[list[int]] = [[], [], []]
        submitted: list[list[int]] = [[], [], []]
        cancelled: set[int] = set()
        hanging: list[tuple[int, int, Deferred, bool]] = []
        finished: set[int] = set()
        results: dict[int, Deferred] = {}

        def make(task_id: int, sig: int, behaviour: str):
            def fn():
                assert active[sig] < levels[sig], "level exceeded"
                active[sig] += 1
                started[sig].append(task_id)
                if behaviour == "succeed":
                    active[sig] -= 1
                    return task_id
                if behaviour == "fail":
                    active[sig] -= 1
                    return fail(RuntimeError(task_id))
                if behaviour == "raise":
                    active[sig] -= 1
                    raise RuntimeError(task_id)
                d: Deferred = Deferred()
                hanging.append((task_id, sig, d, behaviour == "hang_ok"))
                return d

            return fn

        def fire(index: int) -> None:
            task_id, sig, d, ok = hanging.pop(index)
            active[sig] -= 1
            if ok:
                d.callback(task_id)
            else:
                d.errback(RuntimeError(task_id))

        next_id = 0
        for op in ops:
            if op[0] == "submit":
                _, sig, behaviour, cancel = op
                task_id, next_id = next_id, next_id + 1
                submitted[sig].append(task_id)
                d = queue.run(sig, make(task_id, sig, behaviour), sync_level=levels[sig])
                results[task_id] = d
                # consume at once: hypothesis may stop an example half way
                d.addBoth(lambda _r, t=task_id: finished.add(t))
                if cancel and queue.pending(sig) and not d.called:
                    # only cancel tasks still waiting: those never run
                    if task_id not in started[sig]:
                        cancelled.add(task_id)
                        d.cancel()
            elif hanging:
                fire(op[1] % len(hanging))
            for sig in range(3):
                self.assertLessEqual(queue.running(sig), levels[sig])
        while hanging:
            fire(final_order.randrange(len(hanging)))

        self.assertEqual(finished, set(results))
        for sig in range(3):
            expected = [t for t in submitted[sig] if t not in cancelled]
            self.assertEqual(started[sig], expected)
        self.assertEqual(len(queue), 0)
