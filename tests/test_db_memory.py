"""
What the memory store adds to the contract (which it passes in C{tests.test_db_contract}):
it runs on a L{Clock} with no threads, never runs an operation at call time, runs the
operations of one turn in a shuffled (seeded) order, shares a database by name, and drains
at stop.
"""

from __future__ import annotations

import threading

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.db_support import LATEST_SCHEMA, TOPOLOGY
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import Query, open_store
from zcontrol.db.memory import MemoryStore


def started(clock: Clock, **kw: object) -> MemoryStore:
    store = MemoryStore(clock, **kw)
    store.start()
    return store


class MemoryStoreTests(SynchronousTestCase):
    """
    The memory store on a Clock (as a service test would use it).
    """

    def test_start_is_immediate_and_threadless(self) -> None:
        """
        start migrates at once (no clock step needed); operations use no thread.
        """
        before = threading.active_count()
        clock = Clock()
        store = MemoryStore(clock)
        self.assertEqual(self.successResultOf(store.start()), LATEST_SCHEMA)
        d = store.insert("zone", TOPOLOGY["zone"])
        clock.advance(0)
        self.assertEqual(self.successResultOf(d)["name"], "zone1")
        self.assertEqual(threading.active_count(), before)
        self.assertEqual(store.pool_size, 0)

    def test_nothing_runs_at_call_time(self) -> None:
        """
        A call returns an unfired Deferred and changes nothing until the reactor turns:
        code that assumes a store call is done before its Deferred fires fails here.
        """
        clock = Clock()
        store = started(clock)
        d = store.insert("zone", TOPOLOGY["zone"])
        self.assertNoResult(d)
        peek = store.get("zone", "zone-1")
        self.assertNoResult(peek)
        store.flush()
        row = self.successResultOf(d)
        self.assertIn(self.successResultOf(peek), (None, row))
        errors = store.insert("zone", None)
        self.assertNoResult(errors)
        clock.advance(0)
        self.assertEqual(self.failureResultOf(errors, OperationError).value.error.code,
                         SYS.INVALID_ARGUMENT_ERROR)

    def completion_order(self, **kw: object) -> list[int]:
        clock = Clock()
        store = started(clock, **kw)
        order: list[int] = []
        for n in range(12):
            store.insert("zone", {"uuid": f"z{n}", "name": f"z{n}"}).addCallback(
                lambda _, n=n: order.append(n))
        clock.advance(0)
        self.assertEqual(sorted(order), list(range(12)))
        return order

    def test_concurrent_calls_complete_shuffled(self) -> None:
        """
        Calls issued in one turn (not waiting for each other) run and complete in a
        shuffled order, the same for the same seed; in call order with shuffle=False.
        """
        first = self.completion_order()
        self.assertNotEqual(first, list(range(12)))
        self.assertEqual(self.completion_order(), first)
        self.assertNotEqual(self.completion_order(seed=1), first)
        self.assertEqual(self.completion_order(shuffle=False), list(range(12)))

    def test_catches_an_ordering_bug(self) -> None:
        """
        Reading without waiting for one's own write sees the old row for some seed, as it
        may against a real database with several connections.
        """
        seen = set()
        for seed in range(8):
            clock = Clock()
            store = started(clock, seed=seed)
            store.insert("zone", TOPOLOGY["zone"])
            clock.advance(0)
            store.update("zone", "zone-1", {"state": "Disabled"})  # not awaited: the bug
            d = store.get("zone", "zone-1")
            clock.advance(0)
            seen.add(self.successResultOf(d)["state"])
        self.assertEqual(seen, {"Enabled", "Disabled"})

    def test_callbacks_issue_later_turns(self) -> None:
        """
        An operation issued from a callback is queued, never run re-entrantly inside the
        callback (it runs after the current batch, on the next timed call).
        """
        clock = Clock()
        store = started(clock)
        inner: list = []

        def chain(row: dict) -> None:
            d = store.get("zone", row["uuid"])
            inner.append((d, d.called))

        store.insert("zone", TOPOLOGY["zone"]).addCallback(chain)
        clock.advance(0)
        d, called_at_once = inner[0]
        self.assertFalse(called_at_once)
        self.assertEqual(self.successResultOf(d)["name"], "zone1")

    def test_stop_drains_then_refuses(self) -> None:
        """
        stop runs what is queued, then refuses new calls with SYS.1010.
        """
        clock = Clock()
        store = started(clock)
        pending = [store.insert("zone", {"uuid": f"z{n}", "name": f"z{n}"}) for n in range(3)]
        stopped = store.stop()
        self.assertNoResult(stopped)
        self.assertEqual(self.failureResultOf(store.get("zone", "z0"), OperationError)
                         .value.error.code, SYS.NOT_READY_ERROR)
        clock.advance(0)
        for d in pending:
            self.successResultOf(d)
        self.successResultOf(stopped)

    def test_named_databases_are_shared(self) -> None:
        """
        Stores of one name share the database (until the last stops); unnamed ones do not.
        """
        clock = Clock()
        a = open_store("memory://shared-test", clock)
        b = open_store("memory://shared-test", clock)
        c = open_store("memory://", clock)
        for s in (a, b, c):
            s.start()
        a.insert("zone", TOPOLOGY["zone"])
        clock.advance(0)
        counts = [s.query("zone", Query(count=True)) for s in (a, b, c)]
        clock.advance(0)
        self.assertEqual([self.successResultOf(d).total for d in counts], [1, 1, 0])
        for s in (a, b, c):
            s.stop()
        clock.advance(0)
        d = open_store("memory://shared-test", clock)
        d.start()
        count = d.query("zone", Query(count=True))
        clock.advance(0)
        self.assertEqual(self.successResultOf(count).total, 0)
