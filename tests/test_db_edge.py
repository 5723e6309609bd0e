"""
Both backends answer the same to any input (issue 8 item 13).

Hypothesis generates store operations with hostile arguments (text with NUL, control
characters and lone surrogates, text longer than its column, integers beyond 64 bits,
NaN and infinities, bytes, lists and dicts where scalars belong, unknown fields and
resources, malformed holders and queries) and runs each one on SQLite (a file), the memory
store's database (SQLite in memory) and the real PostgreSQL, calling the very C{*_thd}
functions the stores run. Every backend must give the same answer: the same rows, or the
same error code (C{SYS.1007} naming the same field); never C{SYS.1000}, never an exception
that is not an L{OperationError}. At the end the tables are compared row by row.

The public methods are checked too (C{tests.test_db_contract}, C{test_edge_*}): a bad
argument is a failed Deferred, never an exception raised at the caller.
"""

from __future__ import annotations

import itertools
import operator
import os
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.db_support import (
    NON_C_DATABASE,
    TOPOLOGY,
    pg_create_database_sync,
    pg_drop_database_sync,
    pg_dsn,
)
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import _store as thd
from zcontrol.db._store import Db, load_migrations, migrate_thd
from zcontrol.db.postgres import PostgresDialect
from zcontrol.db.query import OPERATORS, RESOURCES, Condition, Query
from zcontrol.db.sqlite import SQLiteDialect

NOW = 1000.0

# Any code point, surrogates and NUL included (hypothesis leaves out surrogates unless told).
ANY_CHAR = st.characters(codec=None, exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=40)
LONG_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FFF), min_size=60,
                    max_size=300)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**400 // 10**300]),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), -0.0, 5e-324, 1e308]),
)
LITERALS = st.sampled_from([
    "Enabled", "Disabled", "Running", "Created", "Starting", "Connected", "zone-1",
    "cluster-1", "host-1", "l3-1", "vm-1", "ps-1", "10.0.0.11", "10.0.0.99", "true", "12",
    " 7 ", "1_000", "nan", "1e400", "%", "a\\", "\\%", "", "x" * 64, "x" * 65, "y" * 256,
    "JOINING", "RUNNING",
])
WILD = st.one_of(
    TEXT, LONG_TEXT, NUMBERS, LITERALS, st.booleans(), st.none(), st.binary(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                              st.integers(-3, 3), max_size=2),
)
# Text whose code point order differs from a linguistic one: both cases, accents composed
# and combining, punctuation, digits, other scripts, an emoji; plus any printable character.
SORTED_TEXT = st.text(
    st.one_of(st.sampled_from(list("aAbBzZ_-~ 1é\u00c9e\u0301äÄßΩω日本\U0001F600")),
              st.characters(min_codepoint=0x20, max_codepoint=0x2FFFF,
                            exclude_categories=("Cc", "Cs"))),
    min_size=1, max_size=6)
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
RESOURCE_NAMES = st.one_of(st.sampled_from(sorted(RESOURCES)), TEXT, st.integers())
HOLDERS = st.one_of(
    st.tuples(st.sampled_from(["VmInstanceVO", "VmNicVO"]), st.sampled_from(["a", "b"])),
    st.tuples(WILD, WILD), WILD, st.lists(WILD, max_size=3),
)


def field_names(resource: Any) -> st.SearchStrategy:
    fields = sorted(RESOURCES[resource].fields) if resource in RESOURCES else ["uuid"]
    return st.one_of(st.sampled_from(fields), st.sampled_from(fields), TEXT)


@st.composite
def inserts(draw: Any) -> tuple:
    base = draw(st.sampled_from(sorted(TOPOLOGY) + ["job", "managementNode", "image"]))
    values: dict[str, Any] = dict(TOPOLOGY.get(base, {}))
    if base == "job":
        values = {"apiName": "APIx", "apiMessage": {"a": 1}, "managementNodeUuid": "mn-1"}
    elif base == "managementNode":
        values = {"hostname": "h", "heartbeat": NOW, "joinDate": NOW}
    elif base == "image":
        values = {"name": "img"}
    values.pop("uuid", None)
    for _ in range(draw(st.integers(0, 3))):
        values[draw(field_names(base))] = draw(WILD)
    resource = draw(st.one_of(st.just(base), st.just(base), RESOURCE_NAMES))
    return ("insert", resource, values)


@st.composite
def queries(draw: Any) -> tuple:
    resource = draw(st.one_of(st.sampled_from(["host", "zone", "vmInstance", "job", "usedIp"]),
                              RESOURCE_NAMES))
    conditions = []
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.one_of(st.sampled_from(OPERATORS), TEXT))
        value = draw(st.one_of(WILD, st.lists(WILD, max_size=3)))
        conditions.append(Condition(draw(field_names(resource)), op, value))
    if draw(st.booleans()):
        conditions.append(draw(TEXT))
    kw = {
        "conditions": draw(st.one_of(st.just(conditions), st.just(conditions), WILD)),
        "sort": draw(st.one_of(st.none(), field_names(resource),
                               field_names(resource).map(lambda f: f"-{f}"), WILD)),
        "limit": draw(st.one_of(st.integers(0, 20), WILD)),
        "start": draw(st.one_of(st.integers(0, 3), WILD)),
        "count": draw(st.booleans()),
        "reply_with_count": draw(st.booleans()),
        "fields": draw(st.one_of(st.none(), st.lists(field_names(resource), max_size=3),
                                 WILD)),
    }
    return ("query", resource, Query(**kw))


UUIDS = st.one_of(LITERALS, WILD)
OPERATIONS = st.one_of(
    inserts(),
    queries(),
    st.tuples(st.just("get"), RESOURCE_NAMES, UUIDS),
    st.tuples(st.just("delete"), st.sampled_from(["zone", "vmInstance", "job"]), UUIDS),
    st.builds(lambda r, u, c, e: ("update", r, u, c, e),
              st.sampled_from(["host", "vmInstance", "zone"]), UUIDS,
              st.one_of(st.dictionaries(field_names("host"), WILD, max_size=3), WILD),
              st.one_of(st.none(), st.dictionaries(field_names("host"), WILD, max_size=2),
                        WILD)),
    st.tuples(st.just("reserve"), UUIDS, NUMBERS | st.integers(0, 5), NUMBERS | WILD,
              HOLDERS),
    st.tuples(st.just("release"), UUIDS, HOLDERS),
    st.tuples(st.just("reserve_ps"), UUIDS, NUMBERS | st.integers(0, 50), HOLDERS),
    st.tuples(st.just("allocate_ip"), UUIDS, HOLDERS, st.one_of(st.none(), WILD),
              st.one_of(st.none(), WILD), st.one_of(st.just("first"), WILD)),
    st.tuples(st.just("release_ip"), UUIDS, HOLDERS),
    st.tuples(st.just("free_ip"), UUIDS),
    st.tuples(st.just("set_host_capacity"), UUIDS, NUMBERS, NUMBERS,
              st.one_of(st.none(), NUMBERS)),
    st.tuples(st.just("change_vm_state"), UUIDS, WILD, WILD,
              st.one_of(st.none(), st.dictionaries(field_names("vmInstance"), WILD,
                                                   max_size=2), WILD)),
    st.tuples(st.just("heartbeat"), UUIDS, WILD, st.one_of(st.none(), NUMBERS, WILD), WILD),
    st.tuples(st.just("running_jobs"), UUIDS),
    st.tuples(st.just("claim_jobs"), UUIDS, UUIDS),
    st.tuples(st.just("live_nodes"), st.one_of(NUMBERS, WILD)),
)


def _call(op: tuple, n: int) -> Callable[[Db], Any]:
    """
    The operation as a function of a connection (fresh uuids numbered C{n}).
    """
    kind, args = op[0], op[1:]
    if kind == "insert":
        resource, values = args
        values = dict(values)
        values.setdefault("uuid", f"e{n}")
        if resource == "host":
            values.setdefault("managementIp", f"10.200.{n // 250}.{n % 250}")
        if isinstance(values.get("name"), str) and resource == "zone":
            values["name"] = f"{values['name']}-{n}"
        return lambda db: thd.insert_thd(db, resource, values, NOW)
    if kind == "query":
        return lambda db: thd.query_thd(db, *args)
    if kind == "get":
        return lambda db: thd.get_thd(db, *args)
    if kind == "delete":
        return lambda db: thd.delete_thd(db, *args)
    if kind == "update":
        return lambda db: thd.update_thd(db, *args, NOW)
    if kind == "reserve":
        return lambda db: thd.reserve_host_capacity_thd(db, *args, NOW)
    if kind == "release":
        return lambda db: thd.release_host_capacity_thd(db, *args, NOW)
    if kind == "reserve_ps":
        return lambda db: thd.reserve_primary_storage_thd(db, *args, NOW)
    if kind == "allocate_ip":
        l3, holder, ip, uuid, strategy = args
        # A generated uuid or a random address would differ between the backends.
        uuid = f"ip{n}" if uuid is None else uuid
        strategy = "first" if strategy == "random" else strategy
        return lambda db: thd.allocate_ip_thd(db, l3, holder, ip, uuid, NOW, strategy)
    if kind == "release_ip":
        return lambda db: thd.release_ip_thd(db, *args)
    if kind == "free_ip":
        return lambda db: thd.free_ip_thd(db, *args)
    if kind == "set_host_capacity":
        return lambda db: thd.set_host_capacity_thd(db, *args, NOW)
    if kind == "change_vm_state":
        return lambda db: thd.change_vm_state_thd(db, *args, NOW)
    if kind == "heartbeat":
        return lambda db: thd.heartbeat_thd(db, *args, NOW)
    if kind == "running_jobs":
        return lambda db: thd.running_jobs_thd(db, *args)
    if kind == "claim_jobs":
        return lambda db: thd.claim_jobs_thd(db, *args, NOW)
    if kind == "live_nodes":
        return lambda db: thd.live_nodes_thd(db, *args, NOW)
    raise AssertionError(kind)


def outcome(db: Db, fn: Callable[[Db], Any]) -> tuple:
    """
    What a backend answered: (\"ok\", result) or (\"error\", code, field for SYS.1007);
    (\"crash\", ...) for anything that is not an OperationError with a domain code.
    """
    try:
        result = fn(db)
    except OperationError as e:
        err = e.error
        if err.code == SYS.INTERNAL:
            return ("crash", err.code, err.details)
        if err.code == SYS.INVALID_ARGUMENT_ERROR:
            return ("error", err.code, err.opaque.get("field", "<no field named>"))
        return ("error", err.code)
    except Exception as e:  # noqa: BLE001 - what the store would map
        err = db.dialect.map_error(e)
        if err is None or err.code in (SYS.INTERNAL, SYS.INVALID_ARGUMENT_ERROR):
            # A driver's DataError (SYS.1007 without a field) is a value the edge let by.
            return ("crash", type(e).__name__, str(e)[:200])
        return ("error", err.code)
    if isinstance(result, thd.QueryResult):
        return ("ok", result.inventories, result.total)
    return ("ok", result)


class Backends:
    """
    One migrated, seeded database per backend, used through one plain connection each.
    """

    def __init__(self, dialects: dict[str, Any]):
        self.dbs = {name: Db(d.open_raw(), d) for name, d in dialects.items()}
        self.counter = itertools.count()
        for db in self.dbs.values():
            migrate_thd(db, load_migrations("sqlite" if db.dialect.name == "sqlite"
                                            else "postgresql"), NOW)
            for name in ("zone", "cluster", "host", "primaryStorage", "l2Network",
                         "l3Network", "ipRange", "vmInstance"):
                thd.insert_thd(db, name, TOPOLOGY[name], NOW)
            thd.insert_thd(db, "job", {"uuid": "job-1", "apiName": "APIx", "apiMessage": {},
                                       "managementNodeUuid": "mn-1", "state": "Running"}, NOW)
            thd.heartbeat_thd(db, "mn-1", "node1", 8080, "RUNNING", NOW)

    def run(self, op: tuple) -> dict[str, tuple]:
        fn = _call(op, next(self.counter))
        return {name: outcome(db, fn) for name, db in self.dbs.items()}

    def tables(self) -> dict[str, Any]:
        out = {}
        for name, db in self.dbs.items():
            rows = {r: thd.query_thd(db, r, Query(limit=100_000)).inventories
                    for r in sorted(RESOURCES)}
            for table in ("host_capacity_holders", "primary_storage_capacity_holders"):
                rows[table] = sorted(tuple(r) for r in db.all(f"SELECT * FROM {table}"))
            out[name] = rows
        return out

    def close(self) -> None:
        for db in self.dbs.values():
            db.raw.close()


class EdgeTests(SynchronousTestCase):
    """
    The same answers from SQLite, the memory store's SQLite and PostgreSQL (a database
    whose own collation is ICU English).
    """

    def setUp(self) -> None:
        path = os.path.abspath(self.mktemp() + ".db")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A database that does not sort by code point (Note [collation]): the generated
        # sorts and text comparisons must still answer as SQLite does.
        name = pg_create_database_sync(NON_C_DATABASE)
        self.addCleanup(pg_drop_database_sync, name)
        self.backends = Backends({
            "sqlite": SQLiteDialect(path),
            "memory": SQLiteDialect(":memory:"),
            "postgresql": PostgresDialect(pg_dsn(name)),
        })
        self.addCleanup(self.backends.close)

    def check(self, op: tuple) -> None:
        answers = self.backends.run(op)
        for backend, answer in answers.items():
            self.assertNotEqual(answer[0], "crash", f"{backend} crashed on {op!r}: {answer}")
        self.assertEqual(answers["sqlite"], answers["postgresql"], f"on {op!r}")
        self.assertEqual(answers["sqlite"], answers["memory"], f"on {op!r}")

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(OPERATIONS, min_size=1, max_size=4))
    def test_same_answers(self, ops: list[tuple]) -> None:
        """
        Fault (issue 8 item 13): the same bad value was stored by SQLite and refused by
        PostgreSQL, refused with different codes, or crashed one backend with SYS.1000 (a
        NUL byte, a lone surrogate, text longer than its column, an integer beyond the
        column's width, NaN). Now every generated operation gets the same answer from every
        backend, and refusals are SYS.1007 naming the field.
        """
        for op in ops:
            self.check(op)

    def test_same_tables_after(self) -> None:
        """
        After a fixed run of hostile and valid operations the tables hold the same rows on
        every backend.
        """
        ops = [
            ("insert", "zone", {"name": "z\x00"}),
            ("insert", "zone", {"name": "z" * 256}),
            ("insert", "zone", {"name": "ok", "description": "line\nbreak\ttab"}),
            ("insert", "zone", {"name": "sur\ud800"}),
            ("insert", "host", dict(TOPOLOGY["host"], uuid="h2", cpuNum=2**31)),
            ("insert", "host", dict(TOPOLOGY["host"], uuid="h3", totalCpuCapacity=2**63)),
            ("insert", "host", dict(TOPOLOGY["host"], uuid="h4", createDate=float("nan"))),
            ("insert", "image", {"name": "i", "size": 2**62, "system": "true"}),
            ("insert", "job", {"apiName": "x", "apiMessage": {"k": float("nan")},
                               "managementNodeUuid": "mn"}),
            ("reserve", "host-1", 3, 30, ("VmInstanceVO", "a")),
            ("reserve", "host-1", 3, 30, ("VmInstanceVO", "a")),
            ("reserve", "host-1", 3, 30, ("VmInstanceVO", "\x00")),
            ("allocate_ip", "l3-1", ("VmNicVO", "a"), None, None, "first"),
            ("allocate_ip", "l3-1", ("VmNicVO", "a"), None, None, "first"),
            ("heartbeat", "mn-2", "h\x7f", 2**40, "RUNNING"),
            ("query", "zone", Query(conditions=["name~=a\\"])),
            ("query", 0, Query()),
            ("get", ["zone"], "zone-1"),
            ("query", "zone", Query(sort="description")),
            ("query", "zone", Query(sort="-description")),
        ]
        for op in ops:
            self.check(op)
        tables = self.backends.tables()
        self.assertEqual(tables["sqlite"], tables["postgresql"])
        self.assertEqual(tables["sqlite"], tables["memory"])
        self.assertEqual(sorted(z["name"] for z in tables["sqlite"]["zone"]), ["ok-2", "zone1"])

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(SORTED_TEXT, min_size=2, max_size=10, unique=True), SORTED_TEXT,
           st.sampled_from(["<", "<=", ">", ">="]))
    def test_same_text_order(self, names: list[str], bound: str, op: str) -> None:
        """
        Fault (issue 8 item 13): PostgreSQL sorted and compared text by the database's
        collation (here ICU English), so generated mixed-case, accented and non-Latin
        names came back in another order than from SQLite and the memory store, and
        C{<}/C{>} selected other rows. Every backend answers in code point order.
        """
        tag = f"t{next(self.backends.counter)}"
        for db in self.backends.dbs.values():
            for i, name in enumerate(names):
                thd.insert_thd(db, "zone", {"uuid": f"{tag}-{i}", "name": name,
                                            "description": tag}, NOW)
        try:
            for query, expected in (
                (Query(conditions=[f"description={tag}"], sort="name"), sorted(names)),
                (Query(conditions=[f"description={tag}"], sort="-name"),
                 sorted(names, reverse=True)),
                (Query(conditions=[f"description={tag}", Condition("name", op, bound)],
                       sort="name"),
                 sorted(n for n in names if _COMPARE[op](n, bound))),
            ):
                answers = self.backends.run(("query", "zone", query))
                for backend, answer in answers.items():
                    self.assertEqual(answer[0], "ok", (backend, answer))
                    self.assertEqual([z["name"] for z in answer[1]], expected,
                                     (backend, query))
        finally:
            for db in self.backends.dbs.values():
                db.run("DELETE FROM zones WHERE description = ?", (tag,))
