# -*- test-case-name: tests.test_db_contract -*-
"""
The PostgreSQL backend: psycopg2 in the threads of an L{adbapi.ConnectionPool}, connections
in autocommit mode (single statements are one round trip; see L{zcontrol.db._store}).

A dead connection (C{pg_terminate_backend}, a server restart) is noticed before it is used
(PostgreSQL writes a FATAL notice on the socket before closing it) and replaced; an operation
in flight when it dies fails with C{SYS.1016}.

Note [collation]: text compares and sorts by code point on every backend, whatever the
database's locale. SQLite and the memory store compare UTF-8 bytes (C{BINARY}), which is code
point order; PostgreSQL compares with the column's collation, by default the database's,
and a database created with C{en_US.UTF-8} or an ICU locale sorts C{'a' < 'B' < 'b' < 'é'}
where code points give C{'B' < 'a' < 'b' < 'é'} (C{sort}, C{<}, C{<=}, C{>}, C{>=} and
C{ORDER BY uuid} would answer differently). So every text column of the schema has
C{COLLATE "C"} (byte order, i.e. code point order for UTF-8): L{PostgresDialect.after_migrations}
sets it, whenever migrations were applied (0003 and any later one), on each C{VARCHAR}/C{TEXT} column not
yet in C{"C"} (a column added by a later common migration is covered without writing
PostgreSQL-only SQL). The common migrations' C{VARCHAR(n)} and C{TEXT} are also given
C{COLLATE "C"} as they run (L{PostgresDialect.ddl}), so a fresh database is created so and
has nothing to convert (the conversion took ~1 s per fresh database on the loaded test
machine). Migrations run with their own statement timeout (L{MIGRATION_TIMEOUT_MS}).

Why on the columns, not C{COLLATE "C"} in the statements: an index is ordered by its
column's collation, so an expression with another collation cannot use it. Measured with
EXPLAIN on a 50,000-row table of an ICU C{en-US} database: C{ORDER BY uuid COLLATE "C"
LIMIT 10} becomes a sequential scan and a sort (cost 1852, against 0.83 for the primary key
walk), and even C{uuid COLLATE "C" = 'x'} a sequential scan; with the column in C{"C"} both
use the primary key, and C{LIKE 'prefix%'} becomes an index range scan as well (with a
non-C collation it needs a C{text_pattern_ops} index). Equality, C{IN} and C{LIKE} give the
same answers under any deterministic collation; only the order changes. The conversion
rewrites no table (the type is the same), it rebuilds the indexes on those columns (0.2 s
for 100,000 rows here) under the migration's lock.
"""

from __future__ import annotations

import re
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

# The bound of each migration statement (and of the wait for the migration lock): an
# upgrade may rebuild the indexes of large tables, longer than an operation may take.
MIGRATION_TIMEOUT_MS = 600_000

# The text types of the migrations (zcontrol.db.query.schema_columns reads the same ones).
_TEXT_TYPE = re.compile(r"\b(VARCHAR\(\d+\)|TEXT\b)(?!\s+COLLATE)")


class PostgresDialect(Dialect):
    """
    PostgreSQL specifics.

    @ivar dsn: a libpq connection string or URI (C{postgresql://user@host:port/dbname}).
    """

    name = "postgresql"
    dbapi_name = "psycopg2"
    writable_ctes = True

    def __init__(self, dsn: str, connect_timeout: int = 5, statement_timeout_ms: int = 60_000,
                 synchronous_commit: bool = True):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.synchronous_commit = synchronous_commit

    def connect_args(self) -> tuple[tuple, dict]:
        # Every wait has a bound: connecting, each statement (lock waits included), and a
        # peer that vanished without closing (TCP keepalives). JIT off: our statements are
        # short OLTP ones, and a plan whose estimated cost passes jit_above_cost (the
        # allocator's counting query over 10,000 hosts) spent ~0.7 s compiling against
        # ~0.1 s running (bench/bench_alloc.py).
        return (self.dsn,), {
            "connect_timeout": self.connect_timeout,
            "application_name": "zcontrol",
            "options": f"-c statement_timeout={int(self.statement_timeout_ms)} -c jit=off"
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
        timeout = max(int(self.statement_timeout_ms), MIGRATION_TIMEOUT_MS)
        db.run(f"SET LOCAL statement_timeout = {timeout}")
        db.all("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def ddl(self, statement: str) -> str:
        # Note [collation]: text columns are created in "C" (a fresh database then has
        # nothing for after_migrations to convert).
        return _TEXT_TYPE.sub(r'\1 COLLATE "C"', statement)

    def after_migrations(self, db: Db) -> None:
        # Note [collation]: every text column of the store's schema in "C".
        rows = db.all(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)"
            " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
            " AND c.relkind IN ('r', 'p')"
            " AND a.attnum > 0 AND NOT a.attisdropped"
            " AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)"
            " AND a.attcollation <> (SELECT oid FROM pg_collation WHERE collname = 'C'"
            " AND collnamespace = 'pg_catalog'::regnamespace)"
            " ORDER BY c.relname, a.attnum")
        tables: dict[str, list[str]] = {}
        for table, column, sql_type in rows:
            tables.setdefault(table, []).append(
                f'ALTER COLUMN "{column}" TYPE {sql_type} COLLATE "C"')
        for table, changes in tables.items():
            db.run(f'ALTER TABLE "{table}" {", ".join(changes)}')

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
