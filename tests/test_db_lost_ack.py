"""
A real lost acknowledgement on PostgreSQL (issue 8 item 12): the store talks to the server
through a TCP proxy in this process which, once armed, forwards a chosen statement (the
C{COMMIT} of a reservation, the C{INSERT} of an address), swallows the server's answer and
cuts both connections. The server has committed (PostgreSQL commits before it answers);
the caller hears C{SYS.1016}. Retrying must not take a second time.

(The same fault on every backend, simulated at the driver, is in
C{tests.test_db_contract}: C{test_lost_ack_retry_takes_once}.)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, protocol, reactor, threads
from twisted.trial import unittest

from tests.db_support import TOPOLOGY, PostgresStoreFactory, error_of, pg_dsn
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS
from zcontrol.db import Query, open_store


class _ToServer(protocol.Protocol):
    def __init__(self, peer: _FromClient):
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.server_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.peer.from_server(data)

    def connectionLost(self, reason: Any) -> None:
        self.peer.transport.loseConnection()


class _FromClient(protocol.Protocol):
    """
    One proxied connection: client bytes to the server, server bytes to the client, unless
    the statement the proxy is armed for went by: then the server's next answer is dropped
    and both sides are cut.
    """

    def __init__(self, proxy: CuttingProxy):
        self.proxy = proxy
        self.server: _ToServer | None = None
        self.buffer: list[bytes] = []
        self.cut_next_answer = False

    def connectionMade(self) -> None:
        host, port = self.proxy.target
        protocol.ClientCreator(reactor, _ToServer, self).connectTCP(host, port).addErrback(
            lambda _: self.transport.loseConnection())

    def server_connected(self, server: _ToServer) -> None:
        self.server = server
        for data in self.buffer:
            server.transport.write(data)
        self.buffer = []

    def dataReceived(self, data: bytes) -> None:
        armed = self.proxy.armed
        if armed is not None and armed in data:
            self.proxy.armed = None
            self.cut_next_answer = True
        if self.server is None:
            self.buffer.append(data)
        else:
            self.server.transport.write(data)

    def from_server(self, data: bytes) -> None:
        if self.cut_next_answer:
            self.cut_next_answer = False
            self.proxy.cuts += 1
            self.transport.abortConnection()
            if self.server is not None:
                self.server.transport.abortConnection()
            return
        self.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.server is not None:
            self.server.transport.loseConnection()


class CuttingProxy(protocol.Factory):
    """
    @ivar armed: the bytes of the statement whose answer to swallow (once), or None.
    @ivar cuts: how many answers were swallowed.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.armed: bytes | None = None
        self.cuts = 0

    def buildProtocol(self, addr: Any) -> _FromClient:
        return _FromClient(self)


class PostgresLostAckTests(PostgresStoreFactory, unittest.TestCase):
    """
    Real cuts after commit, through the proxy.
    """

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        direct = urlsplit(pg_dsn(self.db_name))
        self.proxy = CuttingProxy((direct.hostname or "127.0.0.1", direct.port or 5432))
        self.port = reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        url = direct._replace(netloc=f"{direct.username or 'postgres'}@127.0.0.1:"
                                     f"{self.port.getHost().port}").geturl()
        self.store = open_store(url, reactor, pool_size=2)
        await self.store.start()
        for name in ("zone", "cluster", "l2Network", "l3Network", "ipRange"):
            await self.store.insert(name, TOPOLOGY[name])
        await self.store.add_host(TOPOLOGY["host"])

    @async_to_deferred
    async def tearDown(self) -> None:
        await self.store.stop()
        await self.port.stopListening()
        await self.tearDown_database()

    async def committed(self, sql: str) -> Any:
        """
        Read the database directly (not through the proxy or the store).
        """
        def read() -> Any:
            import psycopg2

            conn = psycopg2.connect(pg_dsn(self.db_name))
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    return cur.fetchall()
            finally:
                conn.close()

        return await threads.deferToThread(read)

    async def io_error(self, d: defer.Deferred) -> None:
        try:
            result = await d
        except Exception as e:
            self.assertEqual(error_of(e).code, SYS.IO_ERROR, str(e))
        else:
            self.fail(f"the answer was not cut: {result!r}")

    @async_to_deferred
    async def test_reservation_commit_answer_lost(self) -> None:
        """
        Fault (issue 8 item 12): the connection is cut after the server committed a
        reservation and before its answer arrived; the caller gets SYS.1016 and retries,
        and the retry took the capacity a second time. Now the capacity is taken once.
        """
        vm = ("VmInstanceVO", "vm-lost-ack")
        self.proxy.armed = b"host_capacity_holders"
        await self.io_error(self.store.reserve_host_capacity("host-1", 4, 100, vm))
        self.assertEqual(self.proxy.cuts, 1)
        rows = await self.committed(
            "SELECT available_cpu_capacity, available_memory_capacity FROM hosts")
        self.assertEqual(rows, [(12, 924)], "the server committed before the cut")
        host = await self.store.reserve_host_capacity("host-1", 4, 100, vm)
        self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                         (12, 924))
        self.assertEqual(await self.store.audit_capacity(), [])
        # The release's answer is lost too: the retry gives nothing back twice.
        self.proxy.armed = b"host_capacity_holders"
        await self.io_error(self.store.release_host_capacity("host-1", vm))
        host = await self.store.release_host_capacity("host-1", vm)
        self.assertEqual(host["availableCpuCapacity"], 16)
        self.assertEqual(self.proxy.cuts, 2)

    @async_to_deferred
    async def test_ip_insert_answer_lost(self) -> None:
        """
        Fault (issue 8 item 12): an address allocated (committed in autocommit mode) whose
        answer was lost; the retry allocated a second address for the same NIC. Now the
        retry answers the address the first attempt took.
        """
        nic = ("VmNicVO", "nic-lost-ack")
        self.proxy.armed = b"INSERT INTO used_ips"
        await self.io_error(self.store.allocate_ip("l3-1", nic))
        rows = await self.committed("SELECT ip, holder_uuid FROM used_ips")
        self.assertEqual(len(rows), 1, "the server committed before the cut")
        again = await self.store.allocate_ip("l3-1", nic)
        self.assertEqual((again["ip"], again["holderUuid"]), rows[0])
        total = (await self.store.query("usedIp", Query(count=True))).total
        self.assertEqual(total, 1)

