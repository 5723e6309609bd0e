# -*- test-case-name: tests.test_db_contract -*-
"""
The PostgreSQL backend: psycopg2 in the threads of an L{adbapi.ConnectionPool}, connections
in autocommit mode (single statements are one round trip; see L{zcontrol.db._store}).

A dead connection (C{pg_terminate_backend}, a server restart) is noticed before it is used
(PostgreSQL writes a FATAL notice on the socket before closing it) and replaced; an operation
in flight when it dies fails with C{SYS.1016}.

Text order (C{sort} and C{<}/C{>} on text fields) follows the database's collation: create
the database with C{LC_COLLATE} C or C.UTF-8 for the code point order SQLite and the memory
store use (the test server's databases are C.UTF-8).
"""

from __future__ import annotations

import select
from typing import Any

import psycopg2
import psycopg2.extensions

from zcontrol.core.errors import SYS, ErrorCode, error_code
from zcontrol.db._store import AdbapiStore, Db, Dialect
from zcontrol.db.interfaces import DB

__all__ = ["PostgresDialect", "PostgresStore"]

# Single-row commits are bound by the WAL flush; more connections in flight let PostgreSQL
# flush several commits at once (bench/bench_db.py: pool 8 ~1-2x pool 4 on this machine),
# within the node's 16-thread budget (the pool grows its threads only under load).
DEFAULT_POOL_SIZE = 8

# An arbitrary constant: the advisory lock that serialises schema migrations.
_MIGRATION_LOCK = 0x7A636F6E


class PostgresDialect(Dialect):
    """
    PostgreSQL specifics.

    @ivar dsn: a libpq connection string or URI (C{postgresql://user@host:port/dbname}).
    """

    name = "postgresql"
    dbapi_name = "psycopg2"

    def __init__(self, dsn: str, connect_timeout: int = 5, statement_timeout_ms: int = 60_000,
                 synchronous_commit: bool = True):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.synchronous_commit = synchronous_commit

    def connect_args(self) -> tuple[tuple, dict]:
        # Every wait has a bound: connecting, each statement (lock waits included), and a
        # peer that vanished without closing (TCP keepalives).
        return (self.dsn,), {
            "connect_timeout": self.connect_timeout,
            "application_name": "zcontrol",
            "options": f"-c statement_timeout={int(self.statement_timeout_ms)}"
            + ("" if self.synchronous_commit else " -c synchronous_commit=off"),
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }

    def openfun(self, raw: Any) -> None:
        raw.autocommit = True

    def prepare(self, sql: str) -> str:
        # Note [placeholders] in zcontrol.db.query: our SQL never holds a literal ? or %.
        return sql.replace("?", "%s")

    def begin_sql(self, write: bool) -> str:
        return "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def lock_row(self, db: Db, table: str, uuid: str) -> None:
        # An advisory lock, not SELECT ... FOR UPDATE: a row lock on the network would also
        # block the foreign-key checks of every other insert referencing it (and deadlock
        # with their speculative inserts).
        db.all("SELECT pg_advisory_xact_lock(hashtext(?))", (f"{table}:{uuid}",))

    def lock_migrations(self, db: Db) -> None:
        db.all("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def alive(self, raw: Any) -> bool:
        if raw.closed:
            return False
        status = raw.get_transaction_status()
        if status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            return False
        # An idle connection has nothing to read unless the server said goodbye
        # (FATAL: terminating connection) or closed the socket. We never LISTEN.
        try:
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            return not poller.poll(0)
        except (OSError, ValueError, psycopg2.Error):
            return False

    def broken(self, raw: Any, exc: BaseException) -> bool:
        if raw is None or raw.closed:
            return True
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            return True
        return raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def map_error(self, exc: BaseException) -> ErrorCode | None:
        if not isinstance(exc, psycopg2.Error):
            return None
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        code = getattr(exc, "pgcode", None)
        if isinstance(exc, psycopg2.IntegrityError):
            if code == "23505":
                return error_code(DB.DUPLICATE, text)
            if code == "23503":
                return error_code(DB.REFERENCE, text)
            return error_code(DB.CONSTRAINT, text)
        if code == "57014":
            return error_code(SYS.TIMEOUT, f"postgresql: {text}", pgcode=code)
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            return error_code(SYS.IO_ERROR, f"postgresql: {text}", pgcode=code)
        if isinstance(exc, psycopg2.DataError):
            return error_code(SYS.INVALID_ARGUMENT_ERROR, text, pgcode=code)
        return error_code(SYS.INTERNAL, f"postgresql: {type(exc).__name__}: {text}", pgcode=code)


class PostgresStore(AdbapiStore):
    """
    The store on PostgreSQL (see L{zcontrol.db.interfaces.IStore}).
    """

    def __init__(self, dsn: str, reactor: Any, pool_size: int = DEFAULT_POOL_SIZE,
                 connect_timeout: int = 5, statement_timeout_ms: int = 60_000,
                 synchronous_commit: bool = True):
        """
        @param synchronous_commit: False trades durability of the last few hundred
            milliseconds of commits, if the PostgreSQL server itself crashes, for ~3x the
            single-row write rate (no corruption: the database stays consistent).
        """
        super().__init__(
            PostgresDialect(dsn, connect_timeout, statement_timeout_ms, synchronous_commit),
            reactor, pool_size)
