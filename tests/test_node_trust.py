"""
Issue 8 item 10, through a whole management node: the node's config tree carries the bootstrap
token and the TLS settings; a host on a TLS agent requiring that token is added over HTTPS
both ways, and an agent requiring another token refuses the node with AGENT.1002.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from agent import protocol as p
from agent import tap
from agent.app import CallbackPolicy
from agent.bootstrap import TOKEN_FILE, ensure_token_file, read_token_file
from agent.http import (
    DEFAULT_POOL_SIZE,
    QuietSite,
    make_http_client,
    make_pool,
    server_tls_options,
    trust_root_from_pem,
)
from tests.agent_fakes import add_kvm_host, make_agent, seed_zone_and_cluster
from tests.test_agent_tls import make_self_signed
from zcontrol.agentclient import AgentClient
from zcontrol.agentclient.client import DEFAULT_MAX_IN_FLIGHT_PER_HOST
from zcontrol.agentclient.errors import AGENT
from zcontrol.config import AgentsConfig, ConfigError, load_config
from zcontrol.node import make_node
from zcontrol.services.host import HOST


class NodeTrustTests(TestCase):
    """
    A whole node (embedded store and bus) and a TLS agent on the real reactor.
    """

    def setUp(self) -> None:
        self.cert, self.key = make_self_signed(self.mktemp())
        self.token_file = os.path.abspath(self.mktemp())
        with open(self.token_file, "w") as f:
            f.write("operator-token\n")

    def agent(self, token: str) -> str:
        pool = make_pool(reactor, 10)
        self.addCleanup(pool.closeCachedConnections)
        http = make_http_client(reactor, pool, trust_root=trust_root_from_pem(self.cert))
        agent, _ = make_agent(http, reactor, host_count=2,
                              policy=CallbackPolicy(time_slice=None, timeout=10.0))
        agent.bootstrap_token = token
        port = reactor.listenSSL(0, QuietSite(agent.app.resource()),
                                 server_tls_options(self.cert, self.key), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return p.host_base_url(f"https://127.0.0.1:{port.getHost().port}", 1)

    async def add_host(self, base: str) -> Any:
        config = load_config(None, {
            "node": {"id": "mn-trust", "data_dir": os.path.abspath(self.mktemp())},
            "http": {"port": 0, "tls_cert": self.cert, "tls_key": self.key},
            "agents": {"bootstrap_token_file": self.token_file, "tls_ca": self.cert}})
        node = make_node(config, reactor)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        self.assertTrue(node.agents.callback_url.startswith("https://"))
        await seed_zone_and_cluster(node.store)
        reply = await add_kvm_host(node.bus, base)
        row = await node.store.get("host", "h1")
        # Fault: the TLS callback connections were only closed by the channel's 60 s idle
        # timeout (a TLS transport with a producer registered never starts its shutdown).
        await node.stopService().addTimeout(10, reactor)
        return reply, row

    async def test_add_host_over_tls_with_token(self) -> None:
        """
        Fault (issue 8 item 10a, c): the node had no setting for a bootstrap token or TLS. With
        [agents] bootstrap_token_file, tls_ca and [http] tls_cert/tls_key, a host on a TLS agent
        requiring the token is added and Connected (its capacity came back by callback over
        HTTPS).
        """
        reply, row = await self.add_host(self.agent("operator-token"))
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(row["status"], "Connected")
        self.assertGreater(row["totalCpuCapacity"], 0)

    async def test_wrong_token_is_reported(self) -> None:
        """
        An agent requiring another token refuses the node; the reply names AGENT.1002 in its
        cause chain and the host is not added.
        """
        reply, row = await self.add_host(self.agent("another-token"))
        self.assertFalse(reply.success)
        codes = []
        error = reply.error
        while error is not None:
            codes.append(error.code)
            error = error.cause
        self.assertIn(AGENT.TOKEN_REFUSED, codes)
        self.assertIsNone(row)


class NodeAddHostFaultTests(TestCase):
    """
    Issue 8, host add items 1 and 3, through a whole node (embedded store) and a real TLS
    agent: the errors a new user meets name what to fix.
    """

    setUp = NodeTrustTests.setUp

    def agent(self, token: str, attempts: int = 15) -> str:
        """
        A TLS agent (2 hosts) requiring C{token}, whose callbacks are tried C{attempts}
        times; its host 1's base URL. The cleanup waits until it has given up its callbacks.
        """
        pool = make_pool(reactor, 10)
        self.addCleanup(pool.closeCachedConnections)
        http = make_http_client(reactor, pool, trust_root=trust_root_from_pem(self.cert))
        agent, _ = make_agent(http, reactor, host_count=2, policy=CallbackPolicy(
            time_slice=None, timeout=10.0, max_attempts=attempts))
        agent.bootstrap_token = token
        port = reactor.listenSSL(0, QuietSite(agent.app.resource()),
                                 server_tls_options(self.cert, self.key), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: agent.drain().addTimeout(10, reactor))
        return p.host_base_url(f"https://127.0.0.1:{port.getHost().port}", 1)

    async def node(self, **sections: Any) -> Any:
        tree: dict[str, Any] = {
            "node": {"id": "mn-hostadd", "data_dir": os.path.abspath(self.mktemp())},
            "http": {"port": 0, "tls_cert": self.cert, "tls_key": self.key},
            "agents": {"bootstrap_token_file": self.token_file, "tls_ca": self.cert}}
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        node = make_node(load_config(None, tree), reactor)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        await seed_zone_and_cluster(node.store)
        return node

    def add(self, node: Any, uuid: str, management_ip: str) -> Any:
        return add_kvm_host(node.bus, management_ip, uuid)

    async def test_wrong_public_url_names_the_callback_url(self) -> None:
        """
        Fault (issue 8, host add item 3): with a wrong C{http.public_url} (nothing listens
        there) the agent accepts the connect's asynchronous commands but its callbacks never
        arrive, and add-host failed after the timeout saying only "no callback". The error
        now says the agent accepted the command but its callback never reached the node,
        and names the callback URL the node gave.
        """
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        public = f"https://127.0.0.1:{closed.getHost().port}"
        await closed.stopListening()
        node = await self.node(http={"public_url": public},
                               host={"command_timeout": 2.0, "connect_timeout": 10.0})
        reply = await self.add(node, "h1", self.agent("operator-token", attempts=1))
        self.assertFalse(reply.success)
        text = str(reply.error)
        self.assertIn("accepted the command but its callback never reached", text)
        self.assertIn(public, text)
        self.assertIn(node.agents.callback_url, text)
        self.assertIn("http.public_url", text)
        self.assertIsNone(await node.store.get("host", "h1"))
        await node.stopService().addTimeout(10, reactor)

    async def test_second_spelling_of_a_host_is_refused(self) -> None:
        """
        Fault (issue 8, host add item 1): a second add of a connected agent host, spelt
        differently (a trailing slash), was accepted as another host; the same text gave the
        store's raw C{DB.1000 UNIQUE constraint} text. Both are now C{HOST.1004} naming
        C{managementIp}, the value and the existing host, and the first host stays
        Connected.
        """
        node = await self.node()
        base = self.agent("operator-token")
        reply = await self.add(node, "h1", base)
        self.assertTrue(reply.success, reply.error)
        for uuid, spelling in (("h2", base), ("h3", base + "/")):
            reply = await self.add(node, uuid, spelling)
            self.assertFalse(reply.success)
            self.assertEqual(reply.error.code, HOST.DUPLICATE_MANAGEMENT_IP)
            self.assertEqual(reply.error.opaque["field"], "managementIp")
            self.assertEqual(reply.error.opaque["value"], spelling)
            self.assertEqual(reply.error.opaque["existingHostUuid"], "h1")
            self.assertNotIn("UNIQUE", str(reply.error))
            self.assertIsNone(await node.store.get("host", uuid))
        self.assertEqual((await node.store.get("host", "h1"))["status"], "Connected")
        await node.stopService().addTimeout(10, reactor)


class DefaultTokenTests(TestCase):
    """
    Issue 8 item 10, secure by default: a node with no token configured used to connect
    agents without one, and agents without one accepted anyone. Now the node keeps its token
    in C{<data_dir>/agent-token} and C{twistd zagent --bootstrap-token-file} reads that file.
    """

    def setUp(self) -> None:
        self.data_dir = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.data_dir, TOKEN_FILE)

    def node(self, agents: dict[str, Any] | None = None) -> Any:
        config = load_config(None, {
            "node": {"id": "mn-token", "data_dir": self.data_dir},
            "store": {"url": "sqlite://:memory:"},
            "http": {"port": 0},
            "agents": agents or {}})
        node = make_node(config, reactor)
        self.addCleanup(node.agents.close, "test over")
        return node

    def test_token_file_created_and_reused(self) -> None:
        """
        Fault (issue 8 item 10, default): a node without a configured token had none. Its
        first start creates <data_dir>/agent-token (mode 0600, a fresh token) and uses it;
        later starts reuse it.
        """
        first = self.node().agents.bootstrap_token
        self.assertIsNotNone(first)
        self.assertGreaterEqual(len(first), 40)
        self.assertEqual(read_token_file(self.path), first)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.node().agents.bootstrap_token, first)

    def test_agent_side_created_first(self) -> None:
        """
        When C{make run-agent} ran first (C{python -m agent.bootstrap var/agent-token}), the
        node takes that token.
        """
        token, created = ensure_token_file(self.path)
        self.assertTrue(created)
        self.assertEqual(self.node().agents.bootstrap_token, token)

    def test_explicit_config_wins(self) -> None:
        """
        agents.bootstrap_token, or the file agents.bootstrap_token_file names, takes
        precedence over the data directory's file, which is then not created; a configured
        file that is missing is an error (never created: the operator manages it).
        """
        self.assertEqual(self.node({"bootstrap_token": "cfg"}).agents.bootstrap_token, "cfg")
        other = os.path.abspath(self.mktemp())
        with open(other, "w") as f:
            f.write("from-file\n")
        node = self.node({"bootstrap_token_file": other})
        self.assertEqual(node.agents.bootstrap_token, "from-file")
        self.assertFalse(os.path.lexists(self.path))
        e = self.assertRaises(ConfigError, self.node,
                              {"bootstrap_token_file": other + ".missing"})
        self.assertIn("agents.bootstrap_token_file", str(e))
        self.assertFalse(os.path.lexists(other + ".missing"))

    def test_corrupt_token_file(self) -> None:
        """
        An empty token file in the data directory stops the node with an error naming it; it
        is not replaced (agents holding the old token would be locked out).
        """
        os.makedirs(self.data_dir)
        with open(self.path, "w") as f:
            f.write("\n")
        e = self.assertRaises(ConfigError, self.node)
        self.assertIn(self.path, str(e))
        with open(self.path) as f:
            self.assertEqual(f.read(), "\n")

    async def test_make_run_pairing(self) -> None:
        """
        C{make run} then C{make run-agent}: a node with a data dir and no token configured,
        and a C{twistd zagent --bootstrap-token-file <data_dir>/agent-token} agent (built from
        its twistd options): a host on that agent is added and Connected. The same agent
        refuses a node with another data dir (hence another token) with AGENT.1002.
        """
        node = self.node()
        options = tap.Options()
        options.parseOptions(["--port", "0", "--hosts", "2", "--callback-time-slice", "-1",
                              "--bootstrap-token-file", self.path])
        agent = tap.build_agent(options, reactor)
        self.assertEqual(agent.bootstrap_token, node.agents.bootstrap_token)
        port = reactor.listenTCP(0, QuietSite(agent.app.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # The agent's callback pool (built inside build_agent, as twistd does).
        pool = getattr(getattr(agent._http, "_agent", None), "_pool", None)
        if pool is not None:
            self.addCleanup(pool.closeCachedConnections)
        base = p.host_base_url(f"http://127.0.0.1:{port.getHost().port}", 1)
        reply, row = await _add_host(self, node, base)
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(row["status"], "Connected")
        self.assertGreater(row["totalCpuCapacity"], 0)

        self.data_dir = os.path.abspath(self.mktemp())
        stranger = self.node()
        reply, row = await _add_host(self, stranger, base)
        self.assertFalse(reply.success)
        self.assertIn(AGENT.TOKEN_REFUSED, _codes(reply.error))
        self.assertIsNone(row)


async def _add_host(case: TestCase, node: Any, base: str) -> Any:
    case.addCleanup(lambda: node.running and node.stopService())
    await node.startService()
    await seed_zone_and_cluster(node.store)
    reply = await add_kvm_host(node.bus, base)
    row = await node.store.get("host", "h1")
    await node.stopService().addTimeout(10, reactor)
    return reply, row


def _codes(error: Any) -> list[str]:
    codes = []
    while error is not None:
        codes.append(error.code)
        error = error.cause
    return codes


class AgentsConfigTests(TestCase):
    """
    The agent client's pool and in-flight limits come from [agents].
    """

    def test_limits_from_config(self) -> None:
        """
        Fault (issue 8 item 17, agents): AgentClient.create's pool size and in-flight limits
        were hard-coded in make_node. [agents] pool_size, max_in_flight and
        max_in_flight_per_host reach the node's agent client.
        """
        config = load_config(None, {
            "node": {"id": "mn-limits", "data_dir": os.path.abspath(self.mktemp())},
            "store": {"url": "sqlite://:memory:"},
            "agents": {"bootstrap_token": "t", "pool_size": 7, "max_in_flight": 50,
                       "max_in_flight_per_host": 5}})
        self.assertEqual((config.agents.pool_size, config.agents.max_in_flight,
                          config.agents.max_in_flight_per_host), (7, 50, 5))
        node = make_node(config, reactor)
        self.addCleanup(node.agents.close, "test over")
        self.assertEqual(node.agents._pool.maxPersistentPerHost, 7)
        self.assertEqual(node.agents._sem.limit, 50)
        self.assertEqual(node.agents._per_host, 5)

    def test_defaults(self) -> None:
        """
        The defaults are the client's: max_in_flight follows pool_size.
        """
        config = load_config(None, {"agents": {"bootstrap_token": "t", "pool_size": 9}})
        self.assertIsNone(config.agents.max_in_flight)
        self.assertEqual(AgentsConfig().pool_size, DEFAULT_POOL_SIZE)
        self.assertEqual(AgentsConfig().max_in_flight_per_host, DEFAULT_MAX_IN_FLIGHT_PER_HOST)
        agents = AgentClient.create(reactor, "", pool_size=config.agents.pool_size,
                                    max_in_flight=config.agents.max_in_flight)
        self.addCleanup(agents.close, "test over")
        self.assertEqual(agents._sem.limit, 9)

    def test_invalid(self) -> None:
        """
        Non-positive or ill-typed limits are refused naming the key, in the config and in
        AgentClient.create.
        """
        for key in ("pool_size", "max_in_flight", "max_in_flight_per_host"):
            for value in (0, -3, "many", 1.5, True):
                e = self.assertRaises(ConfigError, load_config,
                                      None, {"agents": {key: value}})
                self.assertIn(f"agents.{key}", str(e))
            self.assertRaises(ValueError, AgentClient.create, reactor, "", **{key: 0})
        e = self.assertRaises(ConfigError, load_config, None, {"agents": {"pool": 3}})
        self.assertIn("agents.pool", str(e))
