# -*- test-case-name: tests.test_journal -*-
"""
Journaled flow chains: jobs that survive a crash of their management node.

A job kind (L{JobKind}) is an operation (its C{name}, e.g. C{"CreateVm"}, is the job row's
C{apiName}) and an ordered list of journaled flows (L{IJournaledFlow}). Running a job
(L{JournaledFlowChain.run}):

    1. C{store.create_job(uuid, kind.name, message, node, resource_uuid)}: a C{Running}
       row owned by this node;
    2. the flows, in order, through a L{zcontrol.core.flow.FlowChain}; each flow's C{run(ctx)}
       returns what it I{took}, a JSON object (C{{"host": uuid, "cpu": 2, "memory": bytes}},
       C{{"ip": "10.0.0.3", "l3": uuid}}, C{{"holder": [type, uuid]}}), which is appended to
       the job row's C{flows} (C{store.record_job_flow}, a compare-and-swap on the job being
       C{Running} and owned by this node) I{before} the next flow runs;
    3. C{store.finish_job}: C{Succeeded} (result C{{"flows": [names]}}, or the kind's
       C{job_result(ctx)}), or, after the chain rolled back in reverse order every flow that
       ran (each C{rollback(ctx, took)} with its recorded C{took}; the failing flow itself
       with C{took=None}), C{Failed} with the chain's error (C{SYS.1006}, C{location} the
       failing flow's name, C{cause} its error), or the kind's C{job_error(ctx, error)} (an
       operation's own code, e.g. C{IMAGE.1000}; the run still fails with the chain's). The rollbacks are journaled: before them the job is marked I{rolling back}
       (C{store.begin_job_rollback}: its C{rollbackError}, a compare-and-swap), and each
       completed rollback is recorded (C{store.record_job_rollback}, C{rolledBack}); when a
       rollback fails the job stays C{Running}, rolling back, for the next recovery, and the
       run fails with the error plus C{rollback_errors}. A journal write refused because
       another node claimed the job (C{SYS.1005}) abandons it: no rollback, no finish, the
       run fails with L{JOB_TAKEN_OVER} (C{JOB.1001}). A C{kind.context} that raises fails
       the job (C{SYS.1006}).

Recovery (L{recover_jobs}; jobs resolved concurrently, at most C{parallelism} at once;
each probe and rollback bounded by a timeout on the injected clock: a probe that times out
cannot tell, a rollback that times out failed), called when a node starts with its own C{Running} jobs (and, in
the multi-node issue, with the rows C{store.claim_jobs(dead, self)} returned), resolves each:

    - a job whose kind is unknown here (another version's job), or whose recorded flows do
      not match its kind's, is logged and left C{Running}: it never stops the start;
    - a job rolling back (C{rollbackError} set) is never probed nor forwarded: its
      remaining rollbacks run and it is finished C{Failed} with that error;
    - every flow recorded: the work was done, only the finish was lost; the job is finished
      C{Succeeded};
    - otherwise the first unrecorded flow was I{in flight}. Its C{probe(ctx)} says whether
      its work happened (C{True}), did not (C{False}) or cannot tell (C{None}, the default:
      e.g. the agent is unreachable; a VM flow asks the agent C{/vm/checkstate}). Then the
      kind's C{forward(ctx, recorded, happened)} (default: never) chooses to finish the job
      forward (the chain resumes, re-running the in-flight flow, whose run must therefore be
      idempotent, as reservations by holder are) or back: the in-flight flow is rolled back
      with C{took=None} unless its probe said C{False}, then every recorded flow in reverse
      with its C{took}, and the job is finished C{Failed} with L{JOB_NODE_RESTARTED}
      (C{JOB.1000}, C{location} the in-flight flow, details naming it, C{opaque}
      C{{"job", "flows", "rolledBack"}}).
    - a rollback that fails at recovery leaves the job C{Running} (logged): recovering again
      retries it, which is why rollbacks must be idempotent (releases by holder are: giving
      back what a holder no longer holds does nothing). Recovering a resolved job changes
      nothing (it is no longer C{Running}).

Note [in-flight rollback]
=========================
A flow's rollback is called with C{took=None} when its run never reported (it failed, or
the node stopped while it ran). It must then release by what it can derive from the
context, not from a record: by the holder (C{("VmInstanceVO", vm_uuid)}), on the resource
named in the message, or by what its probe found. A flow that I{chooses} a resource (the
allocator's host) must make its probe find the choice (e.g. by the holder's rows) or its
rollback release by holder everywhere.

ZStack, Nova and CloudStack have no such thing (ZSTACK_FACTS §8): ZStack's FlowChain state
lives only in the memory of the node that runs it (PR #1160: a restart during a batch create
left half-made VMs that could not be deleted); Nova leaves the instance's task_state stuck
after a compute restart (the recover-stuck-state blueprint; bug 1276214, MIGRATING);
CloudStack's MN restart left VMs, volumes and networks in transitional states that needed
database edits (PR #8394, PR #2163: volumes stuck in Creating).

Two services run their operations as kinds of this one mechanism: the VM service
(L{zcontrol.services.vm.base.VmServiceBase}: create, start, stop, ... of ZSTACK_FACTS §4)
and the image service's add (L{zcontrol.services.image.service}, Note [add jobs]: insert the
image, download to every backup storage in parallel, the final status; finished forward at
recovery from what the image's refs recorded, as the Sftp agent cannot tell whether a
download ended; the job row keeps C{IMAGE.1000} / C{IMAGE.1001} through C{job_error}). Each
resolves its jobs at start with L{recover_jobs}, in the resource's chain, the job uuid as the
trace id; the multi-node issue applies the same call to the rows C{store.claim_jobs(dead,
self)} returns.
"""

from __future__ import annotations

import contextvars
import uuid as uuidlib
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from zcontrol._defer import maybe_deferred
from zcontrol.core.asyncwhile import step
from zcontrol.core.errors import (
    SYS,
    ErrorCode,
    OperationError,
    error_code,
    from_failure,
    register_codes,
)
from zcontrol.core.flow import FlowChain, IFlow

__all__ = [
    "JOB_NODE_RESTARTED",
    "JOB_TAKEN_OVER",
    "IJournaledFlow",
    "JobKind",
    "JournaledFlow",
    "JournaledFlowChain",
    "recover_jobs",
]

log = Logger()

_JOB = register_codes("JOB", {
    1000: "The management node restarted during a job; what the job took was given back",
    1001: "The job was taken over by another management node",
})
#: C{JOB.1000}: the job's node restarted (or died) during flow C{location}; the flows it had
#: recorded were rolled back at recovery.
JOB_NODE_RESTARTED = _JOB[1000]
#: C{JOB.1001}: another node claimed the job (this node was presumed dead) while this node
#: still ran it; this node abandoned it (no rollback, no finish: the job is the new owner's).
JOB_TAKEN_OVER = _JOB[1001]

#: Recovery defaults: seconds a probe / a rollback may take before it counts as "cannot
#: tell" / failed, and how many jobs are resolved at once.
PROBE_TIMEOUT = 60.0
ROLLBACK_TIMEOUT = 300.0
RECOVERY_PARALLELISM = 8

#: Recovery outcomes (the C{outcome} of L{recover_jobs}' results).
SUCCEEDED = "succeeded"
ROLLED_BACK = "rolled-back"
FORWARD = "forward"
LEFT_RUNNING = "left-running"


class IJournaledFlow(Interface):
    """
    One step of a L{JobKind}.
    """

    name = Attribute("The flow's name (C{str}): the key of its record in the job row.")

    def run(ctx: MutableMapping[str, Any]) -> Deferred:
        """
        Do the step's work.

        @return: (a Deferred of) a JSON object: what the step took, recorded in the job
            row before the next flow runs and given back to L{rollback}. Must be
            idempotent when the kind may finish forward (it is re-run at recovery).
        """

    def rollback(ctx: MutableMapping[str, Any], took: dict | None) -> Deferred:
        """
        Give back exactly C{took}; C{None} when the run never reported (Note [in-flight
        rollback]). Idempotent: it may run again at a later recovery.
        """

    def probe(ctx: MutableMapping[str, Any]) -> Deferred:
        """
        At recovery, for the flow in flight: did its work happen?

        @return: (a Deferred of) C{True}, C{False} or C{None} (cannot tell).
        """


@implementer(IJournaledFlow)
class JournaledFlow:
    """
    Base class: set C{name}, override L{run} and L{rollback}; L{probe} cannot tell.
    """

    name: str = "flow"

    def run(self, ctx: MutableMapping[str, Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> Any:
        return None

    def probe(self, ctx: MutableMapping[str, Any]) -> Any:
        return None


@attrs.frozen
class JobKind:
    """
    An operation run as a journaled job.

    @ivar name: the operation (the job row's C{apiName}, e.g. C{"CreateVm"}).
    @ivar flows: the journaled flows, in order (names unique).
    @ivar forward: at recovery, C{forward(ctx, recorded, happened)} -> C{True} to finish
        the job forward (resume from the in-flight flow) instead of rolling it back;
        C{recorded} is the job's C{flows} list, C{happened} the in-flight flow's probe.
        None: always roll back.
    @ivar context: C{context(job_row)} -> the extra context of a run or a recovery (e.g.
        the VM uuid from the message); None: nothing more than L{JournaledFlowChain}'s
        keys.
    @ivar job_result: C{job_result(ctx)} -> the C{result} (JSON) a C{Succeeded} job is
        finished with; None: C{{"flows": [names]}} (plus C{"recovered": True} when a
        recovery found every flow recorded).
    @ivar job_error: C{job_error(ctx, error)} -> the L{ErrorCode} a C{Failed} job is
        finished with, given the journal's C{error} (the chain's C{SYS.1006}, the
        recovery's C{JOB.1000}, or the C{rollbackError} of a job that was rolling back),
        e.g. the failing flow's own error, which is the operation's (C{IMAGE.1000}); None:
        C{error} itself. Called after the rollbacks (they may leave what it needs in
        C{ctx}). Only the job row's error changes: L{JournaledFlowChain.run} still fails
        with the chain's. A hook that raises is logged and the default is used.
    """

    name: str
    flows: tuple[IJournaledFlow, ...] = attrs.field(converter=tuple)
    forward: Callable[[MutableMapping[str, Any], list, bool | None], bool] | None = None
    context: Callable[[dict], Mapping[str, Any]] | None = None
    job_result: Callable[[MutableMapping[str, Any]], Any] | None = None
    job_error: Callable[[MutableMapping[str, Any], ErrorCode], ErrorCode] | None = None

    def __attrs_post_init__(self) -> None:
        names = [f.name for f in self.flows]
        if len(set(names)) != len(names):
            raise ValueError(f"job kind {self.name!r}: flow names are not unique: {names}")


def _job_result(kind: JobKind, ctx: MutableMapping[str, Any], default: Any) -> Any:
    """
    The result a succeeded job of C{kind} is finished with (L{JobKind.job_result}).
    """
    if kind.job_result is None:
        return default
    try:
        return kind.job_result(ctx)
    except Exception as e:
        log.error("job {job} ({kind}): its job_result hook failed: {error}", job=ctx.get("job"),
                  kind=kind.name, error=str(from_failure(e)))
        return default


def _job_error(kind: JobKind, ctx: MutableMapping[str, Any] | None, err: ErrorCode
               ) -> ErrorCode:
    """
    The error a failed job of C{kind} is finished with (L{JobKind.job_error}); C{err} when
    there is no hook or no context (the context itself failed).
    """
    if kind.job_error is None or ctx is None:
        return err
    try:
        out = kind.job_error(ctx, err)
    except Exception as e:
        log.error("job {job} ({kind}): its job_error hook failed: {error}", job=ctx.get("job"),
                  kind=kind.name, error=str(from_failure(e)))
        return err
    return out if isinstance(out, ErrorCode) else err


def _context(kind: JobKind, job: dict) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "job": job["uuid"],
        "node": job["managementNodeUuid"],
        "message": job.get("apiMessage"),
        "resource": job.get("resourceUuid"),
        "took": {},
    }
    if kind.context is not None:
        ctx.update(kind.context(job))
    return ctx


@implementer(IFlow)
class _Journaling:
    """
    The L{IFlow} of a journaled flow: run, then record what it took; or, resuming, give
    back the recorded C{took} without running.
    """

    def __init__(self, chain: JournaledFlowChain, flow: IJournaledFlow,
                 recorded: dict | None = None, replay: bool = False):
        self.chain = chain
        self.flow = flow
        self.name = flow.name
        self.recorded = recorded
        self.replay = replay

    def run(self, ctx: MutableMapping[str, Any]) -> Deferred:
        # The FlowChain starts a flow from the callback of the previous one, i.e. in the
        # context of whatever fired it (a store's thread result, an HTTP response): each flow
        # runs in (a copy of) the job's own context instead, so that its trace id (and any
        # other context variable) rides what every flow does, not only the first one.
        context = self.chain.context
        if context is None:
            return self._run(ctx)
        return context.copy().run(self._run, ctx)

    def _run(self, ctx: MutableMapping[str, Any]) -> Deferred:
        if self.replay:
            ctx["took"][self.name] = self.recorded
            return maybe_deferred(lambda: None)

        def record(took: Any) -> Deferred:
            if not isinstance(took, dict):
                raise OperationError.of(
                    SYS.INTERNAL, f"flow {self.name!r} of job kind {self.chain.kind.name!r}"
                    f" returned {type(took).__name__}, not a dict of what it took")
            # In the context before the write: a rollback after a failed record gets it.
            ctx["took"][self.name] = took
            d = self.chain.store.record_job_flow(self.chain.job_uuid, self.chain.node_id,
                                                 self.name, took)

            def recorded(_: Any) -> None:
                self.chain.recorded.append(self.name)

            def refused(f: Any) -> Any:
                if _taken_over(from_failure(f)):
                    self.chain.abandoned = True
                return f

            return d.addCallbacks(recorded, refused)

        return maybe_deferred(self.flow.run, ctx).addCallback(record)

    def rollback(self, ctx: MutableMapping[str, Any]) -> Deferred:
        return maybe_deferred(self.flow.rollback, ctx, ctx["took"].get(self.name))


class JournaledFlowChain:
    """
    Run one job of a L{JobKind} with its flows journaled (see the module docstring);
    single use.

    @ivar kind: the job kind.
    @ivar job_uuid: the job's uuid.
    @ivar recorded: the names of the flows recorded by this chain, in order.
    @ivar chain: the underlying L{FlowChain} once running (its C{state}, C{current}).
    """

    def __init__(self, store: Any, node_id: str, kind: JobKind, *,
                 job_uuid: str | None = None) -> None:
        """
        @param store: the L{zcontrol.db.IStore}.
        @param node_id: this management node's uuid (the job's owner).
        @param kind: the job kind.
        @param job_uuid: the job's uuid (a new one when None).
        """
        self.store = store
        self.node_id = node_id
        self.kind = kind
        self.job_uuid = job_uuid or uuidlib.uuid4().hex
        self.recorded: list[str] = []
        self.chain: FlowChain | None = None
        #: The context the flows run in: the caller's, as the run started.
        self.context: contextvars.Context | None = None
        #: True once a journal write was refused because another node owns the job.
        self.abandoned = False

    def run(self, message: Any = None, resource_uuid: str | None = None) -> Deferred:
        """
        Create the job and run it.

        @param message: the job's C{apiMessage} (JSON; None: C{{}}), in the context as
            C{"message"}.
        @param resource_uuid: the job's C{resourceUuid}, in the context as C{"resource"}.
        @return: Deferred firing with the finished job row (C{Succeeded}), or failing with
            an L{OperationError}: the chain's (C{SYS.1006}, C{location} the failing flow)
            after the rollbacks and C{finish_job(Failed)}; a store error of
            C{create_job} (nothing ran).
        """
        return Deferred.fromCoroutine(self._run(message, resource_uuid))

    async def _run(self, message: Any, resource_uuid: str | None) -> dict:
        job = await self.store.create_job(self.job_uuid, self.kind.name,
                                          {} if message is None else message, self.node_id,
                                          resource_uuid)
        return await self._chain(job, [])

    def resume(self, job: dict) -> Deferred:
        """
        Finish forward a C{Running} job of this kind (its row, owned by this node): the
        recorded flows are not run again (their C{took} is in the context and they are
        rolled back if a later flow fails); the next flow runs again, with
        C{ctx["recovering"]} set. Same result as L{run}.
        """
        self.job_uuid = job["uuid"]
        return Deferred.fromCoroutine(self._chain(job, list(job.get("flows") or []),
                                                  recovering=True))

    async def _chain(self, job: dict, recorded: list[dict], recovering: bool = False) -> dict:
        try:
            ctx = _context(self.kind, job)
            if recovering:
                # The re-run flow in flight sees it (Note [in-flight rollback]): it may have
                # done its work already, so it must look before doing it again.
                ctx["recovering"] = True
        except Exception as e:
            err = error_code(SYS.OPERATION_ERROR,
                             f"job {self.job_uuid} ({self.kind.name}): its context failed",
                             cause=from_failure(e), job=self.job_uuid)
            await self._finish_failed(err)
            raise OperationError(err) from None
        steps: list[IFlow] = []
        for i, f in enumerate(self.kind.flows):
            if i < len(recorded):
                steps.append(_Journaling(self, f, recorded[i]["took"], replay=True))
            else:
                steps.append(_Journaling(self, f))
        # The rollbacks are ours (journaled, see _roll_back), not the FlowChain's.
        self.chain = FlowChain(f"{self.kind.name}:{self.job_uuid}", steps, allow_empty=True,
                               no_rollback=True)
        self.context = contextvars.copy_context()
        try:
            await self.chain.run(ctx)
        except OperationError as e:
            if self.abandoned:
                raise OperationError(self._taken_over_error(e.error)) from None
            await self._roll_back(ctx, e.error)
            raise
        row = await self.store.finish_job(
            self.job_uuid,
            result=_job_result(self.kind, ctx, {"flows": [f.name for f in self.kind.flows]}),
            management_node_uuid=self.node_id)
        log.info("job {job} ({kind}) of {resource} succeeded", job=self.job_uuid,
                 kind=self.kind.name, resource=job.get("resourceUuid"))
        return row

    def _taken_over_error(self, cause: ErrorCode) -> ErrorCode:
        return error_code(
            JOB_TAKEN_OVER,
            f"{self.kind.name} job {self.job_uuid} was taken over by another management node;"
            " this node abandoned it (nothing rolled back)", cause=cause, job=self.job_uuid)

    async def _finish_failed(self, err: ErrorCode,
                             ctx: MutableMapping[str, Any] | None = None) -> None:
        try:
            await self.store.finish_job(self.job_uuid, error=_job_error(self.kind, ctx, err),
                                        management_node_uuid=self.node_id)
        except Exception as fe:
            log.error("job {job} ({kind}): cannot record its failure: {error}",
                      job=self.job_uuid, kind=self.kind.name, error=str(from_failure(fe)))

    async def _roll_back(self, ctx: MutableMapping[str, Any], err: ErrorCode) -> None:
        """
        Mark the job rolling back with C{err}, roll back (journaled) the failing flow and
        every flow before it, then finish the job C{Failed} with C{err}. Raises the error to
        fail the run with instead of C{err} when it differs: C{JOB.1001} when another node
        owns the job; C{err} plus C{rollback_errors} when a rollback failed (the job is then
        left C{Running}, rolling back, for the next recovery).
        """
        try:
            await self.store.begin_job_rollback(self.job_uuid, self.node_id, err)
        except Exception as me:
            merr = from_failure(me)
            if _taken_over(merr):
                self.abandoned = True
                raise OperationError(self._taken_over_error(err)) from None
            log.error("job {job} ({kind}): cannot mark it rolling back: {error}; left Running"
                      " for recovery, nothing rolled back", job=self.job_uuid,
                      kind=self.kind.name, error=str(merr))
            return
        names = [f.name for f in self.kind.flows]
        upto = names.index(err.location) if err.location in names else len(ctx["took"]) - 1
        undo = [(self.kind.flows[i], ctx["took"].get(names[i]))
                for i in reversed(range(upto + 1))]
        try:
            errors = await _undo(self.store, self.node_id, self.kind, self.job_uuid, ctx,
                                 undo, [], None, None)
        except _TakenOver:
            self.abandoned = True
            raise OperationError(self._taken_over_error(err)) from None
        if errors:
            raise OperationError(attrs.evolve(
                err, opaque={**err.opaque, "rollback_errors": errors})) from None
        await self._finish_failed(err, ctx)
        log.info("job {job} ({kind}) failed at flow {flow!r} and was rolled back: {error}",
                 job=self.job_uuid, kind=self.kind.name, flow=err.location,
                 error=str(err.cause or err))


class _TakenOver(Exception):
    pass


def _taken_over(err: ErrorCode) -> bool:
    return err.code == SYS.CHANGE_RESOURCE_STATE_ERROR


def _timed(fn: Callable[..., Any], args: tuple, clock: Any, timeout: float | None
           ) -> Deferred:
    d = maybe_deferred(fn, *args)
    if timeout is not None and clock is not None:
        d.addTimeout(timeout, clock)
    return d


async def _undo(store: Any, node_id: str, kind: JobKind, job_uuid: str,
                ctx: MutableMapping[str, Any], undo: list, done: list, clock: Any,
                timeout: float | None) -> list[dict]:
    """
    Roll back C{undo} (C{(flow, took)} pairs, in order), skipping the flows in C{done},
    journaling each completed rollback; a failing (or timed out) rollback is logged and
    does not stop the others.

    @return: the failures, C{[{"flow", "error"}]}.
    @raise _TakenOver: another node owns the job (nothing more is rolled back).
    """
    errors = []
    for f, took in undo:
        if f.name in done:
            continue
        try:
            await _timed(f.rollback, (ctx, took), clock, timeout)
        except Exception as e:
            err = from_failure(e)
            log.error("job {job} ({kind}): rollback of flow {flow!r} failed: {error}; the job"
                      " stays Running, rolling back, for the next recovery",
                      job=job_uuid, kind=kind.name, flow=f.name, error=str(err))
            errors.append({"flow": f.name, "error": err.to_dict()})
            continue
        try:
            await store.record_job_rollback(job_uuid, node_id, f.name)
        except Exception as e:
            err = from_failure(e)
            if _taken_over(err):
                raise _TakenOver() from None
            log.error("job {job} ({kind}): cannot journal the rollback of flow {flow!r}:"
                      " {error}", job=job_uuid, kind=kind.name, flow=f.name, error=str(err))
    return errors


def _kinds(kinds: Iterable[JobKind] | Mapping[str, JobKind]) -> dict[str, JobKind]:
    if isinstance(kinds, Mapping):
        return dict(kinds)
    return {k.name: k for k in kinds}


async def _finish_rollback(store: Any, node_id: str, kind: JobKind, job: dict,
                           clock: Any, rollback_timeout: float | None) -> dict:
    """
    Recover a job that was rolling back (its C{rollbackError} set): never forwarded nor
    probed; its remaining rollbacks run and it fails with its original error.
    """
    err = ErrorCode.from_dict(job["rollbackError"])
    recorded = list(job.get("flows") or [])
    names = [f.name for f in kind.flows]
    if err.location in names:
        upto = names.index(err.location)
    else:
        upto = min(len(recorded), len(names) - 1)
    ctx = _context(kind, job)
    ctx["recovering"] = True
    for r in recorded:
        ctx["took"][r["name"]] = r["took"]
    undo = [(kind.flows[i], recorded[i]["took"] if i < len(recorded) else None)
            for i in reversed(range(upto + 1))]
    try:
        errors = await _undo(store, node_id, kind, job["uuid"], ctx, undo,
                             list(job.get("rolledBack") or []), clock, rollback_timeout)
    except _TakenOver:
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "taken over"}
    if errors:
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "rollback failed",
                "errors": errors}
    err = _job_error(kind, ctx, err)
    await store.finish_job(job["uuid"], error=err, management_node_uuid=node_id)
    return {"job": job["uuid"], "outcome": ROLLED_BACK, "error": err}


async def _recover_one(store: Any, node_id: str, kind: JobKind, job: dict, clock: Any,
                       probe_timeout: float | None, rollback_timeout: float | None) -> dict:
    recorded = list(job.get("flows") or [])
    names = [f.name for f in kind.flows]
    if [r.get("name") for r in recorded] != names[: len(recorded)]:
        log.warn("job {job} ({kind}): its recorded flows {recorded} are not the kind's"
                 " {names}; left Running", job=job["uuid"], kind=kind.name,
                 recorded=[r.get("name") for r in recorded], names=names)
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "flows differ"}
    if job.get("rollbackError") is not None:
        return await _finish_rollback(store, node_id, kind, job, clock, rollback_timeout)
    ctx = _context(kind, job)
    ctx["recovering"] = True
    for r in recorded:
        ctx["took"][r["name"]] = r["took"]
    if len(recorded) == len(names):
        await store.finish_job(
            job["uuid"], result=_job_result(kind, ctx, {"flows": names, "recovered": True}),
            management_node_uuid=node_id)
        return {"job": job["uuid"], "outcome": SUCCEEDED}
    in_flight = kind.flows[len(recorded)]
    try:
        happened = await _timed(in_flight.probe, (ctx,), clock, probe_timeout)
    except Exception as e:
        log.warn("job {job} ({kind}): the probe of flow {flow!r} failed: {error}",
                 job=job["uuid"], kind=kind.name, flow=in_flight.name,
                 error=str(from_failure(e)))
        happened = None
    if kind.forward is not None and kind.forward(ctx, recorded, happened):
        chain = JournaledFlowChain(store, node_id, kind, job_uuid=job["uuid"])
        try:
            await chain.resume(job)
        except OperationError as e:
            return {"job": job["uuid"], "outcome": FORWARD, "error": e.error}
        return {"job": job["uuid"], "outcome": FORWARD}
    undo: list[tuple[IJournaledFlow, dict | None]] = []
    if happened is not False:
        undo.append((in_flight, None))
    undo += [(kind.flows[i], recorded[i]["took"]) for i in reversed(range(len(recorded)))]
    err = attrs.evolve(
        error_code(
            JOB_NODE_RESTARTED,
            f"the management node restarted during flow {in_flight.name!r} of"
            f" {kind.name} job {job['uuid']}",
            job=job["uuid"],
            flows=[r["name"] for r in recorded],
            rolledBack=[f.name for f, _ in undo],
        ),
        location=in_flight.name,
    )
    # Journaled as a live rollback: a crash from here on finishes these rollbacks, never
    # forward (the in-flight flow is the error's location).
    try:
        await store.begin_job_rollback(job["uuid"], node_id, err)
    except OperationError as e:
        if _taken_over(e.error):
            return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "taken over"}
        raise
    try:
        errors = await _undo(store, node_id, kind, job["uuid"], ctx, undo, [], clock,
                             rollback_timeout)
    except _TakenOver:
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "taken over"}
    if errors:
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "rollback failed",
                "errors": errors}
    err = _job_error(kind, ctx, err)
    await store.finish_job(job["uuid"], error=err, management_node_uuid=node_id)
    return {"job": job["uuid"], "outcome": ROLLED_BACK, "error": err}


async def recover_jobs(store: Any, node_id: str,
                       kinds: Iterable[JobKind] | Mapping[str, JobKind],
                       jobs: Sequence[dict] | None = None, *, clock: Any = None,
                       probe_timeout: float | None = PROBE_TIMEOUT,
                       rollback_timeout: float | None = ROLLBACK_TIMEOUT,
                       parallelism: int = RECOVERY_PARALLELISM) -> list[dict]:
    """
    Resolve every C{Running} job of node C{node_id} (see the module docstring).

    @param store: the L{zcontrol.db.IStore}.
    @param node_id: the node whose jobs (owned by it now: its own at its start, or claimed
        from a dead node with C{store.claim_jobs(dead, node_id)}) are resolved.
    @param kinds: the job kinds this node knows, by name or as a list.
    @param jobs: the job rows to resolve (default: C{store.running_jobs(node_id)}); rows
        not C{Running} or not owned by C{node_id} are skipped.
    @param clock: the L{IReactorTime} of the timeouts (default: the global reactor).
    @param probe_timeout: seconds a probe may take; then it "cannot tell" (None: no limit).
    @param rollback_timeout: seconds a rollback may take; then it failed and the job is left
        C{Running} for the next recovery (None: no limit).
    @param parallelism: how many jobs are resolved at once (>= 1).
    @return: one dict per job considered, in the order of C{jobs}: C{job} (uuid),
        C{outcome} (C{"succeeded"}, C{"rolled-back"}, C{"forward"}, C{"left-running"}), and
        C{error} (the L{ErrorCode} the job failed with) or C{reason}. Never fails for one
        job: a job that cannot be resolved is logged and left C{Running}.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    known = _kinds(kinds)
    if jobs is None:
        jobs = await store.running_jobs(node_id)
    todo = [j for j in jobs
            if j.get("state") == "Running" and j.get("managementNodeUuid") == node_id]
    out: list[dict | None] = [None] * len(todo)

    async def one(i: int) -> None:
        job = todo[i]
        kind = known.get(job.get("apiName"))
        if kind is None:
            log.warn("job {job}: unknown job kind {kind!r} (another version's job?);"
                     " left Running", job=job["uuid"], kind=job.get("apiName"))
            out[i] = {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "unknown kind"}
            return
        try:
            out[i] = await _recover_one(store, node_id, kind, job, clock, probe_timeout,
                                        rollback_timeout)
        except Exception as e:
            err: ErrorCode = from_failure(e)
            log.error("job {job} ({kind}): cannot resolve it: {error}; left Running",
                      job=job["uuid"], kind=kind.name, error=str(err))
            out[i] = {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": str(err)}

    await step(range(len(todo)), lambda i: Deferred.fromCoroutine(one(i)), parallelism)
    return [o for o in out if o is not None]
