"""
Tests for L{zcontrol.core.flow}: flow chains with rollback.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from zcontrol.core.errors import SYS, OperationError
from zcontrol.core.flow import (
    FLOW_EMPTY_CHAIN,
    Flow,
    FlowChain,
    IFlow,
    NoRollbackFlow,
    flow,
)


class Log:
    """
    Records the runs and rollbacks of recording flows.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def flow(
        self,
        name: str,
        fail_run: bool = False,
        raise_run: bool = False,
        fail_rollback: bool = False,
        gate: Deferred | None = None,
    ):
        def run(ctx: dict) -> Any:
            self.events.append(("run", name))
            ctx.setdefault("ran", []).append(name)
            if raise_run:
                raise ValueError(f"{name} exploded")
            if fail_run:
                return fail(OperationError.of(SYS.IO_ERROR, f"{name} failed"))
            return gate

        def rollback(ctx: dict) -> Any:
            self.events.append(("rollback", name))
            if fail_rollback:
                raise RuntimeError(f"rollback of {name} broke")

        return flow(name, run, rollback)

    def of(self, kind: str) -> list[str]:
        return [n for k, n in self.events if k == kind]


class FlowChainTests(SynchronousTestCase):
    """
    Behaviour of L{FlowChain}.
    """

    def setUp(self) -> None:
        self.log = Log()

    def test_success(self) -> None:
        """
        Flows run in order; the chain fires with the context, then done and finally hooks
        run (in that order), nothing is rolled back, and the chain ends C{done}.
        """
        hooks = []
        chain = (
            FlowChain("c", [self.log.flow("a"), self.log.flow("b")])
            .then(self.log.flow("c"))
            .done(lambda ctx: hooks.append(("done", list(ctx["ran"]))))
            .error(lambda err, ctx: hooks.append(("error", err)))
            .finally_(lambda ctx: hooks.append(("finally", None)))
        )
        ctx = {"x": 1}
        self.assertIs(self.successResultOf(chain.run(ctx)), ctx)
        self.assertEqual(self.log.of("run"), ["a", "b", "c"])
        self.assertEqual(self.log.of("rollback"), [])
        self.assertEqual(hooks, [("done", ["a", "b", "c"]), ("finally", None)])
        self.assertEqual(chain.state, "done")
        self.assertIsNone(chain.current)
        self.assertIsNone(chain.error_code)

    def test_default_context(self) -> None:
        """
        Without a context, the chain makes a new dict and fires with it.
        """
        chain = FlowChain("c", [flow("a", lambda ctx: ctx.__setitem__("a", 1))])
        self.assertEqual(self.successResultOf(chain.run()), {"a": 1})

    def test_failure_rolls_back_including_failing_flow(self) -> None:
        """
        When a flow fails, the flows that ran and the failing flow itself are rolled back in
        reverse order; later flows never run. The final error is C{SYS.1006} located at the
        failing flow and caused by the flow's own error; the error and finally hooks run.
        """
        hooks = []
        chain = (
            FlowChain(
                "create-vm",
                [
                    self.log.flow("host"),
                    self.log.flow("volume"),
                    self.log.flow("nic", fail_run=True),
                    self.log.flow("start"),
                ],
            )
            .error(lambda err, ctx: hooks.append(("error", err.location)))
            .finally_(lambda ctx: hooks.append(("finally", None)))
        )
        f = self.failureResultOf(chain.run(), OperationError)
        self.assertEqual(self.log.of("run"), ["host", "volume", "nic"])
        self.assertEqual(self.log.of("rollback"), ["nic", "volume", "host"])
        err = f.value.error
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertEqual(err.location, "nic")
        self.assertEqual(err.cause.code, SYS.IO_ERROR)
        self.assertEqual(err.cause.details, "nic failed")
        self.assertEqual(err.opaque["chain"], "create-vm")
        self.assertNotIn("rollback_errors", err.opaque)
        self.assertEqual(hooks, [("error", "nic"), ("finally", None)])
        self.assertEqual(chain.state, "failed")
        self.assertEqual(chain.error_code, err)

    def test_exception_becomes_internal_error(self) -> None:
        """
        An exception raised by a flow's C{run} becomes a C{SYS.1000} cause with the
        exception's text in its details.
        """
        chain = FlowChain("c", [self.log.flow("a"), self.log.flow("b", raise_run=True)])
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.cause.code, SYS.INTERNAL)
        self.assertIn("ValueError: b exploded", err.cause.details)
        self.assertEqual(err.location, "b")
        self.assertEqual(self.log.of("rollback"), ["b", "a"])

    def test_rollback_failures_logged_attached_and_continue(self) -> None:
        """
        Failing rollbacks are logged, attached to the final error in
        C{opaque["rollback_errors"]} (in rollback order) and do not stop the remaining
        rollbacks.
        """
        chain = FlowChain(
            "c",
            [
                self.log.flow("a", fail_rollback=True),
                self.log.flow("b"),
                self.log.flow("c", fail_rollback=True, fail_run=True),
            ],
        )
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(self.log.of("rollback"), ["c", "b", "a"])
        rollback_errors = err.opaque["rollback_errors"]
        self.assertEqual([e["flow"] for e in rollback_errors], ["c", "a"])
        self.assertEqual(rollback_errors[0]["error"]["code"], SYS.INTERNAL)
        self.assertIn("rollback of a broke", rollback_errors[1]["error"]["details"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        # still JSON-serialisable
        self.assertIn("rollback_errors", err.to_json())

    def test_empty_chain_is_error(self) -> None:
        """
        An empty chain fails with C{FLOW.1000} and runs its error hooks.
        """
        seen = []
        chain = FlowChain("empty").error(lambda err, ctx: seen.append(err.code))
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.code, FLOW_EMPTY_CHAIN)
        self.assertEqual(FLOW_EMPTY_CHAIN, "FLOW.1000")
        self.assertEqual(seen, [FLOW_EMPTY_CHAIN])

    def test_empty_chain_allowed(self) -> None:
        """
        With C{allow_empty=True}, an empty chain succeeds with its context.
        """
        self.assertEqual(self.successResultOf(FlowChain("e", allow_empty=True).run()), {})

    def test_no_rollback(self) -> None:
        """
        With C{no_rollback=True}, a failure rolls nothing back.
        """
        chain = FlowChain(
            "c", [self.log.flow("a"), self.log.flow("b", fail_run=True)], no_rollback=True
        )
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.location, "b")
        self.assertEqual(self.log.of("rollback"), [])

    def test_observable_while_running(self) -> None:
        """
        While a flow is in progress the chain shows its name and state; the same during an
        asynchronous rollback.
        """
        gate: Deferred = Deferred()
        rollback_gate: Deferred = Deferred()
        chain = FlowChain(
            "obs",
            [
                flow("first", lambda ctx: None, lambda ctx: rollback_gate),
                flow("second", lambda ctx: gate),
            ],
        )
        self.assertEqual(chain.state, "pending")
        self.assertIsNone(chain.current)
        d = chain.run()
        self.assertEqual((chain.name, chain.current, chain.state), ("obs", "second", "running"))
        gate.errback(OperationError.of(SYS.TIMEOUT, "slow"))
        self.assertEqual((chain.current, chain.state), ("first", "rolling_back"))
        self.assertNoResult(d)
        rollback_gate.callback(None)
        self.assertEqual((chain.current, chain.state), (None, "failed"))
        self.failureResultOf(d, OperationError)

    def test_coroutine_flows(self) -> None:
        """
        Flows and rollbacks may be C{async def} functions.
        """
        gate: Deferred = Deferred()

        async def run(ctx: dict) -> None:
            ctx["value"] = await gate

        async def boom(ctx: dict) -> None:
            raise OperationError.of(SYS.NO_ROUTE_ERROR, "nowhere")

        undone = []

        async def undo(ctx: dict) -> None:
            undone.append(ctx["value"])

        d = FlowChain("c", [flow("a", run, undo), flow("b", boom)]).run()
        gate.callback(7)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.cause.code, SYS.NO_ROUTE_ERROR)
        self.assertEqual(undone, [7])

    def test_cancel_between_flows(self) -> None:
        """
        C{cancel()} lets the flow in progress end, runs no further flow, rolls back every
        flow that ran and fails the chain with C{SYS.1017}.
        """
        gate: Deferred = Deferred()
        chain = FlowChain(
            "c", [self.log.flow("a"), self.log.flow("b", gate=gate), self.log.flow("c")]
        )
        d = chain.run()
        chain.cancel()
        self.assertNoResult(d)
        gate.callback(None)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.CANCEL)
        self.assertIn("before flow 'c'", err.details)
        self.assertEqual(self.log.of("run"), ["a", "b"])
        self.assertEqual(self.log.of("rollback"), ["b", "a"])

    def test_cancel_then_running_flow_fails(self) -> None:
        """
        If the flow in progress fails after a cancel, its own error is reported.
        """
        gate: Deferred = Deferred()
        chain = FlowChain("c", [self.log.flow("a"), self.log.flow("b", gate=gate)])
        d = chain.run()
        chain.cancel()
        gate.errback(OperationError.of(SYS.IO_ERROR))
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.location, "b")
        self.assertEqual(err.cause.code, SYS.IO_ERROR)

    def test_cancel_before_run(self) -> None:
        """
        A chain cancelled before it runs fails with C{SYS.1017} without running any flow.
        """
        chain = FlowChain("c", [self.log.flow("a")])
        chain.cancel()
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.code, SYS.CANCEL)
        self.assertEqual(self.log.events, [])

    def test_cancel_deferred(self) -> None:
        """
        Cancelling the Deferred from C{run} fails it at once with C{SYS.1017} (Twisted's
        rule) and the chain still rolls back in the background.
        """
        gate: Deferred = Deferred()
        chain = FlowChain("c", [self.log.flow("a"), self.log.flow("b", gate=gate)])
        d = chain.run()
        d.cancel()
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.CANCEL)
        gate.callback(None)
        self.assertEqual(self.log.of("rollback"), ["b", "a"])
        self.assertEqual(chain.state, "failed")

    def test_single_use(self) -> None:
        """
        A chain runs once; adding flows or hooks after C{run} is refused too.
        """
        chain = FlowChain("c", [self.log.flow("a")])
        chain.run()
        self.assertRaises(RuntimeError, chain.run)
        self.assertRaises(RuntimeError, chain.then, self.log.flow("b"))
        self.assertRaises(RuntimeError, chain.done, lambda ctx: None)

    def test_hook_failure_on_success(self) -> None:
        """
        A failing done hook is logged and fails the chain with C{SYS.1000}; the finally
        hooks still run.
        """
        finals = []

        def bad(ctx: dict) -> None:
            raise KeyError("oops")

        chain = (
            FlowChain("c", [self.log.flow("a")])
            .on_done(bad)
            .on_finally(lambda ctx: finals.append(1))
        )
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.code, SYS.INTERNAL)
        self.assertEqual(err.location, "c.done")
        self.assertEqual(err.opaque["hook_errors"][0]["hook"], "done")
        self.assertEqual(finals, [1])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_hook_failure_on_failure(self) -> None:
        """
        A failing error hook is logged and added to the final error's C{hook_errors}.
        """

        def bad(err, ctx) -> None:
            raise KeyError("oops")

        chain = FlowChain("c", [self.log.flow("a", fail_run=True)]).on_error(bad)
        err = self.failureResultOf(chain.run(), OperationError).value.error
        self.assertEqual(err.location, "a")
        self.assertEqual(err.opaque["hook_errors"][0]["hook"], "error")
        self.flushLoggedErrors(KeyError)

    def test_async_hooks(self) -> None:
        """
        Hooks may return Deferreds; the chain fires after they do.
        """
        gate: Deferred = Deferred()
        d = FlowChain("c", [self.log.flow("a")]).done(lambda ctx: gate).run()
        self.assertNoResult(d)
        gate.callback(None)
        self.successResultOf(d)

    def test_flow_classes(self) -> None:
        """
        L{Flow} subclasses and L{NoRollbackFlow}s provide L{IFlow} and run in a chain.
        """

        class Allocate(Flow):
            name = "allocate"

            def run(self, ctx):
                ctx["ip"] = "10.0.0.1"

            def rollback(self, ctx):
                ctx.pop("ip", None)

        class Check(NoRollbackFlow):
            name = "check"

            def run(self, ctx):
                raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "bad")

        for f in (Allocate(), Check(), flow("x", lambda ctx: None)):
            verifyObject(IFlow, f)
        ctx: dict = {}
        err = self.failureResultOf(
            FlowChain("c", [Allocate(), Check()]).run(ctx), OperationError
        ).value.error
        self.assertEqual(err.location, "check")
        self.assertEqual(ctx, {})

    def test_many_synchronous_flows(self) -> None:
        """
        50k flows that complete synchronously, and their rollbacks, do not recurse.
        """
        flows = [flow(f"f{i}", lambda ctx: None) for i in range(50_000)]
        flows.append(flow("last", lambda ctx: fail(OperationError.of(SYS.IO_ERROR))))
        err = self.failureResultOf(FlowChain("big", flows).run(), OperationError).value.error
        self.assertEqual(err.location, "last")


class FlowChainPropertyTests(SynchronousTestCase):
    """
    Properties of L{FlowChain} rollback.
    """

    @given(
        n=st.integers(min_value=1, max_value=12),
        data=st.data(),
    )
    def test_rollback_exactly_what_ran_in_reverse(self, n: int, data) -> None:
        """
        For any failure position (or none), any set of failing rollbacks and any mix of
        synchronous and asynchronous flows, the rolled-back flows are exactly the ones that
        ran (the failing one included), in reverse order; the rollback errors name exactly
        the failing rollbacks; the error names the failing flow.
        """
        fail_at = data.draw(st.one_of(st.none(), st.integers(min_value=0, max_value=n - 1)))
        bad_rollbacks = data.draw(st.sets(st.integers(min_value=0, max_value=n - 1)))
        is_async = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        ran: list[int] = []
        rolled: list[int] = []
        pending: list[Deferred] = []
        outcome: list[Any] = []

        def make(i: int):
            def run(ctx):
                ran.append(i)
                if is_async[i]:
                    d: Deferred = Deferred()
                    pending.append(d)
                    return d
                if i == fail_at:
                    raise RuntimeError(i)
                return None

            def rollback(ctx):
                rolled.append(i)
                if i in bad_rollbacks:
                    raise ValueError(i)

            return flow(f"f{i}", run, rollback)

        chain = FlowChain("prop", [make(i) for i in range(n)])
        d = chain.run()
        d.addBoth(outcome.append)
        while pending:
            step = pending.pop()
            i = ran[-1]
            if i == fail_at:
                step.errback(RuntimeError(i))
            else:
                step.callback(None)
        self.assertEqual(len(outcome), 1)
        if fail_at is None:
            self.assertEqual(ran, list(range(n)))
            self.assertEqual(rolled, [])
            self.assertEqual(outcome[0], {})
        else:
            self.assertEqual(ran, list(range(fail_at + 1)))
            self.assertEqual(rolled, list(reversed(ran)))
            err = outcome[0].value.error
            self.assertEqual(err.location, f"f{fail_at}")
            expected_bad = [f"f{i}" for i in rolled if i in bad_rollbacks]
            got_bad = [e["flow"] for e in err.opaque.get("rollback_errors", [])]
            self.assertEqual(got_bad, expected_bad)
        self.flushLoggedErrors(ValueError)
