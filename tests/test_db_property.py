"""
A hypothesis stateful test of the atomic operations, on SQLite and on the real PostgreSQL.

Each step issues a batch of operations (reserve/release host capacity, allocate/free IP, VM
state compare-and-swap, and retries of reservations and allocations already held, as after a
lost acknowledgement) AT THE SAME TIME: the batch runs on several OS threads, each with
its own database connection, released together by a barrier, calling the very C{*_thd}
functions the store runs in its pool. So the races are real races in the database, while
the test itself stays synchronous (hypothesis drives it; no reactor is involved). After each
step it checks that capacity is conserved (and that the audit, which recomputes it from the
holders, agrees), that a retry takes nothing more and answers the same address, that no IP
is held twice, and that the VM state
only moved along a chain of compare-and-swaps whose expected state was the state before.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.trial.unittest import SynchronousTestCase

from tests.db_support import (
    TOPOLOGY,
    pg_create_database_sync,
    pg_drop_database_sync,
    pg_dsn,
)
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import DB
from zcontrol.db import _store as thd
from zcontrol.db._store import Db, load_migrations, migrate_thd
from zcontrol.db.postgres import PostgresDialect
from zcontrol.db.sqlite import SQLiteDialect

TOTAL_CPU, TOTAL_MEMORY, RANGE_SIZE = 8, 1000, 6
WORKERS = 5

TRANSITIONS = [
    ("Created", "Starting"), ("Created", "Destroying"), ("Starting", "Running"),
    ("Starting", "Stopped"), ("Running", "Stopping"), ("Running", "Rebooting"),
    ("Running", "Migrating"), ("Rebooting", "Running"), ("Migrating", "Running"),
    ("Stopping", "Stopped"), ("Stopped", "Starting"), ("Stopped", "Destroying"),
    ("Destroying", "Destroyed"), ("Destroyed", "Stopped"),
]

OPS = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 4), st.integers(0, 400)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("retry"), st.integers(0, 50)),
    st.tuples(st.just("realloc"), st.integers(0, 50)),
    st.tuples(st.just("alloc"), st.sampled_from(["random", "first"])),
    st.tuples(st.just("alloc"), st.sampled_from(["random", "first"])),
    st.tuples(st.just("free"), st.integers(0, 50)),
    st.tuples(st.just("free_again"), st.integers(0, 50)),
    st.tuples(st.just("cas"), st.sampled_from(TRANSITIONS)),
)


class Env:
    """
    A migrated database, a checking connection and a pool of racing worker threads (one
    connection each).
    """

    def __init__(self, dialect: Any):
        self.dialect = dialect
        self.check = Db(dialect.open_raw(), dialect)
        migrate_thd(self.check, load_migrations(dialect.name), 0.0)
        self._local = threading.local()
        self._conns: list[Any] = [self.check.raw]
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=WORKERS)
        self.counter = itertools.count()
        for name in ("zone", "cluster", "l2Network"):
            thd.insert_thd(self.check, name, TOPOLOGY[name], 0.0)

    def worker_db(self) -> Db:
        db = getattr(self._local, "db", None)
        if db is None:
            raw = self.dialect.open_raw()
            with self._lock:
                self._conns.append(raw)
            db = self._local.db = Db(raw, self.dialect)
        return db

    def race(self, calls: list[Callable[[Db], Any]]) -> list[tuple[bool, Any]]:
        """
        Run the calls at the same moment on distinct threads and connections.
        """
        barrier = threading.Barrier(len(calls))

        def one(fn: Callable[[Db], Any]) -> tuple[bool, Any]:
            db = self.worker_db()
            barrier.wait(timeout=30)
            try:
                return True, fn(db)
            except OperationError as e:
                return False, e.error

        futures = [self.executor.submit(one, fn) for fn in calls]
        return [f.result(timeout=60) for f in futures]

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for raw in self._conns:
            raw.close()


class StoreMachine(RuleBasedStateMachine):
    """
    The model: the reservations held, the IPs held, the VM state.
    """

    env: Env

    def __init__(self) -> None:
        super().__init__()
        n = next(self.env.counter)
        self.host, self.l3, self.vm = f"host-p{n}", f"l3-p{n}", f"vm-p{n}"
        db = self.env.check
        thd.insert_thd(db, "host", dict(
            TOPOLOGY["host"], uuid=self.host, managementIp=f"172.16.{n // 250}.{n % 250}",
            totalCpuCapacity=TOTAL_CPU, availableCpuCapacity=TOTAL_CPU,
            totalMemoryCapacity=TOTAL_MEMORY, availableMemoryCapacity=TOTAL_MEMORY), 0.0)
        thd.insert_thd(db, "l3Network", dict(TOPOLOGY["l3Network"], uuid=self.l3), 0.0)
        thd.insert_thd(db, "ipRange", dict(
            TOPOLOGY["ipRange"], uuid=f"range-p{n}", l3NetworkUuid=self.l3,
            startIp="10.9.0.1", endIp=f"10.9.0.{RANGE_SIZE}"), 0.0)
        thd.insert_thd(db, "vmInstance", dict(TOPOLOGY["vmInstance"], uuid=self.vm), 0.0)
        self.reserved: list[tuple[int, int, tuple[str, str]]] = []
        self.held: dict[str, str] = {}
        self.holders: dict[str, tuple[str, str]] = {}
        self.freed: list[str] = []
        self.state = "Created"

    @rule(ops=st.lists(OPS, min_size=2, max_size=WORKERS))
    def concurrent_batch(self, ops: list[tuple]) -> None:
        calls: list[Callable[[Db], Any]] = []
        kinds: list[tuple] = []
        pinned: set = set()  # retried in this batch: not released in it too
        for op in ops:
            kind = op[0]
            if kind == "reserve":
                cpu, mem = op[1], op[2]
                holder = ("VmInstanceVO", f"r{next(self.env.counter)}")
                calls.append(lambda db, c=cpu, m=mem, h=holder: thd.reserve_host_capacity_thd(
                    db, self.host, c, m, h, 1.0))
                kinds.append(("reserve", (cpu, mem, holder)))
            elif kind == "release" and [r for r in self.reserved if r[2] not in pinned]:
                free = [i for i, r in enumerate(self.reserved) if r[2] not in pinned]
                cpu, mem, holder = self.reserved.pop(free[op[1] % len(free)])
                calls.append(lambda db, h=holder: thd.release_host_capacity_thd(
                    db, self.host, h, 1.0))
                kinds.append(("release", (cpu, mem, holder)))
            elif kind == "retry" and self.reserved:
                # A reservation retried (its acknowledgement lost), racing the others.
                cpu, mem, holder = self.reserved[op[1] % len(self.reserved)]
                pinned.add(holder)
                calls.append(lambda db, c=cpu, m=mem, h=holder: thd.reserve_host_capacity_thd(
                    db, self.host, c, m, h, 1.0))
                kinds.append(("retry", (cpu, mem, holder)))
            elif kind == "realloc" and self.held:
                uuid = sorted(self.held)[op[1] % len(self.held)]
                holder = self.holders[uuid]
                pinned.add(uuid)
                calls.append(lambda db, h=holder: thd.allocate_ip_thd(
                    db, self.l3, h, None, None, 1.0, "first"))
                kinds.append(("realloc", uuid))
            elif kind == "alloc":
                holder = ("VmNicVO", f"n{next(self.env.counter)}")
                calls.append(lambda db, s=op[1], h=holder: thd.allocate_ip_thd(
                    db, self.l3, h, None, None, 1.0, s))
                kinds.append(("alloc", holder))
            elif kind == "free" and set(self.held) - pinned:
                choices = sorted(set(self.held) - pinned)
                uuid = choices[op[1] % len(choices)]
                del self.held[uuid]
                calls.append(lambda db, h=self.holders[uuid]: thd.release_ip_thd(
                    db, self.l3, h))
                kinds.append(("free", uuid))
            elif kind == "free_again" and self.freed:
                uuid = self.freed[op[1] % len(self.freed)]
                calls.append(lambda db, h=self.holders[uuid]: thd.release_ip_thd(
                    db, self.l3, h))
                kinds.append(("free_again", uuid))
            elif kind == "cas":
                expected, new = op[1]
                calls.append(lambda db, e=expected, w=new: thd.change_vm_state_thd(
                    db, self.vm, e, w, None, 1.0))
                kinds.append(("cas", (expected, new)))
        if not calls:
            return
        results = self.env.race(calls)
        winners: list[tuple[str, str]] = []
        for (kind, arg), (ok, value) in zip(kinds, results, strict=True):
            if kind == "reserve":
                if ok:
                    self.reserved.append(arg)
                else:
                    assert value.code == DB.HOST_CAPACITY, value
            elif kind == "release":
                assert ok, f"releasing a held reservation failed: {value}"
            elif kind == "retry":
                assert ok, f"retrying a held reservation failed: {value}"
            elif kind == "realloc":
                assert ok and value["uuid"] == arg, (arg, value)
            elif kind == "alloc":
                if ok:
                    assert value["ip"] not in self.held.values(), f"{value['ip']} held twice"
                    self.held[value["uuid"]] = value["ip"]
                    self.holders[value["uuid"]] = arg
                else:
                    assert value.code == DB.NO_FREE_IP, value
            elif kind == "free":
                assert ok and value is not None and value["uuid"] == arg, (
                    f"releasing a held IP failed: {value}")
                self.freed.append(arg)
            elif kind == "free_again":
                assert ok and value is None, value
            elif kind == "cas":
                if ok:
                    winners.append(arg)
                else:
                    assert value.code == SYS.CHANGE_RESOURCE_STATE_ERROR, value
                    assert value.opaque["actual"]["state"] != arg[0], value
        final = self.env.check.one("SELECT state FROM vm_instances WHERE uuid = ?", (self.vm,))[0]
        assert any(
            self._chain(order) == final for order in itertools.permutations(winners)
        ), f"no order of the swaps {winners} leads from {self.state} to {final}"
        self.state = final

    def _chain(self, order: tuple) -> str | None:
        state = self.state
        for expected, new in order:
            if expected != state:
                return None
            state = new
        return state

    @invariant()
    def conserved(self) -> None:
        db = self.env.check
        cpu, mem = db.one(
            "SELECT available_cpu_capacity, available_memory_capacity FROM hosts WHERE uuid = ?",
            (self.host,))
        assert cpu == TOTAL_CPU - sum(r[0] for r in self.reserved), (cpu, self.reserved)
        assert mem == TOTAL_MEMORY - sum(r[1] for r in self.reserved), (mem, self.reserved)
        assert [d for d in thd.audit_capacity_thd(db, False, 1.0) if d["uuid"] == self.host] == []
        assert 0 <= cpu <= TOTAL_CPU and 0 <= mem <= TOTAL_MEMORY
        rows = db.all("SELECT uuid, ip FROM used_ips WHERE l3_network_uuid = ?", (self.l3,))
        assert dict((u, ip) for u, ip in rows) == self.held, (rows, self.held)
        assert len({ip for _, ip in rows}) == len(rows) <= RANGE_SIZE
        state = db.one("SELECT state FROM vm_instances WHERE uuid = ?", (self.vm,))[0]
        assert state == self.state, (state, self.state)


SETTINGS = settings(max_examples=15, stateful_step_count=12)


class PropertyMixin:
    def make_dialect(self) -> Any:
        raise NotImplementedError

    def test_concurrent_interleavings(self) -> None:
        """
        Random batches of concurrent reserve/release/allocate/free/CAS keep capacity
        conserved, never give one IP twice, and move the VM state only from the expected
        state.
        """
        env = Env(self.make_dialect())
        self.addCleanup(env.close)
        machine = type("Machine", (StoreMachine,), {"env": env})
        run_state_machine_as_test(machine, settings=SETTINGS)


class SQLitePropertyTests(PropertyMixin, SynchronousTestCase):
    """
    On SQLite (a temp file shared by several connections: writers really contend).
    """

    def make_dialect(self) -> Any:
        path = os.path.abspath(self.mktemp() + ".db")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return SQLiteDialect(path)


class PostgresPropertyTests(PropertyMixin, SynchronousTestCase):
    """
    On the real PostgreSQL (a fresh database).
    """

    def make_dialect(self) -> Any:
        name = pg_create_database_sync()
        self.addCleanup(pg_drop_database_sync, name)
        return PostgresDialect(pg_dsn(name))
