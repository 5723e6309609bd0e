"""
The VM state machine (L{zcontrol.services.vm.states}): the transition table against ZStack's
C{VmInstanceState.java} and ZSTACK_FACTS §6, the allowed operations, and L{transition} as a
compare-and-swap on the memory, SQLite and PostgreSQL stores.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.db_support import (
    TOPOLOGY,
    MemoryStoreFactory,
    PostgresStoreFactory,
    SQLiteStoreFactory,
    error_of,
)
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import open_store
from zcontrol.services.vm import states
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.states import (
    EVENTS,
    OPERATIONS,
    STATES,
    TRANSITIONS,
    check_operation,
    next_state,
    transition,
)

# ZStack's VmInstanceState.java static table, one "State event Next" per transaction, written
# out here independently of the module so that a slip in either shows.
ZSTACK_TABLE = """
Created starting Starting
Created destroying Destroying
Created destroyed Destroyed
Starting running Running
Starting stopped Stopped
Starting paused Paused
Starting destroying Destroying
Starting unknown Unknown
Running running Running
Running destroying Destroying
Running stopping Stopping
Running stopped Stopped
Running rebooting Rebooting
Running migrating Migrating
Running volumeMigrating Migrating
Running volumeRecovering VolumeRecovering
Running pausing Pausing
Running paused Paused
Running crashed Crashed
Running unknown Unknown
Stopping stopped Stopped
Stopping destroying Destroying
Stopping running Running
Stopping unknown Unknown
Stopped starting Starting
Stopped stopped Stopped
Stopped running Running
Stopped paused Paused
Stopped destroying Destroying
Stopped volumeMigrating VolumeMigrating
Stopped volumeRecovering VolumeRecovering
Stopped unknown Unknown
Migrating migrated Running
Migrating volumeMigrated Running
Migrating running Running
Migrating paused Paused
Migrating stopped Stopped
Migrating unknown Unknown
Migrating destroying Destroying
VolumeMigrating volumeMigrated Stopped
VolumeMigrating stopped Stopped
VolumeMigrating unknown Unknown
VolumeMigrating destroying Destroying
VolumeRecovering starting VolumeRecovering
VolumeRecovering running VolumeRecovering
VolumeRecovering volumeRecovering VolumeRecovering
VolumeRecovering volumeRecovered Running
VolumeRecovering stopping Stopping
VolumeRecovering stopped Stopped
VolumeRecovering unknown Unknown
VolumeRecovering destroying Destroying
Rebooting running Running
Rebooting stopped Stopped
Rebooting unknown Unknown
Rebooting destroying Destroying
Paused resuming Resuming
Paused stopped Stopped
Paused running Running
Paused stopping Stopping
Paused destroying Destroying
Paused unknown Unknown
Paused migrating Migrating
Paused volumeMigrated Running
Pausing paused Paused
Pausing destroying Destroying
Pausing running Running
Pausing unknown Unknown
Resuming running Running
Resuming destroying Destroying
Resuming paused Paused
Resuming unknown Unknown
Unknown destroying Destroying
Unknown stopping Stopping
Unknown unknown Unknown
Unknown paused Paused
Unknown running Running
Unknown migrating Migrating
Unknown stopped Stopped
Destroying unknown Unknown
Destroying destroyed Destroyed
Destroying destroying Destroying
Destroying running Running
Destroying expunging Expunging
Destroyed stopped Stopped
Crashed running Running
Crashed unknown Unknown
Crashed stopping Stopping
Crashed stopped Stopped
Crashed rebooting Rebooting
Crashed crashed Crashed
Crashed destroyed Destroyed
Crashed destroying Destroying
"""

EXPECTED: dict[tuple[str, str], str] = {
    (s, e): n for s, e, n in (line.split() for line in ZSTACK_TABLE.strip().splitlines())
}

# ZSTACK_FACTS §6, "Main transitions" (Unknown -> the sync-reported states).
FACTS_MAIN = [
    ("Created", "Starting"), ("Created", "Destroying"),
    ("Starting", "Running"), ("Starting", "Stopped"), ("Starting", "Unknown"),
    ("Running", "Stopping"), ("Running", "Rebooting"), ("Running", "Migrating"),
    ("Running", "Destroying"), ("Running", "Unknown"),
    ("Stopping", "Stopped"), ("Stopping", "Running"),
    ("Stopped", "Starting"), ("Stopped", "Destroying"),
    ("Migrating", "Running"),
    ("Destroying", "Destroyed"), ("Destroying", "Expunging"),
    ("Destroyed", "Stopped"),
    ("Unknown", "Running"), ("Unknown", "Stopped"), ("Unknown", "Paused"),
]

# ZStack's AbstractVmInstance.allowedOperations, restated (Suspended/Suspending = Paused/Pausing).
EXPECTED_OPERATIONS = {
    "start": {"Created", "Stopped", "Running", "Crashed"},
    "stop": {"Running", "Stopped", "Unknown", "Paused", "Crashed"},
    "reboot": {"Running", "Crashed"},
    # + Error: a half-made VM stays destroyable and expungeable (ZStack PR #1160)
    "destroy": {"Created", "Running", "Stopped", "Unknown", "Starting", "Migrating", "Stopping",
                "Rebooting", "Paused", "Pausing", "Resuming", "VolumeMigrating", "Crashed",
                "Error"},
    "expunge": {"Destroyed", "Error"},
    "recover": {"Destroyed"},
    "migrate": {"Running", "Unknown", "Paused"},
    "pause": {"Running"},
    "resume": {"Paused"},
    "attachNic": {"Running", "Stopped"},
    "detachNic": {"Running", "Stopped"},
    "attachVolume": {"Running", "Stopped"},
    "detachVolume": {"Running", "Stopped"},
    "changeInstanceOffering": {"Stopped"},  # issue 10: while stopped (ZStack: Running too)
    "attachIso": {"Running", "Stopped"},
    "detachIso": {"Running", "Stopped"},
    "setStaticIp": {"Stopped"},
    "deleteStaticIp": {"Running", "Stopped"},
    "getConsoleAddress": {"Running", "Crashed"},
    "getMigrationCandidateHosts": {"Running"},
    "createRootVolumeTemplate": {"Stopped"},
}


def _refusal(fn: Any, *args: Any) -> Any:
    try:
        fn(*args)
    except OperationError as e:
        return e.error
    raise AssertionError(f"{fn.__name__}{args} was not refused")


class TableTests(unittest.SynchronousTestCase):
    """
    The pure table: states, events, transitions, operations.
    """

    def test_states_are_the_check_constraint(self) -> None:
        """
        The states are exactly those the C{vm_instances.state} CHECK constraint lists, in its
        order, and the intermediate states are ZStack's nine.
        """
        path = os.path.join(os.path.dirname(states.__file__), "..", "..", "db", "migrations",
                            "0001_initial.sql")
        with open(path) as f:
            sql = f.read()
        table = sql[sql.index("CREATE TABLE vm_instances"):]
        check = re.search(r"CHECK \(state IN \(([^)]*)\)\)", table).group(1)
        self.assertEqual(tuple(re.findall(r"'(\w+)'", check)), STATES)
        self.assertEqual(set(TRANSITIONS), set(STATES))
        self.assertEqual(states.INTERMEDIATE_STATES, {
            "Starting", "Stopping", "Rebooting", "Destroying", "Migrating", "Pausing",
            "Resuming", "VolumeMigrating", "VolumeRecovering"})
        self.assertEqual(states.FINAL_STATES | states.INTERMEDIATE_STATES, set(STATES))

    def test_every_pair(self) -> None:
        """
        Table-driven: for every state and every event, ZStack's transition is allowed with
        its next state, and every pair not in ZStack's table is refused with VM.1010 naming
        the state and the event.
        """
        allowed = refused = 0
        for state in STATES:
            for event in EVENTS:
                want = EXPECTED.get((state, event))
                if want is not None:
                    self.assertEqual(next_state(state, event), want, (state, event))
                    allowed += 1
                else:
                    err = _refusal(next_state, state, event)
                    self.assertEqual(err.code, VM.NOT_IN_CORRECT_STATE)
                    self.assertIn(f"state {state} ", err.details)
                    self.assertIn(f"event {event};", err.details)
                    self.assertEqual((err.opaque["state"], err.opaque["event"]), (state, event))
                    refused += 1
        self.assertEqual(allowed, len(EXPECTED))
        self.assertEqual(allowed + refused, len(STATES) * len(EVENTS))
        self.assertEqual({e for _, e in EXPECTED}, set(EVENTS))

    def test_facts_main_transitions(self) -> None:
        """
        Every main transition of ZSTACK_FACTS §6 is one event away; Expunging, Error and
        NoState lead nowhere.
        """
        for src, dst in FACTS_MAIN:
            self.assertIn(dst, set(TRANSITIONS[src].values()), (src, dst))
        for dead in ("Expunging", "Error", "NoState"):
            self.assertEqual(states.allowed_events(dead), [])
        self.assertEqual(next_state("Destroyed", "stopped"), "Stopped")  # recover

    def test_unknown_names(self) -> None:
        """
        A name that is not a state or not an event is an invalid argument naming the field.
        """
        self.assertEqual(_refusal(next_state, "Bogus", "starting").opaque["field"], "state")
        err = _refusal(next_state, "Running", "recovered")
        self.assertEqual((err.code, err.opaque["field"]), (SYS.INVALID_ARGUMENT_ERROR, "event"))
        err = _refusal(check_operation, "Running", "fly")
        self.assertEqual((err.code, err.opaque["field"]),
                         (SYS.INVALID_ARGUMENT_ERROR, "operation"))

    def test_sources(self) -> None:
        """
        C{sources} lists the states an event moves out of, narrowed to one target.
        """
        self.assertEqual(states.sources("starting"), ["Created", "Stopped", "VolumeRecovering"])
        self.assertEqual(states.sources("starting", "Starting"), ["Created", "Stopped"])
        self.assertEqual(states.sources("expunging"), ["Destroying"])

    def test_check_operation(self) -> None:
        """
        Each operation is allowed in ZStack's states and refused in every other with VM.1010
        naming the state and the operation, the allowed states in the details.
        """
        self.assertEqual({k: set(v) for k, v in OPERATIONS.items()}, EXPECTED_OPERATIONS)
        for operation, allowed in EXPECTED_OPERATIONS.items():
            for state in STATES:
                if state in allowed:
                    self.assertIsNone(check_operation(state, operation))
                    continue
                err = _refusal(check_operation, state, operation)
                self.assertEqual(err.code, VM.NOT_IN_CORRECT_STATE)
                self.assertIn(f"state {state} ", err.details)
                self.assertIn(f"operation {operation};", err.details)
                ordered = [s for s in STATES if s in allowed]
                self.assertIn(f"allowed states are {ordered}", err.details)
                self.assertEqual(err.opaque["allowedStates"], ordered)


class PropertyTests(unittest.SynchronousTestCase):
    """
    Random event sequences from Created.
    """

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(EVENTS), max_size=40))
    def test_random_events(self, events: list[str]) -> None:
        """
        The state is always one of the states; a refused event leaves it unchanged and its
        error names the state and the event; an allowed one follows ZStack's table.
        """
        state = "Created"
        for event in events:
            try:
                nxt = next_state(state, event)
            except OperationError as e:
                self.assertNotIn((state, event), EXPECTED)
                self.assertEqual(e.error.code, VM.NOT_IN_CORRECT_STATE)
                self.assertIn(state, e.error.details)
                self.assertIn(event, e.error.details)
                self.assertEqual((e.error.opaque["state"], e.error.opaque["event"]),
                                 (state, event))
                continue
            self.assertEqual(nxt, EXPECTED[(state, event)])
            state = nxt
            self.assertIn(state, STATES)


class TransitionMixin:
    """
    L{transition} on a real store (mixed with a store factory and a trial TestCase).
    """

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.store = open_store(self.store_url(), reactor, **self.store_options)
        await self.store.start()
        for name in ("zone", "cluster"):
            await self.store.insert(name, TOPOLOGY[name])
        await self.store.add_host(TOPOLOGY["host"])
        await self.store.insert("vmInstance", TOPOLOGY["vmInstance"])

    @async_to_deferred
    async def tearDown(self) -> None:
        await self.store.stop()
        await self.tearDown_database()

    async def refused(self, d: defer.Deferred) -> Any:
        try:
            row = await d
        except OperationError as e:
            return e.error
        self.fail(f"not refused: {row!r}")

    @async_to_deferred
    async def test_lifecycle(self) -> None:
        """
        Created -> Starting (with the host set in the same swap) -> Running -> Stopping ->
        Stopped -> Destroying -> Destroyed -> Stopped (recover), each through the store.
        """
        row = await transition(self.store, "vm-1", "starting", {"hostUuid": "host-1"})
        self.assertEqual((row["state"], row["hostUuid"]), ("Starting", "host-1"))
        for event, want in [("running", "Running"), ("stopping", "Stopping"),
                            ("stopped", "Stopped"), ("destroying", "Destroying"),
                            ("destroyed", "Destroyed"), ("stopped", "Stopped")]:
            row = await transition(self.store, "vm-1", event)
            self.assertEqual(row["state"], want, event)
        self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Stopped")

    @async_to_deferred
    async def test_expected_narrows_sources(self) -> None:
        """
        Fault (review): a host's late "stopped" report moved a Destroyed VM to Stopped (the
        table's recover edge), silently recovering it. With C{expected} the swap only leaves
        the states the caller saw: a Destroyed VM stays Destroyed (VM.1010 naming it), a
        Running one stops; an event that leaves none of them is SYS.1007.
        """
        for event in ("starting", "running", "stopping", "stopped", "destroying",
                      "destroyed"):
            await transition(self.store, "vm-1", event)
        err = await self.refused(transition(self.store, "vm-1", "stopped",
                                            expected=["Running", "Unknown"]))
        self.assertEqual((err.code, err.opaque["state"]),
                         (VM.NOT_IN_CORRECT_STATE, "Destroyed"))
        self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Destroyed")
        row = await transition(self.store, "vm-1", "stopped", expected=["Destroyed"])
        self.assertEqual(row["state"], "Stopped")
        err = await self.refused(transition(self.store, "vm-1", "destroyed",
                                            expected=["Running"]))
        self.assertEqual((err.code, err.opaque["field"]),
                         (SYS.INVALID_ARGUMENT_ERROR, "expected"))

    @async_to_deferred
    async def test_refused_leaves_state(self) -> None:
        """
        An event the current state has no transition for is refused with VM.1010 naming the
        actual state and the event (the store's SYS.1005 as cause); the row is unchanged.
        """
        err = await self.refused(transition(self.store, "vm-1", "stopped"))
        self.assertEqual(err.code, VM.NOT_IN_CORRECT_STATE)
        self.assertIn("state Created ", err.details)
        self.assertIn("event stopped;", err.details)
        self.assertEqual(err.cause.code, SYS.CHANGE_RESOURCE_STATE_ERROR)
        self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Created")

    @async_to_deferred
    async def test_not_found(self) -> None:
        """
        An unknown VM is VM.1100 naming the uuid, for single- and multi-target events.
        """
        for event in ("starting", "running"):
            err = await self.refused(transition(self.store, "vm-nope", event))
            self.assertEqual(err.code, VM.NOT_FOUND)
            self.assertIn("vm-nope", err.details)
            self.assertEqual(err.opaque["uuid"], "vm-nope")

    @async_to_deferred
    async def test_multi_target_event(self) -> None:
        """
        C{running} from VolumeRecovering stays VolumeRecovering while from Starting it goes to
        Running: the state is read and swapped from exactly that state.
        """
        await self.store.change_vm_state("vm-1", "Created", "VolumeRecovering")
        row = await transition(self.store, "vm-1", "running")
        self.assertEqual(row["state"], "VolumeRecovering")
        await transition(self.store, "vm-1", "stopped")
        await transition(self.store, "vm-1", "starting")
        row = await transition(self.store, "vm-1", "running")
        self.assertEqual(row["state"], "Running")

    @async_to_deferred
    async def test_concurrent(self) -> None:
        """
        Two concurrent starts of one stopped VM: exactly one wins; the other gets VM.1010
        naming the new state, Starting.
        """
        await self.store.change_vm_state("vm-1", "Created", "Stopped")
        results = await defer.DeferredList(
            [transition(self.store, "vm-1", "starting", {"hostUuid": "host-1"})
             for _ in range(2)], consumeErrors=True)
        wins = [r for ok, r in results if ok]
        losses = [error_of(r) for ok, r in results if not ok]
        self.assertEqual((len(wins), len(losses)), (1, 1))
        self.assertEqual(wins[0]["state"], "Starting")
        self.assertEqual(losses[0].code, VM.NOT_IN_CORRECT_STATE)
        self.assertIn("state Starting ", losses[0].details)
        self.assertEqual(losses[0].opaque["state"], "Starting")


    @async_to_deferred
    async def test_concurrent_single_target(self) -> None:
        """
        Two concurrent stops of one running VM (one swap from every source of C{stopping}):
        exactly one wins; the other gets VM.1010 naming Stopping.
        """
        await self.store.change_vm_state("vm-1", "Created", "Running")
        results = await defer.DeferredList(
            [transition(self.store, "vm-1", "stopping") for _ in range(2)],
            consumeErrors=True)
        self.assertEqual(sorted(ok for ok, _ in results), [False, True])
        err = next(error_of(r) for ok, r in results if not ok)
        self.assertEqual((err.code, err.opaque["state"]), (VM.NOT_IN_CORRECT_STATE, "Stopping"))
        self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Stopping")

    @async_to_deferred
    async def test_changed_between_read_and_swap(self) -> None:
        """
        For an event with several targets, a change between the read and the swap to a state
        that also has the event makes transition() read again and follow the new state.
        """
        await self.store.change_vm_state("vm-1", "Created", "Starting")
        store = _Interfering(self.store, "Starting", "VolumeRecovering")
        row = await transition(store, "vm-1", "running")
        self.assertEqual((row["state"], store.reads), ("VolumeRecovering", 2))


class _Interfering:
    """
    A store whose first C{get} of a VM is followed by another writer's state change.
    """

    def __init__(self, store: Any, old: str, new: str) -> None:
        self.store, self.old, self.new, self.reads = store, old, new, 0

    async def _get(self, resource: str, uuid: str) -> Any:
        row = await self.store.get(resource, uuid)
        self.reads += 1
        if self.reads == 1:
            await self.store.change_vm_state(uuid, self.old, self.new)
        return row

    def get(self, resource: str, uuid: str) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._get(resource, uuid))

    def change_vm_state(self, *args: Any) -> defer.Deferred:
        return self.store.change_vm_state(*args)


class MemoryTransitionTests(MemoryStoreFactory, TransitionMixin, unittest.TestCase):
    """
    L{transition} on the in-memory store.
    """


class SQLiteTransitionTests(SQLiteStoreFactory, TransitionMixin, unittest.TestCase):
    """
    L{transition} on SQLite.
    """


class PostgresTransitionTests(PostgresStoreFactory, TransitionMixin, unittest.TestCase):
    """
    L{transition} on PostgreSQL.
    """
