"""
The management node's service tree, configuration and twistd plugins.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceMaker, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from agent import protocol as p
from agent.app import Faults
from tests.agent_fakes import add_kvm_host, seed_zone_and_cluster
from tests.bus_contract import SERVICE, ContractEcho, ContractEchoReply
from tests.test_agent_loopback import LoopbackTestCase
from zcontrol import identity
from zcontrol.config import ConfigError, load_config
from zcontrol.core.errors import SYS
from zcontrol.db.memory import MemoryStore
from zcontrol.identity import NODE_ID_FILE, resolve_node_id
from zcontrol.node import HeartbeatService, OrderedMultiService, make_node
from zcontrol.tap import Options


class Recorder(Service):
    def __init__(self, name, events, start=None, stop=None):
        self.setName(name)
        self.events = events
        self._start = start
        self._stop = stop

    def startService(self):
        Service.startService(self)
        self.events.append(("start", self.name))
        return self._start if self._start is not None else succeed(None)

    def stopService(self):
        Service.stopService(self)
        self.events.append(("stop", self.name))
        return self._stop if self._stop is not None else succeed(None)


class OrderedMultiServiceTests(SynchronousTestCase):
    def test_start_in_order_stop_in_reverse(self):
        """
        A child starts only once the previous one is up; stop goes in reverse and waits
        for each child.
        """
        events = []
        slow_start, slow_stop = Deferred(), Deferred()
        root = OrderedMultiService()
        Recorder("store", events, start=slow_start).setServiceParent(root)
        Recorder("bus", events, stop=slow_stop).setServiceParent(root)
        Recorder("http", events).setServiceParent(root)
        d = root.startService()
        self.assertEqual(events, [("start", "store")])
        slow_start.callback(None)
        self.successResultOf(d)
        self.assertEqual(events[1:], [("start", "bus"), ("start", "http")])
        stopped = root.stopService()
        self.assertEqual(events[3:], [("stop", "http"), ("stop", "bus")])
        self.assertNoResult(stopped)
        slow_stop.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(events[5:], [("stop", "store")])

    def test_start_failure_stops_what_started(self):
        """
        When a child fails to start, the children already up are stopped and the failure
        is reported.
        """
        events, failures = [], []
        root = OrderedMultiService(on_start_failure=failures.append)
        Recorder("store", events).setServiceParent(root)
        Recorder("bus", events, start=fail(RuntimeError("no broker"))).setServiceParent(root)
        Recorder("http", events).setServiceParent(root)
        self.failureResultOf(root.startService(), RuntimeError)
        self.assertEqual(events, [("start", "store"), ("start", "bus"), ("stop", "store")])
        self.assertEqual(len(failures), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_stop_during_start(self):
        """
        A stop that comes while a child is still starting waits for it, then stops what
        is up.
        """
        events = []
        slow = Deferred()
        root = OrderedMultiService()
        Recorder("store", events, start=slow).setServiceParent(root)
        root.startService()
        stopped = root.stopService()
        self.assertNoResult(stopped)
        slow.callback(None)
        self.successResultOf(stopped)
        self.assertIn(("stop", "store"), events)


    def test_stop_is_bounded(self):
        """
        Fault (issue 8 item 9): a child whose stop never finished (a store waiting for a hung
        query, an AMQP queue deletion without an answer) kept the node from ever exiting.
        Each child's stop now has a drain limit: past it the stop is abandoned (logged) and
        the next child stops.
        """
        events, clock = [], Clock()
        hung = Deferred()
        root = OrderedMultiService(drain_timeout=20, clock=clock)
        Recorder("store", events).setServiceParent(root)
        Recorder("bus", events, stop=hung).setServiceParent(root)
        self.successResultOf(root.startService())
        stopped = root.stopService()
        self.assertEqual(events[2:], [("stop", "bus")])
        clock.advance(19)
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(events[3:], [("stop", "store")])
        self.assertTrue(hung.called)  # cancelled
        self.flushLoggedErrors()


class HeartbeatTests(SynchronousTestCase):
    def test_beats_and_leaves(self):
        """
        The heartbeat writes the node's row at start and every interval, and deletes it on
        stop.
        """
        clock = Clock()
        store = MemoryStore(clock)
        self.successResultOf(store.start())
        # What the store wrote: the uuid of each heartbeat row, the deleted node rows.
        beats, deleted = [], []
        heartbeat, delete = store.heartbeat, store.delete_management_node

        def recorded_heartbeat(*args, **kwargs):
            return heartbeat(*args, **kwargs).addCallback(
                lambda row: beats.append(row["uuid"]) or row)

        def recorded_delete(uuid):
            return delete(uuid).addCallback(lambda gone: deleted.append(uuid) or gone)

        store.heartbeat, store.delete_management_node = recorded_heartbeat, recorded_delete
        svc = HeartbeatService(store, "mn-1", clock, interval=5)
        started = svc.startService()
        clock.advance(0)
        self.successResultOf(started)
        clock.advance(5)
        clock.advance(5)
        self.assertEqual(beats, ["mn-1"] * 3)
        live = store.live_management_nodes(60)
        clock.advance(0)
        self.assertEqual([(n["uuid"], n["heartbeat"]) for n in self.successResultOf(live)],
                         [("mn-1", 10.0)])
        stopped = svc.stopService()
        clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(deleted, ["mn-1"])
        live = store.live_management_nodes(60)
        clock.advance(0)
        self.assertEqual(self.successResultOf(live), [])
        self.successResultOf(store.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self):
        """
        Without a file or options: LocalBus, SQLite under ./var, HTTP on 8080.
        """
        c = load_config()
        self.assertEqual(c.bus.backend, "local")
        self.assertTrue(c.store.url.startswith("sqlite:///"))
        self.assertTrue(c.store.url.endswith(os.path.join("var", "zcontrol.db")))
        self.assertEqual((c.http.port, c.http.backlog), (8080, 1024))

    def test_file_then_options(self):
        """
        Options override the file, which overrides the defaults.
        """
        path = self.write('[bus]\nbackend = "amqp"\nmessage_timeout = 60\n'
                          '[http]\nport = 9000\n[node]\nid = "mn-a"\n')
        c = load_config(path, {"http": {"port": 9100, "interface": None}})
        self.assertEqual((c.bus.backend, c.bus.message_timeout, c.http.port, c.node_id),
                         ("amqp", 60.0, 9100, "mn-a"))

    def test_bad_config(self):
        """
        Unknown keys, bad types, bad values and unreadable files are clear errors.
        """
        for text, fragment in [
            ("[bus]\nbakend = 1\n", "unknown config key bus.bakend"),
            ("[http]\nport = \"x\"\n", "http.port must be a int"),
            ("[bus]\nbackend = \"zeromq\"\n", "bus.backend must be 'local' or 'amqp'"),
            ("[nope]\na = 1\n", "unknown config section [nope]"),
            ("not toml ===", "not valid TOML"),
        ]:
            e = self.assertRaises(ConfigError, load_config, self.write(text))
            self.assertIn(fragment, str(e))
        e = self.assertRaises(ConfigError, load_config, "/nonexistent/zc.toml")
        self.assertIn("cannot read config file", str(e))

    def test_service_settings_in_config_tree(self):
        """
        Fault (issue 8 item 17): the host service's settings were hard-coded (HostConfig()
        built inside the node), so an operator could not set them. They are the C{[host]}
        section of the config tree, with the drain limits in C{[shutdown]}; bad values are
        clear errors.
        """
        path = self.write('[host]\nping_interval = 30\nauto_reconnect = false\n'
                          'host_sync_level = 4\n[shutdown]\ndrain_timeout = 7\n')
        c = load_config(path)
        self.assertEqual((c.host.ping_interval, c.host.auto_reconnect, c.host.host_sync_level,
                          c.shutdown.drain_timeout), (30.0, False, 4, 7.0))
        self.assertEqual(load_config().host.command_timeout, 300.0)
        for text, fragment in [
            ("[host]\nping_interval = 0\n", "host.ping_interval must be positive"),
            ("[host]\nauto_reconnect = 1\n", "host.auto_reconnect must be true or false"),
            ("[host]\npingintervall = 1\n", "unknown config key host.pingintervall"),
            ("[shutdown]\ndrain_timeout = -1\n", "shutdown.drain_timeout"),
        ]:
            e = self.assertRaises(ConfigError, load_config, self.write(text))
            self.assertIn(fragment, str(e))

    def test_options(self):
        """
        twistd options build the config tree; a bad value is a usage error.
        """
        o = Options()
        o.parseOptions(["--bus", "local", "--http-port", "0", "--data-dir", "/tmp/zc",
                        "--drain-timeout", "3"])
        self.assertEqual(o["config_tree"].http.port, 0)
        self.assertEqual(o["config_tree"].shutdown.drain_timeout, 3.0)
        self.assertEqual(o["config_tree"].data_dir, "/tmp/zc")
        self.assertRaises(UsageError, Options().parseOptions, ["--bus", "carrier-pigeon"])

    def test_numeric_option_errors_name_the_key(self):
        """
        Fault: C{--drain-timeout abc} said only "Parameter type enforcement failed: could not
        convert string to float", and C{nan} was accepted (every stop then failed). A bad
        number is a usage error naming the config key it sets.
        """
        for option, value, key in [("--drain-timeout", "abc", "shutdown.drain_timeout"),
                                   ("--drain-timeout", "nan", "shutdown.drain_timeout"),
                                   ("--message-timeout", "inf", "bus.message_timeout")]:
            e = self.assertRaises(UsageError, Options().parseOptions, [option, value])
            self.assertIn(key, str(e))


class PluginTests(SynchronousTestCase):
    def test_plugins_found(self):
        """
        twistd finds both plugins, and each names a module with Options and makeService.
        """
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("zcontrol", makers)
        self.assertIn("zagent", makers)
        for name in ("zcontrol", "zagent"):
            self.assertTrue(makers[name].options)

    def test_twistd_help(self):
        """
        C{twistd zcontrol --help} lists the options.
        """
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "zcontrol", "--help"], capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        for opt in ("--db", "--bus", "--amqp-url", "--http-port", "--config"):
            self.assertIn(opt, out.stdout)


class NodeTests(TestCase):
    """
    A whole node on the embedded defaults, on the real reactor.
    """

    async def test_node_runs_and_drains(self):
        """
        The node starts store, heartbeat and bus in order, serves messages, and a stop
        waits for a handler in flight before answering.
        """
        data = os.path.abspath(self.mktemp())
        config = load_config(None, {"node": {"id": "mn-test", "data_dir": data},
                                    "http": {"port": 0}})
        node = make_node(config, reactor)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        self.assertEqual([s.name for s in node],
                         ["store", "heartbeat", "bus", "agents", "http", "host", "inventory"])
        live = await node.store.live_management_nodes(60)
        self.assertIn("mn-test", [n["uuid"] if isinstance(n, dict) else n for n in live])

        started, release = Deferred(), Deferred()
        node.bus.register_service(SERVICE, lambda m: started.callback(None) or release)
        reply_d = node.bus.send(ContractEcho(service_id=SERVICE))
        await started
        stopped = []
        stopping = node.stopService().addCallback(stopped.append)
        self.assertEqual(stopped, [])
        release.callback(ContractEchoReply(text="drained"))
        reply = await reply_d
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.text, "drained")
        await stopping
        late = await node.bus.send(ContractEcho(service_id=SERVICE))
        self.assertEqual(late.error.code, SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR)


class NodeWithAgentTests(LoopbackTestCase):
    """
    A whole node and a real simulated agent over loopback HTTP.
    """

    async def test_add_host_through_the_node(self):
        """
        An AddHostMsg sent on the node's bus connects the agent's host over real HTTP (its
        callbacks reach the node's own endpoint) and records it Connected with its capacity;
        a restarted node reconnects it at boot.
        """
        data = os.path.abspath(self.mktemp())
        config = load_config(None, {"node": {"id": "mn-e2e", "data_dir": data},
                                    "http": {"port": 0}})
        node = make_node(config, reactor)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        await seed_zone_and_cluster(node.store)
        reply = await add_kvm_host(node.bus, self.base(1))
        self.assertTrue(reply.success, reply.error)
        row = await node.store.get("host", "h1")
        self.assertEqual(row["status"], "Connected")
        self.assertGreater(row["totalCpuCapacity"], 0)
        await node.stopService()

        again = make_node(config, reactor)
        self.addCleanup(lambda: again.running and again.stopService())
        await again.startService()
        host = [s for s in again if s.name == "host"][0]
        self.assertEqual(await host.reconnected, 1)
        await again.stopService()


class NodeIdentityTests(SynchronousTestCase):
    """
    The management node's id (issue 8 item 15): explicit config, else the data dir's id file,
    else (an in-memory store) a fresh one with a warning.
    """

    def config(self, data, **node):
        return load_config(None, {"node": {"data_dir": data, **node}, "http": {"port": 0}})

    def data_dir(self):
        return os.path.abspath(self.mktemp())

    def test_first_start_persists_atomically(self):
        """
        The first start writes a fresh id to C{<data_dir>/node-id} (creating the directory)
        and leaves no temporary file behind; the next resolution reads the same id.
        """
        data = self.data_dir()
        first = resolve_node_id(self.config(data))
        self.assertEqual(os.listdir(data), [NODE_ID_FILE])
        with open(os.path.join(data, NODE_ID_FILE), "rb") as f:
            self.assertEqual(f.read(), first.encode("ascii") + b"\n")
        self.assertEqual(resolve_node_id(self.config(data)), first)

    def test_lost_creation_race_reads_the_winner(self):
        """
        When another start created the file first, creating does not overwrite it: the
        winner's id is used, and no temporary file remains.
        """
        data = self.data_dir()
        os.makedirs(data)
        path = os.path.join(data, NODE_ID_FILE)
        with open(path, "w") as f:
            f.write("winner-id\n")
        self.assertEqual(identity._create(data, path), "winner-id")
        self.assertEqual(os.listdir(data), [NODE_ID_FILE])

    def test_explicit_id_wins(self):
        """
        C{node.id} wins over an existing id file, which is left as it is; an explicit id
        that cannot be a queue-name part is a ConfigError.
        """
        data = self.data_dir()
        persisted = resolve_node_id(self.config(data))
        self.assertEqual(resolve_node_id(self.config(data, id="mn-7")), "mn-7")
        self.assertEqual(resolve_node_id(self.config(data)), persisted)
        e = self.assertRaises(ConfigError, resolve_node_id, self.config(data, id="mn 7/x"))
        self.assertIn("node.id", str(e))

    def test_corrupt_file_refused(self):
        """
        Fault (issue 8 item 15): nothing kept the id, so nothing checked it. An empty,
        binary, over-long or malformed id file is a startup error naming the file
        (C{make_node} raises it, C{twistd} exits with it), never a silently new id; the file
        is left untouched for the operator.
        """
        data = self.data_dir()
        os.makedirs(data)
        path = os.path.join(data, NODE_ID_FILE)
        for content in [b"", b"\n", b"\xff\xfe\x00", b"two words\n", b"x" * 65, b"-lead\n"]:
            with open(path, "wb") as f:
                f.write(content)
            e = self.assertRaises(ConfigError, resolve_node_id, self.config(data))
            self.assertIn(path, str(e))
            self.assertIn("corrupt", str(e))
            self.assertRaises(ConfigError, make_node, self.config(data), reactor)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_in_memory_store_gets_a_fresh_id_with_a_warning(self):
        """
        With an in-memory store (no persistent state) each start gets a fresh id, a warning
        says so, and no id file is written.
        """
        data = self.data_dir()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = load_config(None, {"node": {"data_dir": data},
                                    "store": {"url": "sqlite://:memory:"}})
        a, b = resolve_node_id(config), resolve_node_id(config)
        self.assertNotEqual(a, b)
        self.assertFalse(os.path.exists(data))
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                    and "fresh id" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)


class NodeIdentityRestartTests(TestCase):
    """
    A whole node restarted on the same data dir (issue 8 item 15).
    """

    async def test_restart_keeps_the_id(self):
        """
        Fault (issue 8 item 15): the node id was a fresh uuid on every start, so a restarted
        node could not find what it owned. Started twice on one data dir with no C{node.id},
        the node keeps its id: in its config, on its bus and in the management-node table.
        """
        data = os.path.abspath(self.mktemp())
        config = load_config(None, {"node": {"data_dir": data}, "http": {"port": 0}})
        ids = []
        for _ in range(2):
            node = make_node(config, reactor)
            self.addCleanup(lambda node=node: node.running and node.stopService())
            await node.startService()
            self.assertEqual(node.bus.node_id, node.config.node_id)
            live = await node.store.live_management_nodes(60)
            self.assertIn(node.config.node_id,
                          [n["uuid"] if isinstance(n, dict) else n for n in live])
            ids.append(node.config.node_id)
            await node.stopService()
        self.assertEqual(ids[0], ids[1])
        with open(os.path.join(data, NODE_ID_FILE)) as f:
            self.assertEqual(f.read().strip(), ids[0])


class NodeShutdownTests(LoopbackTestCase):
    """
    A node stopping with agent commands in flight, over loopback HTTP.
    """

    async def test_stop_does_not_wait_out_commands(self):
        """
        Fault (issue 8 item 9): a node told to stop (SIGTERM) while an agent command was in
        flight waited for it: up to the command's 300 s timeout. The stop now takes about
        the host service's drain limit: the command fails with SYS.1017 saying that the
        host service is stopping, and every part of the node stops.

        (This test polled an unbounded loop until the command was pending; it now waits,
        bounded, for the agent to accept the command. The node's agent client gets
        agents.accept_timeout from the config.)
        """
        data = os.path.abspath(self.mktemp())
        config = load_config(None, {"node": {"id": "mn-stop", "data_dir": data},
                                    "http": {"port": 0},
                                    "host": {"drain_timeout": 0.2},
                                    "agents": {"accept_timeout": 5},
                                    "shutdown": {"drain_timeout": 5}})
        node = make_node(config, reactor)
        self.assertEqual(node.agents.accept_timeout, 5)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        await seed_zone_and_cluster(node.store)
        reply = await add_kvm_host(node.bus, self.base(2))
        self.assertTrue(reply.success, reply.error)
        self.agent._faults = Faults(never_callback_rate=1.0)  # the agent goes silent
        accepted = self.when_accepted()
        host = [s for s in node if s.name == "host"][0]
        command = host.service.call("h1", p.StartVmCmd(vm_instance_uuid="v", cpu_num=1,
                                                       memory_size=1), timeout=300)
        failures = []
        command.addErrback(failures.append)
        await accepted  # the client marked it sent before posting
        self.assertEqual(len(node.agents), 1)
        started = reactor.seconds()
        await node.stopService()
        self.assertLess(reactor.seconds() - started, 4)
        [failure] = failures
        self.assertEqual(failure.value.error.code, SYS.CANCEL)
        self.assertIn("stopping", failure.value.error.details)
        self.assertEqual(len(node.agents), 0)
        self.flushLoggedErrors()
