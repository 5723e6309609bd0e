# -*- test-case-name: tests.test_core_chain -*-
"""
Chain tasks: per-signature FIFO queues with a bounded number of running tasks, the Twisted
form of ZStack's C{ThreadFacade.chainSubmit} / C{DispatchQueueImpl}.

A task is a zero-argument callable returning a value, a L{Deferred} or a coroutine. Tasks
submitted under the same I{signature} (e.g. C{"Vm-<uuid>"}) start in submission order and at
most C{sync_level} of them run at once; tasks under different signatures are independent. The
slot a task holds is released when its result fires, whether it succeeds, raises or fails, so
the queue always moves on (ZStack's C{chain.next()} in C{finally}).

Note [Chain queue bookkeeping]
==============================
Each live signature owns a L{_SignatureQueue} (pending deque, running count, level). When a
signature has nothing pending and nothing running its entry is removed, so a long-lived node
that sees millions of distinct signatures (one per VM operation) keeps no trace of them.

Starting tasks is a loop guarded by a per-queue C{draining} flag: a task that completes
synchronously releases its slot from inside the loop, which only sees the flag set and
returns; the outer loop then starts the next task. So 100k tasks that complete synchronously
run at constant stack depth (no recursion, no C{RecursionError}).

A task's function is called directly rather than through C{maybe_deferred}: a plain
value or an already-fired successful Deferred (C{called}, not C{paused}, C{result} not a
Failure) finishes the task at once without adding a callback; anything else (a pending or
failed Deferred, a coroutine, an exception) takes the general C{addBoth} path. That halves the
per-task cost of the common "already done" case.

Cancelled and timed-out pending tasks are marked dead and skipped lazily (O(1) cancel); the
deque is compacted when dead entries dominate it, so a hung queue cannot accumulate them.

Note [Deadlines through the queue]
==================================
A task that has to wait is started later by whoever frees the slot, in I{that} caller's
context. So a waiting task keeps a copy of its submitter's C{contextvars} context and runs in
it: the bus's current deadline (L{zcontrol.core.deadline.current_deadline}) and anything else
kept in context variables travel with the task. A task that starts at once runs in the
submitter's context anyway and pays nothing for this.

The time a task waits counts against its deadline: the task's start deadline is the earliest
of C{deadline}, the submitter's current (bus) deadline and C{now + timeout}. A task whose
deadline passes while it waits is dropped with C{SYS.1001} and never runs; one submitted
after its deadline fails at once. Deadlines are only enforced on a queue with a clock (the
bus's clock: deadlines are absolute times on it).

Every signature's queue is bounded: C{max_pending} defaults to the queue's own bound
(L{DEFAULT_MAX_PENDING}), and a task that would wait beyond it is refused at once with
C{CHAIN.1000}.
"""

from __future__ import annotations

import contextvars
from collections import deque
from typing import Any, Callable, Hashable

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from zcontrol.core.deadline import current_deadline
from zcontrol.core.errors import SYS, OperationError, error_code, register_codes

__all__ = ["CHAIN_QUEUE_FULL", "ChainTaskQueue", "DEFAULT_MAX_PENDING"]

log = Logger()

#: C{CHAIN.1000}: a task was refused because its signature already has C{max_pending} tasks
#: waiting (ZStack's C{exceedMaxPendingCallback}).
CHAIN_QUEUE_FULL = register_codes(
    "CHAIN", {1000: "Too many tasks are waiting in a chain-task queue"}
)[1000]

#: The default bound of one signature's waiting tasks.
DEFAULT_MAX_PENDING = 10_000

_BY_CLOSE = 2  # cancel_requested value of a task cancelled by close()

_PENDING = 0
_RUNNING = 1
_FINISHED = 2
_DEAD = 3  # cancelled or timed out while pending


class _Task:
    """
    One submitted task and the Deferred its caller holds.
    """

    __slots__ = ("fn", "result", "state", "inner", "timer", "cancel_requested", "context",
                 "deadline")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.context: contextvars.Context | None = None
        self.deadline: float | None = None
        self.result: Deferred = None  # type: ignore[assignment]
        self.state = _PENDING
        self.inner: Deferred | None = None
        self.timer: IDelayedCall | None = None
        self.cancel_requested = False


class _SignatureQueue:
    """
    The bookkeeping of one live signature.
    """

    __slots__ = ("signature", "pending", "live_pending", "running", "level", "draining",
                 "active")

    def __init__(self, signature: Hashable, level: int) -> None:
        self.signature = signature
        self.pending: deque[_Task] = deque()
        self.live_pending = 0  # pending entries that are not dead
        self.running = 0
        self.level = level
        self.draining = False
        self.active: set[_Task] = set()  # running tasks, for close()


class ChainTaskQueue:
    """
    Per-signature FIFO task queues with a concurrency level (ZStack's chain tasks).

    @ivar _clock: the L{IReactorTime} used for pending timeouts and deadlines, or None
        (neither is enforced).
    @ivar max_pending: the default bound of one signature's waiting tasks.
    """

    def __init__(self, clock: IReactorTime | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        """
        @param clock: needed for the C{timeout} and C{deadline} arguments of L{run} and for
            the submitters' bus deadlines to be enforced while tasks wait.
        @param max_pending: the default of L{run}'s C{max_pending} (>= 0).
        @raise ValueError: a negative C{max_pending}.
        """
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, not {max_pending!r}")
        self._clock = clock
        self.max_pending = max_pending
        self._queues: dict[Hashable, _SignatureQueue] = {}
        self._closed: OperationError | None = None

    # -- introspection -----------------------------------------------------------------

    def __len__(self) -> int:
        """
        The number of live signatures (with a task pending or running).
        """
        return len(self._queues)

    def pending(self, signature: Hashable) -> int:
        """
        How many tasks wait (not yet started) under C{signature}.
        """
        q = self._queues.get(signature)
        return 0 if q is None else q.live_pending

    def running(self, signature: Hashable) -> int:
        """
        How many tasks run under C{signature}.
        """
        q = self._queues.get(signature)
        return 0 if q is None else q.running

    def sync_level(self, signature: Hashable) -> int:
        """
        The current level of C{signature}'s queue, or 0 when it has no live queue.
        """
        q = self._queues.get(signature)
        return 0 if q is None else q.level

    # -- submission --------------------------------------------------------------------

    def run(
        self,
        signature: Hashable,
        fn: Callable[[], Any],
        sync_level: int = 1,
        max_pending: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Deferred:
        """
        Queue C{fn} under C{signature}.

        Tasks of one signature start in FIFO order, at most C{sync_level} at a time; a task
        submitted with a higher level than the queue has raises the queue's level (as ZStack
        does) for as long as the queue lives.

        @param signature: any hashable; tasks sharing it are serialised.
        @param fn: called with no arguments once the task may run; returns a value, a
            Deferred or a coroutine.
        @param sync_level: how many tasks of this signature may run at once (>= 1).
        @param max_pending: when the task would have to wait and this many tasks already
            wait, refuse it at once with C{CHAIN.1000} (L{CHAIN_QUEUE_FULL}). Default: the
            queue's C{max_pending}.
        @param timeout: seconds the task may wait before it starts; if still waiting then,
            it is dropped with C{SYS.1001}. Requires a clock. The task's own run time is not
            limited.
        @param deadline: absolute time (on the clock) by which the task must have started,
            else it is dropped with C{SYS.1001}; the submitter's bus deadline caps it (see
            Note [Deadlines through the queue]). Requires a clock.

        @return: a Deferred firing with the task's result, or failing with its failure.
            Cancelling it before the task starts drops the task (it never runs) and fails
            it with an L{OperationError} C{SYS.1017}; cancelling it while the task runs
            forwards C{cancel()} to the task's own Deferred.

            A queue that was closed (L{close}) fails every new task at once with its
            close error.

        @raise ValueError: C{sync_level} < 1, C{max_pending} < 0, or a C{timeout} or
            C{deadline} without a clock (programming errors).
        """
        if sync_level < 1:
            raise ValueError(f"sync_level must be >= 1, not {sync_level!r}")
        if max_pending is None:
            max_pending = self.max_pending
        elif max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, not {max_pending!r}")
        clock = self._clock
        if clock is None:
            if timeout is not None or deadline is not None:
                raise ValueError("a pending timeout needs a ChainTaskQueue built with a clock")
        else:
            inherited = current_deadline()
            if inherited is not None and (deadline is None or inherited < deadline):
                deadline = inherited
            if timeout is not None or deadline is not None:
                now = clock.seconds()
                if timeout is not None and (deadline is None or now + timeout < deadline):
                    deadline = now + timeout
                if deadline <= now:  # type: ignore[operator]
                    return fail(OperationError.of(
                        SYS.TIMEOUT,
                        f"chain task of {signature!r}: its deadline passed before it was "
                        "submitted", signature=str(signature)))
        if self._closed is not None:
            return fail(OperationError(self._closed.error))

        q = self._queues.get(signature)
        if q is None:
            q = self._queues[signature] = _SignatureQueue(signature, sync_level)
        elif sync_level > q.level:
            log.info(
                "chain queue {signature!r}: sync level raised from {old} to {new}",
                signature=signature,
                old=q.level,
                new=sync_level,
            )
            q.level = sync_level

        must_wait = q.running >= q.level or q.live_pending > 0
        if must_wait and q.live_pending >= max_pending:
            return fail(
                OperationError(
                    error_code(
                        CHAIN_QUEUE_FULL,
                        f"chain queue {signature!r} already has {q.live_pending} pending "
                        f"task(s), the limit is {max_pending}",
                        max_pending=max_pending,
                        pending=q.live_pending,
                        signature=str(signature),
                    )
                )
            )

        task = _Task(fn)
        task.result = Deferred(lambda _d: self._cancel(q, task))
        q.pending.append(task)
        q.live_pending += 1
        if must_wait:
            # Started later by whoever frees a slot: keep the submitter's context.
            task.context = contextvars.copy_context()
            if deadline is not None:
                task.deadline = deadline
                task.timer = clock.callLater(  # type: ignore[union-attr]
                    deadline - clock.seconds(),  # type: ignore[union-attr]
                    self._expire, q, task, deadline,
                )
        self._drain(q)
        return task.result

    def close(self, reason: str = "the chain-task queue was closed") -> None:
        """
        Fail every waiting task (it never runs) and cancel every running one, each with an
        L{OperationError} C{SYS.1017} whose details are C{reason}; later submissions fail at
        once the same way. Used to bound a shutdown: work still in flight after the drain
        limit is failed rather than waited for.
        """
        self._closed = OperationError.of(SYS.CANCEL, reason)
        running: list[_Task] = []
        for q in list(self._queues.values()):
            for task in list(q.pending):
                if task.state == _PENDING:
                    self._drop(q, task)
                    task.result.errback(OperationError.of(
                        SYS.CANCEL, f"chain task of {q.signature!r} never started: {reason}",
                        signature=str(q.signature)))
            running.extend(q.active)
        for task in running:
            # Answer the caller with the reason now, then cancel the task's own work; what
            # that work fails with afterwards is expected, not logged.
            task.cancel_requested = _BY_CLOSE
            if not task.result.called:
                task.result.errback(OperationError.of(
                    SYS.CANCEL, f"chain task cancelled while running: {reason}"))
            if task.inner is not None:
                task.inner.cancel()

    # -- internals ---------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.seconds()  # type: ignore[union-attr]

    def _drain(self, q: _SignatureQueue) -> None:
        """
        Start pending tasks while slots are free, then drop the queue if it is empty.
        """
        if q.draining:
            return  # the loop further up the stack will see the change
        q.draining = True
        try:
            pending = q.pending
            while pending and q.running < q.level:
                task = pending.popleft()
                if task.state == _DEAD:
                    continue
                if task.deadline is not None and task.deadline <= self._now():
                    self._expire(q, task, task.deadline)
                    continue
                q.live_pending -= 1
                self._start(q, task)
        finally:
            q.draining = False
        if q.running == 0 and not q.pending and self._queues.get(q.signature) is q:
            del self._queues[q.signature]

    def _start(self, q: _SignatureQueue, task: _Task) -> None:
        if task.timer is not None:
            if task.timer.active():
                task.timer.cancel()
            task.timer = None
        task.state = _RUNNING
        q.running += 1
        fn, task.fn = task.fn, None
        context, task.context = task.context, None
        try:
            result = fn() if context is None else context.run(fn)
        except BaseException:
            self._finished(Failure(), q, task)
            return
        # Fast path (see Note [Chain queue bookkeeping]): a plain value or an already-fired,
        # successful Deferred finishes the task without adding a callback.
        if isinstance(result, Deferred):
            if (
                result.called
                and not result.paused
                and not isinstance(result.result, (Failure, Deferred))
            ):
                self._finished(result.result, q, task)
                return
        elif hasattr(result, "__await__") and hasattr(result, "send"):
            result = Deferred.fromCoroutine(result)
        else:
            self._finished(result, q, task)
            return
        if task.state == _RUNNING:  # not finished synchronously by a re-entrant cancel
            task.inner = result
            q.active.add(task)
        result.addBoth(self._finished, q, task)

    def _finished(self, result: Any, q: _SignatureQueue, task: _Task) -> None:
        task.state = _FINISHED
        if task.inner is not None:
            task.inner = None
            q.active.discard(task)
        q.running -= 1
        d = task.result
        if not d.called:
            if isinstance(result, Failure):
                if task.cancel_requested and result.check(CancelledError):
                    result = Failure(
                        OperationError.of(
                            SYS.CANCEL, f"chain task of {q.signature!r} cancelled while running"
                        )
                    )
                d.errback(result)
            else:
                d.callback(result)
        elif (isinstance(result, Failure) and not result.check(CancelledError)
              and task.cancel_requested != _BY_CLOSE):
            # The caller gave up (cancel) before the task ended: keep the error visible.
            log.failure(
                "chain task of {signature!r} failed after its caller cancelled it",
                failure=result,
                signature=q.signature,
            )
        self._drain(q)
        return None

    def _cancel(self, q: _SignatureQueue, task: _Task) -> None:
        """
        Canceller of the caller's Deferred.
        """
        if task.state == _PENDING:
            self._drop(q, task)
            task.result.errback(
                OperationError.of(
                    SYS.CANCEL,
                    f"chain task of {q.signature!r} cancelled before it started",
                )
            )
        elif task.state == _RUNNING:
            task.cancel_requested = True
            if task.inner is not None:
                task.inner.cancel()
            if not task.result.called:
                # The task's Deferred ignored the cancel: the caller is answered now, the
                # slot stays held until the task really ends.
                task.result.errback(
                    OperationError.of(
                        SYS.CANCEL,
                        f"chain task of {q.signature!r} cancelled while running; its slot is "
                        "held until it ends",
                    )
                )

    def _expire(self, q: _SignatureQueue, task: _Task, deadline: float) -> None:
        task.timer = None
        if task.state != _PENDING:
            return
        self._drop(q, task)
        task.result.errback(
            OperationError.of(
                SYS.TIMEOUT,
                f"chain task of {q.signature!r} was still waiting to start at its deadline "
                f"(t={deadline:g}); it did not run",
                signature=str(q.signature),
            )
        )

    def _drop(self, q: _SignatureQueue, task: _Task) -> None:
        """
        Mark a pending task dead; compact the deque when dead entries dominate it.
        """
        task.state = _DEAD
        task.fn = None  # type: ignore[assignment]
        task.context = None
        if task.timer is not None:
            if task.timer.active():
                task.timer.cancel()
            task.timer = None
        q.live_pending -= 1
        dead = len(q.pending) - q.live_pending
        if dead > 64 and dead > q.live_pending:
            if not q.draining:
                q.pending = deque(t for t in q.pending if t.state != _DEAD)
        if q.running == 0 and q.live_pending == 0 and not q.draining:
            # Cannot normally happen (a waiting task implies busy slots), but never leak.
            q.pending.clear()
            if self._queues.get(q.signature) is q:
                del self._queues[q.signature]
