"""
Tests for L{zcontrol.core.asyncwhile}: each, step, all_done, gather and retry.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.core.asyncwhile import all_done, each, gather, retry, step
from zcontrol.core.errors import SYS, OperationError


class EachTests(SynchronousTestCase):
    """
    L{each}: one item at a time.
    """

    def test_sequential(self) -> None:
        """
        The next item starts only when the previous one ended; the result lists the errors
        in item order.
        """
        gates: dict[int, Deferred] = {}
        started = []

        def fn(i: int) -> Deferred:
            started.append(i)
            gates[i] = Deferred()
            return gates[i]

        d = each([0, 1, 2], fn)
        self.assertEqual(started, [0])
        gates[0].errback(OperationError.of(SYS.IO_ERROR, "zero"))
        self.assertEqual(started, [0, 1])
        gates[1].callback(None)
        gates[2].errback(ValueError("two"))
        errors = self.successResultOf(d)
        self.assertEqual([e.code for e in errors], [SYS.IO_ERROR, SYS.INTERNAL])
        self.assertIn("two", errors[1].details)

    def test_empty(self) -> None:
        """
        No items: fires at once with no errors.
        """
        self.assertEqual(self.successResultOf(each([], lambda i: None)), [])

    def test_stop_on_error(self) -> None:
        """
        With C{stop_on_error}, no item starts after the first failure.
        """
        seen = []

        def fn(i: int) -> None:
            seen.append(i)
            if i == 1:
                raise ValueError(i)

        errors = self.successResultOf(each(range(5), fn, stop_on_error=True))
        self.assertEqual(seen, [0, 1])
        self.assertEqual(len(errors), 1)

    def test_many_synchronous(self) -> None:
        """
        100k items that complete synchronously (some failing) run without recursion.
        """
        def fn(i: int) -> Any:
            if i % 1000 == 0:
                return fail(ValueError(i))
            return i

        errors = self.successResultOf(each(range(100_000), fn))
        self.assertEqual(len(errors), 100)

    def test_coroutines(self) -> None:
        """
        The item function may be an C{async def}.
        """
        seen = []

        async def fn(i: int) -> None:
            seen.append(i)

        self.assertEqual(self.successResultOf(each("abc", fn)), [])
        self.assertEqual(seen, ["a", "b", "c"])

    def test_bad_iterable(self) -> None:
        """
        An iterable that raises ends the loop with that error at the end of the list.
        """
        def items():
            yield 1
            raise KeyError("gone")

        errors = self.successResultOf(each(items(), lambda i: None))
        self.assertEqual([e.code for e in errors], [SYS.INTERNAL])


class StepTests(SynchronousTestCase):
    """
    L{step}: bounded parallelism.
    """

    def test_parallelism(self) -> None:
        """
        At most C{parallelism} items are in flight; a finished one makes room for the next,
        errors come back in item order even when they happen out of order.
        """
        gates: dict[int, Deferred] = {}

        def fn(i: int) -> Deferred:
            gates[i] = Deferred()
            return gates[i]

        d = step(range(5), fn, 2)
        self.assertEqual(sorted(gates), [0, 1])
        gates[1].errback(ValueError(1))
        self.assertEqual(sorted(gates), [0, 1, 2])
        gates[2].callback(None)
        gates[0].errback(OperationError.of(SYS.TIMEOUT, "zero"))
        gates[3].errback(ValueError(3))
        self.assertNoResult(d)
        gates[4].callback(None)
        errors = self.successResultOf(d)
        self.assertEqual(
            [(e.code, e.details) for e in errors],
            [(SYS.TIMEOUT, "zero"), (SYS.INTERNAL, "ValueError: 1"), (SYS.INTERNAL, "ValueError: 3")],
        )

    def test_lazy_iterable(self) -> None:
        """
        Items are drawn from the iterable only as slots free up.
        """
        drawn = []

        def items():
            for i in range(10):
                drawn.append(i)
                yield i

        gates: list[Deferred] = []
        step(items(), lambda i: gates.append(Deferred()) or gates[-1], 3)
        self.assertEqual(drawn, [0, 1, 2])

    def test_bad_parallelism(self) -> None:
        """
        C{parallelism} must be at least 1.
        """
        self.assertRaises(ValueError, step, [], lambda i: None, 0)

    def test_cancel(self) -> None:
        """
        Cancelling stops new items; the Deferred fails with C{SYS.1017}.
        """
        started = []

        def fn(i: int) -> Deferred:
            started.append(i)
            return Deferred()

        d = step(range(10), fn, 2)
        d.cancel()
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.CANCEL)
        self.assertEqual(started, [0, 1])

    def test_many_synchronous(self) -> None:
        """
        100k synchronous items with parallelism 10 do not recurse.
        """
        count = [0]

        def fn(i: int) -> None:
            count[0] += 1

        self.assertEqual(self.successResultOf(step(range(100_000), fn, 10)), [])
        self.assertEqual(count[0], 100_000)

    @given(
        n=st.integers(min_value=0, max_value=40),
        parallelism=st.integers(min_value=1, max_value=6),
        data=st.data(),
    )
    def test_property_bound_and_exactly_once(self, n: int, parallelism: int, data) -> None:
        """
        For random completion orders and random failures, never more than C{parallelism}
        items are in flight, every item is processed exactly once, and the errors are those
        of the failed items in item order.
        """
        behaviours = data.draw(
            st.lists(st.sampled_from(["ok", "fail", "raise", "hang_ok", "hang_fail"]),
                     min_size=n, max_size=n)
        )
        order = data.draw(st.randoms(use_true_random=False))
        in_flight = [0]
        calls: list[int] = []
        hanging: list[tuple[int, Deferred]] = []

        def fn(i: int) -> Any:
            self.assertLess(in_flight[0], parallelism)
            calls.append(i)
            b = behaviours[i]
            if b == "ok":
                return i
            if b == "fail":
                return fail(ValueError(i))
            if b == "raise":
                raise ValueError(i)
            in_flight[0] += 1
            d: Deferred = Deferred()
            hanging.append((i, d))
            return d

        outcome: list[Any] = []
        step(range(n), fn, parallelism).addBoth(outcome.append)
        while hanging:
            i, d = hanging.pop(order.randrange(len(hanging)))
            in_flight[0] -= 1
            if behaviours[i] == "hang_ok":
                d.callback(None)
            else:
                d.errback(ValueError(i))
        self.assertEqual(sorted(calls), list(range(n)))
        self.assertEqual(calls, list(range(n)))  # items start in order
        self.assertEqual(len(outcome), 1)
        failed = [i for i in range(n) if behaviours[i] in ("fail", "raise", "hang_fail")]
        self.assertEqual([e.details for e in outcome[0]], [f"ValueError: {i}" for i in failed])


class LatchTests(SynchronousTestCase):
    """
    L{all_done} and L{gather}.
    """

    def test_all_done(self) -> None:
        """
        Waits for every Deferred, consumes failures, returns their ErrorCodes in input
        order.
        """
        a: Deferred = Deferred()
        b: Deferred = Deferred()
        d = all_done([a, b, succeed(1)])
        b.errback(ValueError("b"))
        self.assertNoResult(d)
        a.errback(OperationError.of(SYS.IO_ERROR))
        errors = self.successResultOf(d)
        self.assertEqual([e.code for e in errors], [SYS.IO_ERROR, SYS.INTERNAL])
        self.assertEqual(self.successResultOf(all_done([])), [])

    def test_gather_success(self) -> None:
        """
        All succeed: the results in input order.
        """
        a: Deferred = Deferred()
        d = gather([a, succeed(2)])
        a.callback(1)
        self.assertEqual(self.successResultOf(d), [1, 2])

    def test_gather_failure(self) -> None:
        """
        Any failure: after all fired, fails with the first failure in input order, with the
        failure count in C{opaque}; the inputs' failures are consumed.
        """
        a: Deferred = Deferred()
        b = fail(OperationError.of(SYS.TIMEOUT))
        d = gather([a, b, fail(ValueError())])
        self.assertNoResult(d)
        a.errback(OperationError.of(SYS.IO_ERROR))
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.IO_ERROR)
        self.assertEqual(err.opaque["errors"], 3)


class RetryTests(SynchronousTestCase):
    """
    L{retry}.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def flaky(self, failures: int):
        calls = []

        def fn() -> Any:
            calls.append(self.clock.seconds())
            if len(calls) <= failures:
                return fail(OperationError.of(SYS.IO_ERROR, f"try {len(calls)}"))
            return "ok"

        return fn, calls

    def test_succeeds_after_delays(self) -> None:
        """
        Retries after C{delay} seconds until success.
        """
        fn, calls = self.flaky(2)
        d = retry(fn, times=5, delay=3, clock=self.clock)
        self.assertNoResult(d)
        self.clock.advance(3)
        self.assertNoResult(d)
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(calls, [0, 3, 6])

    def test_backoff(self) -> None:
        """
        A callable delay gets the attempt number.
        """
        fn, calls = self.flaky(3)
        d = retry(fn, times=5, delay=lambda n: 2**n, clock=self.clock)
        self.clock.pump([1] * 20)
        self.successResultOf(d)
        self.assertEqual(calls, [0, 2, 6, 14])

    def test_gives_up(self) -> None:
        """
        After C{times} failed attempts, fails with C{SYS.1006} caused by the last error.
        """
        fn, calls = self.flaky(10)
        err = self.failureResultOf(retry(fn, times=3), OperationError).value.error
        self.assertEqual(len(calls), 3)
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertEqual(err.cause.details, "try 3")
        self.assertEqual(err.opaque["attempts"], 3)

    def test_retry_on(self) -> None:
        """
        An error C{retry_on} rejects fails at once, unchanged.
        """
        fn, calls = self.flaky(10)
        d = retry(fn, times=3, retry_on=lambda e: e.code != SYS.IO_ERROR)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.details, "try 1")
        self.assertEqual(len(calls), 1)

    def test_async_attempts(self) -> None:
        """
        Attempts returning pending Deferreds are awaited.
        """
        gates: list[Deferred] = []

        def fn() -> Deferred:
            gates.append(Deferred())
            return gates[-1]

        d = retry(fn, times=2)
        gates[0].errback(ValueError())
        self.assertEqual(len(gates), 2)
        gates[1].callback(5)
        self.assertEqual(self.successResultOf(d), 5)

    def test_cancel_during_delay(self) -> None:
        """
        Cancelling during a delay stops further attempts and leaves no delayed call.
        """
        fn, calls = self.flaky(10)
        d = retry(fn, times=5, delay=1, clock=self.clock)
        d.cancel()
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.CANCEL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_during_attempt(self) -> None:
        """
        Cancelling while an attempt runs cancels the attempt and makes no other.
        """
        attempts: list[Deferred] = []

        def fn() -> Deferred:
            attempts.append(Deferred())
            return attempts[-1]

        d = retry(fn, times=5)
        d.cancel()
        self.assertEqual(len(attempts), 1)
        self.assertTrue(attempts[0].called)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.CANCEL)

    def test_bad_arguments(self) -> None:
        """
        C{times} >= 1, and a delay needs a clock.
        """
        self.assertRaises(ValueError, retry, lambda: None, 0)
        self.assertRaises(ValueError, retry, lambda: None, 2, 1.0)

    def test_many_synchronous_retries(self) -> None:
        """
        100k synchronous failing attempts without a delay do not recurse.
        """
        fn, calls = self.flaky(10**6)
        self.failureResultOf(retry(fn, times=100_000), OperationError)
        self.assertEqual(len(calls), 100_000)
