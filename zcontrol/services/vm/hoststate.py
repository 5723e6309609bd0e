# -*- test-case-name: tests.test_vm_hoststate -*-
"""
Host-reported VM state (issue 10, deliverable 3): what a host says about its VMs, decided by
the VM's owner in the VM's chain, so that a report never races an operation on the VM.

The host service (L{zcontrol.services.host.service}) only observes: its VM sync
(C{/vm/vmsync}) and the agent's C{/kvm/reportvmstate} become L{VmStateChangedOnHostMsg}s routed
by VM uuid; L{HostStateMixin} decides, as ZStack's C{VmInstanceBase.handle(
VmStateChangedOnHostMsg)} (C{compute/vm/VmInstanceBase.java}) with its
C{VmAbnormalLifeCycleStruct} cases and C{VmTracer} (C{compute/vm/VmTracer.java}) do.

Decisions (Note [host reports]), each in the chain C{vm-<uuid>}, on the row as it is then:
 - B{stale}: a sync's report carries the state the sync read before asking the agent
   (C{vm_state_at_tracing_moment}); when the VM's state has changed since, an operation ran
   in between and the report is older than it: ignored (ZStack the same);
 - B{an operation owns it}: a VM in an intermediate state (C{Starting}, C{Stopping}, ...,
   L{states.INTERMEDIATE_STATES}) is left to that operation: ignored;
 - B{stopped on its host} (ZStack's C{VmStoppedOnTheSameHost},
   C{VmStoppedFromUnknownStateHostNotChanged}, C{...FromPaused/Crashed...}): a C{Running},
   C{Paused}, C{Crashed} or C{Unknown} VM its host reports C{Stopped} gives back its host
   capacity (C{ReturnHostCapacityMsg} to the allocator, holder C{("VmInstanceVO", vm)}) and
   becomes C{Stopped} with C{hostUuid} NULL and C{lastHostUuid} the host. The capacity goes
   first: a crash between the two leaves a C{Running} VM holding nothing, which the next
   sync stops again (the release is idempotent); the other order would leak the capacity
   for good;
 - B{running on a host} (ZStack's C{VmRunningOnTheHost}, C{VmRunningFromUnknownState...}): a
   C{Stopped} VM reported C{Running} (started by hand), or an C{Unknown} VM reported
   C{Running} on another host, takes the VM's CPU and memory on that host
   (C{store.reserve_host_capacity}, the VM holder; an C{Unknown} VM first gives back what it
   held on its old host) and becomes C{Running} there. The host says it runs: when the host
   has no room the VM is still recorded C{Running} and a warning is logged (the audit will
   show the over-commitment). The reservation goes first, for the same reason as above;
 - B{back from Unknown} (ZStack's C{VmRunningFromUnknownStateHostNotChanged}): an C{Unknown}
   VM its own host reports C{Running} (or C{Paused}) is so again; it kept its capacity;
 - B{other changes on its host}: C{Running} -> C{Paused}/C{Crashed}/C{Unknown} and back, as
   the state table allows;
 - B{another host}: a report from a host that is not the VM's host is logged and ignored,
   except for a C{Stopped} or C{Unknown} VM reported C{Running} there (adopted, above). A
   C{Running} VM another host also runs is a stranger there (below), where ZStack adopts
   the new host (C{VmMigrateToAnotherHost}): two copies may be running, and moving the
   record would hide the one it names;
 - B{strangers}: a VM a host runs that the store does not have, has C{Destroyed} (or
   C{Created}, C{Error}, C{Expunging}), or has C{Running} on another host, is B{reported,
   never adopted}: a warning is logged and a L{StrangerVmFoundEvent} published (ZStack's
   C{VmTracer.handleAnonymousVm}, C{VmTracerCanonicalEvents.STRANGER_VM_FOUND_PATH}), once
   per VM and host (an LRU of L{STRANGER_CACHE} entries, as ZStack's), so that every sync
   does not repeat it.

Every change goes through L{VmServiceBase.change_state} (a compare-and-swap from the state
read in the chain, and a L{VmInstanceStateChangedEvent}) and also publishes the host
service's L{VmStateChangedOnHostEvent} (ZStack's C{VmTracerCanonicalEvents.
VM_STATE_CHANGED_PATH}).

B{Disconnected hosts}: the service subscribes to L{HostStatusChangedEvent}; when a host
becomes C{Disconnected}, each VM this node owns that is C{Running}, C{Paused} or C{Crashed}
on it becomes C{Unknown}, in its chain, provided the host is still Disconnected then (a
late event after a reconnect changes nothing). When the host reconnects, the host service's
VM sync reports what the host runs, and the decisions above bring each VM back (C{Unknown}
-> C{Running}, or C{Stopped} with its capacity given back).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zcontrol.bus.message import Event, Reply, registry
from zcontrol.core.errors import OperationError
from zcontrol.db.query import Condition, Query
from zcontrol.scheduler.messages import SERVICE_ID as ALLOCATOR_SERVICE
from zcontrol.scheduler.messages import ReturnHostCapacityMsg
from zcontrol.services import validate
from zcontrol.services.base import handles
from zcontrol.services.host.messages import HostStatusChangedEvent, VmStateChangedOnHostEvent
from zcontrol.services.vm import states
from zcontrol.services.vm.base import VM_HOLDER
from zcontrol.services.vm.messages import VmStateChangedOnHostMsg

__all__ = [
    "HOST_REPORTED_STATES",
    "STRANGER_CACHE",
    "HostStateMixin",
    "StrangerVmFoundEvent",
    "VmStateChangedOnHostReply",
]

log = Logger()

S = states.VmInstanceState
E = states.Event

#: The states a host may report (ZStack's C{VmTracer.reportVmState} check, plus Unknown).
HOST_REPORTED_STATES = frozenset({S.Running, S.Stopped, S.Paused, S.Crashed, S.Unknown})
#: The states a VM on a host that becomes Disconnected leaves for Unknown.
UNKNOWN_ON_DISCONNECT = (S.Running, S.Paused, S.Crashed)
#: States whose VM holds capacity on its host (the invariants at rest of
#: L{zcontrol.services.vm.base}).
_ON_HOST = frozenset({S.Running, S.Paused, S.Unknown, S.Crashed})
#: Store states in which a VM running on a host is a stranger: reported, not adopted.
_NOT_ADOPTED = frozenset({S.Destroyed, S.Expunging, S.Created, S.Error, S.NoState})
#: How many (VM, host) stranger sightings are remembered (ZStack's C{strangeVmNumberInCache}).
STRANGER_CACHE = 1500
#: The event a reported state moves a VM along.
_EVENT_FOR = {S.Running: E.running, S.Stopped: E.stopped, S.Paused: E.paused,
              S.Crashed: E.crashed, S.Unknown: E.unknown}


@registry.register
@attrs.define(kw_only=True)
class VmStateChangedOnHostReply(Reply):
    """
    The answer to a L{VmStateChangedOnHostMsg} (ZStack's C{VmStateChangedOnHostReply}):
    C{changed}, whether the VM's record was changed; C{state}, its state afterwards (None:
    no such VM); C{decision}, a word saying what was decided (C{stale}, C{busy},
    C{unchanged}, C{stopped}, C{running}, C{adopted}, C{state}, C{otherHost}, C{stranger},
    C{ignored}).
    """

    changed: bool = False
    state: str | None = None
    decision: str | None = None


@registry.register
@attrs.define(kw_only=True)
class StrangerVmFoundEvent(Event):
    """
    A host runs a VM the store does not place there (ZStack's
    C{VmTracerCanonicalEvents.StrangerVmFoundData}, path C{STRANGER_VM_FOUND_PATH}): no such
    VM (C{known_state} None), a VM the store has C{Destroyed} (or Created, Error, Expunging),
    or one the store has C{Running} on C{known_host_uuid}. The VM is not adopted: an operator
    decides (ZStack: "please manually clean this vm").
    """

    topic: ClassVar[str] = "vm.stranger"

    vm_uuid: str
    host_uuid: str
    vm_state: str
    known_state: str | None = None
    known_host_uuid: str | None = None
    reason: str = ""


class HostStateMixin:
    """
    The VM service's side of host-reported state (see the module docstring). Mixed into
    L{zcontrol.services.vm.service.VmService} before L{VmServiceBase}, whose C{store},
    C{bus}, C{in_vm_chain}, C{change_state}, C{send}, C{publish} and C{background} it uses.
    """

    store: Any
    bus: Any
    in_vm_chain: Any
    change_state: Any
    send: Any
    publish: Any
    background: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._strangers: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._host_subscriptions: list[Any] = []

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Any:
        """
        Subscribe to host status changes, then start as L{VmServiceBase.start}.
        """
        self._host_subscriptions.append(
            self.bus.subscribe(HostStatusChangedEvent.topic, self._on_host_status))
        return super().start()  # type: ignore[misc]

    def stop(self) -> Deferred[None]:
        for sub in self._host_subscriptions:
            sub.cancel()
        self._host_subscriptions = []
        return super().stop()  # type: ignore[misc]

    # --- reports ------------------------------------------------------------------------

    @handles(VmStateChangedOnHostMsg)
    def handle_vm_state_changed_on_host(self, msg: VmStateChangedOnHostMsg) -> Deferred:
        """
        Decide on a host's report in the VM's chain (Note [host reports] in the module
        docstring).

        @return: a Deferred firing with a L{VmStateChangedOnHostReply}; fails with
            C{SYS.1007} naming the field for a malformed uuid or a state a host cannot
            report.
        """
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        host_uuid = validate.uuid(msg.host_uuid, "hostUuid")
        reported = validate.one_of(msg.state, "state", sorted(HOST_REPORTED_STATES))
        expected = msg.vm_state_at_tracing_moment
        return self.in_vm_chain(vm_uuid, lambda: Deferred.fromCoroutine(
            self._decide(vm_uuid, host_uuid, reported, expected)))

    async def _decide(self, vm_uuid: str, host_uuid: str, reported: str,
                      expected: str | None) -> VmStateChangedOnHostReply:
        row = await self.store.get("vmInstance", vm_uuid)
        if row is None:
            if reported in (S.Running, S.Paused):
                self._stranger(vm_uuid, host_uuid, reported, None, None,
                               "the store has no such VM")
                return VmStateChangedOnHostReply(decision="stranger")
            return VmStateChangedOnHostReply(decision="ignored")
        known, on = row["state"], row.get("hostUuid")

        def answer(decision: str, changed: bool = False, state: str = known
                   ) -> VmStateChangedOnHostReply:
            return VmStateChangedOnHostReply(changed=changed, state=state, decision=decision)

        if expected is not None and expected != known:
            log.debug("vm {vm}: host {host}'s report {state} was read while the VM was "
                      "{expected}; it is {known} now: ignored", vm=vm_uuid, host=host_uuid,
                      state=reported, expected=expected, known=known)
            return answer("stale")
        if known in states.INTERMEDIATE_STATES:
            log.info("vm {vm} is {known} (an operation owns it): host {host}'s report "
                     "{state} ignored", vm=vm_uuid, known=known, host=host_uuid,
                     state=reported)
            return answer("busy")
        if known in _NOT_ADOPTED:
            if reported in (S.Running, S.Paused):
                self._stranger(vm_uuid, host_uuid, reported, known, on,
                               f"the store has the VM {known}")
                return answer("stranger")
            return answer("ignored")
        if on is not None and on != host_uuid:
            return await self._other_host(row, host_uuid, reported)
        # The VM's own host, or a Stopped VM (no host).
        if known == reported and on == host_uuid:
            return answer("unchanged")
        if reported == S.Stopped:
            if known not in _ON_HOST:
                return answer("unchanged")
            await self._return_capacity(vm_uuid, host_uuid)
            row = await self._change(row, host_uuid, E.stopped,
                                     {"hostUuid": None, "lastHostUuid": host_uuid})
            return answer("stopped", True, row["state"])
        if known == S.Stopped:
            if reported not in (S.Running, S.Paused):
                return answer("ignored")  # ZStack: Stopped + Unknown on host: nothing
            await self._take_capacity(row, host_uuid)
            row = await self._change(row, host_uuid, _EVENT_FOR[reported],
                                     {"hostUuid": host_uuid})
            return answer("running", True, row["state"])
        event = _EVENT_FOR[reported]
        if event not in states.TRANSITIONS.get(known, {}):
            log.info("vm {vm} is {known}: host {host} reports {state}, which it has no "
                     "transition for: ignored", vm=vm_uuid, known=known, host=host_uuid,
                     state=reported)
            return answer("ignored")
        row = await self._change(row, host_uuid, event)
        return answer("state", True, row["state"])

    async def _other_host(self, row: dict[str, Any], host_uuid: str, reported: str
                          ) -> VmStateChangedOnHostReply:
        vm_uuid, known, on = row["uuid"], row["state"], row["hostUuid"]
        if known == S.Unknown and reported == S.Running:
            # ZStack's VmRunningFromUnknownStateHostChanged: it runs there now.
            log.warn("vm {vm} was Unknown on host {old}; host {host} runs it: moving it "
                     "there", vm=vm_uuid, old=on, host=host_uuid)
            await self._return_capacity(vm_uuid, on)
            await self._take_capacity(row, host_uuid)
            row = await self._change(row, host_uuid, E.running,
                                     {"hostUuid": host_uuid, "lastHostUuid": on})
            return VmStateChangedOnHostReply(changed=True, state=row["state"],
                                             decision="adopted")
        if reported in (S.Running, S.Paused):
            self._stranger(vm_uuid, host_uuid, reported, known, on,
                           f"the store has the VM {known} on host {on}")
            return VmStateChangedOnHostReply(state=known, decision="stranger")
        log.info("vm {vm} is {known} on host {on}: host {host}'s report {state} ignored",
                 vm=vm_uuid, known=known, on=on, host=host_uuid, state=reported)
        return VmStateChangedOnHostReply(state=known, decision="otherHost")

    async def _change(self, row: dict[str, Any], host_uuid: str, event: str,
                      changes: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        Move the VM along C{event} from the state read in the chain, publish the host
        service's L{VmStateChangedOnHostEvent} too, and log it.
        """
        known = row["state"]
        new = await self.change_state(row["uuid"], event, changes, expected=[known])
        log.info("vm {vm}: host {host} reports it {state}; {known} -> {new}",
                 vm=row["uuid"], host=host_uuid, state=new["state"], known=known,
                 new=new["state"])
        self.publish(VmStateChangedOnHostEvent(host_uuid=host_uuid, vm_uuid=row["uuid"],
                                               from_state=known, to_state=new["state"]))
        return new

    async def _return_capacity(self, vm_uuid: str, host_uuid: str) -> None:
        """
        Give back what the VM holds on the host (C{ReturnHostCapacityMsg}; holding nothing
        is a no-op). A host that is gone holds nothing.
        """
        try:
            await self.send(ReturnHostCapacityMsg(
                service_id=ALLOCATOR_SERVICE, host_uuid=host_uuid, vm_instance_uuid=vm_uuid))
        except OperationError as e:
            if await self.store.get("host", host_uuid) is not None:
                raise
            log.info("vm {vm}: host {host} is gone, nothing to give back ({error})",
                     vm=vm_uuid, host=host_uuid, error=e.error)

    async def _take_capacity(self, row: dict[str, Any], host_uuid: str) -> None:
        """
        Take the VM's CPU and memory on the host (the VM holder, idempotent); when the host
        has no room (or the holder holds other amounts there), log a warning and go on: the
        host runs the VM whatever the books say.
        """
        try:
            await self.store.reserve_host_capacity(host_uuid, row["cpuNum"],
                                                   row["memorySize"], (VM_HOLDER, row["uuid"]))
        except OperationError as e:
            log.warn("vm {vm} runs on host {host}, which has no room for its {cpu} CPUs and "
                     "{memory} bytes by the books: recorded Running without the capacity "
                     "({error})", vm=row["uuid"], host=host_uuid, cpu=row["cpuNum"],
                     memory=row["memorySize"], error=e.error)

    def _stranger(self, vm_uuid: str, host_uuid: str, reported: str, known: str | None,
                  known_host: str | None, reason: str) -> None:
        """
        Report, once per VM and host, a VM found on a host that the store does not place
        there (a warning and a L{StrangerVmFoundEvent}).
        """
        key = (vm_uuid, host_uuid)
        if key in self._strangers:
            self._strangers.move_to_end(key)
            log.debug("vm {vm} on host {host}: stranger already reported", vm=vm_uuid,
                      host=host_uuid)
            return
        self._strangers[key] = reason
        while len(self._strangers) > STRANGER_CACHE:
            self._strangers.popitem(last=False)
        log.warn("a stranger VM {vm} ({state}) was found on host {host}: {reason}; it is "
                 "not adopted, please clean it up by hand", vm=vm_uuid, state=reported,
                 host=host_uuid, reason=reason)
        self.publish(StrangerVmFoundEvent(vm_uuid=vm_uuid, host_uuid=host_uuid,
                                          vm_state=reported, known_state=known,
                                          known_host_uuid=known_host, reason=reason))

    # --- disconnected hosts -------------------------------------------------------------

    def _on_host_status(self, event: HostStatusChangedEvent) -> None:
        if event.new_status != "Disconnected":
            return
        self.background(Deferred.fromCoroutine(self.host_disconnected(event.host_uuid)),
                        f"marking the VMs of disconnected host {event.host_uuid} Unknown")

    async def host_disconnected(self, host_uuid: str) -> int:
        """
        Make the VMs this node owns that are C{Running}, C{Paused} or C{Crashed} on host
        C{host_uuid} C{Unknown}, each in its chain and only while the host is still
        Disconnected there.

        @return: how many VMs became Unknown.
        """
        page = await self.store.query("vmInstance", Query(
            conditions=[Condition("hostUuid", "=", host_uuid),
                        Condition("state", "?=", list(UNKNOWN_ON_DISCONNECT))],
            fields=["uuid"], sort="uuid", limit=100_000))
        mine = [r["uuid"] for r in page.inventories
                if self.bus.owner_of(r["uuid"]) == self.bus.node_id]
        changed = 0
        for d in [self.in_vm_chain(u, lambda u=u: Deferred.fromCoroutine(
                self._unknown(u, host_uuid))) for u in mine]:
            try:
                changed += await d
            except OperationError as e:
                log.error("vm: cannot mark a VM of host {host} Unknown: {error}",
                          host=host_uuid, error=e.error)
        return changed

    async def _unknown(self, vm_uuid: str, host_uuid: str) -> int:
        host = await self.store.get("host", host_uuid)
        if host is None or host["status"] != "Disconnected":
            return 0
        row = await self.store.get("vmInstance", vm_uuid)
        if row is None or row["hostUuid"] != host_uuid or row["state"] not in \
                UNKNOWN_ON_DISCONNECT:
            return 0
        await self._change(row, host_uuid, E.unknown)
        return 1
