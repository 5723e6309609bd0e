# -*- test-case-name: tests.test_db_contract -*-
"""
The in-memory store: an L{IStore} without threads or files, for service tests (and a
throw-away node), held to the same contract suite as SQLite and PostgreSQL.

It is the SQLite backend's schema and its very C{*_thd} functions on a private in-memory
SQLite database (Python's C{sqlite3}, always available), run on the reactor thread. So the
query language (every operator, sort, paging, counts), the constraints (unique, foreign
keys, checks), the compare-and-swaps, capacity and IP allocation, jobs and heartbeats are
not re-implemented, and cannot drift from the real backends; the edge checks (Note [edge] in
L{zcontrol.db._store}) are the same too.

Never blocking: an in-memory database has no I/O and, with one connection, no lock waits;
each operation is a few statements of CPU work (bounded by the query limits).

Asynchrony (Note [memory ordering]): no operation runs when it is called. Calls are queued
and run on a later reactor turn (C{reactor.callLater(0, ...)}); the operations queued during
one turn, i.e. the ones a caller issued without waiting for each other, run in a shuffled
order (a seeded C{random.Random}: deterministic for a given seed, default 0), and each
Deferred fires right after its own operation ran. Code that relies on a store call having
happened before its Deferred fired, or on concurrent calls completing in call order, fails
here as it would, rarely, against a real database. Pass C{shuffle=False} for call order.

With a L{twisted.internet.task.Clock} as the reactor, operations run when the clock is
advanced (C{clock.advance(0)} suffices), or at once with L{MemoryStore.flush}.

Several stores can share one database by name (C{memory://name}, as a second management
node would share PostgreSQL); C{memory://} alone is private to its store.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from zcontrol._defer import DeferWaiter, async_to_deferred
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db._store import AdbapiStore, Db, load_migrations, migrate_thd
from zcontrol.db.interfaces import IStore
from zcontrol.db.sqlite import SQLiteDialect

__all__ = ["MemoryStore"]


class _Shared:
    """
    One named in-memory database and the number of started stores using it.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self.users = 0


_SHARED: dict[str, _Shared] = {}


@implementer(IStore)
class MemoryStore(AdbapiStore):
    """
    The store in memory (see L{IStore} and the module docstring).

    @ivar backend: C{"memory"}.
    @ivar pool_size: 0 (no threads, no connections besides the in-memory one).
    """

    def __init__(self, reactor: Any, name: str | None = None, shuffle: bool = True,
                 seed: int = 0):
        """
        @param reactor: the reactor (or a Clock) whose turns run the operations.
        @param name: share the database with the other stores of this name (None: private).
        @param shuffle: run the operations queued in one turn in a seeded random order.
        @param seed: the seed of that order.
        """
        self.dialect = SQLiteDialect(":memory:")
        self.backend = "memory"
        self.pool_size = 0
        self.schema_version: int | None = None
        self.name = name
        self._reactor = reactor
        self._random = random.Random(seed) if shuffle else None
        self._db: Db | None = None
        self._stopping = False
        self._waiter = DeferWaiter()
        self._pending: list[tuple[Callable, tuple, Deferred]] = []
        self._call: Any = None

    def __repr__(self) -> str:
        return f"<MemoryStore {self.name or 'private'}>"

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, fn: Callable, *args: Any) -> Deferred:
        if self._db is None or self._stopping:
            return fail(OperationError.of(SYS.NOT_READY_ERROR, "the memory store is not running"))
        d: Deferred = Deferred()
        self._pending.append((fn, args, d))
        if self._call is None:
            self._call = self._reactor.callLater(0, self._turn)
        return self._waiter.add(d)

    def _turn(self) -> None:
        self._call = None
        batch, self._pending = self._pending, []
        if self._random is not None:
            self._random.shuffle(batch)
        for fn, args, d in batch:
            db = self._db
            if db is None:  # pragma: no cover - stop waits for the queue
                d.errback(OperationError.of(SYS.NOT_READY_ERROR, "the memory store stopped"))
                continue
            try:
                result = fn(db, *args)
            except BaseException:
                d.errback(self._map(Failure()))
            else:
                d.callback(result)

    def flush(self) -> None:
        """
        Run every queued operation now (and those their callbacks queue), for tests
        driven by a Clock.
        """
        while self._pending:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._turn()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Deferred:
        """
        Create (or join, by name) the database and migrate it, at once.
        """
        if self._db is not None:
            return fail(OperationError.of(SYS.OPERATION_ERROR, "the store is already started"))
        shared = _SHARED.get(self.name) if self.name is not None else None
        raw = shared.raw if shared is not None else self.dialect.open_raw()
        db = Db(raw, self.dialect)
        try:
            version = migrate_thd(db, load_migrations("sqlite"), float(self._reactor.seconds()))
        except BaseException:
            if shared is None:
                raw.close()
            return fail(self._map(Failure()))
        if self.name is not None:
            shared = _SHARED.setdefault(self.name, _Shared(raw))
            shared.users += 1
        self._stopping = False
        self._db = db
        self.schema_version = version
        return succeed(version)

    @async_to_deferred
    async def stop(self) -> None:
        """
        Refuse new operations, run the queued ones, then drop the database (unless another
        store of the same name still uses it).
        """
        if self._db is None:
            return
        self._stopping = True
        await self._waiter.wait()
        db, self._db = self._db, None
        shared = _SHARED.get(self.name) if self.name is not None else None
        if shared is not None:
            shared.users -= 1
            if shared.users > 0:
                return
            del _SHARED[self.name]
        db.raw.close()
