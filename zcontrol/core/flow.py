# -*- test-case-name: tests.test_core_flow -*-
"""
Flow chains: ordered steps with rollback, the Twisted form of ZStack's C{SimpleFlowChain}.

A flow has a C{name}, C{run(ctx)} and C{rollback(ctx)}; both return a value, a L{Deferred}
or a coroutine. A L{FlowChain} runs its flows in order, passing them one shared context (a
dict by default, ZStack's C{data} map). If every flow succeeds the chain's Deferred fires
with the context. If one fails, the chain rolls back, in reverse order, every flow that ran
I{including the failing flow itself}, then fails with an L{OperationError}.

Note [The failing flow is rolled back]
======================================
ZStack's C{FlowTrigger.fail()} pushes the failing flow onto the rollback stack before
unwinding it, so the failing flow's own C{rollback} runs first. We keep that rule: a flow
that fails half way (allocated an IP, then failed to write the DB row) gets the chance to
undo its partial work, and it does not need an error path of its own. The consequence is
that every C{rollback} must tolerate partial (or no) work by its own C{run}, e.g. by
checking what is recorded in the context before undoing it.

Note [Rollback errors]
======================
A failing rollback is logged (C{log.failure}, with its traceback) and recorded, and the
remaining rollbacks still run (ZStack logs and continues). The recorded errors are attached to
the chain's final error as C{opaque["rollback_errors"]}: a list of
C{{"flow": name, "error": ErrorCode.to_dict()}} in the order the rollbacks ran. They are
never swallowed.

Note [Final error]
==================
The chain fails with C{OperationError(SYS.1006)} whose C{location} is the failing flow's
name and whose C{cause} is the flow's own ErrorCode (an exception raised by a flow becomes
C{SYS.1000} with the exception's text as details). C{opaque} carries C{"chain"} (the chain's
name) and, when any, C{"rollback_errors"}. A cancelled chain fails with C{SYS.1017} instead
(see L{FlowChain.cancel}).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, MutableMapping

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from zcontrol._defer import maybe_deferred
from zcontrol.core.errors import (
    SYS,
    ErrorCode,
    OperationError,
    error_code,
    from_failure,
    register_codes,
)

__all__ = [
    "FLOW_EMPTY_CHAIN",
    "Flow",
    "FlowChain",
    "FunctionFlow",
    "IFlow",
    "NoRollbackFlow",
    "flow",
]

log = Logger()

#: C{FLOW.1000}: a chain without flows was run and C{allow_empty} was not set.
FLOW_EMPTY_CHAIN = register_codes("FLOW", {1000: "A flow chain has no flows"})[1000]

_NOTHING = object()


class IFlow(Interface):
    """
    One step of a L{FlowChain}.
    """

    name = Attribute("The flow's name (C{str}), used in logs and as the error location.")

    def run(ctx: MutableMapping[str, Any]) -> Deferred:
        """
        Do the step's work, recording in C{ctx} what later flows (and this flow's rollback)
        need.

        @return: a value, a Deferred or a coroutine; its value is ignored. A failure (an
            exception or a failing Deferred, ideally an L{OperationError}) fails the chain.
        """

    def rollback(ctx: MutableMapping[str, Any]) -> Deferred:
        """
        Undo what C{run} did. Called after this flow's C{run} succeeded I{or failed} (the
        failing flow is rolled back too, so this must tolerate partial or no work).

        @return: a value, a Deferred or a coroutine. A failure is logged and attached to the
            chain's final error; it does not stop the remaining rollbacks.
        """


@implementer(IFlow)
class Flow:
    """
    Base class for flows: subclass, set C{name} and override L{run} and L{rollback}.
    """

    name: str = "flow"

    def run(self, ctx: MutableMapping[str, Any]) -> Any:
        """
        Do the work; see L{IFlow.run}.
        """
        raise NotImplementedError(f"{type(self).__name__}.run")

    def rollback(self, ctx: MutableMapping[str, Any]) -> Any:
        """
        Undo the work; nothing by default. See L{IFlow.rollback}.
        """
        return None


class NoRollbackFlow(Flow):
    """
    A flow with nothing to undo (ZStack's C{NoRollbackFlow}): its rollback passes on.
    """

    def rollback(self, ctx: MutableMapping[str, Any]) -> None:
        """
        Nothing to undo.
        """
        return None


@implementer(IFlow)
@attrs.frozen
class FunctionFlow:
    """
    A flow made of functions of the context.

    @ivar name: the flow's name.
    @ivar run_fn: C{run_fn(ctx)} does the work.
    @ivar rollback_fn: C{rollback_fn(ctx)} undoes it, or None for nothing to undo.
    """

    name: str
    run_fn: Callable[[MutableMapping[str, Any]], Any]
    rollback_fn: Callable[[MutableMapping[str, Any]], Any] | None = None

    def run(self, ctx: MutableMapping[str, Any]) -> Any:
        """
        Call C{run_fn(ctx)}.
        """
        return self.run_fn(ctx)

    def rollback(self, ctx: MutableMapping[str, Any]) -> Any:
        """
        Call C{rollback_fn(ctx)}, if any.
        """
        if self.rollback_fn is None:
            return None
        return self.rollback_fn(ctx)


def flow(
    name: str,
    run: Callable[[MutableMapping[str, Any]], Any],
    rollback: Callable[[MutableMapping[str, Any]], Any] | None = None,
) -> FunctionFlow:
    """
    A flow from functions of the context; without C{rollback} it is a no-rollback flow.
    """
    return FunctionFlow(name, run, rollback)


class FlowChain:
    """
    Ordered flows with rollback (ZStack's C{SimpleFlowChain}); single use.

    Usage::

        chain = (
            FlowChain("create-vm", [allocate_host, allocate_volume])
            .then(create_on_hypervisor)
            .done(lambda ctx: ...)
            .error(lambda err, ctx: ...)
            .finally_(lambda ctx: ...)
        )
        d = chain.run({"vm_uuid": uuid})

    Semantics: flows run in order; on a failure the flows that ran I{and the failing flow}
    are rolled back in reverse order (see Note [The failing flow is rolled back]); rollback
    failures are logged, attached to the final error and never stop the other rollbacks. Then
    the C{error} hooks run (or the C{done} hooks on success), then the C{finally_} hooks, in
    registration order, and then the Deferred from L{run} fires.

    A failing hook is logged; on success the chain then fails with C{SYS.1000} (location
    C{"<chain>.done"} or C{"<chain>.finally"}) listing the hook errors in
    C{opaque["hook_errors"]}; on failure the hook errors are added to the final error's
    C{opaque["hook_errors"]}.

    @ivar name: the chain's name.
    @ivar state: C{"pending"}, C{"running"}, C{"rolling_back"}, C{"done"} or C{"failed"}.
    @ivar current: the name of the flow running (or rolling back) now, or None.
    @ivar error_code: the final ErrorCode once failed, else None.
    """

    PENDING = "pending"
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    FAILED = "failed"

    def __init__(
        self,
        name: str,
        flows: Iterable[IFlow] = (),
        *,
        allow_empty: bool = False,
        no_rollback: bool = False,
    ) -> None:
        """
        @param name: the chain's name (logs, errors).
        @param flows: the flows, in order (more can be added with L{then} before L{run}).
        @param allow_empty: run an empty chain successfully instead of failing it with
            C{FLOW.1000}.
        @param no_rollback: on failure, roll nothing back (ZStack's C{noRollback(true)}).
        """
        self.name = name
        self.state = self.PENDING
        self.current: str | None = None
        self.error_code: ErrorCode | None = None
        self._flows: list[IFlow] = list(flows)
        self._allow_empty = allow_empty
        self._no_rollback = no_rollback
        self._done_hooks: list[Callable[..., Any]] = []
        self._error_hooks: list[Callable[..., Any]] = []
        self._finally_hooks: list[Callable[..., Any]] = []
        self._ctx: MutableMapping[str, Any] = {}
        self._index = 0
        self._stack: list[IFlow] = []  # flows started, for rollback
        self._rollback_errors: list[dict[str, Any]] = []
        self._cancel_requested = False
        self._error: ErrorCode | None = None
        self._result: Deferred | None = None
        # trampoline state (see _loop)
        self._in_loop = False
        self._sync_result: Any = _NOTHING

    def __repr__(self) -> str:
        return f"<FlowChain {self.name!r} state={self.state} current={self.current!r}>"

    # -- building ------------------------------------------------------------------

    def then(self, *flows: IFlow) -> FlowChain:
        """
        Append flows; returns the chain for chaining.
        """
        self._check_pending("add flows to")
        self._flows.extend(flows)
        return self

    def done(self, fn: Callable[[MutableMapping[str, Any]], Any]) -> FlowChain:
        """
        On success, call C{fn(ctx)} (may return a Deferred); returns the chain.
        """
        self._check_pending("add hooks to")
        self._done_hooks.append(fn)
        return self

    def error(self, fn: Callable[[ErrorCode, MutableMapping[str, Any]], Any]) -> FlowChain:
        """
        On failure, after the rollbacks, call C{fn(error_code, ctx)} with the final
        ErrorCode (may return a Deferred); returns the chain.
        """
        self._check_pending("add hooks to")
        self._error_hooks.append(fn)
        return self

    def finally_(self, fn: Callable[[MutableMapping[str, Any]], Any]) -> FlowChain:
        """
        Always, after the C{done} or C{error} hooks, call C{fn(ctx)} (may return a
        Deferred); returns the chain.
        """
        self._check_pending("add hooks to")
        self._finally_hooks.append(fn)
        return self

    on_done = done
    on_error = error
    on_finally = finally_

    @property
    def flows(self) -> tuple[IFlow, ...]:
        """
        The chain's flows, in order.
        """
        return tuple(self._flows)

    def _check_pending(self, what: str) -> None:
        if self.state != self.PENDING:
            raise RuntimeError(f"cannot {what} flow chain {self.name!r}: it is {self.state}")

    # -- running -------------------------------------------------------------------

    def run(self, ctx: MutableMapping[str, Any] | None = None) -> Deferred:
        """
        Run the chain (once).

        @param ctx: the shared context (a new dict when None).
        @return: a Deferred firing with C{ctx} when every flow succeeded, or failing with an
            L{OperationError} after the rollbacks (see Note [Final error]). Cancelling it
            calls L{cancel}; since Twisted fires a cancelled Deferred at once, it then fails
            with C{SYS.1017} immediately while the rollbacks go on (and log) in the
            background.
        @raise RuntimeError: the chain was already run.
        """
        self._check_pending("run")
        self._ctx = {} if ctx is None else ctx
        self._result = Deferred(self._cancel_result)
        self.state = self.RUNNING
        if self._cancel_requested:
            self._error = error_code(
                SYS.CANCEL, f"flow chain {self.name!r} cancelled before it ran", chain=self.name
            )
            self._finish()
        elif not self._flows and not self._allow_empty:
            self._error = error_code(
                FLOW_EMPTY_CHAIN,
                f"flow chain {self.name!r} has no flows",
                chain=self.name,
            )
            self._finish()
        else:
            self._loop()
        return self._result

    def cancel(self) -> None:
        """
        Stop before the next flow: the flow running now (if any) is allowed to end, then
        every flow that ran is rolled back and the chain fails with C{SYS.1017}. If the
        running flow fails, its own error is reported instead. Before L{run}, the chain
        will fail with C{SYS.1017} without running any flow. No effect once the chain is
        rolling back or finished.
        """
        if self.state in (self.PENDING, self.RUNNING):
            self._cancel_requested = True

    def _cancel_result(self, d: Deferred) -> None:
        self.cancel()
        if not d.called:
            d.errback(
                OperationError.of(
                    SYS.CANCEL,
                    f"flow chain {self.name!r} cancelled; rollback continues in the background",
                    chain=self.name,
                )
            )

    def _next_deferred(self) -> Deferred | None:
        """
        The next flow's run or rollback as a Deferred, or None when the phase is over (after
        moving to the next phase or finishing).
        """
        while True:
            if self.state == self.RUNNING:
                if self._cancel_requested:
                    nxt = self._flows[self._index].name if self._index < len(self._flows) else None
                    self._error = error_code(
                        SYS.CANCEL,
                        f"flow chain {self.name!r} cancelled"
                        + (f" before flow {nxt!r}" if nxt else ""),
                        chain=self.name,
                    )
                    self._start_rollback()
                    continue
                if self._index >= len(self._flows):
                    self._finish()
                    return None
                f = self._flows[self._index]
                self.current = f.name
                self._stack.append(f)
                return maybe_deferred(f.run, self._ctx)
            if self.state == self.ROLLING_BACK:
                if not self._stack:
                    self._finish()
                    return None
                f = self._stack[-1]
                self.current = f.name
                return maybe_deferred(f.rollback, self._ctx)
            return None

    def _handle(self, result: Any) -> None:
        """
        Take the result of the step that just ended.
        """
        if self.state == self.RUNNING:
            if isinstance(result, Failure):
                f = self._flows[self._index]
                cause = from_failure(result)
                self._error = attrs.evolve(
                    error_code(
                        SYS.OPERATION_ERROR,
                        f"flow {f.name!r} of chain {self.name!r} failed: {cause}",
                        cause=cause,
                        chain=self.name,
                    ),
                    location=f.name,
                )
                self._start_rollback()
            else:
                self._index += 1
        elif self.state == self.ROLLING_BACK:
            f = self._stack.pop()
            if isinstance(result, Failure):
                err = from_failure(result)
                log.failure(
                    "rollback of flow {flow!r} in chain {chain!r} failed",
                    failure=result,
                    flow=f.name,
                    chain=self.name,
                )
                self._rollback_errors.append({"flow": f.name, "error": err.to_dict()})

    def _start_rollback(self) -> None:
        self.state = self.ROLLING_BACK
        if self._no_rollback:
            self._stack.clear()

    def _loop(self) -> None:
        """
        Drive the flows without recursion: a step that ends synchronously hands its result
        back through C{_sync_result} and the loop goes on; one that ends later resumes the
        loop from its callback.
        """
        self._in_loop = True
        try:
            while True:
                d = self._next_deferred()
                if d is None:
                    return
                d.addBoth(self._on_step_result)
                if self._sync_result is _NOTHING:
                    return  # asynchronous: _on_step_result resumes
                result, self._sync_result = self._sync_result, _NOTHING
                self._handle(result)
        finally:
            self._in_loop = False

    def _on_step_result(self, result: Any) -> None:
        if self._in_loop:
            self._sync_result = result
            return None
        self._handle(result)
        self._loop()
        return None

    # -- finishing -----------------------------------------------------------------

    def _finish(self) -> None:
        self.current = None
        if self._error is None:
            self.state = self.DONE
            hooks = [(fn, (self._ctx,)) for fn in self._done_hooks]
            where = "done"
        else:
            err = self._error
            if self._rollback_errors:
                err = attrs.evolve(
                    err, opaque={**err.opaque, "rollback_errors": list(self._rollback_errors)}
                )
            self._error = err
            self.error_code = err
            self.state = self.FAILED
            hooks = [(fn, (err, self._ctx)) for fn in self._error_hooks]
            where = "error"
        hooks += [(fn, (self._ctx,)) for fn in self._finally_hooks]
        hook_errors: list[dict[str, Any]] = []

        def call_hooks(_: Any, i: int) -> Any:
            while i < len(hooks):
                fn, args = hooks[i]
                d = maybe_deferred(fn, *args)
                kind = where if i < len(hooks) - len(self._finally_hooks) else "finally"
                d.addErrback(record, kind)
                if not d.called:
                    return d.addCallback(call_hooks, i + 1)
                i += 1
            return None

        def record(reason: Failure, kind: str) -> None:
            log.failure(
                "{kind} hook of flow chain {chain!r} failed",
                failure=reason,
                kind=kind,
                chain=self.name,
            )
            hook_errors.append({"hook": kind, "error": from_failure(reason).to_dict()})

        def fire(_: Any) -> None:
            assert self._result is not None
            if self._error is None and hook_errors:
                self._error = attrs.evolve(
                    error_code(
                        SYS.INTERNAL,
                        f"a hook of flow chain {self.name!r} failed",
                        chain=self.name,
                        hook_errors=hook_errors,
                    ),
                    location=f"{self.name}.{hook_errors[0]['hook']}",
                )
                self.error_code = self._error
                self.state = self.FAILED
            elif self._error is not None and hook_errors:
                self._error = attrs.evolve(
                    self._error, opaque={**self._error.opaque, "hook_errors": hook_errors}
                )
                self.error_code = self._error
            if self._result.called:
                return None
            if self._error is None:
                self._result.callback(self._ctx)
            else:
                self._result.errback(OperationError(self._error))
            return None

        succeed(None).addCallback(call_hooks, 0).addCallback(fire)
