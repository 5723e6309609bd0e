"""
The host service, deterministically: LocalBus, the in-memory agent pair and the in-memory
store (L{MemoryStore}: the real schema and SQL, held to the store contract) on one
task.Clock.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from agent import protocol as p
from agent.hypervisor.simulator import parse_latency
from tests.agent_fakes import InMemoryPair, base
from zcontrol.agentclient.client import AGENT_LOST_WORK
from zcontrol.agentclient.errors import AGENT
from zcontrol.bus._pending import deadline_scope
from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.memory import MemoryStore
from zcontrol.db.query import Query
from zcontrol.services.cluster.messages import CLUSTER
from zcontrol.services.host import (
    HOST,
    SERVICE_ID,
    AddHostMsg,
    HostConfig,
    HostService,
    HostStatusChangedEvent,
    IHostService,
    PingHostMsg,
    VmStateChangedOnHostEvent,
    agent_base_url,
    canonical_agent_url,
)


class DownHTTP:
    """
    An HTTP client whose every POST is refused (the agent is down).
    """

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return fail(ConnectionRefusedError())

    def flush(self) -> None:
        pass


class HungHTTP:
    """
    An HTTP client whose every POST stays unanswered (a hung peer).
    """

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return Deferred()

    def flush(self) -> None:
        pass


class HostServiceTestCase(SynchronousTestCase):
    """
    One clock, one LocalBus, the in-memory store (zone C{z} and cluster C{c} seeded), an
    in-memory agent with 8 hosts.
    """

    config = HostConfig(ping_interval=60, ping_timeout=5, max_ping_failures=3,
                        connect_timeout=10, echo_interval=1, echo_timeout=2,
                        command_timeout=30, vm_sync_on_ping=False)
    latency: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = InMemoryPair(host_count=8, clock=self.clock, latency=dict(self.latency))
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)
        self.seed("zone", {"uuid": "z", "name": "zone"})
        self.seed("cluster", {"uuid": "c", "name": "cluster", "zoneUuid": "z",
                              "hypervisorType": "KVM"})
        self.service = HostService(self.clock, self.bus, self.store, self.pair.client,
                                   self.config)
        self.service.start(track=False)
        self.events: list[Any] = []
        self.bus.subscribe("host.#", self.events.append)

    def pump(self, seconds: float = 0.0) -> None:
        """
        Run the clock (bus deliveries are scheduled on it) and flush the HTTP stubs.
        """
        for _ in range(20):
            self.pair.flush()
            self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
            for _ in range(20):
                self.pair.flush()
                self.clock.advance(0)

    def stop_store(self) -> None:
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def result(self, d: Deferred) -> Any:
        """
        The result of C{d}, once the store operations it waits for have run.
        """
        self.pump()
        return self.successResultOf(d)

    def seed(self, resource: str, values: dict[str, Any]) -> dict[str, Any]:
        """
        Insert a row directly (as another service or an operator would have).
        """
        return self.result(self.store.insert(resource, values))

    def seed_host(self, uuid: str, status: str, management_ip: str) -> dict[str, Any]:
        return self.seed("host", {"uuid": uuid, "name": uuid, "zoneUuid": "z",
                                  "clusterUuid": "c", "hypervisorType": "KVM",
                                  "managementIp": management_ip, "status": status})

    def seed_vm(self, uuid: str, host_uuid: str, state: str) -> dict[str, Any]:
        return self.seed("vmInstance", {"uuid": uuid, "name": uuid, "hostUuid": host_uuid,
                                        "state": state, "cpuNum": 1, "memorySize": 1})

    def vm_states(self) -> dict[str, str]:
        """
        Every stored VM's state, by uuid.
        """
        page = self.result(self.store.query("vmInstance", Query(fields=["uuid", "state"])))
        return {vm["uuid"]: vm["state"] for vm in page.inventories}

    def row(self, resource: str, uuid: str) -> dict[str, Any] | None:
        """
        The stored row, read through the store (None when there is none).
        """
        return self.result(self.store.get(resource, uuid))

    def add(self, i: int, name: str | None = None) -> Any:
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name=name or f"host-{i}",
                                     zone_uuid="z", cluster_uuid="c", uuid=f"h{i}",
                                     management_ip=base(i)))
        self.pump()
        return d

    def statuses(self) -> list[tuple[str, str | None, str]]:
        return [(e.host_uuid, e.old_status, e.new_status) for e in self.events
                if isinstance(e, HostStatusChangedEvent)]


class AddConnectTests(HostServiceTestCase):
    """
    Adding and connecting hosts.
    """

    def test_interface(self) -> None:
        """
        HostService provides IHostService.
        """
        self.assertTrue(verifyObject(IHostService, self.service))

    def test_add_host(self) -> None:
        """
        An added host ends Connected with its capacity in the store, its facts known, a
        callback secret agreed, and a status event.
        """
        reply = self.successResultOf(self.add(1))
        self.assertTrue(reply.success, reply.error)
        row = self.row("host", "h1")
        self.assertEqual(row["status"], "Connected")
        self.assertEqual((row["cpuNum"], row["totalCpuCapacity"]), (32, 32))
        self.assertEqual(row["totalMemoryCapacity"], 128 * 1024**3)
        self.assertEqual(reply.inventory["status"], "Connected")
        self.assertEqual(self.service.facts("h1").hypervisor_type, "KVM")
        self.assertIsNotNone(self.pair.client.secret_for(base(1)))
        self.assertEqual(self.statuses(), [("h1", "Connecting", "Connected")])

    def test_add_unreachable_host(self) -> None:
        """
        A host whose agent never answers echo is removed again: HOST.1000 wrapping the
        connect failure.
        """
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name="x", zone_uuid="z",
                                     cluster_uuid="c", uuid="hx",
                                     management_ip=base(99)))
        for _ in range(15):
            self.pump(1)
        reply = self.successResultOf(d)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, HOST.ADD_ERROR)
        self.assertTrue(reply.error.has_code(HOST.CONNECT_ERROR))
        self.assertIsNone(self.row("host", "hx"))

    def test_add_rolls_back_per_flow(self) -> None:
        """
        Fault (issue 8 item 17): add_host rolled back by hand in one C{except} block, so a
        failing delete replaced the real error (no HOST.1000) and skipped the rest of the
        rollback (the callback secret agreed at connect stayed). As a FlowChain each flow
        undoes its own work: the secret is forgotten even when the row's delete fails, and
        the reply is HOST.1000 carrying the connect failure and the rollback error.
        """
        self.store.set_host_capacity = lambda *a, **k: fail(  # type: ignore[method-assign]
            OperationError.of(SYS.IO_ERROR, "store down"))
        self.store.delete = lambda *a, **k: fail(  # type: ignore[method-assign]
            OperationError.of(SYS.IO_ERROR, "store still down"))
        reply = self.successResultOf(self.add(3))
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, HOST.ADD_ERROR)
        self.assertTrue(reply.error.has_code(HOST.CONNECT_ERROR))
        self.assertIn("store still down", str(reply.error.to_dict()))
        self.assertIsNone(self.pair.client.secret_for(base(3)))
        self.flushLoggedErrors()

    def test_echo_until_up(self) -> None:
        """
        The connect echoes until the agent answers, then proceeds.
        """
        client = self.pair.client
        real = client._http
        client._http = DownHTTP()
        d = self.add(2)
        self.pump(1)
        self.pump(1)
        self.assertNoResult(d)
        client._http = real
        self.pump(1)
        self.assertTrue(self.successResultOf(d).success)

    def test_add_with_unreachable_callback_url(self) -> None:
        """
        Fault (issue 8, host add item 3): with a wrong C{http.public_url} agents call back to
        a URL where nothing listens; the agent accepts the connect's first asynchronous
        command (C{/host/fact}) but its callback never arrives, and the add failed after
        the command timeout with "no callback after Ns" only. The error now says that the
        agent accepted the command but its callback never reached this node, and names the
        callback URL the node gave (so the operator checks C{http.public_url}).
        """
        self.pair.to_endpoint.stub = DownHTTP()
        d = self.add(4)
        self.pump(self.config.command_timeout)
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, HOST.ADD_ERROR)
        self.assertTrue(reply.error.has_code(HOST.CONNECT_ERROR))
        timeout = reply.error.root_cause()
        self.assertEqual(timeout.code, SYS.TIMEOUT)
        self.assertIn("accepted the command but its callback never reached", timeout.details)
        self.assertIn(self.pair.client.callback_url, timeout.details)
        self.assertEqual(timeout.opaque["callbackUrl"], self.pair.client.callback_url)
        self.assertIn("http.public_url", str(reply.error))
        self.assertIsNone(self.row("host", "h4"))
        self.flushLoggedErrors()

    def test_agent_down_echo_attempts_logged(self) -> None:
        """
        Fault (issue 8, host add item 2): adding a host whose agent is down echoed it every
        C{echo_interval} until C{connect_timeout} and logged nothing per attempt, and the
        final error said neither how many attempts were made nor why they failed. Failed
        echoes are now logged at info, rate-limited (the first, then every 10th), and the
        error's details give the attempts and the last reason.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.pair.client._http = DownHTTP()
        config = attrs.evolve(self.config, connect_timeout=25)
        self.service.config = config
        d = self.add(5)
        for _ in range(30):
            self.pump(1)
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, HOST.ADD_ERROR)
        [echo] = [e for e in reply.error.chain() if e.opaque.get("attempts")]
        self.assertEqual(echo.code, SYS.TIMEOUT)
        self.assertEqual(echo.opaque["attempts"], 25)
        self.assertIn("25 attempt(s)", echo.details)
        self.assertIn("ConnectionRefusedError", echo.opaque["lastError"])
        self.assertIn("last error", echo.details)
        self.assertIn("ConnectionRefusedError", echo.details)
        logged = [e for e in events if "echo attempt" in e.get("log_format", "")]
        self.assertEqual([e["n"] for e in logged], [1, 10, 20])
        self.assertTrue(all(e["log_level"] == LogLevel.info for e in logged))
        self.assertIn("ConnectionRefusedError", formatEvent(logged[0]))
        self.assertIn(base(5), formatEvent(logged[0]))
        self.assertIsNone(self.row("host", "h5"))

    def test_duplicate_add(self) -> None:
        """
        Adding a host uuid twice fails with HOST.1000.
        """
        self.successResultOf(self.add(1))
        reply = self.successResultOf(self.add(1))
        self.assertEqual(reply.error.code, HOST.ADD_ERROR)

    def test_add_host_at_a_taken_management_ip(self) -> None:
        """
        Fault (issue 8 item 14): these tests ran on a hand-written store fake without the
        schema's constraints (and reading every query condition as C{=}), so they passed on
        what no real store does. Here the fake added a second host at the management IP of
        a Connected one, and its connect took that agent over (a new callback secret). The
        real stores (so the memory store) refuse the duplicate C{managementIp}: HOST.1000,
        no row, the agent never contacted, the first host untouched.
        """
        self.successResultOf(self.add(1))
        secret = self.pair.client.secret_for(base(1))
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name="twin", zone_uuid="z",
                                     cluster_uuid="c", uuid="h2", management_ip=base(1)))
        self.pump()
        reply = self.successResultOf(d)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, HOST.DUPLICATE_MANAGEMENT_IP)
        self.assertIsNone(self.row("host", "h2"))
        self.assertEqual(self.pair.client.secret_for(base(1)), secret)
        self.assertEqual(self.row("host", "h1")["status"], "Connected")
        self.assertEqual(self.statuses(), [("h1", "Connecting", "Connected")])

    def add_at(self, uuid: str, management_ip: str) -> Any:
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name=f"n-{uuid}", zone_uuid="z",
                                     cluster_uuid="c", uuid=uuid,
                                     management_ip=management_ip))
        self.pump()
        return self.successResultOf(d)

    def assert_taken(self, reply: Any, value: str, existing: str, agent_url: str) -> None:
        self.assertFalse(reply.success)
        err = reply.error
        self.assertEqual(err.code, HOST.DUPLICATE_MANAGEMENT_IP)
        self.assertEqual(err.opaque["field"], "managementIp")
        self.assertEqual(err.opaque["value"], value)
        self.assertEqual(err.opaque["existingHostUuid"], existing)
        self.assertEqual(err.opaque["agentUrl"], agent_url)
        self.assertIn("managementIp", err.details)
        self.assertIn(value, err.details)
        self.assertIn(existing, err.details)
        self.assertNotIn("DB.", str(err))
        self.assertNotIn("UNIQUE", str(err))

    def test_taken_management_ip_is_a_host_error(self) -> None:
        """
        Fault (issue 8, host add item 1): a second host at a taken management address
        failed with the store's raw text (C{DB.1000 ... UNIQUE constraint failed:
        hosts.management_ip}). It is now found before inserting and refused with C{HOST.1004}
        whose details name the field C{managementIp}, the value and the existing host.
        """
        self.assertTrue(self.successResultOf(self.add(1)).success)
        reply = self.add_at("h2", base(1))
        self.assert_taken(reply, base(1), "h1", base(1))
        self.assertIsNone(self.row("host", "h2"))

    def test_spellings_of_one_agent_are_one_host(self) -> None:
        """
        Fault (issue 8, host add item 1): C{http://127.0.0.1:7070}, C{.../hosts/0} and
        C{127.0.0.1} (port 7070 by default) name the same agent host but were accepted as
        three hosts (each a new callback secret, the previous host's taken over). Addresses
        are compared as one canonical agent base URL; the stored C{managementIp} stays what
        the user gave.
        """
        self.assertTrue(self.add_at("h0", "http://agent.example:7070").success)
        secret = self.pair.client.secret_for("http://agent.example:7070")
        for i, spelling in enumerate([
            "agent.example", "AGENT.example", "http://agent.example:7070/",
            "HTTP://Agent.Example:7070/hosts/0", "http://agent.example:7070/hosts/0/",
        ]):
            reply = self.add_at(f"t{i}", spelling)
            self.assert_taken(reply, spelling, "h0", "http://agent.example:7070")
            self.assertIsNone(self.row("host", f"t{i}"))
        self.assertEqual(self.row("host", "h0")["managementIp"], "http://agent.example:7070")
        self.assertEqual(self.pair.client.secret_for("http://agent.example:7070"), secret)
        # Another simulated host of the same agent is another host.
        self.assertTrue(self.add_at("h3", base(3)).success)
        self.assert_taken(self.add_at("t9", base(3) + "/"), base(3) + "/", "h3", base(3))

    def test_concurrent_add_of_the_same_address(self) -> None:
        """
        Fault (issue 8, host add item 1): when a concurrent add of the same address wins
        the store's unique key between the check and the insert, the loser must still get
        C{HOST.1004} naming the winner, not the store's C{DB.1000} text.
        """
        real = self.store.add_host

        def racing(values: dict[str, Any]) -> Deferred:
            self.store.add_host = real  # type: ignore[method-assign]
            winner = {"uuid": "winner", "name": "winner", "zoneUuid": "z",
                      "clusterUuid": "c", "hypervisorType": "KVM",
                      "managementIp": values["managementIp"], "status": "Connected"}
            return real(winner).addCallback(lambda _: real(values))

        self.store.add_host = racing  # type: ignore[method-assign]
        reply = self.add_at("h2", base(2))
        self.assert_taken(reply, base(2), "winner", base(2))
        self.assertIsNone(self.row("host", "h2"))
        self.assertIsNone(self.pair.client.secret_for(base(2)))

    def test_concurrent_add_of_another_spelling(self) -> None:
        """
        Fault (issue 8, host add item 1): two concurrent adds of one agent under different
        spellings both pass the check before inserting and the unique key (on the text)
        does not stop them. The check after inserting makes the later one roll back with
        C{HOST.1004}; the other host stays.
        """
        real = self.store.add_host

        def racing(values: dict[str, Any]) -> Deferred:
            self.store.add_host = real  # type: ignore[method-assign]
            winner = {"uuid": "winner", "name": "winner", "zoneUuid": "z",
                      "clusterUuid": "c", "hypervisorType": "KVM",
                      "managementIp": "agent.example", "status": "Connected"}
            return real(winner).addCallback(lambda _: real(values))

        self.store.add_host = racing  # type: ignore[method-assign]
        reply = self.add_at("h0", "http://agent.example:7070/hosts/0")
        self.assert_taken(reply, "http://agent.example:7070/hosts/0", "winner",
                          "http://agent.example:7070")
        self.assertIsNone(self.row("host", "h0"))
        self.assertIsNotNone(self.row("host", "winner"))
        self.assertEqual(self.statuses(), [])

    def test_malformed_management_ip(self) -> None:
        """
        A management address that is no host name, IP or agent URL is refused with
        C{SYS.1007} naming the field, before anything is stored or sent.
        """
        for bad in ["", " 10.0.0.5", "ftp://10.0.0.5", "http://10.0.0.5:70x0",
                    "http://:7070", "http://10.0.0.5:7070?x=1"]:
            reply = self.add_at("hb", bad)
            self.assertEqual(reply.error.code, SYS.INVALID_ARGUMENT_ERROR, bad)
            self.assertEqual(reply.error.opaque["field"], "managementIp")
            self.assertIsNone(self.row("host", "hb"))

    def test_canonical_agent_url(self) -> None:
        """
        Every spelling of one agent base URL has one canonical form.
        """
        for spelling in ["127.0.0.1", "http://127.0.0.1:7070", "http://127.0.0.1:7070/",
                         "HTTP://127.0.0.1:7070/hosts/0", "http://127.0.0.1:7070/hosts/0/"]:
            self.assertEqual(canonical_agent_url(spelling, 7070), "http://127.0.0.1:7070")
        self.assertEqual(canonical_agent_url("http://Node-A:7070/hosts/17/", 7070),
                         "http://node-a:7070/hosts/17")
        self.assertEqual(canonical_agent_url("http://10.0.0.5", 7070), "http://10.0.0.5:80")
        self.assertEqual(canonical_agent_url("https://10.0.0.5/", 7070),
                         "https://10.0.0.5:443")
        self.assertEqual(canonical_agent_url("http://[0:0::1]:7070", 7070),
                         "http://[::1]:7070")
        self.assertEqual(canonical_agent_url("10.0.0.5", 9000), "http://10.0.0.5:9000")

    def test_add_host_to_unknown_cluster(self) -> None:
        """
        Fault (issue 8 item 14): the store fake had no foreign keys, so a host was added
        (and connected) in a cluster that does not exist. The real stores refuse it:
        CLUSTER.1000 naming the cluster (checked before the insert), no row, no callback
        secret agreed with the agent.
        """
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name="stray", zone_uuid="z",
                                     cluster_uuid="no-such-cluster", uuid="h2",
                                     management_ip=base(2)))
        self.pump()
        reply = self.successResultOf(d)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, CLUSTER.NOT_FOUND)
        self.assertEqual((reply.error.opaque["field"], reply.error.opaque["uuid"]),
                         ("clusterUuid", "no-such-cluster"))
        self.assertIsNone(self.row("host", "h2"))
        self.assertIsNone(self.pair.client.secret_for(base(2)))
        self.assertEqual(self.statuses(), [])

    def test_management_ip_forms(self) -> None:
        """
        A URL is the agent base URL; a bare IP gets the agent port.
        """
        self.assertEqual(agent_base_url("http://a:1/hosts/2/", 7070), "http://a:1/hosts/2")
        self.assertEqual(agent_base_url("10.0.0.5", 7070), "http://10.0.0.5:7070")


class PingTests(HostServiceTestCase):
    """
    Pings, disconnection and reconnection.
    """

    def setUp(self) -> None:
        super().setUp()
        self.successResultOf(self.add(1))
        del self.events[:]

    def ping(self) -> Any:
        d = self.bus.send(PingHostMsg(service_id=SERVICE_ID, host_uuid="h1",
                                      resource_uuid="h1"))
        self.pump()
        return self.successResultOf(d)

    def test_ping_ok(self) -> None:
        """
        A ping of a healthy host replies connected.
        """
        reply = self.ping()
        self.assertTrue(reply.connected)
        self.assertEqual(self.statuses(), [])

    def test_disconnect_after_n_failures_then_reconnect(self) -> None:
        """
        Three failed pings make the host Disconnected (an event), and the automatic reconnect
        fails while the agent is down; once it is back, the next ping reconnects it.
        """
        client = self.pair.client
        real = client._http
        client._http = DownHTTP()
        self.assertTrue(self.ping().connected)
        self.assertTrue(self.ping().connected)
        reply = self.ping()
        self.assertFalse(reply.connected)
        for _ in range(15):
            self.pump(1)
        self.assertEqual(self.row("host", "h1")["status"], "Disconnected")
        self.assertEqual(self.statuses()[0], ("h1", "Connected", "Disconnected"))
        client._http = real
        self.ping()
        self.pump()
        self.assertEqual(self.row("host", "h1")["status"], "Connected")

    def test_other_uuid_forces_reconnect(self) -> None:
        """
        A ping answered without our host uuid (the agent restarted) forces a reconnect,
        with a new secret.
        """
        old = self.pair.client.secret_for(base(1))
        self.pair.agent.crash_host("1")
        self.ping()
        self.pump()
        self.assertEqual(self.row("host", "h1")["status"], "Connected")
        self.assertNotEqual(self.pair.client.secret_for(base(1)), old)
        self.assertEqual(self.statuses(), [("h1", "Connected", "Connecting"),
                                           ("h1", "Connecting", "Connected")])

    def test_track_once(self) -> None:
        """
        The tracker pings every host this node owns, with a parallelism bound.
        """
        for i in (2, 3, 4):
            self.successResultOf(self.add(i))
        d = self.service.track_once()
        self.pump()
        self.assertEqual(self.successResultOf(d), 4)

    def test_track_pages_through_every_host(self) -> None:
        """
        The tracker lists the hosts a page at a time (sorted by uuid, C{page_size} rows from
        C{start}), on the store's real paging: with 5 hosts and pages of 2, and with 4 (the
        last page empty), every host is pinged once.
        """
        self.service.config = attrs.evolve(self.config, page_size=2)
        for i in (2, 3, 4):
            self.successResultOf(self.add(i))
        accepted = []
        real = self.service._ping

        async def counted(host_uuid: str) -> Any:
            accepted.append(host_uuid)
            return await real(host_uuid)

        self.service._ping = counted  # type: ignore[method-assign]
        self.assertEqual(self.result(self.service.track_once()), 4)
        self.successResultOf(self.add(5))
        self.assertEqual(self.result(self.service.track_once()), 5)
        self.assertEqual(sorted(accepted), sorted(["h1", "h2", "h3", "h4"] * 2 + ["h5"]))

    def test_reconnect_all(self) -> None:
        """
        reconnect_all agrees new secrets with every host (as at boot) with a parallelism
        bound; a host that cannot be reached ends Disconnected.
        """
        self.successResultOf(self.add(2))
        self.seed_host("h9", "Connected", base(99))
        old = self.pair.client.secret_for(base(1))
        d = self.service.reconnect_all(parallelism=2)
        for _ in range(15):
            self.pump(1)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertNotEqual(self.pair.client.secret_for(base(1)), old)
        self.assertEqual(self.row("host", "h9")["status"], "Disconnected")

    def test_tracker_rounds_do_not_overlap(self) -> None:
        """
        Fault (issue 8 item 9): a tracking round slower than the ping interval (hung agents:
        each ping waits its timeout) did not delay the next one, so rounds piled up, each
        listing every host again. A round now starts only once the previous one ended.
        """
        self.service.stop()
        config = attrs.evolve(self.config, ping_interval=1, auto_reconnect=False)
        service = HostService(self.clock, self.bus, self.store, self.pair.client, config)
        rounds = []
        real = service._my_hosts

        async def counted() -> list[str]:
            rounds.append(self.clock.seconds())
            return await real()

        service._my_hosts = counted  # type: ignore[method-assign]
        service.start()
        self.pair.client._http = HungHTTP()  # every ping waits its 5 s timeout
        for _ in range(12):
            self.pump(1)
        self.assertGreater(service.skipped_rounds, 0)
        self.assertLessEqual(len(rounds), 3)
        for earlier, later in zip(rounds, rounds[1:], strict=False):
            self.assertGreaterEqual(later - earlier, 5)
        d = service.stop()
        for _ in range(15):
            self.pump(1)
        self.successResultOf(d)

    def test_periodic_tracking(self) -> None:
        """
        Started with tracking, the service pings on its interval; stop ends it.
        """
        self.service.stop()
        service = HostService(self.clock, self.bus, self.store, self.pair.client, self.config)
        service.start()
        client = self.pair.client
        client._http = DownHTTP()
        for _ in range(3):
            self.pump(60)
        for _ in range(15):  # the automatic reconnect fails too
            self.pump(1)
        self.assertEqual(self.row("host", "h1")["status"], "Disconnected")
        self.assertIn(("h1", "Connected", "Disconnected"), self.statuses())
        d = service.stop()
        for _ in range(15):
            self.pump(1)
        self.successResultOf(d)


class CommandTests(HostServiceTestCase):
    """
    Commands through the host's chain.
    """

    latency = {"*": parse_latency("const:1")}

    def test_chain_bounds_commands_per_host(self) -> None:
        """
        At most host_sync_level (10) commands are in flight to one host; the rest wait.
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.assertTrue(self.successResultOf(reply_d).success)
        accepted = self.pair.agent.stats["accepted"]
        calls = [self.service.call("h1", p.HostCapacityCmd()) for _ in range(15)]
        self.pump()
        self.assertEqual(self.pair.agent.stats["accepted"] - accepted, 10)
        self.pump(1)
        self.assertEqual(self.pair.agent.stats["accepted"] - accepted, 15)
        self.pump(1)
        for d in calls:
            self.assertTrue(self.successResultOf(d).success)

    def test_time_queued_counts_against_timeout(self) -> None:
        """
        Fault (issue 8 item 6): with 10 slots per host and a slow agent (1 s per command), the
        30th call with a 1 s timeout waited two rounds in the host's chain and only then
        started its 1 s timeout, failing after 3 s. The timeout now runs from the call: it
        fails at 1 s and is never sent.

        Fault (issue 8 items 6/7): such a command failed with the chain's SYS.1001 ("it did
        not run") while the agent client says AGENT.1000 for a command that only waited; it
        now fails with AGENT.1000 too, the chain's SYS.1001 as its cause.
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.assertTrue(self.successResultOf(reply_d).success)
        accepted = self.pair.agent.stats["accepted"]
        calls = [self.service.call("h1", p.HostCapacityCmd()) for _ in range(29)]
        last = self.service.call("h1", p.HostCapacityCmd(), timeout=1)
        self.pump()
        self.assertNoResult(last)
        self.pump(1)
        err = self.failureResultOf(last, OperationError).value.error
        self.assertEqual(err.code, AGENT.NOT_SENT)
        self.assertIn("not sent", err.details)
        self.assertEqual(err.cause.code, SYS.TIMEOUT)
        for _ in range(3):
            self.pump(1)
        for d in calls:
            self.assertTrue(self.successResultOf(d).success)
        self.assertEqual(self.pair.agent.stats["accepted"] - accepted, 29)

    def test_bus_deadline_caps_queued_command(self) -> None:
        """
        Fault (issue 8 item 6): a command queued in a host's chain ran after the deadline of
        the message that caused it had passed, and its agent call ignored that deadline.
        Under a bus deadline, the queued command fails at that deadline without being sent,
        and a started one's agent call times out at it.
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.successResultOf(reply_d)
        accepted = self.pair.agent.stats["accepted"]
        self.pair.to_endpoint.stub = HungHTTP()  # the agent's callbacks never arrive
        start = self.clock.seconds()
        calls = [deadline_scope(start + 2, self.service.call, "h1", p.HostCapacityCmd())
                 for _ in range(11)]
        self.pump()
        self.pump(2)
        codes = [self.failureResultOf(d, OperationError).value.error.code for d in calls]
        self.assertEqual(codes, [SYS.TIMEOUT] * 10 + [AGENT.NOT_SENT])
        # Ten were sent and timed out at the deadline, the 11th never was.
        self.assertEqual(self.pair.agent.stats["accepted"] - accepted, 10)
        self.assertEqual(len(self.pair.client), 0)

    def test_agent_restart_fails_pending_commands(self) -> None:
        """
        Fault (issue 8 item 8): when a ping showed that the agent had restarted (it answers
        as never connected), the commands it had accepted waited out their 300 s timeout.
        They now fail at once with AGENT.1001, and the host is reconnected.
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.successResultOf(reply_d)
        d = self.service.call("h1", p.HostCapacityCmd(), timeout=300)
        self.pump()
        self.assertNoResult(d)
        self.pair.agent.crash_host("1")
        ping = self.bus.send(PingHostMsg(service_id=SERVICE_ID, host_uuid="h1",
                                         resource_uuid="h1"))
        self.pump()
        self.successResultOf(ping)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, AGENT_LOST_WORK)
        self.assertIn("restarted", err.details)
        for _ in range(5):
            self.pump(1)
        self.assertEqual(self.row("host", "h1")["status"], "Connected")

    def test_stop_is_bounded(self) -> None:
        """
        Fault (issue 8 item 9): a stop did not wait for the commands in the hosts' chains, and
        nothing failed them, so a node stopping with a 300 s command in flight either left it
        hanging or (waiting for it) never exited. Now the stop drains for at most
        C{drain_timeout} (10 s), then fails the running and the waiting commands with
        SYS.1017 saying that the host service is stopping; the waiting one never runs.
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.successResultOf(reply_d)
        self.pair.to_endpoint.stub = HungHTTP()  # the agent's callbacks never arrive
        accepted = self.pair.agent.stats["accepted"]
        running = [self.service.call("h1", p.HostCapacityCmd(), timeout=300)
                   for _ in range(10)]
        waiting = self.service.call("h1", p.HostCapacityCmd(), timeout=300)
        self.pump()
        stopped = self.service.stop()
        self.pump(9)
        self.assertNoResult(stopped)
        self.assertNoResult(running[0])
        self.pump(1)
        self.successResultOf(stopped)
        for d in running + [waiting]:
            err = self.failureResultOf(d, OperationError).value.error
            self.assertEqual(err.code, SYS.CANCEL)
        self.assertEqual(self.pair.agent.stats["accepted"] - accepted, 10)
        self.assertEqual(len(self.pair.client), 0)
        self.flushLoggedErrors()

    def test_stop_drains_quickly_when_idle(self) -> None:
        """
        With nothing in flight, a stop is immediate (the drain limit is only an upper bound).
        """
        self.successResultOf(self.service.stop())

    def test_reconnect_after_agent_restart_fails_pending_commands(self) -> None:
        """
        Fault (issue 8 item 8): a reconnect to an agent that had restarted (so the commands
        it had accepted are gone) left those commands waiting out their timeout. The ping
        that precedes /host/connect shows the restart and they fail at once (AGENT.1001).
        """
        reply_d = self.add(1)
        for _ in range(5):
            self.pump(1)
        self.successResultOf(reply_d)
        d = self.service.call("h1", p.HostCapacityCmd(), timeout=300)
        self.pump()
        self.assertNoResult(d)
        self.pair.agent.crash_host("1")
        connected = self.service.connect("h1")
        self.pump()
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         AGENT_LOST_WORK)
        for _ in range(5):
            self.pump(1)
        self.assertEqual(self.successResultOf(connected)["status"], "Connected")

    def test_not_connected(self) -> None:
        """
        A command to a host that is not Connected fails with HOST.1002; to an unknown host
        with HOST.1003.
        """
        self.seed_host("hz", "Disconnected", base(5))
        to_hz = self.service.call("hz", p.HostCapacityCmd())
        to_nope = self.service.call("nope", p.HostCapacityCmd())
        self.pump()
        self.assertEqual(
            self.failureResultOf(to_hz, OperationError).value.error.code, HOST.NOT_CONNECTED)
        self.assertEqual(
            self.failureResultOf(to_nope, OperationError).value.error.code, HOST.NOT_FOUND)


class TakeOverTests(HostServiceTestCase):
    """
    Note [take over]: a Connected host this node holds no callback secret for (another node
    connected it, and left the ring).
    """

    def setUp(self) -> None:
        super().setUp()
        self.successResultOf(self.add(1))
        self.agent_url = agent_base_url(self.row("host", "h1")["managementIp"],
                                        self.config.agent_port)
        # as on the node that takes h1 over: the row says Connected, no secret here
        self.pair.client.forget(self.agent_url, "connected by another node")
        del self.events[:]

    def test_command_reconnects_first_once(self) -> None:
        """
        Fault: on the node that took a host over, every command to it failed (no callback
        secret) for ever. Now the first commands reconnect it once, then run.
        """
        calls = [self.service.call("h1", p.HostCapacityCmd()) for _ in range(5)]
        for _ in range(5):
            self.pump(1)
        for d in calls:
            self.assertTrue(self.successResultOf(d).success)
        self.assertIsNotNone(self.pair.client.secret_for(self.agent_url))
        self.assertEqual(self.statuses(), [("h1", "Connected", "Connecting"),
                                           ("h1", "Connecting", "Connected")])

    def test_ping_reconnects(self) -> None:
        """
        Fault: a ping that the agent answers with the host's uuid left such a host alone, so
        its callbacks and reports kept going to the node that had left. Now it reconnects.
        """
        d = self.bus.send(PingHostMsg(service_id=SERVICE_ID, host_uuid="h1",
                                      resource_uuid="h1"))
        for _ in range(5):
            self.pump(1)
        self.assertTrue(self.successResultOf(d).connected)
        self.assertIsNotNone(self.pair.client.secret_for(self.agent_url))
        self.assertEqual(self.row("host", "h1")["status"], "Connected")


class VmSyncTests(HostServiceTestCase):
    """
    VM state reconciliation, with the VM service deciding (Note [VM states]): a VM service
    and the host allocator run on the same bus and store.
    """

    def setUp(self) -> None:
        super().setUp()
        from zcontrol.scheduler.service import HostAllocatorService
        from zcontrol.services.vm.service import VmService

        self.vms = VmService(self.clock, self.bus, self.store)
        self.allocator = HostAllocatorService(self.clock, self.bus, self.store)
        self.allocator.start()
        self.result(self.vms.start())
        self.successResultOf(self.add(1))
        hv = self.pair.cluster.backends("1").hypervisor
        from agent.hypervisor.interfaces import VmSpec

        self.successResultOf(hv.start_vm(VmSpec(uuid="vm-a", name=None, cpu_num=1,
                                                memory_size=1)))
        for vm, state in (("vm-a", "Stopped"), ("vm-b", "Running"), ("vm-c", "Starting")):
            self.seed_vm(vm, "h1", state)
        del self.events[:]

    def test_sync(self) -> None:
        """
        The VM service makes the store follow the host for stable states (the Stopped VM
        the host runs takes its capacity, the Running one it does not gives it back and
        leaves the host); a VM in an operation is left alone; each change is an event.
        """
        d = self.service.sync_vms("h1")
        self.pump()
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.vm_states(),
                         {"vm-a": "Running", "vm-b": "Stopped", "vm-c": "Starting"})
        b = self.row("vmInstance", "vm-b")
        self.assertEqual((b["hostUuid"], b["lastHostUuid"]), (None, "h1"))
        held = self.result(self.store.host_capacity_holders("h1"))
        self.assertEqual([h["holderUuid"] for h in held["holders"]], ["vm-a"])
        self.assertEqual(self.result(self.store.audit_capacity()), [])
        changes = {(e.vm_uuid, e.from_state, e.to_state) for e in self.events
                   if isinstance(e, VmStateChangedOnHostEvent)}
        self.assertEqual(changes, {("vm-a", "Stopped", "Running"),
                                   ("vm-b", "Running", "Stopped")})

    def test_sync_without_vm_service(self) -> None:
        """
        The host service never writes a VM's state itself: with no VM service to decide,
        the sync changes nothing (the reports fail, logged) and says so.
        """
        self.result(self.vms.stop())
        d = self.service.sync_vms("h1")
        self.pump()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.vm_states(),
                         {"vm-a": "Stopped", "vm-b": "Running", "vm-c": "Starting"})

    def test_sync_on_ping(self) -> None:
        """
        With vm_sync_on_ping, a successful ping reconciles the VMs.
        """
        self.service.config = HostConfig(vm_sync_on_ping=True)
        self.result(self.service.ping("h1"))
        self.pump()
        self.assertEqual(self.row("vmInstance", "vm-a")["state"], "Running")

    def test_report(self) -> None:
        """
        An agent's VM state report changes the store once; a Stopped report of an unknown
        VM is ignored; a Running one is a stranger, reported (an event), not adopted.
        """
        from zcontrol.services.vm.hoststate import StrangerVmFoundEvent

        strangers: list[Any] = []
        self.bus.subscribe(StrangerVmFoundEvent.topic, strangers.append)
        cmd = p.ReportVmStateCmd(host_uuid="h1", vm_uuid="vm-b", vm_state="Stopped")
        self.assertTrue(self.result(self.service.report_vm_state(cmd)))
        self.assertFalse(self.result(self.service.report_vm_state(cmd)))
        ghost = p.ReportVmStateCmd(host_uuid="h1", vm_uuid="ghost", vm_state="Stopped")
        self.assertFalse(self.result(self.service.report_vm_state(ghost)))
        self.assertEqual(strangers, [])
        ghost = p.ReportVmStateCmd(host_uuid="h1", vm_uuid="ghost", vm_state="Running")
        self.assertFalse(self.result(self.service.report_vm_state(ghost)))
        self.pump()
        self.assertEqual([(e.vm_uuid, e.host_uuid, e.known_state) for e in strangers],
                         [("ghost", "h1", None)])
        self.assertIsNone(self.row("vmInstance", "ghost"))

    def test_sync_queries_exactly_its_host(self) -> None:
        """
        Fault: the VM sync built its query condition as text (C{f"hostUuid={uuid}"}), and
        the condition parser trims the text, so the sync of host C{"h1 "} read the VMs of
        host C{h1} and reconciled them against the wrong agent's list (here marking h1's
        running vm-b Stopped). The condition is now a L{Condition}: the value is taken as
        is, on every store. (AddHostMsg now refuses such a uuid, C{SYS.1007}; the row is
        made in the store, as one written before that check would be.)
        """
        d = self.bus.send(AddHostMsg(service_id=SERVICE_ID, name="h1-twin", zone_uuid="z",
                                     cluster_uuid="c", uuid="h1 ", management_ip=base(2)))
        self.pump()
        self.assertEqual(self.successResultOf(d).error.opaque["field"], "uuid")
        self.result(self.store.add_host({
            "uuid": "h1 ", "name": "h1-twin", "zoneUuid": "z", "clusterUuid": "c",
            "managementIp": base(2), "hypervisorType": "KVM", "status": "Connecting"}))
        self.assertEqual(self.result(self.service.connect("h1 "))["status"], "Connected")
        del self.events[:]
        self.assertEqual(self.result(self.service.sync_vms("h1 ")), 0)
        self.assertEqual(self.vm_states(),
                         {"vm-a": "Stopped", "vm-b": "Running", "vm-c": "Starting"})
        self.assertEqual([e for e in self.events if isinstance(e, VmStateChangedOnHostEvent)],
                         [])

    def test_unknown_message(self) -> None:
        """
        The handler refuses messages it does not know.
        """
        self.assertRaises(OperationError, self.service.handle, object())
