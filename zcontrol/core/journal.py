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
    3. C{store.finish_job}: C{Succeeded} (result C{{"flows": [names]}}), or, after the
       chain rolled back in reverse order every flow that ran (each C{rollback(ctx, took)}
       with its recorded C{took}; the failing flow itself with C{took=None}), C{Failed} with
       the chain's error (C{SYS.1006}, C{location} the failing flow's name, C{cause} its
       error).

Recovery (L{recover_jobs}), called when a node starts with its own C{Running} jobs (and, in
the multi-node issue, with the rows C{store.claim_jobs(dead, self)} returned), resolves each:

    - a job whose kind is unknown here (another version's job), or whose recorded flows do
      not match its kind's, is logged and left C{Running}: it never stops the start;
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

The add-image job of L{zcontrol.services.image.service.ImageService}
(C{resolve_add_image_jobs}) is an ad-hoc form of this mechanism written before it; it should
move onto a L{JobKind} whose flows are the downloads.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
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
from zcontrol.core.flow import FlowChain, IFlow

__all__ = [
    "JOB_NODE_RESTARTED",
    "IJournaledFlow",
    "JobKind",
    "JournaledFlow",
    "JournaledFlowChain",
    "recover_jobs",
]

log = Logger()

_JOB = register_codes("JOB", {
    1000: "The management node restarted during a job; what the job took was given back",
})
#: C{JOB.1000}: the job's node restarted (or died) during flow C{location}; the flows it had
#: recorded were rolled back at recovery.
JOB_NODE_RESTARTED = _JOB[1000]

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
    """

    name: str
    flows: tuple[IJournaledFlow, ...] = attrs.field(converter=tuple)
    forward: Callable[[MutableMapping[str, Any], list, bool | None], bool] | None = None
    context: Callable[[dict], Mapping[str, Any]] | None = None

    def __attrs_post_init__(self) -> None:
        names = [f.name for f in self.flows]
        if len(set(names)) != len(names):
            raise ValueError(f"job kind {self.name!r}: flow names are not unique: {names}")


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
        if self.replay:
            ctx["took"][self.name] = self.recorded
            return maybe_deferred(lambda: None)

        def record(took: Any) -> Deferred:
            if not isinstance(took, dict):
                raise OperationError.of(
                    SYS.INTERNAL, f"flow {self.name!r} of job kind {self.chain.kind.name!r}"
                    f" returned {type(took).__name__}, not a dict of what it took")
            d = self.chain.store.record_job_flow(self.chain.job_uuid, self.chain.node_id,
                                                 self.name, took)

            def recorded(_: Any) -> None:
                ctx["took"][self.name] = took
                self.chain.recorded.append(self.name)

            return d.addCallback(recorded)

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
        rolled back if a later flow fails); the next flow runs again. Same result as L{run}.
        """
        self.job_uuid = job["uuid"]
        return Deferred.fromCoroutine(self._chain(job, list(job.get("flows") or [])))

    async def _chain(self, job: dict, recorded: list[dict]) -> dict:
        ctx = _context(self.kind, job)
        steps: list[IFlow] = []
        for i, f in enumerate(self.kind.flows):
            if i < len(recorded):
                steps.append(_Journaling(self, f, recorded[i]["took"], replay=True))
            else:
                steps.append(_Journaling(self, f))
        self.chain = FlowChain(f"{self.kind.name}:{self.job_uuid}", steps, allow_empty=True)
        try:
            await self.chain.run(ctx)
        except OperationError as e:
            err = e.error
            try:
                await self.store.finish_job(self.job_uuid, error=err,
                                            management_node_uuid=self.node_id)
            except Exception as fe:
                log.error("job {job} ({kind}): cannot record its failure: {error}",
                          job=self.job_uuid, kind=self.kind.name, error=str(from_failure(fe)))
            raise
        return await self.store.finish_job(
            self.job_uuid, result={"flows": [f.name for f in self.kind.flows]},
            management_node_uuid=self.node_id)


def _kinds(kinds: Iterable[JobKind] | Mapping[str, JobKind]) -> dict[str, JobKind]:
    if isinstance(kinds, Mapping):
        return dict(kinds)
    return {k.name: k for k in kinds}


async def _recover_one(store: Any, node_id: str, kind: JobKind, job: dict) -> dict:
    recorded = list(job.get("flows") or [])
    names = [f.name for f in kind.flows]
    if [r.get("name") for r in recorded] != names[: len(recorded)]:
        log.warn("job {job} ({kind}): its recorded flows {recorded} are not the kind's"
                 " {names}; left Running", job=job["uuid"], kind=kind.name,
                 recorded=[r.get("name") for r in recorded], names=names)
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "flows differ"}
    if len(recorded) == len(names):
        await store.finish_job(job["uuid"], result={"flows": names, "recovered": True},
                               management_node_uuid=node_id)
        return {"job": job["uuid"], "outcome": SUCCEEDED}
    ctx = _context(kind, job)
    ctx["recovering"] = True
    for r in recorded:
        ctx["took"][r["name"]] = r["took"]
    in_flight = kind.flows[len(recorded)]
    try:
        happened = await maybe_deferred(in_flight.probe, ctx)
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
    errors = []
    for f, took in undo:
        try:
            await maybe_deferred(f.rollback, ctx, took)
        except Exception as e:
            err = from_failure(e)
            log.error("job {job} ({kind}): rollback of flow {flow!r} failed at recovery:"
                      " {error}; the job stays Running for the next recovery",
                      job=job["uuid"], kind=kind.name, flow=f.name, error=str(err))
            errors.append({"flow": f.name, "error": err.to_dict()})
    if errors:
        return {"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "rollback failed",
                "errors": errors}
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
    await store.finish_job(job["uuid"], error=err, management_node_uuid=node_id)
    return {"job": job["uuid"], "outcome": ROLLED_BACK, "error": err}


async def recover_jobs(store: Any, node_id: str,
                       kinds: Iterable[JobKind] | Mapping[str, JobKind],
                       jobs: Sequence[dict] | None = None) -> list[dict]:
    """
    Resolve every C{Running} job of node C{node_id} (see the module docstring).

    @param store: the L{zcontrol.db.IStore}.
    @param node_id: the node whose jobs (owned by it now: its own at its start, or claimed
        from a dead node with C{store.claim_jobs(dead, node_id)}) are resolved.
    @param kinds: the job kinds this node knows, by name or as a list.
    @param jobs: the job rows to resolve (default: C{store.running_jobs(node_id)}); rows
        not C{Running} or not owned by C{node_id} are skipped.
    @return: one dict per job considered: C{job} (uuid), C{outcome} (C{"succeeded"},
        C{"rolled-back"}, C{"forward"}, C{"left-running"}), and C{error} (the
        L{ErrorCode} the job failed with) or C{reason}. Never fails for one job: a job
        that cannot be resolved is logged and left C{Running}.
    """
    known = _kinds(kinds)
    if jobs is None:
        jobs = await store.running_jobs(node_id)
    out = []
    for job in jobs:
        if job.get("state") != "Running" or job.get("managementNodeUuid") != node_id:
            continue
        kind = known.get(job.get("apiName"))
        if kind is None:
            log.warn("job {job}: unknown job kind {kind!r} (another version's job?);"
                     " left Running", job=job["uuid"], kind=job.get("apiName"))
            out.append({"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": "unknown kind"})
            continue
        try:
            out.append(await _recover_one(store, node_id, kind, job))
        except Exception as e:
            err: ErrorCode = from_failure(e)
            log.error("job {job} ({kind}): cannot resolve it: {error}; left Running",
                      job=job["uuid"], kind=kind.name, error=str(err))
            out.append({"job": job["uuid"], "outcome": LEFT_RUNNING, "reason": str(err)})
    return out
