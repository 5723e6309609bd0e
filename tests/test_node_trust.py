"""
Issue 8 item 10, through a whole management node: the node's config tree carries the bootstrap
token and the TLS settings; a host on a TLS agent requiring that token is added over HTTPS
both ways, and an agent requiring another token refuses the node with AGENT.1002.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from agent import protocol as p
from agent.app import CallbackPolicy
from agent.http import (
    QuietSite,
    make_http_client,
    make_pool,
    server_tls_options,
    trust_root_from_pem,
)
from tests.agent_fakes import make_agent
from tests.test_agent_tls import make_self_signed
from zcontrol.agentclient.errors import AGENT
from zcontrol.config import load_config
from zcontrol.node import make_node
from zcontrol.services.host import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host import AddHostMsg


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
        await node.store.insert("zone", {"uuid": "z", "name": "zone"})
        await node.store.insert("cluster", {"uuid": "c", "name": "cluster", "zoneUuid": "z",
                                            "hypervisorType": "KVM"})
        reply = await node.bus.send(AddHostMsg(
            service_id=HOST_SERVICE, name="h", zone_uuid="z", cluster_uuid="c", uuid="h1",
            management_ip=base))
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
