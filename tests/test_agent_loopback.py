"""
The callback path over real loopback HTTP: a real agent (klein, listenTCP on an OS-chosen port)
and the real agent client with its callback endpoint (listenTCP on an OS-chosen port), in one
process on the real reactor.
"""

from __future__ import annotations

import random
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase

from agent import protocol as p
from agent.app import AgentApp, CallbackPolicy, Faults
from agent.console import ConsolePlugin
from agent.http import QuietSite, make_http_client, make_pool
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig, parse_latency
from agent.kvm import KvmPlugin
from agent.vrouter import VRouterPlugin
from zcontrol.agentclient import AgentClient, CallbackEndpoint
from zcontrol.agentclient import callback_site as callback_site_for
from zcontrol.core.errors import SYS, OperationError


async def _drain_async(factory: WrappingFactory) -> None:
    for protocol in list(factory.protocols):
        protocol.transport.loseConnection()
    for _ in range(500):
        if not factory.protocols:
            return
        await deferLater(0.01)
    raise AssertionError(f"{len(factory.protocols)} server connections did not close")


def _drain(factory: WrappingFactory) -> defer.Deferred:
    """
    Close the server side of every connection to C{factory} and wait until they are gone.
    """
    return defer.Deferred.fromCoroutine(_drain_async(factory))


class LoopbackTestCase(TestCase):
    """
    Starts an agent serving 50 hosts and a client with its callback endpoint.
    """

    faults = Faults()
    latency: dict[str, Any] = {}
    #: the simulated hosts (slots) the agent serves
    host_count = 50

    def agent_plugins(self) -> list[Any]:
        """
        The agent's plugins (a subclass adds e.g. storage or backup storage).
        """
        return [KvmPlugin(), ConsolePlugin(), VRouterPlugin()]

    def setUp(self) -> None:
        rng = random.Random(3)
        cluster = SimulatedCluster(SimulatorConfig(clock=reactor, rng=rng,
                                                   latency=dict(self.latency)))
        #: the agent's simulated hosts (downloads, NFS exports, per-host backends)
        self.simulated = cluster
        agent_pool = make_pool(reactor, 1000)
        self.agent = AgentApp(
            clock=reactor,
            http=make_http_client(reactor, agent_pool),
            backend_factory=cluster.backends,
            plugins=self.agent_plugins(),
            host_count=self.host_count,
            faults=self.faults,
            policy=CallbackPolicy(max_attempts=3, initial_delay=0.05),
            rng=rng,
            reset_host=cluster.reset,
        )
        agent_site = WrappingFactory(QuietSite(self.agent.app.resource()))
        agent_port = reactor.listenTCP(0, agent_site, backlog=1024, interface="127.0.0.1")
        self.agent_url = f"http://127.0.0.1:{agent_port.getHost().port}"
        self.client = AgentClient.create(reactor, "", pool_size=1000, default_timeout=30)
        self.endpoint = CallbackEndpoint(self.client)
        callback_site = WrappingFactory(callback_site_for(self.endpoint))
        callback_port = reactor.listenTCP(0, callback_site, backlog=1024, interface="127.0.0.1")
        self.client.callback_url = (
            f"http://127.0.0.1:{callback_port.getHost().port}{self.endpoint.path}"
        )
        self.plain_pool = make_pool(reactor, 10)
        self.plain = make_http_client(reactor, self.plain_pool)
        # Cleanups run last-in first-out: close the pools, drop the server side of the
        # connections, then stop listening.
        self.addCleanup(agent_port.stopListening)
        self.addCleanup(callback_port.stopListening)
        self.addCleanup(_drain, agent_site)
        self.addCleanup(_drain, callback_site)
        self.addCleanup(agent_pool.closeCachedConnections)
        self.addCleanup(self.plain_pool.closeCachedConnections)
        self.addCleanup(self.client.close)
        self.addCleanup(self.agent.drain)

    def base(self, i: int) -> str:
        return p.host_base_url(self.agent_url, i)

    def when_accepted(self) -> defer.Deferred[str]:
        """
        A Deferred firing with the task uuid of the next command the agent accepts (fired
        from the agent's accept path, so no polling), failing after 5 s.
        """
        accepted: defer.Deferred[str] = defer.Deferred()
        accept = self.agent._accepted

        def accepting(definition, handler, host, taskuuid, *rest):
            accept(definition, handler, host, taskuuid, *rest)
            if not accepted.called:
                self.agent._accepted = accept
                accepted.callback(taskuuid)

        self.agent._accepted = accepting
        return accepted.addTimeout(5, reactor)

    async def post_callback(self, headers: dict, body: bytes) -> int:
        response = await self.plain.post(self.client.callback_url, data=body, headers=headers)
        await treq.content(response)
        return response.code


class CallbackPathTests(LoopbackTestCase):
    """
    The callback path end to end.
    """

    def test_connect_and_commands(self) -> defer.Deferred:
        """
        echo, connect, then asynchronous commands complete through signed callbacks, on
        several simulated hosts of one agent process.
        """

        async def go() -> None:
            await self.client.call(self.base(7), p.EchoCmd())
            for i in (0, 7, 49):
                await self.client.connect(self.base(i), f"host-{i}")
            rsp = await self.client.call(self.base(7), p.StartVmCmd(
                vm_instance_uuid="vm", cpu_num=2, memory_size=2048))
            self.assertTrue(rsp.success)
            capacity = await self.client.call(self.base(7), p.HostCapacityCmd())
            self.assertEqual(capacity.used_cpu, 2)
            other = await self.client.call(self.base(49), p.HostCapacityCmd())
            self.assertEqual(other.used_cpu, 0)
            ping = await self.client.call(self.base(49), p.PingCmd(host_uuid="host-49"))
            self.assertEqual(ping.host_uuid, "host-49")
            self.assertEqual(len(self.client), 0)

        return defer.Deferred.fromCoroutine(go())

    def test_thousand_in_flight(self) -> defer.Deferred:
        """
        1,000 commands in flight at once over loopback all complete; none is lost.
        """

        async def go() -> None:
            hosts = range(50)
            await defer.gatherResults([self.client.connect(self.base(i), f"h{i}") for i in hosts])
            calls = [self.client.call(self.base(n % 50), p.HostCapacityCmd())
                     for n in range(1000)]
            results = await defer.gatherResults(calls, consumeErrors=True)
            self.assertEqual(len(results), 1000)
            self.assertTrue(all(r.success for r in results))
            self.assertEqual(len(self.client), 0)
            self.assertEqual(self.agent.stats["accepted"], 1000)
            self.assertEqual(self.client.stats["completed"], 1000)

        return defer.Deferred.fromCoroutine(go())

    def test_duplicate_callback(self) -> defer.Deferred:
        """
        The first callback wins; the same callback again gets 404.
        """

        async def go() -> None:
            await self.client.connect(self.base(1), "h1")
            rsp = await self.client.call(self.base(1), p.HostCapacityCmd())
            [taskuuid] = list(self.agent.tasks._seen)
            body = rsp.to_json()
            secret = self.client.secret_for(self.base(1))
            headers = {"taskuuid": taskuuid, p.SIGNATURE_HEADER: p.sign(secret, taskuuid, body)}
            self.assertEqual(await self.post_callback(headers, body), 404)

        return defer.Deferred.fromCoroutine(go())

    def test_malformed_json(self) -> defer.Deferred:
        """
        A callback for no pending task gets 404 before its body is looked at (a body is
        parsed only once its signature is verified); one without taskuuid gets 400.
        """

        async def go() -> None:
            self.assertEqual(await self.post_callback({"taskuuid": "t"}, b"{nope"), 404)
            self.assertEqual(await self.post_callback({}, b"{}"), 400)

        return defer.Deferred.fromCoroutine(go())


class SlowAgentTests(LoopbackTestCase):
    """
    Against an agent whose commands take 0.3 s.
    """

    latency = {"*": parse_latency("const:0.3")}

    def test_forged_callback(self) -> defer.Deferred:
        """
        A forged (unsigned or wrongly signed) callback for a pending task gets 403 and
        completes nothing; the genuine callback then completes it.
        """

        async def go() -> None:
            await self.client.connect(self.base(2), "h2")
            accepted = self.when_accepted()
            d = self.client.call(self.base(2), p.HostCapacityCmd())
            taskuuid = await accepted
            forged = p.HostCapacityRsp(cpu_num=999).to_json()
            self.assertEqual(await self.post_callback({"taskuuid": taskuuid}, forged), 403)
            bad = {"taskuuid": taskuuid, p.SIGNATURE_HEADER: p.sign("guess", taskuuid, forged)}
            self.assertEqual(await self.post_callback(bad, forged), 403)
            self.assertTrue(self.client.is_pending(taskuuid))
            rsp = await d
            self.assertEqual(rsp.cpu_num, 32)

        return defer.Deferred.fromCoroutine(go())


    def test_crash_mid_task(self) -> defer.Deferred:
        """
        The host crashes while the command runs: no callback, the call times out (SYS.1001)
        and its pending entry is gone.
        """

        async def go() -> None:
            await self.client.connect(self.base(6), "h6")
            accepted = self.when_accepted()
            d = self.client.call(self.base(6), p.HostCapacityCmd(), timeout=1.5)
            # Crash as soon as the agent has accepted (the work takes 0.3 s).
            await accepted
            self.assertEqual(self.agent.stats["accepted"], 1)
            self.agent.crash_host("6")
            try:
                await d
            except OperationError as e:
                self.assertEqual(e.error.code, SYS.TIMEOUT)
            else:
                self.fail("no timeout")
            self.assertEqual(len(self.client), 0)
            self.assertEqual(self.agent.stats["callbacks"], 0)

        return defer.Deferred.fromCoroutine(go())


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class NeverCallbackTests(LoopbackTestCase):
    """
    An agent that never calls back.
    """

    faults = Faults(never_callback_rate=1.0)

    def test_timeout(self) -> defer.Deferred:
        """
        The call times out with SYS.1001 naming the URL, and its pending entry is gone.
        """

        async def go() -> None:
            await self.client.connect(self.base(3), "h3")
            d = self.client.call(self.base(3), p.HostCapacityCmd(), timeout=0.3)
            self.assertEqual(len(self.client), 1)
            try:
                await d
            except OperationError as e:
                self.assertEqual(e.error.code, SYS.TIMEOUT)
                self.assertIn(self.base(3) + "/host/capacity", e.error.details)
            else:
                self.fail("no timeout")
            self.assertEqual(len(self.client), 0)

        return defer.Deferred.fromCoroutine(go())


class CrashAfterAcceptTests(LoopbackTestCase):
    """
    An agent whose host crashes right after accepting.
    """

    faults = Faults(crash_after_accept_rate=1.0)

    def test_crash_times_out(self) -> defer.Deferred:
        """
        The call times out (SYS.1001); afterwards the host refuses commands (409: not
        connected) until it is connected again.
        """

        async def go() -> None:
            await self.client.connect(self.base(4), "h4")
            try:
                await self.client.call(self.base(4), p.HostCapacityCmd(), timeout=0.3)
            except OperationError as e:
                self.assertEqual(e.error.code, SYS.TIMEOUT)
            else:
                self.fail("no timeout")
            self.assertEqual(len(self.client), 0)
            try:
                await self.client.call(self.base(4), p.HostCapacityCmd(), timeout=5)
            except OperationError as e:
                self.assertEqual((e.error.code, e.error.opaque["status"]), (SYS.HTTP_ERROR, 409))
            else:
                self.fail("accepted by a crashed host")

        return defer.Deferred.fromCoroutine(go())


class UnreachableAgentTests(TestCase):
    """
    No agent listening.
    """

    def test_connection_refused(self) -> defer.Deferred:
        """
        Connecting to a port nobody listens on fails with SYS.1016.
        """
        client = AgentClient.create(reactor, "http://127.0.0.1:9/cb")
        self.addCleanup(client.close)
        client._secrets["http://127.0.0.1:1"] = "s"

        async def go() -> None:
            try:
                await client.call("http://127.0.0.1:1", p.HostCapacityCmd(), timeout=5)
            except OperationError as e:
                self.assertEqual(e.error.code, SYS.IO_ERROR)
            else:
                self.fail("no error")
            self.assertEqual(len(client), 0)

        return defer.Deferred.fromCoroutine(go())


class _Silent(Protocol):
    """
    Reads whatever comes and never answers (a hung agent that still accepts TCP).
    """


class HungAgentTests(TestCase):
    """
    An "agent" that accepts TCP connections and never answers, over real loopback TCP.
    """

    def test_unanswered_post_gives_up(self) -> defer.Deferred:
        """
        Fault (issue 8 item 7): a POST to a host that accepts TCP and never answers had no
        timeout of its own: it held its connection slots until the command's timeout (30 s
        here, 300 s by default). It now fails after the client's accept_timeout with
        SYS.1001 saying the agent did not answer, for asynchronous and synchronous commands;
        the slots are free and no connection is left open.
        """
        site = WrappingFactory(Factory.forProtocol(_Silent))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(_drain, site)
        client = AgentClient.create(reactor, "http://127.0.0.1:9/cb", pool_size=4)
        client.accept_timeout = 0.2
        self.addCleanup(client.close)
        base_url = f"http://127.0.0.1:{port.getHost().port}"
        client._secrets[base_url] = "s"

        async def go() -> None:
            started = reactor.seconds()
            for cmd in (p.HostCapacityCmd(), p.EchoCmd()):
                try:
                    await client.call(base_url, cmd, timeout=30)
                except OperationError as e:
                    self.assertEqual(e.error.code, SYS.TIMEOUT)
                    self.assertIn("did not answer the POST within 0.2s", e.error.details)
                else:
                    self.fail("answered by a silent agent")
            self.assertLess(reactor.seconds() - started, 5)
            self.assertEqual(len(client), 0)
            self.assertEqual((client._sem.tokens, client._host_slots), (4, {}))
            self.assertEqual(client._suspect, {base_url})

        return defer.Deferred.fromCoroutine(go())
