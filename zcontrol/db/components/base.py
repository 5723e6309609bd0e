# -*- test-case-name: tests.test_db_contract -*-
"""
The generic part of the store components: the L{Db} wrapper and L{Dialect}, migrations,
the edge checks, the generic C{*_thd} functions (get, insert, update, delete, query), the
holder bookkeeping shared by capacity and IP reservations, and L{StoreComponent}, the base
of every component mixed into L{zcontrol.db._store.AdbapiStore}.

See the notes in L{zcontrol.db._store} ([threads], [autocommit], [holders], [edge]).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zcontrol.core.errors import SYS, ErrorCode, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.db.query import (
    CompiledQuery,
    Query,
    Resource,
    _short,
    check_int,
    check_text,
    compile_query,
    ip_to_long,
    resource,
)

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


class StoreComponent:
    """
    The base of a store component: a mixin of L{zcontrol.db._store.AdbapiStore} whose
    methods run C{*_thd} functions on the store's one pool with C{self._run} (and read the
    clock with C{self._now}); components hold no state of their own.
    """

    def _now(self) -> float:
        raise NotImplementedError

    def _run(self, fn: Callable, *args: Any) -> Deferred:
        raise NotImplementedError


class CrudComponent(StoreComponent):
    """
    Generic operations on any resource of the catalogue (see L{IStore}).
    """

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
