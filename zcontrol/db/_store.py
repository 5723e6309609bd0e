# -*- test-case-name: tests.test_db_contract -*-
"""
The store shared by both backends: an L{adbapi.ConnectionPool} with a few threads, and the
C{*_thd} functions that run in those threads.

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
import importlib.resources
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zcontrol._defer import DeferWaiter, async_to_deferred
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code
from zcontrol.db.interfaces import DB, IStore
from zcontrol.db.query import (
    CompiledQuery,
    Field,
    Query,
    Resource,
    _short,
    check_int,
    check_text,
    compile_query,
    ip_to_long,
    resource,
)

__all__ = ["AdbapiStore", "Db", "Dialect", "Holder", "QueryResult", "load_migrations"]

log = Logger()


@attrs.frozen
class QueryResult:
    """
    The answer to a query.

    @ivar inventories: the rows (API dicts), empty for a count-only query.
    @ivar total: the number of matching rows when a count was asked, else None.
    """

    inventories: list[dict[str, Any]]
    total: int | None = None


@attrs.frozen
class Holder:
    """
    What holds capacity or an IP address: e.g. C{Holder("VmInstanceVO", vm_uuid)}. A holder
    holds at most one reservation per host, primary storage or L3 network, which makes a
    retried reservation a no-op (Note [holders]). A 2-tuple C{(type, uuid)} is accepted
    wherever a Holder is.

    @ivar type: the kind of holder (at most 64 characters).
    @ivar uuid: its uuid (at most 64 characters).
    """

    type: str
    uuid: str

    @classmethod
    def of(cls, value: Any) -> Holder:
        """
        A Holder from a Holder or a C{(type, uuid)} pair; C{SYS.1007} naming C{holder}
        otherwise.
        """
        if isinstance(value, Holder):
            pair: Any = (value.type, value.uuid)
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            pair = value
        else:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"a holder is a Holder or a (type, uuid) pair, not {type(value).__name__}",
                field="holder")
        htype = check_text("holder.type", pair[0], 64)
        huuid = check_text("holder.uuid", pair[1], 64)
        if not htype or not huuid:
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                    "a holder needs a non-empty type and uuid", field="holder")
        return cls(htype, huuid)


class Dialect:
    """
    What differs between the backends. Subclassed in L{zcontrol.db.sqlite} and
    L{zcontrol.db.postgres}.
    """

    name: str = "?"
    dbapi_name: str = "?"
    # Whether INSERT/UPDATE/DELETE may appear in a WITH clause (PostgreSQL): the holder
    # reservations are then one statement instead of a four-statement transaction.
    writable_ctes: bool = False

    def connect_args(self) -> tuple[tuple, dict]:
        """
        Positional and keyword arguments of the DB-API C{connect}.
        """
        raise NotImplementedError

    def openfun(self, raw: Any) -> None:
        """
        Prepare a fresh connection (autocommit, PRAGMAs). Runs in the pool thread.
        """

    def open_raw(self) -> Any:
        """
        A new prepared connection, outside any pool (for migrations tools and tests).
        """
        import importlib

        args, kw = self.connect_args()
        raw = importlib.import_module(self.dbapi_name).connect(*args, **kw)
        self.openfun(raw)
        return raw

    def prepare(self, sql: str) -> str:
        return sql

    def begin_sql(self, write: bool) -> str:
        return "BEGIN"

    def lock_row(self, db: Db, table: str, uuid: str) -> None:
        """
        Inside a write transaction: hold C{table}'s row C{uuid} until the transaction ends,
        serialising the writers that take the same lock (nothing here: a backend whose
        write transactions already exclude each other needs no more).
        """

    def lock_migrations(self, db: Db) -> None:
        """
        Serialise concurrent migrations (inside the migration transaction).
        """

    def ddl(self, statement: str) -> str:
        """
        A statement of a common migration as this backend runs it (unchanged here).
        """
        return statement

    def after_migrations(self, db: Db) -> None:
        """
        Inside the migration transaction, when migrations were applied: bring what a
        common migration cannot say in SQL both backends accept to this backend's rules
        (nothing here; PostgreSQL sets the text columns' collation).
        """

    def alive(self, raw: Any) -> bool:
        """
        Whether an idle pooled connection is still usable (cheap, never blocks).
        """
        return True

    def broken(self, raw: Any, exc: BaseException) -> bool:
        """
        Whether C{exc}, raised while using C{raw}, left the connection unusable.
        """
        return False

    def map_error(self, exc: BaseException) -> ErrorCode | None:
        """
        The ErrorCode for a driver exception, or None when it is not one.
        """
        return None


class Db:
    """
    A connection seen from a C{*_thd} function: runs statements with C{?} placeholders and
    returns plain tuples. Lives in one thread.
    """

    def __init__(self, raw: Any, dialect: Dialect):
        self.raw = raw
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> tuple[int, list[tuple] | None]:
        """
        Run one statement: (rowcount, rows or None when it returns no rows).
        """
        cur = self.raw.cursor()
        try:
            cur.execute(self.dialect.prepare(sql), tuple(params))
            rows = cur.fetchall() if cur.description is not None else None
            return cur.rowcount, rows
        finally:
            cur.close()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.execute(sql, params)[1] or []

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.execute(sql, params)[0]

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Db]:
        """
        An explicit transaction: committed when the block ends, rolled back when it raises.
        """
        self.run(self.dialect.begin_sql(write))
        try:
            yield self
        except BaseException:
            with contextlib.suppress(Exception):
                self.run("ROLLBACK")
            raise
        self.run("COMMIT")


# Migrations ------------------------------------------------------------------------------------

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(sqlite|postgresql))?\.sql$")


@attrs.frozen
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def split_sql(text: str) -> tuple[str, ...]:
    """
    Split a migration file into statements: comment lines dropped, split on C{;} at the end
    of a line.
    """
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
    body = "\n".join(lines)
    return tuple(s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip())


def load_migrations(backend: str, directory: Any = None) -> list[Migration]:
    """
    The migrations for C{backend}, in version order. C{NNNN_name.sql} applies to both;
    C{NNNN_name.sqlite.sql} / C{NNNN_name.postgresql.sql} to one backend only (and replace
    the common file of that version).
    """
    if directory is None:
        directory = importlib.resources.files("zcontrol.db") / "migrations"
    found: dict[int, tuple[bool, Migration]] = {}
    for entry in directory.iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m is None:
            continue
        version, name, only = int(m.group(1)), m.group(2), m.group(3)
        if only is not None and only != backend:
            continue
        mig = Migration(version, name, split_sql(entry.read_text(encoding="utf-8")))
        specific = only is not None
        if version in found and found[version][0] and not specific:
            continue
        if version in found and found[version][0] == specific:
            raise ValueError(f"two migrations with version {version}")
        found[version] = (specific, mig)
    return [found[v][1] for v in sorted(found)]


_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_versions ("
    " version INTEGER PRIMARY KEY,"
    " name VARCHAR(255) NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)"
)


def migrate_thd(db: Db, migrations: Sequence[Migration], now: float) -> int:
    """
    Apply the pending migrations in one transaction and record them in C{schema_versions}.

    @return: the schema version.
    @raise OperationError: C{DB.1006} when the database is at a newer version than known.
    """
    known = max((m.version for m in migrations), default=0)
    with db.transaction(write=True):
        db.dialect.lock_migrations(db)
        db.run(db.dialect.ddl(_VERSION_TABLE))
        current = db.one("SELECT MAX(version) FROM schema_versions")[0] or 0
        applied = False
        if current > known:
            raise OperationError.of(
                DB.SCHEMA_TOO_NEW,
                f"the database schema is at version {current} but this zcontrol only knows "
                f"versions up to {known}: upgrade zcontrol (or point it at another database); "
                "refusing to start",
                database_version=current,
                known_version=known,
            )
        for m in migrations:
            if m.version <= current:
                continue
            log.info("applying schema migration {version} {name}", version=m.version, name=m.name)
            for stmt in m.statements:
                db.run(db.dialect.ddl(stmt))
            db.run(
                "INSERT INTO schema_versions (version, name, applied_at) VALUES (?, ?, ?)",
                (m.version, m.name, now),
            )
            applied, current = True, m.version
        if applied:
            db.dialect.after_migrations(db)
    return current


# Thread-side operations ------------------------------------------------------------------------


def _cols(res: Resource) -> str:
    return ", ".join(f.column for f in res.fields.values())


def _row(res: Resource, row: Sequence[Any]) -> dict[str, Any]:
    return res.from_row(tuple(res.fields), row)


def _not_found(res: Resource, uuid: Any) -> OperationError:
    return OperationError.of(
        SYS.RESOURCE_NOT_FOUND, f"no {res.name} with uuid {uuid!r}", resource=res.name, uuid=uuid
    )


def _mapping(name: str, value: Any) -> dict:
    """
    A copy of C{value} if it is a mapping, else C{SYS.1007} naming C{name}.
    """
    if not isinstance(value, Mapping):
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR,
            f"{name} must be a mapping of field names to values, not {type(value).__name__}",
            field=name)
    return dict(value)


def _copy(value: Any) -> Any:
    # The reactor side copies the caller's mappings before a pool thread reads them; any
    # other value goes as it is, to be refused by the thread-side check.
    return dict(value) if isinstance(value, Mapping) else value


def _amount(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR,
            f"{name} must be a non-negative integer, not {_short(value)}",
            field=name,
        )
    return check_int(name, value, 0, 2**63 - 1)


def insert_thd(db: Db, resource_name: str, values: dict, now: float) -> dict:
    """
    Insert a row; see L{IStore.insert}.
    """
    res = resource(resource_name)
    values = _mapping("values", values)
    if not values.get("uuid"):
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"a new {res.name} needs a uuid",
                                field="uuid")
    if res.has_dates:
        values.setdefault("createDate", now)
        values.setdefault("lastOpDate", now)
    if res.name == "ipRange":
        # The integer forms the allocator works on, derived from the dotted addresses.
        for text, number in (("startIp", "startIpInLong"), ("endIp", "endIpInLong")):
            if values.get(text) is not None and number not in values:
                res.field(text).to_db(values[text])
                values[number] = ip_to_long(values[text], field=text)
    row = res.to_row(values)
    sql = (
        f"INSERT INTO {res.table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})"
        f" RETURNING {_cols(res)}"
    )
    return _row(res, db.all(sql, tuple(row.values()))[0])


def get_thd(db: Db, resource_name: str, uuid: str) -> dict | None:
    """
    One row by uuid, or None.
    """
    res = resource(resource_name)
    uuid = _uuid("uuid", uuid)
    r = db.one(f"SELECT {_cols(res)} FROM {res.table} WHERE uuid = ?", (uuid,))
    return None if r is None else _row(res, r)


def update_thd(
    db: Db, resource_name: str, uuid: str, changes: dict, expected: dict | None, now: float
) -> dict:
    """
    A (conditional) single-statement update; see L{IStore.update}.
    """
    res = resource(resource_name)
    uuid = _uuid("uuid", uuid)
    changes = _mapping("changes", changes)
    if expected is not None:
        expected = _mapping("expected", expected)
    if "uuid" in changes:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "the uuid of a row cannot change",
                                field="uuid")
    if res.has_dates:
        changes.setdefault("lastOpDate", now)
    if not changes:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "nothing to update", field="changes")
    sets = res.to_row(changes)
    where = ["uuid = ?"]
    params: list[Any] = list(sets.values()) + [uuid]
    for name, want in (expected or {}).items():
        f = res.field(name)
        if isinstance(want, (list, tuple, set, frozenset)):
            want = list(want)
            if not want:
                raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"no expected {name}",
                                        field=name)
            where.append(f"{f.column} IN ({', '.join('?' for _ in want)})")
            params.extend(f.to_db(w) for w in want)
        elif want is None:
            where.append(f"{f.column} IS NULL")
        else:
            where.append(f"{f.column} = ?")
            params.append(f.to_db(want))
    sql = (
        f"UPDATE {res.table} SET {', '.join(f'{c} = ?' for c in sets)}"
        f" WHERE {' AND '.join(where)} RETURNING {_cols(res)}"
    )
    rows = db.all(sql, params)
    if rows:
        return _row(res, rows[0])
    current = get_thd(db, resource_name, uuid)
    if current is None:
        raise _not_found(res, uuid)
    actual = {name: current[name] for name in (expected or {})}
    expected_desc = ", ".join(
        f"{k} {'/'.join(map(str, v)) if isinstance(v, (list, tuple, set, frozenset)) else v}"
        for k, v in (expected or {}).items()
    )
    actual_desc = ", ".join(f"{k} {v}" for k, v in actual.items())
    raise OperationError.of(
        SYS.CHANGE_RESOURCE_STATE_ERROR,
        f"{res.name} {uuid}: expected {expected_desc} but it is {actual_desc}",
        resource=res.name,
        uuid=uuid,
        expected={
            k: (sorted(v) if isinstance(v, (set, frozenset)) else list(v))
            if isinstance(v, (list, tuple, set, frozenset))
            else v
            for k, v in (expected or {}).items()
        },
        actual=actual,
    )


def delete_thd(db: Db, resource_name: str, uuid: str) -> bool:
    """
    Delete one row by uuid: whether there was one.
    """
    res = resource(resource_name)
    uuid = _uuid("uuid", uuid)
    if res.name == "usedIp":
        # An address with a holder is given back by its holder only (free_ip_thd).
        if db.run("DELETE FROM used_ips WHERE uuid = ? AND holder_uuid IS NULL", (uuid,)) > 0:
            return True
        refusal = _held_ip_refusal(db, uuid, "delete")
        if refusal is not None:
            raise refusal
        return False
    return db.run(f"DELETE FROM {res.table} WHERE uuid = ?", (uuid,)) > 0


def query_thd(db: Db, resource_name: str, query: Query) -> QueryResult:
    """
    Run an API query; see L{zcontrol.db.query}.
    """
    cq: CompiledQuery = compile_query(resource_name, query)
    if cq.select is not None and cq.count is not None:
        with db.transaction(write=False):
            rows = db.all(cq.select, cq.select_params)
            total = db.one(cq.count, cq.count_params)[0]
    elif cq.select is not None:
        rows, total = db.all(cq.select, cq.select_params), None
    else:
        rows, total = [], db.one(cq.count, cq.count_params)[0]
    return QueryResult(
        inventories=[cq.resource.from_row(cq.names, r) for r in rows],
        total=None if total is None else int(total),
    )


_HOST = resource("host")
_PS = resource("primaryStorage")
_USED_IP = resource("usedIp")


def _uuid(name: str, value: Any) -> str:
    return check_text(name, value, 64)


class _Rollback(Exception):
    """
    Raised inside L{Db.transaction} to undo it (caught by the caller).
    """


def _held_thd(db: Db, table: str, key: str, resource_uuid: str, holder: Holder,
              columns: str) -> tuple | None:
    return db.one(
        f"SELECT {columns} FROM {table} WHERE {key} = ? AND holder_type = ? AND holder_uuid = ?",
        (resource_uuid, holder.type, holder.uuid))


def _reserve_thd(db: Db, *, table: str, key: str, res: Resource, resource_uuid: str,
                 holder: Holder, amounts: dict[str, int], update_sql: str,
                 update_params: tuple, short: Callable[[], OperationError], now: float) -> dict:
    """
    The idempotent reservation (Note [holders]): atomically, record the holder and take
    the amounts (a conditional C{UPDATE}). When the holder already holds this resource's
    capacity, nothing changes and the resource row is returned, so a retry after a lost
    acknowledgement is safe.

    On PostgreSQL it is one statement (L{_reserve_cte}): one round trip instead of four
    (C{BEGIN}, C{INSERT}, C{UPDATE}, C{COMMIT}; bench/bench_db.py). SQLite has no
    writable CTEs, and its statements cost no round trip: a transaction of the holder's
    C{INSERT ... ON CONFLICT DO NOTHING} and the C{UPDATE}.
    """
    names = ", ".join(amounts)
    if db.dialect.writable_ctes:
        try:
            rows = db.all(*_reserve_cte(table, key, resource_uuid, holder, amounts,
                                        update_sql, update_params, now))
        except Exception as e:
            err = db.dialect.map_error(e)
            # DB.1000: the same holder won a concurrent race (its row is there now).
            if err is None or err.code != DB.DUPLICATE:
                raise
        else:
            if rows:
                return _row(res, rows[0])
        return _reserved_already(db, table, key, res, resource_uuid, holder, amounts, short)
    try:
        with db.transaction():
            inserted = db.all(
                f"INSERT INTO {table} ({key}, holder_type, holder_uuid, {names}, create_date)"
                f" VALUES (?, ?, ?, {', '.join('?' for _ in amounts)}, ?)"
                " ON CONFLICT DO NOTHING RETURNING holder_uuid",
                (resource_uuid, holder.type, holder.uuid, *amounts.values(), now))
            if not inserted:
                raise _Rollback()
            rows = db.all(update_sql, update_params)
            if not rows:
                raise _Rollback()
            return _row(res, rows[0])
    except _Rollback:
        pass
    except Exception as e:
        err = db.dialect.map_error(e)
        if err is None or err.code != DB.REFERENCE:
            raise
        raise _not_found(res, resource_uuid) from None
    return _reserved_already(db, table, key, res, resource_uuid, holder, amounts, short)


def _reserve_cte(table: str, key: str, resource_uuid: str, holder: Holder,
                 amounts: dict[str, int], update_sql: str, update_params: tuple, now: float
                 ) -> tuple[str, tuple]:
    """
    The reservation as one statement (one round trip, atomic in autocommit mode): take
    the amounts unless the holder already holds some (C{NOT EXISTS}, in the statement's
    snapshot), and record the holder for the taken row. The two succeed or fail together:
    a concurrent reservation by the same holder makes the C{INSERT} violate the holders'
    primary key (C{DB.1000}), which undoes the statement's C{UPDATE} as well.
    """
    head, returning = update_sql.split(" RETURNING ")
    names = ", ".join(amounts)
    sql = (
        f"WITH u AS ({head} AND NOT EXISTS (SELECT 1 FROM {table} WHERE {key} = ?"
        f" AND holder_type = ? AND holder_uuid = ?) RETURNING {returning}),"
        f" h AS (INSERT INTO {table} ({key}, holder_type, holder_uuid, {names}, create_date)"
        f" SELECT u.uuid, ?, ?, {', '.join('?' for _ in amounts)}, ? FROM u)"
        f" SELECT {returning} FROM u"
    )
    return sql, (*update_params, resource_uuid, holder.type, holder.uuid,
                 holder.type, holder.uuid, *amounts.values(), now)


def _reserved_already(db: Db, table: str, key: str, res: Resource, resource_uuid: str,
                      holder: Holder, amounts: dict[str, int],
                      short: Callable[[], OperationError]) -> dict:
    """
    After a reservation that changed nothing: the resource row when C{holder} already
    holds these amounts (a retry), C{DB.1000} when it holds others, else C{short()} (no
    such row, or not enough capacity).
    """
    names = ", ".join(amounts)
    held = _held_thd(db, table, key, resource_uuid, holder, names)
    if held is None:
        # The update found no row, or not enough capacity.
        raise short()
    held_amounts = dict(zip(amounts, (int(v) for v in held), strict=True))
    if held_amounts != amounts:
        raise OperationError.of(
            DB.DUPLICATE,
            f"{holder.type} {holder.uuid} already holds {held_amounts} of {res.name}"
            f" {resource_uuid}, not {amounts}: release it first",
            resource=res.name, uuid=resource_uuid, holder_type=holder.type,
            holder_uuid=holder.uuid, held=held_amounts)
    row = get_thd(db, res.name, resource_uuid)
    if row is None:  # pragma: no cover - the holder row references it
        raise _not_found(res, resource_uuid)
    return row


def _release_thd(db: Db, *, table: str, key: str, res: Resource, resource_uuid: str,
                 holder: Holder, figures: tuple[tuple[str, str], ...], now: float) -> dict:
    """
    The idempotent release: delete the holder's row and give back what it held (each
    C{(available column, held column)} of C{figures}) atomically; nothing held is a no-op.
    One statement where the backend has writable CTEs (the C{UPDATE} reads what the
    C{DELETE} returned), else a transaction of two.
    """
    delete = (f"DELETE FROM {table} WHERE {key} = ? AND holder_type = ? AND holder_uuid = ?"
              f" RETURNING {', '.join(held for _, held in figures)}")
    returning = ", ".join(f"{res.table}.{f.column}" for f in res.fields.values())
    if db.dialect.writable_ctes:
        sets = ", ".join(f"{avail} = {avail} + d.{held}" for avail, held in figures)
        rows = db.all(
            f"WITH d AS ({delete}) UPDATE {res.table} SET {sets}, last_op_date = ? FROM d"
            f" WHERE {res.table}.uuid = ? RETURNING {returning}",
            (resource_uuid, holder.type, holder.uuid, now, resource_uuid))
        if rows:
            return _row(res, rows[0])
    else:
        sets = ", ".join(f"{avail} = {avail} + ?" for avail, _ in figures)
        with db.transaction():
            held = db.all(delete, (resource_uuid, holder.type, holder.uuid))
            if held:
                rows = db.all(f"UPDATE {res.table} SET {sets}, last_op_date = ?"
                              f" WHERE uuid = ? RETURNING {returning}",
                              (*held[0], now, resource_uuid))
                if rows:
                    return _row(res, rows[0])
    row = get_thd(db, res.name, resource_uuid)
    if row is None:
        raise _not_found(res, resource_uuid)
    return row


def reserve_host_capacity_thd(db: Db, host_uuid: str, cpu: int, memory: int, holder: Any,
                              now: float) -> dict:
    """
    C{holder} takes cpu and memory from a host, once (Note [holders]).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    cpu, memory = _amount("cpu", cpu), _amount("memory", memory)
    holder = Holder.of(holder)

    def short() -> OperationError:
        r = db.one(
            "SELECT available_cpu_capacity, available_memory_capacity FROM hosts WHERE uuid = ?",
            (host_uuid,),
        )
        if r is None:
            return _not_found(_HOST, host_uuid)
        return OperationError.of(
            DB.HOST_CAPACITY,
            f"host {host_uuid} has {r[0]} CPU and {r[1]} memory available;"
            f" {cpu} CPU and {memory} memory were asked",
            host_uuid=host_uuid,
            availableCpu=int(r[0]),
            availableMemory=int(r[1]),
            cpu=cpu,
            memory=memory,
        )

    return _reserve_thd(
        db, table="host_capacity_holders", key="host_uuid", res=_HOST,
        resource_uuid=host_uuid, holder=holder, amounts={"cpu": cpu, "memory": memory},
        update_sql="UPDATE hosts SET available_cpu_capacity = available_cpu_capacity - ?,"
        " available_memory_capacity = available_memory_capacity - ?, last_op_date = ?"
        " WHERE uuid = ? AND available_cpu_capacity >= ? AND available_memory_capacity >= ?"
        f" RETURNING {_cols(_HOST)}",
        update_params=(cpu, memory, now, host_uuid, cpu, memory), short=short, now=now)


def release_host_capacity_thd(db: Db, host_uuid: str, holder: Any, now: float) -> dict:
    """
    Give back what C{holder} holds on a host (nothing held: no-op).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    return _release_thd(
        db, table="host_capacity_holders", key="host_uuid", res=_HOST,
        resource_uuid=host_uuid, holder=Holder.of(holder),
        figures=(("available_cpu_capacity", "cpu"), ("available_memory_capacity", "memory")),
        now=now)


def set_host_capacity_thd(
    db: Db, host_uuid: str, total_cpu: int, total_memory: int, cpu_num: int | None, now: float
) -> dict:
    """
    New totals keeping what is reserved, in one UPDATE (the CHECK constraints refuse totals
    below the reservations).
    """
    host_uuid = _uuid("host_uuid", host_uuid)
    total_cpu, total_memory = _amount("total_cpu", total_cpu), _amount("total_memory", total_memory)
    extra, params = "", [total_cpu, total_cpu, total_memory, total_memory, now]
    if cpu_num is not None:
        extra = ", cpu_num = ?"
        params.append(check_int("cpu_num", _amount("cpu_num", cpu_num), 0, 2**31 - 1))
    rows = db.all(
        "UPDATE hosts SET"
        " available_cpu_capacity = ? - (total_cpu_capacity - available_cpu_capacity),"
        " total_cpu_capacity = ?,"
        " available_memory_capacity = ? - (total_memory_capacity - available_memory_capacity),"
        f" total_memory_capacity = ?, last_op_date = ?{extra}"
        f" WHERE uuid = ? RETURNING {_cols(_HOST)}",
        params + [host_uuid],
    )
    if not rows:
        raise _not_found(_HOST, host_uuid)
    return _row(_HOST, rows[0])


def reserve_primary_storage_thd(db: Db, ps_uuid: str, size: int, holder: Any,
                                now: float) -> dict:
    """
    C{holder} takes bytes from a primary storage, once (Note [holders]).
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    size = _amount("size", size)

    def short() -> OperationError:
        r = db.one("SELECT available_capacity FROM primary_storages WHERE uuid = ?", (ps_uuid,))
        if r is None:
            return _not_found(_PS, ps_uuid)
        return OperationError.of(
            DB.STORAGE_CAPACITY,
            f"primary storage {ps_uuid} has {r[0]} bytes available; {size} were asked",
            primary_storage_uuid=ps_uuid,
            availableCapacity=int(r[0]),
            size=size,
        )

    return _reserve_thd(
        db, table="primary_storage_capacity_holders", key="primary_storage_uuid", res=_PS,
        resource_uuid=ps_uuid, holder=Holder.of(holder), amounts={"size": size},
        update_sql="UPDATE primary_storages SET available_capacity = available_capacity - ?,"
        " last_op_date = ? WHERE uuid = ? AND available_capacity >= ?"
        f" RETURNING {_cols(_PS)}",
        update_params=(size, now, ps_uuid, size), short=short, now=now)


def release_primary_storage_thd(db: Db, ps_uuid: str, holder: Any, now: float) -> dict:
    """
    Give back what C{holder} holds on a primary storage (nothing held: no-op).
    """
    ps_uuid = _uuid("primary_storage_uuid", ps_uuid)
    return _release_thd(
        db, table="primary_storage_capacity_holders", key="primary_storage_uuid", res=_PS,
        resource_uuid=ps_uuid, holder=Holder.of(holder),
        figures=(("available_capacity", "size"),), now=now)


_AUDITS = (
    # (resource, table, holders table, key, [(API field, total column, available column,
    #  held column)])
    ("host", "hosts", "host_capacity_holders", "host_uuid",
     (("availableCpuCapacity", "total_cpu_capacity", "available_cpu_capacity", "cpu"),
      ("availableMemoryCapacity", "total_memory_capacity", "available_memory_capacity",
       "memory"))),
    ("primaryStorage", "primary_storages", "primary_storage_capacity_holders",
     "primary_storage_uuid",
     (("availableCapacity", "total_capacity", "available_capacity", "size"),)),
)


def audit_capacity_thd(db: Db, repair: bool, now: float) -> list[dict]:
    """
    Recompute every host's and primary storage's available capacity from its holders
    (C{total - sum(held)}) and report where the recorded figure drifted; with C{repair},
    set the recomputed figure, each row in a transaction that holds the row's lock (so a
    concurrent reservation is either counted or waits).
    """
    drift: list[dict] = []
    for res_name, table, holders, key, figures in _AUDITS:
        select = ", ".join(
            f"r.{total}, r.{avail}, COALESCE((SELECT SUM(h.{held}) FROM {holders} h"
            f" WHERE h.{key} = r.uuid), 0)" for _, total, avail, held in figures)
        check = f"SELECT r.uuid, {select} FROM {table} r"
        for row in db.all(check + " ORDER BY r.uuid"):
            found = _drift(res_name, row, figures)
            if not found:
                continue
            if repair:
                with db.transaction():
                    # A no-op update takes the row lock before the holders are summed again.
                    db.run(f"UPDATE {table} SET last_op_date = last_op_date WHERE uuid = ?",
                           (row[0],))
                    fresh = db.one(check + " WHERE r.uuid = ?", (row[0],))
                    found = [] if fresh is None else _drift(res_name, fresh, figures)
                    if found:
                        sets = ", ".join(f"{d['column']} = ?" for d in found)
                        db.run(f"UPDATE {table} SET {sets}, last_op_date = ? WHERE uuid = ?",
                               (*(d["computed"] for d in found), now, row[0]))
                for d in found:
                    d["repaired"] = True
            drift.extend(found)
    for d in drift:
        d.pop("column")
    return drift


def _drift(res_name: str, row: tuple, figures: tuple) -> list[dict]:
    out = []
    for i, (field, _, avail_col, _) in enumerate(figures):
        total, avail, held = (int(v) for v in row[1 + 3 * i: 4 + 3 * i])
        if total - held != avail:
            out.append({"resource": res_name, "uuid": row[0], "field": field,
                        "column": avail_col, "recorded": avail, "computed": total - held,
                        "held": held, "repaired": False})
    return out


# The lowest free addresses of one range: its start when free, else the address after each
# used one whose successor is not used (a gap). LEAD over the (l3_network_uuid, ip_in_long)
# unique index is one ordered walk that stops at the first gaps: linear at worst, never the
# quadratic anti-join a planner without statistics may pick for a NOT EXISTS form.
_RANGES = (
    "SELECT uuid, start_ip_in_long, end_ip_in_long, netmask, gateway FROM ip_ranges"
    " WHERE l3_network_uuid = ? ORDER BY start_ip_in_long, uuid"
)
_START_USED = "SELECT 1 FROM used_ips WHERE l3_network_uuid = ? AND ip_in_long = ?"
_GAPS = (
    "SELECT cand FROM (SELECT ip_in_long + 1 AS cand,"
    " LEAD(ip_in_long) OVER (ORDER BY ip_in_long) AS nxt"
    " FROM used_ips WHERE l3_network_uuid = ? AND ip_in_long >= ? AND ip_in_long <= ?) g"
    " WHERE (nxt IS NULL OR nxt > cand) AND cand <= ? ORDER BY cand LIMIT 64"
)


def _free_candidates_thd(db: Db, l3_uuid: str, ranges: list[tuple]) -> list[tuple]:
    out: list[tuple] = []
    for range_uuid, start, end, netmask, gateway in ranges:
        start, end = int(start), int(end)
        if db.one(_START_USED, (l3_uuid, start)) is None:
            out.append((range_uuid, start, netmask, gateway))
        for (cand,) in db.all(_GAPS, (l3_uuid, start, end, end)):
            out.append((range_uuid, int(cand), netmask, gateway))
        if len(out) >= 64:
            break
    return out


_INSERT_IP = (
    "INSERT INTO used_ips (uuid, ip_range_uuid, l3_network_uuid, ip, ip_in_long, netmask,"
    " gateway, create_date, last_op_date, holder_type, holder_uuid)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (l3_network_uuid, ip_in_long) DO NOTHING"
    f" RETURNING {_cols(_USED_IP)}"
)


def _insert_ip_thd(db: Db, uuid: str, range_uuid: str, l3_uuid: str, n: int, netmask: str,
                   gateway: str, now: float, holder: Holder) -> list[tuple]:
    return db.all(_INSERT_IP, (uuid, range_uuid, l3_uuid, _long_to_ip(n), int(n), netmask,
                               gateway, now, now, holder.type, holder.uuid))


def _ip_held_thd(db: Db, l3_uuid: str, holder: Holder) -> dict | None:
    r = db.one(f"SELECT {_cols(_USED_IP)} FROM used_ips WHERE l3_network_uuid = ?"
               " AND holder_type = ? AND holder_uuid = ?", (l3_uuid, holder.type, holder.uuid))
    return None if r is None else _row(_USED_IP, r)

_IP_ATTEMPTS = 200


def _long_to_ip(n: int) -> str:
    import ipaddress

    return str(ipaddress.IPv4Address(int(n)))


IP_STRATEGIES = ("random", "first")
_RANDOM_PROBES = 4


def allocate_ip_thd(
    db: Db, l3_uuid: str, holder: Any, ip: str | None, uuid: str | None, now: float,
    strategy: str = "random",
) -> dict:
    """
    C{holder}'s address in an L3 network: the one it already holds (a retry after a lost
    acknowledgement gets the same address; Note [holders]), else a newly taken one.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    holder = Holder.of(holder)
    if uuid is not None:
        uuid = _uuid("uuid", uuid)
    if ip is not None:
        check_text("ip", ip, 64)
    held = _ip_held_thd(db, l3_uuid, holder)
    if held is not None:
        if ip is not None and ip_to_long(ip) != held["ipInLong"]:
            raise OperationError.of(
                DB.DUPLICATE,
                f"{holder.type} {holder.uuid} already holds {held['ip']} in L3 network"
                f" {l3_uuid}, not {ip}: release it first",
                l3_network_uuid=l3_uuid, ip=held["ip"], holder_type=holder.type,
                holder_uuid=holder.uuid)
        return held
    try:
        return _allocate_ip_thd(db, l3_uuid, holder, ip, uuid, now, strategy)
    except Exception as e:
        # A concurrent call for the same holder won (the holder's unique key).
        err = db.dialect.map_error(e)
        if err is None or err.code != DB.DUPLICATE:
            raise
        held = _ip_held_thd(db, l3_uuid, holder)
        if held is None or (ip is not None and ip_to_long(ip) != held["ipInLong"]):
            raise
        return held


def _allocate_ip_thd(
    db: Db, l3_uuid: str, holder: Holder, ip: str | None, uuid: str | None, now: float,
    strategy: str = "random",
) -> dict:
    """
    Take a free address of an L3 network: each attempt is one C{INSERT ... ON CONFLICT DO
    NOTHING} on the (L3, address) unique key, so concurrent callers never share an address;
    a caller that loses a race tries another candidate.

    Strategies (ZStack's C{RandomIpAllocatorStrategy} and
    C{FirstAvailableIpAllocatorStrategy}): C{"first"} takes the lowest free address (a gap
    search whose cost grows with the addresses in use); C{"random"} probes a few random
    addresses of the ranges first (constant cost while the network is not nearly full) and
    falls back to the gap search, so a full network is still reported exactly.
    """
    import random
    import uuid as uuidlib

    if strategy not in IP_STRATEGIES:
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR, f"unknown IP allocator strategy {_short(strategy)}",
            field="strategy")

    uuid = uuid or uuidlib.uuid4().hex
    if ip is not None:
        n = ip_to_long(ip)
        rng = db.one(
            "SELECT uuid, netmask, gateway FROM ip_ranges WHERE l3_network_uuid = ?"
            " AND start_ip_in_long <= ? AND end_ip_in_long >= ? ORDER BY uuid LIMIT 1",
            (l3_uuid, n, n),
        )
        if rng is None:
            raise OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"{ip} is in no IP range of L3 network {l3_uuid}",
                field="ip",
                l3_network_uuid=l3_uuid,
                ip=ip,
            )
        rows = _insert_ip_thd(db, uuid, rng[0], l3_uuid, n, rng[1], rng[2], now, holder)
        if not rows:
            raise OperationError.of(
                DB.DUPLICATE, f"{ip} is already allocated in L3 network {l3_uuid}",
                l3_network_uuid=l3_uuid, ip=ip,
            )
        return _row(_USED_IP, rows[0])
    ranges = db.all(_RANGES, (l3_uuid,))
    if strategy == "random":
        size = sum(int(r[2]) - int(r[1]) + 1 for r in ranges)
        for _ in range(_RANDOM_PROBES if size else 0):
            k = random.randrange(size)
            for rng in ranges:
                width = int(rng[2]) - int(rng[1]) + 1
                if k < width:
                    break
                k -= width
            n = int(rng[1]) + k
            rows = _insert_ip_thd(db, uuid, rng[0], l3_uuid, n, rng[3], rng[4], now, holder)
            if rows:
                return _row(_USED_IP, rows[0])
    # One optimistic round; after a lost race, take the network's row lock so that the
    # allocators of one network stop racing for the same lowest address (with 100 callers
    # on one network an unlucky one lost 200 races in a row).
    found = _take_first_free_thd(db, l3_uuid, ranges, uuid, now, holder, rounds=1)
    if found is not None:
        return found
    with db.transaction():
        db.dialect.lock_row(db, "l3_networks", l3_uuid)
        found = _take_first_free_thd(db, l3_uuid, ranges, uuid, now, holder, rounds=_IP_ATTEMPTS)
    if found is not None:
        return found
    raise OperationError.of(
        DB.CONTENTION,
        f"gave up allocating an IP in L3 network {l3_uuid} after {_IP_ATTEMPTS} lost races",
        l3_network_uuid=l3_uuid,
    )


def _take_first_free_thd(db: Db, l3_uuid: str, ranges: list[tuple], uuid: str, now: float,
                         holder: Holder, rounds: int) -> dict | None:
    """
    Up to C{rounds} times: find the lowest free addresses and insert the first one nobody
    took meanwhile. None when every round lost its races.

    @raise OperationError: DB.1005 when the network is full, SYS.1003 when it does not exist.
    """
    for _ in range(rounds):
        candidates = _free_candidates_thd(db, l3_uuid, ranges)
        if not candidates:
            if db.one("SELECT uuid FROM l3_networks WHERE uuid = ?", (l3_uuid,)) is None:
                raise _not_found(resource("l3Network"), l3_uuid)
            raise OperationError.of(
                DB.NO_FREE_IP, f"no free IP left in L3 network {l3_uuid}", l3_network_uuid=l3_uuid
            )
        for range_uuid, n, netmask, gateway in candidates:
            rows = _insert_ip_thd(db, uuid, range_uuid, l3_uuid, n, netmask, gateway, now,
                                  holder)
            if rows:
                return _row(_USED_IP, rows[0])
    return None


def _held_ip_refusal(db: Db, used_ip_uuid: str, how: str) -> OperationError | None:
    """
    C{SYS.1006} pointing at L{release_ip_thd} when the usedIp row C{used_ip_uuid} has a
    holder, None when it has none or does not exist.
    """
    r = db.one("SELECT holder_type, holder_uuid, l3_network_uuid, ip FROM used_ips"
               " WHERE uuid = ?", (used_ip_uuid,))
    if r is None or r[1] is None:
        return None
    return OperationError.of(
        SYS.OPERATION_ERROR,
        f"usedIp {used_ip_uuid} ({r[3]}) is held by {r[0]} {r[1]}: {how} gives back only"
        f" addresses without a holder; release it with release_ip({r[2]!r}, ({r[0]!r},"
        f" {r[1]!r}))",
        uuid=used_ip_uuid, l3_network_uuid=r[2], holder_type=r[0], holder_uuid=r[1])


def free_ip_thd(db: Db, used_ip_uuid: str) -> bool:
    """
    Give back an address that has no holder (a row of schema version 1), in one DELETE:
    whether there was one (freeing twice is a no-op). A held address is refused with
    C{SYS.1006}: only its holder releases it (L{release_ip_thd}), so that a retried or late
    release by uuid cannot free an address its holder still uses (Note [holders]).
    """
    used_ip_uuid = _uuid("used_ip_uuid", used_ip_uuid)
    if db.run("DELETE FROM used_ips WHERE uuid = ? AND holder_uuid IS NULL",
              (used_ip_uuid,)) > 0:
        return True
    refusal = _held_ip_refusal(db, used_ip_uuid, "free_ip")
    if refusal is not None:
        raise refusal
    return False


def release_ip_thd(db: Db, l3_uuid: str, holder: Any) -> dict | None:
    """
    Give back the address C{holder} holds in an L3 network (one DELETE): the freed usedIp
    row, or None when it held none.
    """
    l3_uuid = _uuid("l3_network_uuid", l3_uuid)
    holder = Holder.of(holder)
    rows = db.all(f"DELETE FROM used_ips WHERE l3_network_uuid = ? AND holder_type = ?"
                  f" AND holder_uuid = ? RETURNING {_cols(_USED_IP)}",
                  (l3_uuid, holder.type, holder.uuid))
    return _row(_USED_IP, rows[0]) if rows else None


def change_vm_state_thd(
    db: Db, vm_uuid: str, expected: Any, new: str, changes: dict | None, now: float
) -> dict:
    """
    The VM state compare-and-swap: one C{UPDATE ... WHERE uuid = ? AND state IN (...)}.
    """
    values = _mapping("changes", changes) if changes is not None else {}
    values["state"] = new
    return update_thd(db, "vmInstance", vm_uuid, values, {"state": expected}, now)


def running_jobs_thd(db: Db, node_uuid: str) -> list[dict]:
    res = resource("job")
    node_uuid = _uuid("management_node_uuid", node_uuid)
    return [
        _row(res, r)
        for r in db.all(
            f"SELECT {_cols(res)} FROM jobs WHERE management_node_uuid = ? AND state = ?"
            " ORDER BY create_date, uuid",
            (node_uuid, "Running"),
        )
    ]


def claim_jobs_thd(db: Db, from_node: str, to_node: str, now: float) -> list[dict]:
    """
    Move every running job of C{from_node} to C{to_node} in one UPDATE: two claimers never
    get the same job.
    """
    res = resource("job")
    from_node = _uuid("from_node_uuid", from_node)
    to_node = _uuid("to_node_uuid", to_node)
    return [
        _row(res, r)
        for r in db.all(
            "UPDATE jobs SET management_node_uuid = ?, last_op_date = ?"
            " WHERE management_node_uuid = ? AND state = ?"
            f" RETURNING {_cols(res)}",
            (to_node, now, from_node, "Running"),
        )
    ]


def heartbeat_thd(
    db: Db, uuid: str, hostname: str, port: int | None, state: str, now: float
) -> dict:
    """
    Insert or refresh a management node row in one upsert.
    """
    res = resource("managementNode")
    row = res.to_row({"uuid": uuid, "hostname": hostname, "port": port, "state": state})
    rows = db.all(
        "INSERT INTO management_nodes (uuid, hostname, port, state, heartbeat, join_date)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO UPDATE SET"
        " hostname = excluded.hostname, port = excluded.port, state = excluded.state,"
        f" heartbeat = excluded.heartbeat RETURNING {_cols(res)}",
        (row["uuid"], row["hostname"], row["port"], row["state"], now, now),
    )
    return _row(res, rows[0])


def live_nodes_thd(db: Db, max_age: Any, now: float) -> list[dict]:
    res = resource("managementNode")
    if max_age is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "max_age is required",
                                field="max_age")
    oldest = now - Field("max_age", "max_age", "float").to_db(max_age)
    return [
        _row(res, r)
        for r in db.all(
            f"SELECT {_cols(res)} FROM management_nodes WHERE heartbeat >= ? ORDER BY uuid",
            (oldest,),
        )
    ]


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
class AdbapiStore:
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

    # -- CRUD ------------------------------------------------------------------------------

    def insert(self, resource: str, values: dict) -> Deferred:
        return self._run(insert_thd, resource, _copy(values), self._now())

    def get(self, resource: str, uuid: str) -> Deferred:
        return self._run(get_thd, resource, uuid)

    def update(self, resource: str, uuid: str, changes: dict, expected: dict | None = None
               ) -> Deferred:
        return self._run(update_thd, resource, uuid, _copy(changes), _copy(expected),
                         self._now())

    def delete(self, resource: str, uuid: str) -> Deferred:
        return self._run(delete_thd, resource, uuid)

    def query(self, resource: str, query: Query) -> Deferred:
        return self._run(query_thd, resource, query)

    # -- hosts and storage -----------------------------------------------------------------

    def add_host(self, values: dict) -> Deferred:
        if not isinstance(values, Mapping):
            return self.insert("host", values)
        values = dict(values)
        values.setdefault("availableCpuCapacity", values.get("totalCpuCapacity", 0))
        values.setdefault("availableMemoryCapacity", values.get("totalMemoryCapacity", 0))
        return self.insert("host", values)

    def update_host_status(self, host_uuid: str, status: str, expected: Any = None) -> Deferred:
        return self.update("host", host_uuid, {"status": status},
                           None if expected is None else {"status": expected})

    def set_host_capacity(self, host_uuid: str, total_cpu: int, total_memory: int,
                          cpu_num: int | None = None) -> Deferred:
        return self._run(set_host_capacity_thd, host_uuid, total_cpu, total_memory, cpu_num,
                         self._now())

    def reserve_host_capacity(self, host_uuid: str, cpu: int, memory: int, holder: Any
                              ) -> Deferred:
        return self._run(reserve_host_capacity_thd, host_uuid, cpu, memory, holder,
                         self._now())

    def release_host_capacity(self, host_uuid: str, holder: Any) -> Deferred:
        return self._run(release_host_capacity_thd, host_uuid, holder, self._now())

    def reserve_primary_storage_capacity(self, primary_storage_uuid: str, size: int,
                                         holder: Any) -> Deferred:
        return self._run(reserve_primary_storage_thd, primary_storage_uuid, size, holder,
                         self._now())

    def release_primary_storage_capacity(self, primary_storage_uuid: str, holder: Any
                                         ) -> Deferred:
        return self._run(release_primary_storage_thd, primary_storage_uuid, holder,
                         self._now())

    def audit_capacity(self, repair: bool = False) -> Deferred:
        return self._run(audit_capacity_thd, bool(repair), self._now())

    # -- IPs and VM state ------------------------------------------------------------------

    def allocate_ip(self, l3_network_uuid: str, holder: Any, ip: str | None = None,
                    uuid: str | None = None, strategy: str = "random") -> Deferred:
        return self._run(allocate_ip_thd, l3_network_uuid, holder, ip, uuid, self._now(),
                         strategy)

    def free_ip(self, used_ip_uuid: str) -> Deferred:
        return self._run(free_ip_thd, used_ip_uuid)

    def release_ip(self, l3_network_uuid: str, holder: Any) -> Deferred:
        return self._run(release_ip_thd, l3_network_uuid, holder)

    def change_vm_state(self, vm_uuid: str, expected: Any, new: str,
                        changes: dict | None = None) -> Deferred:
        return self._run(change_vm_state_thd, vm_uuid, expected, new, _copy(changes),
                         self._now())

    # -- jobs ------------------------------------------------------------------------------

    def create_job(self, uuid: str, api_name: str, api_message: Any, management_node_uuid: str,
                   resource_uuid: str | None = None, account_uuid: str | None = None
                   ) -> Deferred:
        return self.insert("job", {
            "uuid": uuid,
            "apiName": api_name,
            "apiMessage": api_message,
            "managementNodeUuid": management_node_uuid,
            "resourceUuid": resource_uuid,
            "accountUuid": account_uuid,
            "state": "Running",
        })

    def finish_job(self, uuid: str, result: Any = None, error: ErrorCode | None = None
                   ) -> Deferred:
        now = self._now()
        changes: dict[str, Any] = {"finishDate": now}
        if error is not None:
            if not isinstance(error, ErrorCode):
                return fail(OperationError.of(
                    SYS.INVALID_ARGUMENT_ERROR,
                    f"a job error is an ErrorCode, not {type(error).__name__}", field="error"))
            changes.update(state="Failed", error=error.to_dict())
        else:
            # A result that is not JSON is refused by the edge check (SYS.1007, "result").
            changes.update(state="Succeeded", result=result)
        return self.update("job", uuid, changes, {"state": "Running"})

    def running_jobs(self, management_node_uuid: str) -> Deferred:
        return self._run(running_jobs_thd, management_node_uuid)

    def claim_jobs(self, from_node_uuid: str, to_node_uuid: str) -> Deferred:
        return self._run(claim_jobs_thd, from_node_uuid, to_node_uuid, self._now())

    # -- management nodes ------------------------------------------------------------------

    def heartbeat(self, uuid: str, hostname: str, port: int | None = None,
                  state: str = "RUNNING") -> Deferred:
        return self._run(heartbeat_thd, uuid, hostname, port, state, self._now())

    def live_management_nodes(self, max_age: float) -> Deferred:
        return self._run(live_nodes_thd, max_age, self._now())

    def delete_management_node(self, uuid: str) -> Deferred:
        return self.delete("managementNode", uuid)
