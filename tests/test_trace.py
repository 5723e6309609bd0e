"""
Trace ids (L{zcontrol.core.trace}): the context variable, the agent command header and the
agent's log events, and the log observer that puts the id in log lines. How the bus carries
them is in the bus contract (L{tests.bus_contract}, C{test_trace_propagation}), run on every
bus.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogPublisher,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.tracelog import TRACE_SUFFIX, install_trace_observer
from tests.agent_fakes import CALLBACK_URL, InMemoryPair, RecordingHTTP, base
from zcontrol.agentclient import AgentClient
from zcontrol.core.trace import current_trace_id, new_trace_id, trace_scope
from zcontrol.core.tracelog import install_node_trace_observer


class TraceScopeTests(SynchronousTestCase):
    def test_scope(self) -> None:
        """
        The trace id is current inside the scope only, scopes nest, and new ids are 32 hex
        digits, each different.
        """
        self.assertIsNone(current_trace_id())
        seen = trace_scope("a", lambda: (current_trace_id(),
                                         trace_scope("b", current_trace_id),
                                         current_trace_id()))
        self.assertEqual(seen, ("a", "b", "a"))
        self.assertIsNone(current_trace_id())
        self.assertRaises(ZeroDivisionError, trace_scope, "a", lambda: 1 / 0)
        self.assertIsNone(current_trace_id())
        t1, t2 = new_trace_id(), new_trace_id()
        self.assertNotEqual(t1, t2)
        self.assertRegex(t1, r"^[0-9a-f]{32}$")

    def test_header_parsing(self) -> None:
        """
        The agent takes a well-formed trace id header and ignores a missing or bad one.
        """
        self.assertEqual(p.trace_id_of([b"abc-1.2_3"]), "abc-1.2_3")
        self.assertIsNone(p.trace_id_of(None))
        self.assertIsNone(p.trace_id_of([]))
        self.assertIsNone(p.trace_id_of([b"a b"]))
        self.assertIsNone(p.trace_id_of([b"x" * 65]))


class AgentCommandTraceTests(SynchronousTestCase):
    def capture(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_sync_command_header(self) -> None:
        """
        A synchronous command sent while a trace id is current carries it in X-Trace-Id;
        one sent outside any scope has no such header.
        """
        http = RecordingHTTP()
        client = AgentClient(Clock(), http, CALLBACK_URL)
        trace_scope("t-sync", client.call, base(0), p.PingCmd(host_uuid="h"))
        client.call(base(0), p.PingCmd(host_uuid="h"))
        self.assertEqual(len(http.posts), 2)
        self.assertEqual(http.posts[0].header(p.TRACE_ID_HEADER), "t-sync")
        self.assertIsNone(http.posts[1].header(p.TRACE_ID_HEADER))

    def test_async_command_traced_at_the_agent(self) -> None:
        """
        An asynchronous command sent under a trace id reaches the agent with it: the agent
        logs the command's accept and its callback with C{trace_id}; the command completes.
        An untraced command logs neither.
        """
        pair = InMemoryPair()
        self.successResultOf(pair.client.connect(base(1), "host-1"))
        events = self.capture()
        d = trace_scope("t-async", pair.client.call, base(1),
                        p.StartVmCmd(vm_instance_uuid="vm", cpu_num=2, memory_size=1024))
        pair.flush()
        self.assertEqual(self.successResultOf(d).vnc_port, 5900)
        traced = [e for e in events if e.get("trace_id") == "t-async"]
        formats = [e["log_format"] for e in traced]
        self.assertTrue(any(f.startswith("accepted ") for f in formats), formats)
        self.assertTrue(any(f.startswith("calling back ") for f in formats), formats)
        self.assertTrue(all(e.get("task") for e in traced))

        del events[:]
        d = pair.client.call(base(1), p.StopVmCmd(uuid="vm"))
        pair.flush()
        self.successResultOf(d)
        self.assertEqual([e for e in events if "trace_id" in e], [])


class LogLineTraceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.events: list[dict] = []
        # Added before the trace observer: it must still see the trace id.
        self.publisher.addObserver(self.events.append)
        install_node_trace_observer(self.publisher)
        self.log = Logger(namespace="test", observer=self.publisher)

    def test_inside_scope(self) -> None:
        """
        An event emitted while a trace id is current gets C{trace_id} and its text ends in
        C{[trace=<id>]}.
        """
        trace_scope("t-log", lambda: self.log.info("creating {vm}", vm="vm-1"))
        (event,) = self.events
        self.assertEqual(event["trace_id"], "t-log")
        text = formatEventAsClassicLogText(event)
        self.assertIn("creating vm-1 [trace=t-log]", text)

    def test_outside_scope(self) -> None:
        """
        Outside any scope nothing is added.
        """
        self.log.info("creating {vm}", vm="vm-1")
        (event,) = self.events
        self.assertNotIn("trace_id", event)
        self.assertEqual(event["log_format"], "creating {vm}")
        self.assertNotIn("trace", formatEventAsClassicLogText(event))

    def test_own_trace_id_kept(self) -> None:
        """
        An event naming its own trace id (as the agent's do) keeps it, and is suffixed once
        even when installed twice (the second replaces the first).
        """
        install_node_trace_observer(self.publisher)
        trace_scope("other",
                    lambda: self.log.info("accepted {task}", task="t", trace_id="mine"))
        (event,) = self.events
        self.assertEqual(event["trace_id"], "mine")
        self.assertEqual(event["log_format"], "accepted {task}" + TRACE_SUFFIX)

    def test_agent_observer(self) -> None:
        """
        The agent's observer (no context variable) suffixes events that carry a trace id
        and leaves the others alone.
        """
        publisher, events = LogPublisher(), []
        publisher.addObserver(events.append)
        install_trace_observer(publisher=publisher)
        log = Logger(namespace="agent", observer=publisher)
        trace_scope("ignored", log.info, "plain")
        log.info("accepted {task}", task="t", trace_id="x1")
        self.assertNotIn("trace_id", events[0])
        self.assertIn("[trace=x1]", formatEventAsClassicLogText(events[1]))
