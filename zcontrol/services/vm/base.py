# -*- test-case-name: tests.test_vm_lifecycle -*-
"""
The frame of the VM service: what every VM operation shares. The operations themselves are
mixins in sibling modules (L{zcontrol.services.vm.lifecycle}: create, start, stop, reboot,
destroy, recover, expunge; L{zcontrol.services.vm.migrate}; L{zcontrol.services.vm.nics};
L{zcontrol.services.vm.volumes}), combined in L{zcontrol.services.vm.service.VmService}.

Note [recovery after reconnect]
==============================
A starting node reconnects its hosts in the background (each C{Connected -> Connecting ->
Connected}) while its services start. A recovery that probed or rolled back during that
window got C{HOST.1002} (the host is Connecting) and concluded wrongly: a stop's VM left
C{Unknown}, a destroy gone forward without destroying the VM on its host (skipped as for a
Disconnected host: the VM kept running, its capacity given back), a create's rollback left
C{Running} (an orphan volume row after the retry). So a recovery first waits for the
reconnect (L{VmServiceBase.hosts_ready}, at most C{vm.probe_timeout}).

Conventions every operation follows
===================================
 - B{One chain per VM}: an operation runs in the chain C{vm-<uuid>} at level 1
   (L{VmServiceBase.run_job} and L{VmServiceBase.in_vm_chain}), so a stop sent while a create
   runs waits for it and then acts on its result (ZStack's C{VmInstanceBase} signature
   C{Vm-<uuid>}). Different VMs run concurrently. The state check (L{check_operation}) is made
   inside the chain, on the state the previous operation left.
 - B{Every long operation is a journaled job} (L{zcontrol.core.journal}): a L{JobKind} whose
   flows each return what they took and give back exactly that on rollback. The job uuid is
   the B{trace id} of everything the job causes (bus messages, agent commands, log lines), and
   is answered in the reply's C{job_uuid}.
 - B{State changes are flows}: the first flow of a kind moves the VM into its intermediate
   state (C{Starting}, C{Stopping}, ...) and records the state it left; its rollback moves the
   VM back (or to the final state ZStack gives a failed operation); the last flow moves it to
   the final state. So a rollback, live or at recovery, always leaves the VM in a final state,
   and recovering a job is the journal's business alone.
 - B{Holders}: host capacity is held by C{("VmInstanceVO", vm)}, primary storage capacity by
   C{("VolumeVO", volume)}, an address by C{("VmNicVO", nic)}; releases are by holder, so
   they are idempotent and a recovery can give back what a flow took even when its run never
   reported (Note [in-flight rollback] of L{zcontrol.core.journal}).
 - B{Invariants at rest} (no job C{Running}; what the audit checks):
    - a VM in C{Running}, C{Paused}, C{Unknown} or C{Crashed} has C{hostUuid} set and holds
      exactly its C{cpuNum}/C{memorySize} on that host (holder C{("VmInstanceVO", vm)}), and
      is Running on that host's agent (C{Unknown}: the host cannot tell);
    - a VM in C{Created}, C{Stopped}, C{Destroyed} or C{Error} has C{hostUuid} NULL (a stopped
      VM keeps C{lastHostUuid}) and holds no host capacity, and runs on no agent;
    - a NIC's C{usedIpUuid} and C{ip} name the address whose holder is C{("VmNicVO", nic)},
      or are NULL and it holds none; every NIC of a VM on a host holds one; a C{Destroyed}
      VM's NICs hold none (ZStack's destroy gives the addresses back; a recovered VM's NICs
      take one again at its next start);
    - a volume C{Ready} has C{installPath} and C{primaryStorageUuid} set and holds its
      C{size} there (holder C{("VolumeVO", volume)}; on LocalStorage the holder row names the
      host, which is where the volume is), and its bits exist on the storage agent; a
      C{NotInstantiated} volume holds nothing and has no bits;
    - nothing else holds capacity or addresses (no holder without its VM, volume or NIC row).
 - B{Agent commands} go to the host's owner through the host service
   (L{VmServiceBase.host_call}: C{KVMHostAsyncHttpCallMsg}), within the host's chain level.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Iterable

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from agent import protocol as p
from zcontrol._defer import maybe_deferred
from zcontrol.config import VmConfig
from zcontrol.core.errors import SYS, OperationError, error_code, from_failure
from zcontrol.core.journal import JobKind, JournaledFlowChain, recover_jobs
from zcontrol.core.trace import new_trace_id, trace_scope
from zcontrol.services.base import Service
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import KVMHostAsyncHttpCallMsg
from zcontrol.services.vm import states
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import SERVICE_ID, VmInstanceStateChangedEvent

__all__ = ["NO_JOB", "VmServiceBase", "job_kinds", "message_body", "vm_chain"]

log = Logger()

#: What a job's C{prepare} returns when the operation has nothing to do (L{VmServiceBase.run_job}).
NO_JOB = object()

#: The holder types (see the module docstring).
VM_HOLDER = "VmInstanceVO"
VOLUME_HOLDER = "VolumeVO"
NIC_HOLDER = "VmNicVO"


def vm_chain(vm_uuid: str) -> str:
    """
    The chain-task signature of a VM's operations.
    """
    return f"vm-{vm_uuid}"


def job_kinds(fn: Callable[[Any], Iterable[JobKind]]) -> Callable[[Any], Iterable[JobKind]]:
    """
    Mark a method of a VM service mixin as returning the L{JobKind}s it runs (built per
    service instance: their flows hold the service). L{VmServiceBase} collects every marked
    method's kinds, by name, for running and for recovery.
    """
    fn.__job_kinds__ = True  # type: ignore[attr-defined]
    return fn


def message_body(msg: Any) -> dict[str, Any]:
    """
    The fields of a bus message that a job records as its C{apiMessage} (its own fields, in
    camelCase, without the bus envelope: id, routing, deadline, headers).
    """
    skip = {"id", "service_id", "resource_uuid", "created_at", "trace_id", "headers",
            "timeout", "deadline", "reply_to"}
    out: dict[str, Any] = {"_type": type(msg).type_name}
    for a in attrs.fields(type(msg)):
        if a.name in skip:
            continue
        value = getattr(msg, a.name)
        out[_camel(a.name)] = value
    return out


@functools.lru_cache(maxsize=None)
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


class VmServiceBase(Service):
    """
    The VM service's frame (see the module docstring).

    @ivar config: the L{VmConfig}.
    @ivar node_id: this management node's uuid (the owner of the jobs it runs).
    @ivar kinds: the job kinds of every mixin, by name.
    @ivar recovered: a Deferred that fires (with the list of L{recover_jobs} outcomes) once
        the jobs this node was running when it last stopped are resolved.
    """

    service_id: ClassVar[str] = SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, config: VmConfig | None = None,
                 node_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(clock, bus, store, **kwargs)
        self.config = config or VmConfig()
        self.node_id = node_id or bus.node_id
        self.kinds: dict[str, JobKind] = {}
        for klass in reversed(type(self).__mro__):
            for name, member in vars(klass).items():
                if getattr(member, "__job_kinds__", False):
                    for kind in getattr(self, name)():
                        if kind.name in self.kinds:
                            raise TypeError(f"job kind {kind.name!r} defined twice")
                        self.kinds[kind.name] = kind
        self.recovered: Deferred = Deferred()
        self._periodic: list[LoopingCall] = []
        #: the uuids of the jobs this node runs now (never resolved as interrupted)
        self.live_jobs: set[str] = set()
        self._recovering: set[str] = set()
        self._recovery_slots = DeferredSemaphore(self.config.recovery_parallelism)
        #: C{hosts_ready()} -> a new Deferred firing once this node's start has reconnected
        #: its hosts (None: nothing to wait for). A recovery waits for it (at most
        #: C{probe_timeout}): its probes and rollbacks need the hosts Connected, and a host
        #: being reconnected answers C{HOST.1002} (Note [recovery after reconnect]).
        self.hosts_ready: Callable[[], Deferred] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Any:
        """
        Queue the resolution of this node's interrupted jobs (each in its VM's chain, so
        that no new operation on that VM runs before it), then serve. L{recovered} fires
        once they are resolved.
        """
        d = Deferred.fromCoroutine(self._queue_recovery())
        d.addCallback(lambda _: super(VmServiceBase, self).start())

        def periodic(result: Any) -> Any:
            self.every(self.config.recovery_interval, self.retry_interrupted,
                       "retrying interrupted VM jobs")
            return result

        return d.addCallback(periodic)

    async def retry_interrupted(self) -> int:
        """
        Resolve again this node's C{Running} jobs that no chain of this node runs or resolves
        now (a recovery left them C{Running}: a rollback could not reach an agent).

        @return: how many were queued.
        """
        jobs = [j for j in await self.store.running_jobs(self.node_id)
                if j.get("apiName") in self.kinds and j["uuid"] not in self.live_jobs
                and j["uuid"] not in self._recovering]
        for j in jobs:
            self.background(self.recover_job(j), f"resolving job {j['uuid']}")
        return len(jobs)

    async def _queue_recovery(self) -> None:
        jobs = [j for j in await self.store.running_jobs(self.node_id)
                if j.get("apiName") in self.kinds]
        recoveries = [self.recover_job(j) for j in jobs]
        if jobs:
            log.info("vm: resolving {n} interrupted jobs", n=len(jobs))

        async def gather() -> list[dict]:
            out: list[dict] = []
            for d in recoveries:
                out.extend(await d)
            return out

        self.background(Deferred.fromCoroutine(gather()), "resolving interrupted VM jobs"
                         ).chainDeferred(self.recovered)

    def recover_job(self, job: dict[str, Any]) -> Deferred:
        """
        Resolve one interrupted job of this node in its VM's chain (L{recover_jobs} with the
        configured timeouts), as the job's trace.

        @return: a Deferred firing with L{recover_jobs}' list of outcomes.
        """
        vm_uuid = job.get("resourceUuid") or job["uuid"]
        self._recovering.add(job["uuid"])

        async def resolve() -> list[dict]:
            await self._hosts_reconnected()
            return await recover_jobs(
                self.store, self.node_id, self.kinds, [job], clock=self.clock,
                probe_timeout=self.config.probe_timeout,
                rollback_timeout=self.config.rollback_timeout, parallelism=1)

        def run() -> Deferred:
            # At most recovery_parallelism jobs are resolved at once (their probes and
            # rollbacks reach agents); the others wait in their VM's chain.
            return self._recovery_slots.run(lambda: Deferred.fromCoroutine(resolve()))

        def done(result: Any) -> Any:
            self._recovering.discard(job["uuid"])
            return result

        return trace_scope(job["uuid"], self.serialized, vm_chain(vm_uuid), run
                           ).addBoth(done)

    async def _hosts_reconnected(self) -> None:
        """
        Wait (at most C{probe_timeout}) until this node's hosts are reconnected
        (L{hosts_ready}; Note [recovery after reconnect]).
        """
        if self.hosts_ready is None:
            return
        d = self.hosts_ready()
        d.addTimeout(self.config.probe_timeout, self.clock)
        try:
            await d
        except Exception as e:
            log.warn("vm: resolving interrupted jobs before this node's hosts are reconnected:"
                     " {error}", error=str(from_failure(e)))

    def stop(self) -> Deferred[None]:
        for loop in self._periodic:
            if loop.running:
                loop.stop()
        return super().stop()

    # --- jobs ---------------------------------------------------------------------------

    def run_job(self, kind_name: str, vm_uuid: str, prepare: Callable[[], Any],
                fail_code: str | None = None, job_uuid: str | None = None,
                reply: Callable[[Any], Any] | None = None) -> Deferred[Any]:
        """
        Run a job of kind C{kind_name} about VM C{vm_uuid} in the VM's chain, with the job
        uuid as the trace id. C{prepare()} runs first, in the chain (so it sees the state the
        previous operation left): it checks the operation (raising refuses it before any job
        row exists, with its own error) and returns the job's C{apiMessage} (a JSON object,
        the flows' plan: see L{message_body}), or C{(kind name, apiMessage)} to run another
        kind than C{kind_name} (chosen on the state it saw), or L{NO_JOB} when there is
        nothing to do (stopping a Stopped VM).

        @param fail_code: the operation's error code (e.g. C{VM.1000}); a job that failed
            fails with it, naming the VM and the job, its cause the job's error (the failing
            flow's, down to the agent's own words).
        @param reply: C{reply(job)} (the finished row or L{NO_JOB}) builds the answer still
            in the VM's chain, so that it shows the VM as this job left it, not as an
            operation queued behind it is making it; the run then fires with it.
        @return: a Deferred firing with the finished job row (L{NO_JOB} when prepare said
            so), or failing as said.
        """
        job_uuid = job_uuid or new_trace_id()

        async def run() -> Any:
            body = await maybe_deferred(prepare)
            if body is NO_JOB:
                return NO_JOB if reply is None else await maybe_deferred(reply, NO_JOB)
            name = kind_name
            if isinstance(body, tuple):
                name, body = body
            kind = self.kinds[name]
            self.live_jobs.add(job_uuid)
            try:
                job = await JournaledFlowChain(self.store, self.node_id, kind,
                                               job_uuid=job_uuid).run(body, vm_uuid)
                return job if reply is None else await maybe_deferred(reply, job)
            except OperationError as e:
                if fail_code is None:
                    raise
                raise OperationError(error_code(
                    fail_code, f"{kind.name} job {job_uuid} of VM {vm_uuid} failed",
                    e.error, uuid=vm_uuid, job=job_uuid)) from None
            finally:
                self.live_jobs.discard(job_uuid)

        return trace_scope(job_uuid, self.in_vm_chain, vm_uuid,
                           lambda: Deferred.fromCoroutine(run()))

    def in_vm_chain(self, vm_uuid: str, fn: Callable[[], Any]) -> Deferred:
        """
        Run C{fn()} in the VM's chain (level 1), counted as work in flight.
        """
        return self.background_result(self.serialized(vm_chain(vm_uuid), fn))

    def background_result(self, d: Deferred) -> Deferred:
        """
        Count C{d} as work in flight (L{stop} waits for it) and return it unchanged.
        """
        return self._waiter.add(d)

    # --- VMs ----------------------------------------------------------------------------

    async def vm_row(self, vm_uuid: str, field: str = "uuid") -> dict[str, Any]:
        """
        The VM's row, or C{VM.1100} naming the uuid and C{field}.
        """
        return await self.must_get("vmInstance", vm_uuid, VM.NOT_FOUND, field=field)

    async def check(self, vm_uuid: str, operation: str, field: str = "uuid") -> dict:
        """
        The VM's row when its state allows C{operation} (L{states.check_operation}); else
        C{VM.1010} naming the state, or C{VM.1100}.
        """
        row = await self.vm_row(vm_uuid, field)
        states.check_operation(row["state"], operation)
        return row

    async def change_state(self, vm_uuid: str, event: str, changes: dict | None = None,
                           expected: Iterable[str] | None = None) -> dict:
        """
        Move the VM along C{event} (L{states.transition}: a compare-and-swap) and publish a
        L{VmInstanceStateChangedEvent} after the commit, carrying the current trace id.

        @return: the updated row; fails as L{states.transition}.
        """
        before = await self.store.get("vmInstance", vm_uuid)
        row = await states.transition(self.store, vm_uuid, event, changes, expected)
        from zcontrol.core.trace import current_trace_id

        self.publish(VmInstanceStateChangedEvent(
            vm_uuid=vm_uuid, old_state=before["state"] if before else None,
            new_state=row["state"], host_uuid=row.get("hostUuid"),
            trace_id=current_trace_id()))
        return row

    # --- agents -------------------------------------------------------------------------

    async def host_call(self, host_uuid: str, cmd: p.Message,
                        timeout: float | None = None) -> Any:
        """
        Send C{cmd} to the host's agent through the host service on the host's owner node
        (C{KVMHostAsyncHttpCallMsg}), within the host's chain level.

        @return: the agent's response (the command's response type); fails with the host
            service's or the agent client's ErrorCode (C{HOST.1002} not Connected,
            C{AGENT.*}: the agent's own error text is in the cause chain, never masked).
        """
        path = p.command_for(cmd).path
        timeout = timeout or self.config.command_timeout
        reply = await self.send(KVMHostAsyncHttpCallMsg(
            service_id=HOST_SERVICE, resource_uuid=host_uuid, host_uuid=host_uuid, path=path,
            command=cmd.to_dict(), command_timeout=timeout, timeout=timeout + 30))
        rsp = p.COMMANDS[path].rsp_type.from_dict(reply.response)
        if not rsp.success:
            raise OperationError.of(SYS.OPERATION_ERROR, f"host {host_uuid} {path}: {rsp.error}",
                                    hostUuid=host_uuid, path=path, response=reply.response)
        return rsp

    def every(self, interval: float, fn: Callable[[], Any], what: str) -> None:
        """
        Run C{fn()} every C{interval} seconds on the service's clock while it serves (a
        failure is logged; rounds never overlap because each waits for the last).
        """
        running: list[Deferred] = []

        def tick() -> None:
            if running:
                return
            d = maybe_deferred(fn)
            running.append(d)
            d.addBoth(lambda r: (running.clear(), r)[1])
            self.background(d, what)

        loop = LoopingCall(tick)
        loop.clock = self.clock
        loop.start(interval, now=False).addErrback(
            lambda f: log.error("vm: {what} loop died: {e}", what=what, e=str(from_failure(f))))
        self._periodic.append(loop)


def reraise_as(code: str, what: str) -> Callable[[Any], Any]:
    """
    An errback that wraps an L{OperationError} in C{code} (the operation's VM.10xx) with
    C{what} as its description, keeping the original as the cause; other failures pass.
    """
    def wrap(f: Any) -> Any:
        err = from_failure(f)
        raise OperationError.of(code, what, err, **{k: v for k, v in err.opaque.items()
                                                   if k in ("uuid", "field")})
    return wrap
