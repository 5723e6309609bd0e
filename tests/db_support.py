"""
Shared fixtures of the db tests: a fresh PostgreSQL database per test (created through a
psycopg2 connection to the C{postgres} database, in a thread; dropped at the end), a temp
SQLite file, and a small seeded topology.

PostgreSQL is at 127.0.0.1:5432 (trust, user postgres), or C{ZCONTROL_TEST_PG} (a libpq URI
of the server's C{postgres} database). When it is missing the tests FAIL: they never skip.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import psycopg2
from twisted.internet import defer, threads

from zcontrol.core.errors import OperationError
from zcontrol.db.components.base import load_migrations

PG_ADMIN_DSN = os.environ.get("ZCONTROL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_dsn(dbname: str) -> str:
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    return f"{base}/{dbname}"


def pg_admin(sql: str, params: tuple = ()) -> list[tuple]:
    """
    Run one statement on the server's C{postgres} database (blocking: call it in a thread
    or from a synchronous test).
    """
    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _drop_orphans() -> None:
    # Databases left by test processes that died before their cleanup (same machine only).
    for (name,) in pg_admin(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", ("zcontrol_test_",)
    ):
        pid = name.split("_")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_orphans_dropped = False


# A collation that does not sort by code point (Note [collation] in zcontrol.db.postgres):
# ICU's English, which every PostgreSQL built with ICU has (this server's libc has no
# en_US.UTF-8: `locale -a` lists only C, C.utf8 and POSIX).
NON_C_DATABASE = ("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                  " LOCALE 'C.UTF-8'")


def pg_create_database_sync(options: str = "") -> str:
    """
    Create C{zcontrol_test_<pid>_<hex>} and return its name (dropping, the first time,
    databases of test processes that no longer exist).

    @param options: what follows the name in C{CREATE DATABASE} (e.g. L{NON_C_DATABASE}).
    """
    global _orphans_dropped
    if not _orphans_dropped:
        _orphans_dropped = True
        _drop_orphans()
    name = f"zcontrol_test_{os.getpid()}_{secrets.token_hex(4)}"
    pg_admin(f'CREATE DATABASE "{name}" {options}')
    return name


def pg_drop_database_sync(name: str) -> None:
    assert name.startswith("zcontrol_test_")
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_terminate_sync(name: str) -> int:
    """
    C{pg_terminate_backend} every connection to database C{name} (from another connection).
    """
    rows = pg_admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    return len(rows)


class SQLiteStoreFactory:
    """
    Mixin for trial TestCases: stores on a temp SQLite file.
    """

    backend = "sqlite"
    store_options: dict[str, Any] = {"pool_size": 4}

    def connection_lost(self) -> BaseException:
        """
        What the driver raises when the database goes away under an operation.
        """
        import sqlite3

        return sqlite3.OperationalError("disk I/O error")

    def setUp_database(self) -> Any:
        self.db_path = os.path.abspath(self.mktemp() + ".db")
        os.makedirs(os.path.dirname(self.db_path), exist_ok=True)
        return defer.succeed(None)

    def tearDown_database(self) -> Any:
        return defer.succeed(None)

    def store_url(self) -> str:
        return f"sqlite://{self.db_path}"


class PostgresStoreFactory:
    """
    Mixin for trial TestCases: stores on a fresh PostgreSQL database per test.
    """

    backend = "postgresql"
    store_options: dict[str, Any] = {"pool_size": 4}

    def connection_lost(self) -> BaseException:
        return psycopg2.OperationalError("server closed the connection unexpectedly")

    # What follows the name in CREATE DATABASE: the server's defaults (C.UTF-8 here).
    database_options = ""

    def setUp_database(self) -> Any:
        d = threads.deferToThread(pg_create_database_sync, self.database_options)

        def created(name: str) -> None:
            self.db_name = name

        return d.addCallback(created)

    def tearDown_database(self) -> Any:
        return threads.deferToThread(pg_drop_database_sync, self.db_name)

    def store_url(self) -> str:
        return pg_dsn(self.db_name)


class PostgresNonCStoreFactory(PostgresStoreFactory):
    """
    Mixin for trial TestCases: stores on a fresh PostgreSQL database whose default
    collation is ICU's English (L{NON_C_DATABASE}), as a production database created with
    an C{en_US.UTF-8} locale would sort.
    """

    database_options = NON_C_DATABASE


class MemoryStoreFactory(SQLiteStoreFactory):
    """
    Mixin for trial TestCases: in-memory stores (L{zcontrol.db.memory.MemoryStore}), one
    database per test shared by name between the stores a test opens.
    """

    backend = "memory"
    store_options: dict[str, Any] = {}

    def setUp_database(self) -> Any:
        self.memory_name = f"test-{secrets.token_hex(6)}"
        return defer.succeed(None)

    def store_url(self) -> str:
        return f"memory://{self.memory_name}"


TOPOLOGY = {
    "zone": {"uuid": "zone-1", "name": "zone1"},
    "cluster": {"uuid": "cluster-1", "name": "cluster1", "zoneUuid": "zone-1",
                "hypervisorType": "KVM"},
    "host": {"uuid": "host-1", "name": "host1", "zoneUuid": "zone-1", "clusterUuid": "cluster-1",
             "managementIp": "192.168.0.1", "hypervisorType": "KVM", "cpuNum": 8,
             "totalCpuCapacity": 16, "totalMemoryCapacity": 1024},
    "primaryStorage": {"uuid": "ps-1", "name": "ps1", "zoneUuid": "zone-1",
                       "url": "/var/ps", "type": "LocalStorage", "totalCapacity": 1000,
                       "availableCapacity": 1000},
    "l2Network": {"uuid": "l2-1", "name": "l2", "zoneUuid": "zone-1",
                  "physicalInterface": "eth0"},
    "l3Network": {"uuid": "l3-1", "name": "l3", "l2NetworkUuid": "l2-1", "zoneUuid": "zone-1"},
    "ipRange": {"uuid": "range-1", "l3NetworkUuid": "l3-1", "startIp": "10.0.0.10",
                "endIp": "10.0.0.14", "netmask": "255.255.255.0", "gateway": "10.0.0.1"},
    "vmInstance": {"uuid": "vm-1", "name": "vm1", "cpuNum": 1, "memorySize": 64},
}


def error_of(failure_or_exc: Any) -> Any:
    """
    The ErrorCode an OperationError failure carries (fails the test when it carries none).
    """
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    assert isinstance(exc, OperationError), f"not an OperationError: {exc!r}"
    return exc.error


#: The schema version the migrations bring a store to (the highest migration).
LATEST_SCHEMA = max(m.version for m in load_migrations("sqlite"))
