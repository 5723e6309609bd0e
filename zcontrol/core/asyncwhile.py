# -*- test-case-name: tests.test_core_while -*-
"""
Loops over asynchronous steps, after ZStack's C{While} (C{core/asyncbatch/While.java}):
L{each} runs one item at a time, L{step} runs a bounded number at once, both process every
item and collect the errors; L{all_done} and L{gather} wait for Deferreds already started;
L{retry} repeats a failing call.

Every function here calls the item function through L{maybe_deferred}, so it may return a
value, a Deferred or a coroutine, or raise. Failures become L{ErrorCode}s via
L{from_failure} (an L{OperationError}'s own code, C{SYS.1000} for any other exception).

Note [No recursion in loops]
============================
A step that completes synchronously ends inside the loop that started it; the loop is
guarded by a C{pumping} flag, so the nested completion only records its result and the outer
loop starts the next item. 100k synchronous items thus run at constant stack depth.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from zcontrol._defer import maybe_deferred
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code, from_failure

__all__ = ["all_done", "each", "gather", "retry", "step"]


class _Stepper:
    """
    Runs C{fn(item)} over an iterable, at most C{parallelism} at a time.
    """

    def __init__(
        self,
        items: Iterable[Any],
        fn: Callable[[Any], Any],
        parallelism: int,
        stop_on_error: bool,
    ) -> None:
        self._it = enumerate(iter(items))
        self._fn = fn
        self._parallelism = parallelism
        self._stop_on_error = stop_on_error
        self._in_flight = 0
        self._exhausted = False
        self._pumping = False
        self._errors: list[tuple[int, ErrorCode]] = []
        self.result: Deferred[list[ErrorCode]] = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        # Start nothing more; items in flight end on their own.
        self._exhausted = True
        d.errback(OperationError.of(SYS.CANCEL, "loop cancelled"))

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._exhausted and self._in_flight < self._parallelism:
                try:
                    index, item = next(self._it)
                except StopIteration:
                    self._exhausted = True
                    break
                except Exception:
                    self._exhausted = True
                    self._errors.append((-1, from_failure(Failure())))
                    break
                self._in_flight += 1
                maybe_deferred(self._fn, item).addBoth(self._done, index)
        finally:
            self._pumping = False
        if self._exhausted and self._in_flight == 0 and not self.result.called:
            self._errors.sort(key=lambda pair: pair[0] if pair[0] >= 0 else float("inf"))
            self.result.callback([err for _, err in self._errors])

    def _done(self, result: Any, index: int) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure):
            self._errors.append((index, from_failure(result)))
            if self._stop_on_error:
                self._exhausted = True
        self.pump()
        return None


def each(
    items: Iterable[Any],
    fn: Callable[[Any], Any],
    stop_on_error: bool = False,
) -> Deferred[list[ErrorCode]]:
    """
    Call C{fn(item)} for each item, one after the other (ZStack's C{While.each}).

    @param items: any iterable; consumed lazily.
    @param fn: returns a value, Deferred or coroutine; a failure is recorded, not raised.
    @param stop_on_error: start no further item after the first failure.
    @return: a Deferred firing, once every started item has ended, with the ErrorCodes of
        the failed items in item order (empty when all succeeded). It never fails, except
        with C{SYS.1017} when cancelled (no further item starts).
    """
    return step(items, fn, 1, stop_on_error=stop_on_error)


def step(
    items: Iterable[Any],
    fn: Callable[[Any], Any],
    parallelism: int,
    stop_on_error: bool = False,
) -> Deferred[list[ErrorCode]]:
    """
    Call C{fn(item)} for each item with at most C{parallelism} calls in flight (ZStack's
    C{While.step}); items start in order, every item is processed even when some fail.

    @param parallelism: >= 1.
    @param stop_on_error: start no further item after the first failure.
    @return: as L{each}: the ErrorCodes of the failed items, in item order.
    @raise ValueError: C{parallelism} < 1.
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, not {parallelism!r}")
    s = _Stepper(items, fn, parallelism, stop_on_error)
    s.pump()
    return s.result


def all_done(deferreds: Iterable[Deferred]) -> Deferred[list[ErrorCode]]:
    """
    Wait for every Deferred (ZStack's C{AsyncLatch}), consuming their failures.

    @return: a Deferred firing once all have fired, with the ErrorCodes of the failed ones in
        input order (empty when all succeeded).
    """
    return _collect(list(deferreds), fail_first=False)


def gather(deferreds: Iterable[Deferred]) -> Deferred[list[Any]]:
    """
    Wait for every Deferred, consuming their failures (C{consumeErrors} semantics).

    @return: a Deferred firing with the results in input order once all have fired, or, if
        any failed, failing (after all have fired) with an L{OperationError} carrying the
        first failure's ErrorCode in input order, with C{opaque["errors"]} = the count of
        failures.
    """
    return _collect(list(deferreds), fail_first=True)


def _collect(ds: Sequence[Deferred], fail_first: bool) -> Deferred:
    results: list[Any] = [None] * len(ds)
    errors: list[tuple[int, ErrorCode]] = []
    out: Deferred = Deferred()
    remaining = [len(ds)]

    def finish() -> None:
        errors.sort(key=lambda pair: pair[0])
        if not fail_first:
            out.callback([e for _, e in errors])
        elif errors:
            first = errors[0][1]
            if len(errors) > 1:
                first = attrs.evolve(first, opaque={**first.opaque, "errors": len(errors)})
            out.errback(OperationError(first))
        else:
            out.callback(results)

    def one(result: Any, i: int) -> None:
        if isinstance(result, Failure):
            errors.append((i, from_failure(result)))
        else:
            results[i] = result
        remaining[0] -= 1
        if remaining[0] == 0:
            finish()
        return None

    if not ds:
        finish()
        return out
    for i, d in enumerate(ds):
        d.addBoth(one, i)
    return out


def retry(
    fn: Callable[[], Any],
    times: int,
    delay: float | Callable[[int], float] = 0.0,
    clock: IReactorTime | None = None,
    retry_on: Callable[[ErrorCode], bool] | None = None,
) -> Deferred:
    """
    Call C{fn()} until it succeeds, at most C{times} times (ZStack's C{makeRetryWhile}).

    @param delay: seconds between attempts, or C{delay(attempt)} for attempt 1, 2, ... (e.g.
        exponential backoff). A positive or callable delay needs C{clock}; with no delay
        the attempts follow each other at once (in a loop, not recursively).
    @param retry_on: C{retry_on(error_code)} says whether an error is worth another attempt;
        when it says no, the call fails at once with that error unchanged. Default: retry
        every error.
    @return: a Deferred firing with the first successful result, or failing with an
        L{OperationError} C{SYS.1006} "gave up after N attempts" whose cause is the last
        attempt's ErrorCode (C{opaque["attempts"]} = N). Cancelling it cancels the attempt
        in flight or the pending delay, and fails it with C{SYS.1017}.
    @raise ValueError: C{times} < 1, or a positive or callable delay without a clock.
    """
    if times < 1:
        raise ValueError(f"times must be >= 1, not {times!r}")
    if clock is None and (callable(delay) or delay > 0):
        raise ValueError("retry with a delay needs a clock")

    state: dict[str, Any] = {"attempt": 0, "inner": None, "timer": None, "cancelled": False}

    def cancel(d: Deferred) -> None:
        timer: IDelayedCall | None = state["timer"]
        if timer is not None and timer.active():
            timer.cancel()
        state["timer"] = None
        inner = state["inner"]
        state["cancelled"] = True
        if inner is not None:
            inner.cancel()
        if not d.called:
            d.errback(OperationError.of(SYS.CANCEL, "retry cancelled"))

    out: Deferred = Deferred(cancel)

    def attempt() -> None:
        state["timer"] = None
        while not out.called:
            state["attempt"] += 1
            n = state["attempt"]
            d = maybe_deferred(fn)
            box: list[Any] = []
            state["inner"] = d
            d.addBoth(box.append)
            if not box:
                # asynchronous: resume from the callback
                d.addCallback(lambda _r, box=box, n=n: after(box[0], n))
                return
            state["inner"] = None
            if not _after_sync(box[0], n):
                return

    def _after_sync(result: Any, n: int) -> bool:
        """
        Handle one attempt's result; True to loop on at once.
        """
        if out.called or state["cancelled"]:
            return False
        if not isinstance(result, Failure):
            out.callback(result)
            return False
        err = from_failure(result)
        if retry_on is not None and not retry_on(err):
            out.errback(OperationError(err))
            return False
        if n >= times:
            out.errback(
                OperationError(
                    error_code(
                        SYS.OPERATION_ERROR,
                        f"gave up after {n} attempt(s): {err}",
                        cause=err,
                        attempts=n,
                    )
                )
            )
            return False
        wait = delay(n) if callable(delay) else delay
        if wait > 0:
            assert clock is not None
            state["timer"] = clock.callLater(wait, attempt)
            return False
        return True

    def after(result: Any, n: int) -> None:
        state["inner"] = None
        if _after_sync(result, n):
            attempt()

    attempt()
    return out

