# -*- test-case-name: tests.test_vm_states -*-
"""
The VM state machine: ZStack's C{VmInstanceState} (C{header/vm/VmInstanceState.java}) as
state + event -> next state, and the operations each state allows (ZStack's
C{AbstractVmInstance.allowedOperations}, C{compute/vm/AbstractVmInstance.java}).

Pure data and functions, plus L{transition}, the compare-and-swap of a VM's state through the
store (C{IStore.change_vm_state}). Nothing here keeps state between calls.

States are the strings of the C{vm_instances.state} CHECK constraint
(C{zcontrol/db/migrations/0001_initial.sql}); events are ZStack's C{VmInstanceStateEvent}
names (C{starting}, C{running}, C{stopped}, ...). ZStack recovers a destroyed VM with the
C{stopped} event (Destroyed -> Stopped); there is no separate C{recovered} event.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS, OperationError
from zcontrol.services.vm.errors import VM

__all__ = [
    "EVENTS",
    "FINAL_STATES",
    "INTERMEDIATE_STATES",
    "OPERATIONS",
    "STATES",
    "TRANSITIONS",
    "Event",
    "Operation",
    "VmInstanceState",
    "allowed_events",
    "check_operation",
    "next_state",
    "sources",
    "transition",
]


class VmInstanceState:
    """
    ZStack's C{VmInstanceState} names, as the C{vm_instances} CHECK constraint lists them.
    """

    Created = "Created"
    Starting = "Starting"
    Running = "Running"
    Stopping = "Stopping"
    Stopped = "Stopped"
    Rebooting = "Rebooting"
    Destroying = "Destroying"
    Destroyed = "Destroyed"
    Migrating = "Migrating"
    Expunging = "Expunging"
    Pausing = "Pausing"
    Paused = "Paused"
    Resuming = "Resuming"
    VolumeMigrating = "VolumeMigrating"
    VolumeRecovering = "VolumeRecovering"
    Error = "Error"
    NoState = "NoState"
    Unknown = "Unknown"
    Crashed = "Crashed"


S = VmInstanceState

#: Every state, in the order of the CHECK constraint.
STATES: tuple[str, ...] = (
    S.Created, S.Starting, S.Running, S.Stopping, S.Stopped, S.Rebooting, S.Destroying,
    S.Destroyed, S.Migrating, S.Expunging, S.Pausing, S.Paused, S.Resuming, S.VolumeMigrating,
    S.VolumeRecovering, S.Error, S.NoState, S.Unknown, S.Crashed,
)

#: ZStack's C{VmInstanceState.intermediateStates}: a VM in one of these has an operation under
#: way (a crash recovery must finish or roll it back).
INTERMEDIATE_STATES: frozenset[str] = frozenset({
    S.Starting, S.Stopping, S.Rebooting, S.Destroying, S.Migrating, S.Pausing, S.Resuming,
    S.VolumeMigrating, S.VolumeRecovering,
})

#: The states where no operation is under way.
FINAL_STATES: frozenset[str] = frozenset(STATES) - INTERMEDIATE_STATES


class Event:
    """
    ZStack's C{VmInstanceStateEvent} names (the events its C{VmInstanceState.java} table uses).
    """

    starting = "starting"
    stopping = "stopping"
    migrating = "migrating"
    migrated = "migrated"
    destroying = "destroying"
    rebooting = "rebooting"
    destroyed = "destroyed"
    expunging = "expunging"
    pausing = "pausing"
    resuming = "resuming"
    unknown = "unknown"
    running = "running"
    stopped = "stopped"
    paused = "paused"
    crashed = "crashed"
    volumeMigrating = "volumeMigrating"
    volumeMigrated = "volumeMigrated"
    volumeRecovering = "volumeRecovering"
    volumeRecovered = "volumeRecovered"


E = Event

#: Every event.
EVENTS: tuple[str, ...] = tuple(
    v for k, v in vars(Event).items() if not k.startswith("_") and isinstance(v, str)
)

#: state -> {event: next state}: ZStack's C{VmInstanceState} static table, transition for
#: transition. Created has no C{unknown}: a VM never started has nothing a host could report.
#: Error, NoState and Expunging have no transitions (ZStack's neither): the service writes
#: Error directly when an operation fails beyond repair, and an expunged VM's row is deleted.
TRANSITIONS: Mapping[str, Mapping[str, str]] = {
    S.Created: {E.starting: S.Starting, E.destroying: S.Destroying, E.destroyed: S.Destroyed},
    S.Starting: {E.running: S.Running, E.stopped: S.Stopped, E.paused: S.Paused,
                 E.destroying: S.Destroying, E.unknown: S.Unknown},
    S.Running: {E.running: S.Running, E.destroying: S.Destroying, E.stopping: S.Stopping,
                E.stopped: S.Stopped, E.rebooting: S.Rebooting, E.migrating: S.Migrating,
                E.volumeMigrating: S.Migrating, E.volumeRecovering: S.VolumeRecovering,
                E.pausing: S.Pausing, E.paused: S.Paused, E.crashed: S.Crashed,
                E.unknown: S.Unknown},
    S.Stopping: {E.stopped: S.Stopped, E.destroying: S.Destroying, E.running: S.Running,
                 E.unknown: S.Unknown},
    S.Stopped: {E.starting: S.Starting, E.stopped: S.Stopped, E.running: S.Running,
                E.paused: S.Paused, E.destroying: S.Destroying,
                E.volumeMigrating: S.VolumeMigrating, E.volumeRecovering: S.VolumeRecovering,
                E.unknown: S.Unknown},
    S.Migrating: {E.migrated: S.Running, E.volumeMigrated: S.Running, E.running: S.Running,
                  E.paused: S.Paused, E.stopped: S.Stopped, E.unknown: S.Unknown,
                  E.destroying: S.Destroying},
    S.VolumeMigrating: {E.volumeMigrated: S.Stopped, E.stopped: S.Stopped,
                        E.unknown: S.Unknown, E.destroying: S.Destroying},
    S.VolumeRecovering: {E.starting: S.VolumeRecovering, E.running: S.VolumeRecovering,
                         E.volumeRecovering: S.VolumeRecovering,
                         E.volumeRecovered: S.Running, E.stopping: S.Stopping,
                         E.stopped: S.Stopped, E.unknown: S.Unknown,
                         E.destroying: S.Destroying},
    S.Rebooting: {E.running: S.Running, E.stopped: S.Stopped, E.unknown: S.Unknown,
                  E.destroying: S.Destroying},
    S.Paused: {E.resuming: S.Resuming, E.stopped: S.Stopped, E.running: S.Running,
               E.stopping: S.Stopping, E.destroying: S.Destroying, E.unknown: S.Unknown,
               E.migrating: S.Migrating, E.volumeMigrated: S.Running},
    S.Pausing: {E.paused: S.Paused, E.destroying: S.Destroying, E.running: S.Running,
                E.unknown: S.Unknown},
    S.Resuming: {E.running: S.Running, E.destroying: S.Destroying, E.paused: S.Paused,
                 E.unknown: S.Unknown},
    S.Unknown: {E.destroying: S.Destroying, E.stopping: S.Stopping, E.unknown: S.Unknown,
                E.paused: S.Paused, E.running: S.Running, E.migrating: S.Migrating,
                E.stopped: S.Stopped},
    S.Destroying: {E.unknown: S.Unknown, E.destroyed: S.Destroyed,
                   E.destroying: S.Destroying, E.running: S.Running,
                   E.expunging: S.Expunging},
    S.Destroyed: {E.stopped: S.Stopped},
    S.Crashed: {E.running: S.Running, E.unknown: S.Unknown, E.stopping: S.Stopping,
                E.stopped: S.Stopped, E.rebooting: S.Rebooting, E.crashed: S.Crashed,
                E.destroyed: S.Destroyed, E.destroying: S.Destroying},
    S.Expunging: {},
    S.Error: {},
    S.NoState: {},
}


class Operation:
    """
    The VM operations whose allowed states ZStack checks (its API message names without
    C{API}/C{Msg}, in camelCase).
    """

    start = "start"
    stop = "stop"
    reboot = "reboot"
    destroy = "destroy"
    expunge = "expunge"
    recover = "recover"
    migrate = "migrate"
    pause = "pause"
    resume = "resume"
    attachNic = "attachNic"
    detachNic = "detachNic"
    attachVolume = "attachVolume"
    detachVolume = "detachVolume"
    changeInstanceOffering = "changeInstanceOffering"
    attachIso = "attachIso"
    detachIso = "detachIso"
    setStaticIp = "setStaticIp"
    deleteStaticIp = "deleteStaticIp"
    getConsoleAddress = "getConsoleAddress"
    getMigrationCandidateHosts = "getMigrationCandidateHosts"
    createRootVolumeTemplate = "createRootVolumeTemplate"


Op = Operation

#: operation -> the states it is allowed in: ZStack's C{AbstractVmInstance.allowedOperations}
#: (C{StartVmInstanceMsg} in Created and Stopped; C{StopVmInstanceMsg} in Running, Stopped and
#: Unknown; C{DestroyVmInstanceMsg} in every state but Created, Destroyed, Error, ...; its
#: Suspended/Suspending are our Paused/Pausing). ZStack lets the instance offering change
#: while Running too (it applies at the next start).
OPERATIONS: Mapping[str, frozenset[str]] = {
    # start in Running is a no-op in ZStack; Crashed VMs can be started, stopped, rebooted,
    # destroyed (ZStack's allowedOperations).
    Op.start: frozenset({S.Created, S.Stopped, S.Running, S.Crashed}),
    Op.stop: frozenset({S.Running, S.Stopped, S.Unknown, S.Paused, S.Crashed}),
    Op.reboot: frozenset({S.Running, S.Crashed}),
    # Error too: a half-made VM must be destroyable (ZStack PR #1160's undeletable VMs).
    # Created too: a VM made with strategy JustCreate (ZStack's Created allows destroy).
    Op.destroy: frozenset({S.Created, S.Running, S.Stopped, S.Unknown, S.Starting, S.Migrating,
                          S.Stopping, S.Rebooting, S.Paused, S.Pausing, S.Resuming,
                          S.VolumeMigrating, S.Crashed, S.Error}),
    Op.expunge: frozenset({S.Destroyed, S.Error}),
    Op.recover: frozenset({S.Destroyed}),
    Op.migrate: frozenset({S.Running, S.Unknown, S.Paused}),
    Op.pause: frozenset({S.Running}),
    Op.resume: frozenset({S.Paused}),
    Op.attachNic: frozenset({S.Running, S.Stopped}),
    Op.detachNic: frozenset({S.Running, S.Stopped}),
    Op.attachVolume: frozenset({S.Running, S.Stopped}),
    Op.detachVolume: frozenset({S.Running, S.Stopped}),
    # ZStack also allows it Running (CPU/memory hot-plug); issue 10 asks for it while
    # Stopped only, which is what the simulated hypervisor can honour.
    Op.changeInstanceOffering: frozenset({S.Stopped}),
    Op.attachIso: frozenset({S.Running, S.Stopped}),
    Op.detachIso: frozenset({S.Running, S.Stopped}),
    Op.setStaticIp: frozenset({S.Stopped}),
    Op.deleteStaticIp: frozenset({S.Running, S.Stopped}),
    Op.getConsoleAddress: frozenset({S.Running, S.Crashed}),
    Op.getMigrationCandidateHosts: frozenset({S.Running}),
    Op.createRootVolumeTemplate: frozenset({S.Stopped}),
}


def _ordered(states: Iterable[str]) -> list[str]:
    wanted = set(states)
    return [s for s in STATES if s in wanted]


def allowed_events(state: str) -> list[str]:
    """
    The events state C{state} has a transition for (empty for an unknown state).
    """
    return list(TRANSITIONS.get(state, {}))


def sources(event: str, target: str | None = None) -> list[str]:
    """
    The states that event C{event} moves out of, in L{STATES} order; only those it moves to
    C{target} when given. These are the C{expected} states of a compare-and-swap.
    """
    return _ordered(s for s, table in TRANSITIONS.items()
                    if event in table and (target is None or table[event] == target))


def _refused(state: str, event: str, **opaque: Any) -> OperationError:
    return OperationError.of(
        VM.NOT_IN_CORRECT_STATE,
        f"the VM instance in state {state} has no transition on event {event};"
        f" events allowed in {state}: {allowed_events(state)}",
        state=state, event=event, **opaque)


def next_state(state: str, event: str) -> str:
    """
    The state C{event} moves a VM in C{state} to (ZStack's C{VmInstanceState.nextState}).

    @raise OperationError: C{VM.1010} naming the state and the event (opaque C{state},
        C{event}) when the table has no such transition, or C{SYS.1007} for a name that is
        not a state or not an event.
    """
    if state not in TRANSITIONS:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"not a VM state: {state!r}",
                                field="state")
    if event not in EVENTS:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"not a VM state event: {event!r}",
                                field="event")
    nxt = TRANSITIONS[state].get(event)
    if nxt is None:
        raise _refused(state, event)
    return nxt


def check_operation(state: str, operation: str) -> None:
    """
    Refuse C{operation} on a VM in C{state} unless ZStack allows it there
    (C{AbstractVmInstance.validateOperationByState}).

    @raise OperationError: C{VM.1010} naming the state and the operation, the allowed states
        in the details and in opaque C{allowedStates}; C{SYS.1007} for an unknown operation.
    """
    allowed = OPERATIONS.get(operation)
    if allowed is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"not a VM operation: {operation!r}",
                                field="operation")
    if state not in allowed:
        ordered = _ordered(allowed)
        raise OperationError.of(
            VM.NOT_IN_CORRECT_STATE,
            f"the VM instance in state {state} does not allow operation {operation};"
            f" allowed states are {ordered}",
            state=state, operation=operation, allowedStates=ordered)


@async_to_deferred
async def transition(store: Any, vm_uuid: str, event: str, changes: dict | None = None,
                     expected: Iterable[str] | None = None) -> dict:
    """
    Move VM C{vm_uuid} along C{event}: one compare-and-swap
    (C{store.change_vm_state(vm_uuid, expected, new, changes)}) from every state the event
    leads to the same next state. When an event leads to different states from different
    sources (C{running} and C{starting} from VolumeRecovering, C{volumeMigrating}), the state
    is read first and swapped from exactly that one; a concurrent change between the read and
    the swap makes it read again (at most three times).

    @param changes: other columns to set in the same statement (camelCase, e.g.
        C{{"hostUuid": ...}}).
    @param expected: only from these states (the state the caller saw): a host's late
        "stopped" report must not move a Destroyed VM to Stopped, which the table allows
        (recover), nor "running" a Destroying one.
    @return: a Deferred firing with the updated row.
    @raise OperationError: C{VM.1010} naming the actual state and the event when the VM is in
        a state the event has no transition from (someone else changed it first: the store's
        C{SYS.1005} is its cause); C{VM.1100} naming the uuid when there is no such VM;
        C{SYS.1007} for an unknown event.
    """
    if event not in EVENTS:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"not a VM state event: {event!r}",
                                field="event")
    allowed = None if expected is None else set(expected)
    targets = {table[event] for state, table in TRANSITIONS.items()
               if event in table and (allowed is None or state in allowed)}
    if not targets:
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR, f"event {event} leaves none of the expected states "
            f"{sorted(allowed or ())}", field="expected")
    if len(targets) == 1:
        (target,) = targets
        srcs = [x for x in sources(event, target) if allowed is None or x in allowed]
        return await _swap(store, vm_uuid, event, srcs, target, changes)
    for attempt in range(3):
        row = await store.get("vmInstance", vm_uuid)
        if row is None:
            raise _not_found(vm_uuid, None)
        state = row["state"]
        if allowed is not None and state not in allowed:
            raise _refused(state, event)
        target = next_state(state, event)
        try:
            return await _swap(store, vm_uuid, event, [state], target, changes)
        except OperationError as e:
            if e.error.code != VM.NOT_IN_CORRECT_STATE or attempt == 2:
                raise
            if event not in TRANSITIONS.get(e.error.opaque.get("state"), {}):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _not_found(vm_uuid: str, cause: OperationError | None) -> OperationError:
    return OperationError.of(VM.NOT_FOUND, f"no VM instance {vm_uuid}",
                             cause.error if cause is not None else None,
                             uuid=vm_uuid, field="uuid")


async def _swap(store: Any, vm_uuid: str, event: str, expected: list[str], new: str,
                changes: dict | None) -> dict:
    try:
        return await store.change_vm_state(vm_uuid, expected, new, changes)
    except OperationError as e:
        if e.error.code == SYS.RESOURCE_NOT_FOUND:
            raise _not_found(vm_uuid, e) from None
        if e.error.code == SYS.CHANGE_RESOURCE_STATE_ERROR:
            actual = (e.error.opaque.get("actual") or {}).get("state")
            err = _refused(str(actual), event, uuid=vm_uuid, expected=expected)
            raise OperationError(err.error.wrap(e.error)) from None
        raise
