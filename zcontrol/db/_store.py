# -*- test-case-name: tests.test_db_contract -*-
"""
The store shared by both backends: an L{adbapi.ConnectionPool} with a few threads, and the
C{*_thd} functions that run in those threads.

Note [components]: as buildbot's C{db} connector, each resource group's store operations live
in a component of their own, L{zcontrol.db.components} (C{base}: L{Db}, migrations, the generic
get/insert/update/delete/query and edge checks, holders; C{hosts}: host capacity, the
audit; C{storage}: primary storage capacity, LocalStorage refs, image caches; C{ips}; C{vms}; C{jobs}; C{nodes}: management node heartbeats), each a mixin
of L{AdbapiStore}, which holds only the pool, the C{_run} plumbing and the lifecycle; every
component runs on that one pool. The C{*_thd} functions and L{Db}, L{Dialect}, L{Holder},
L{QueryResult}, L{load_migrations} and L{migrate_thd} are re-exported here.

Note [threads]: every psycopg2/sqlite3 call happens in a C{*_thd} function, on a pool thread,
through a L{Db} wrapper; cursors are opened and closed inside one L{Db.execute} and never
leave the thread. The reactor side only builds arguments and maps failures. The C{*_thd}
functions are plain synchronous functions of a L{Db}: the property tests call them directly
from several threads, each with its own connection, to race them for real.

Note [autocommit]: connections run in autocommit mode, so that a single-statement operation
(a reservation, a compare-and-swap, an insert) is one round trip rather than three
(BEGIN, statement, COMMIT). The few multi-statement operations open an explicit transaction
with L{Db.transaction} (C{BEGIN IMMEDIATE} on SQLite, so that writers queue on the busy
timeout instead of failing to upgrade a read lock).

Note [reconnect]: adbapi's own C{cp_reconnect} only notices a dead connection when an
operation fails on it, and logs the failed rollback as an error. Here a pooled connection
is checked before each operation (a closed socket, or data waiting on an idle connection,
which is how PostgreSQL announces C{pg_terminate_backend} and shutdowns); a dead one is
replaced at once, so a later operation succeeds. An operation that was in flight when the
connection died fails with C{SYS.1016} and its connection is dropped.

Note [holders]: a C{SYS.1016} does not say whether the operation happened: the connection
may have been cut after the server committed, before the answer came back (a lost
acknowledgement). So every allocation is made idempotent rather than "exactly once": capacity
and IP addresses are held by named L{Holder}s (C{host_capacity_holders},
C{primary_storage_capacity_holders}, C{used_ips.holder_*}), at most one reservation per
holder and resource, recorded in the same transaction as the change of the available
figure. Retrying a reservation whose outcome is unknown finds the holder's row and changes
nothing (the same address for an IP); releasing twice is a no-op; and
L{AdbapiStore.audit_capacity} recomputes the available figures from the holders (total minus
the sum held) and reports (optionally repairs) drift.

Note [edge]: every value is checked before it reaches a driver (L{zcontrol.db.query.Field}:
type, C{VARCHAR} size read from the migrations, integer width, NUL/control characters/lone
surrogates, finite floats, JSON size; arguments such as uuids and holders likewise), so
that both backends (and the in-memory store) accept or refuse the same inputs, refusing
with C{SYS.1007} naming the field instead of one storing what the other refuses, or
failing with C{SYS.1000}.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zcontrol._defer import DeferWaiter, async_to_deferred
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.db.components.base import (  # noqa: F401 (re-exported: tests, backends)
    CrudComponent,
    Db,
    Dialect,
    Holder,
    Migration,
    QueryResult,
    delete_thd,
    get_thd,
    insert_thd,
    load_migrations,
    migrate_thd,
    query_thd,
    split_sql,
    update_thd,
)
from zcontrol.db.components.hosts import (  # noqa: F401 (re-exported)
    HostsComponent,
    audit_capacity_thd,
    release_host_capacity_thd,
    reserve_host_capacity_thd,
    set_host_capacity_thd,
)
from zcontrol.db.components.images import ImagesComponent
from zcontrol.db.components.ips import (  # noqa: F401 (re-exported)
    IP_STRATEGIES,
    IpsComponent,
    allocate_ip_thd,
    free_ip_thd,
    release_ip_thd,
)
from zcontrol.db.components.jobs import JobsComponent, claim_jobs_thd, running_jobs_thd  # noqa: F401
from zcontrol.db.components.networks import NetworksComponent
from zcontrol.db.components.nodes import NodesComponent, heartbeat_thd, live_nodes_thd  # noqa: F401
from zcontrol.db.components.offerings import OfferingsComponent
from zcontrol.db.components.scheduler import SchedulerComponent
from zcontrol.db.components.storage import (  # noqa: F401 (re-exported)
    StorageComponent,
    release_primary_storage_thd,
    reserve_primary_storage_thd,
)
from zcontrol.db.components.vms import VmsComponent, change_vm_state_thd  # noqa: F401
from zcontrol.db.components.zones import ZonesComponent
from zcontrol.db.interfaces import IStore

__all__ = ["AdbapiStore", "Db", "Dialect", "Holder", "QueryResult", "load_migrations"]

log = Logger()

def _call_thd(conn: _PooledConnection, dialect: Dialect, fn: Callable, args: tuple) -> Any:
    raw = conn._connection
    try:
        return fn(Db(raw, dialect), *args)
    except BaseException as e:
        if dialect.broken(raw, e):
            conn.drop()
        raise


class _PooledConnection(adbapi.Connection):
    """
    adbapi's per-operation connection wrapper, checking the pooled connection before use
    and leaving transactions to L{Db.transaction} (see Note [reconnect]).
    """

    def reconnect(self) -> None:
        pool = self._pool
        if self._connection is not None:
            pool.disconnect(self._connection)
        raw = pool.connect()
        if not pool.dialect.alive(raw):
            log.info("replacing a dead {backend} connection", backend=pool.dialect.name)
            pool.disconnect(raw)
            raw = pool.connect()
        self._connection = raw

    def drop(self) -> None:
        if self._connection is not None:
            raw, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                self._pool.disconnect(raw)

    def commit(self) -> None:
        # Autocommit: explicit transactions are committed by Db.transaction.
        pass

    def rollback(self) -> None:
        # Nothing is ever left open (Db.transaction rolls back); a broken connection was
        # already dropped by _call_thd.
        pass


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _PooledConnection

    def __init__(self, dialect: Dialect, reactor: Any, size: int):
        self.dialect = dialect
        args, kw = dialect.connect_args()
        super().__init__(
            dialect.dbapi_name,
            *args,
            cp_min=1,
            cp_max=size,
            cp_noisy=False,
            cp_openfun=dialect.openfun,
            cp_reactor=reactor,
            **kw,
        )

    def _close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()


@implementer(IStore)
class AdbapiStore(CrudComponent, HostsComponent, IpsComponent, VmsComponent, JobsComponent,
                  NodesComponent, ZonesComponent, OfferingsComponent, StorageComponent,
                  ImagesComponent, NetworksComponent, SchedulerComponent):
    """
    The store over an L{adbapi.ConnectionPool} of C{pool_size} threads (see L{IStore}).
    """

    pool_class: type = _Pool

    def __init__(self, dialect: Dialect, reactor: Any, pool_size: int):
        if not 1 <= pool_size <= 16:
            raise ValueError(f"pool_size must be between 1 and 16, not {pool_size}")
        self.dialect = dialect
        self.backend = dialect.name
        self.pool_size = pool_size
        self.schema_version: int | None = None
        self._reactor = reactor
        self._pool: _Pool | None = None
        self._stopping = False
        self._waiter = DeferWaiter()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend} pool={self.pool_size}>"

    # -- plumbing --------------------------------------------------------------------------

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def _map(self, f: Failure) -> Failure:
        if isinstance(f.value, OperationError):
            return f
        err = self.dialect.map_error(f.value)
        if err is None:
            log.failure("unexpected store failure", f)
            err = error_code(SYS.INTERNAL, f"{type(f.value).__name__}: {f.value}")
        return Failure(OperationError(err))

    def _raw_run(self, fn: Callable, *args: Any) -> Deferred:
        assert self._pool is not None
        d = self._pool.runWithConnection(_call_thd, self.dialect, fn, args)
        d.addErrback(self._map)
        return self._waiter.add(d)

    def _run(self, fn: Callable, *args: Any) -> Deferred:
        if self._pool is None or self._stopping:
            return fail(OperationError.of(SYS.NOT_READY_ERROR, f"the {self.backend} store is not running"))
        return self._raw_run(fn, *args)

    # -- lifecycle -------------------------------------------------------------------------

    @async_to_deferred
    async def start(self) -> int:
        if self._pool is not None:
            raise OperationError.of(SYS.OPERATION_ERROR, "the store is already started")
        self._stopping = False
        self._pool = self.pool_class(self.dialect, self._reactor, self.pool_size)
        if not self._pool.running:
            self._pool.start()
        try:
            version = await self._raw_run(
                migrate_thd, load_migrations(self.dialect.name), self._now()
            )
        except BaseException:
            pool, self._pool = self._pool, None
            pool.close()
            raise
        self.schema_version = version
        log.info("{backend} store ready at schema version {version}", backend=self.backend,
                 version=version)
        return version

    @async_to_deferred
    async def stop(self) -> None:
        if self._pool is None:
            return
        self._stopping = True
        await self._waiter.wait()
        pool, self._pool = self._pool, None
        pool.close()
