"""
Faults on the real PostgreSQL: connections killed with C{pg_terminate_backend} (from a
separate connection) while idle and while an operation is in flight, and an unreachable
server. In-flight operations fail with SYS.1016, the pool replaces dead connections by
itself, later operations succeed. (A full server restart is exercised by
C{python -m bench.soak_db_restart}, kept out of CI because it disturbs every other user of
the server.)
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.db_support import (
    TOPOLOGY,
    PostgresStoreFactory,
    error_of,
    pg_admin,
    pg_terminate_sync,
)
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS
from zcontrol.db import open_store


class PostgresFaultTests(PostgresStoreFactory, unittest.TestCase):
    """
    Connection loss on PostgreSQL.
    """

    POOL = 4

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.store = open_store(self.store_url(), reactor, pool_size=self.POOL)
        await self.store.start()
        for name in ("zone", "cluster"):
            await self.store.insert(name, TOPOLOGY[name])
        await self.store.add_host(TOPOLOGY["host"])

    @async_to_deferred
    async def tearDown(self) -> None:
        await self.store.stop()
        await self.tearDown_database()

    async def backends(self, query_like: str | None = None) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        params: tuple = (self.db_name,)
        if query_like is not None:
            sql += " AND state = 'active' AND query LIKE %s"
            params += (query_like,)
        rows = await threads.deferToThread(pg_admin, sql, params)
        return rows[0][0]

    async def wait_for(self, predicate: Any, what: str) -> None:
        for _ in range(200):
            if await predicate():
                return
            await task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"timed out waiting for {what}")

    async def terminate_all(self) -> None:
        await threads.deferToThread(pg_terminate_sync, self.db_name)

        async def gone() -> bool:
            return await self.backends() == 0

        await self.wait_for(gone, "terminated backends to exit")

    async def use_every_connection(self) -> list[Any]:
        return await defer.gatherResults(
            [self.store.reserve_host_capacity("host-1", 0, 1, ("VmInstanceVO", uuid4().hex))
             for _ in range(4 * self.POOL)])

    @async_to_deferred
    async def test_idle_connections_killed(self) -> None:
        """
        After every pooled connection was killed while idle, the next operations all
        succeed: dead connections are noticed and replaced before use.
        """
        await self.use_every_connection()
        self.assertGreaterEqual(await self.backends(), 1)
        await self.terminate_all()
        await self.use_every_connection()
        host = await self.store.get("host", "host-1")
        self.assertEqual(host["availableMemoryCapacity"], 1024 - 8 * self.POOL)
        self.assertGreaterEqual(await self.backends(), 1)

    @async_to_deferred
    async def test_in_flight_operation_fails_then_recovers(self) -> None:
        """
        An operation in flight when its connection is killed fails with SYS.1016 (and its
        transaction is rolled back); the pool reconnects and later operations succeed.
        """
        def slow_thd(db: Any) -> None:
            with db.transaction():
                db.run("UPDATE hosts SET available_cpu_capacity = 0 WHERE uuid = ?", ("host-1",))
                db.all("SELECT pg_sleep(30)")

        d = self.store._run(slow_thd)

        async def sleeping() -> bool:
            return await self.backends("SELECT pg_sleep%") == 1

        await self.wait_for(sleeping, "the slow operation to be in flight")
        await threads.deferToThread(pg_terminate_sync, self.db_name)
        try:
            await d
        except Exception as e:
            err = error_of(e)
        else:
            self.fail("the in-flight operation succeeded")
        self.assertEqual(err.code, SYS.IO_ERROR)
        self.assertIn("postgresql", err.details)

        # pg_terminate_backend returns before the backends exit: an operation racing with
        # their exit is in flight too. Once they are gone, every operation must succeed.
        async def gone() -> bool:
            return await self.backends() == 0

        await self.wait_for(gone, "terminated backends to exit")
        host = await self.store.get("host", "host-1")
        self.assertEqual(host["availableCpuCapacity"], 16)
        await self.use_every_connection()
        self.assertEqual(await self.store.allocate_ip("nope", ("VmNicVO", "nic")).addErrback(
            lambda f: error_of(f).code), SYS.RESOURCE_NOT_FOUND)

    @async_to_deferred
    async def test_repeated_kills(self) -> None:
        """
        Killing the connections several times in a row never leaves the pool unusable.
        """
        for _ in range(3):
            await self.use_every_connection()
            await self.terminate_all()
        await self.use_every_connection()


class StatementTimeoutTests(PostgresStoreFactory, unittest.TestCase):
    """
    The statement timeout bounds every wait in PostgreSQL.
    """

    @async_to_deferred
    async def test_statement_timeout(self) -> None:
        """
        A statement that runs longer than statement_timeout_ms fails with SYS.1001; the
        store keeps working.
        """
        await self.setUp_database()
        # The schema first, without the short timeout: migrating a fresh database can take
        # longer than 100 ms on a loaded machine, and that is not what this test is about.
        migrate = open_store(self.store_url(), reactor, pool_size=1)
        await migrate.start()
        await migrate.stop()
        store = open_store(self.store_url(), reactor, pool_size=1, statement_timeout_ms=100)
        await store.start()
        try:
            try:
                await store._run(lambda db: db.all("SELECT pg_sleep(5)"))
            except Exception as e:
                self.assertEqual(error_of(e).code, SYS.TIMEOUT)
            else:
                self.fail("the slow statement succeeded")
            self.assertIsNone(await store.get("zone", "x"))
        finally:
            await store.stop()
            await self.tearDown_database()


class UnreachableTests(unittest.TestCase):
    """
    A server that is not there.
    """

    @async_to_deferred
    async def test_start_fails_with_io_error(self) -> None:
        """
        Starting against a closed port fails with SYS.1016 and leaves nothing running.
        """
        store = open_store("postgresql://postgres@127.0.0.1:1/nothing", reactor, pool_size=1,
                           connect_timeout=2)
        try:
            await store.start()
        except Exception as e:
            self.assertEqual(error_of(e).code, SYS.IO_ERROR)
        else:
            self.fail("start succeeded")
        self.assertIsNone(store._pool)
        self.assertEqual(error_of(await store.get("zone", "x").addErrback(lambda f: f.value)).code,
                         SYS.NOT_READY_ERROR)
