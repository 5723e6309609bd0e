"""
C{twistd zagent}: the plugin is found, its options parse and its help lists the plugins and the
simulator options.
"""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from agent import tap


class TapTests(SynchronousTestCase):
    """
    Options and makeService.
    """

    def test_plugin_found(self) -> None:
        """
        twistd finds the zagent plugin, pointing at agent.tap.
        """
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("zagent", makers)
        self.assertEqual(makers["zagent"].module, "agent.tap")

    def test_help_lists_plugins_and_options(self) -> None:
        """
        The help text names every plugin and the simulator options.
        """
        text = str(tap.Options())
        for word in ("kvm", "console", "vrouter", "--hosts", "--latency", "--error-rate",
                     "--never-callback-rate", "--crash-after-accept-rate", "--backlog",
                     "--port", "/hosts/<i>/"):
            self.assertIn(word, text)

    def test_parse(self) -> None:
        """
        Options parse into typed values; latency is repeatable.
        """
        options = tap.Options()
        options.parseOptions(["--port", "0", "--hosts", "1000", "--plugins", "kvm",
                              "--latency", "*=const:0.1", "--latency", "/vm/start=uniform:1,5",
                              "--error-rate", "0.1", "--backlog", "2048"])
        self.assertEqual(options["hosts"], 1000)
        self.assertEqual(options["plugins"], ["kvm"])
        self.assertEqual(str(options["latency"]["/vm/start"]), "uniform:1,5")
        self.assertEqual(options["backlog"], 2048)

    def test_bad_options(self) -> None:
        """
        Unknown plugins, bad rates and bad latencies are usage errors.
        """
        for argv in (["--plugins", "xen"], ["--error-rate", "2"], ["--latency", "x"],
                     ["--latency", "*=gamma:1"], ["--hosts", "0"]):
            self.assertRaises(usage.UsageError, tap.Options().parseOptions, argv)

    def test_make_service(self) -> None:
        """
        makeService builds a TCP server with the configured backlog (not started), after the
        service that drains callbacks at stop.
        """
        options = tap.Options()
        options.parseOptions(["--port", "0", "--backlog", "777", "--hosts", "3", "--gc-freeze"])
        service = tap.makeService(options)
        [_drain, server, _gc] = list(service)
        self.assertEqual(server.kwargs["backlog"], 777)
        self.assertFalse(server.running)


class DrainTests(SynchronousTestCase):
    """
    The agent service drains on stop.
    """

    def test_stop_waits_for_callbacks(self) -> None:
        """
        stopService waits for accepted commands to call back, at most its timeout.
        """
        from twisted.internet.defer import Deferred
        from twisted.internet.task import Clock

        clock = Clock()

        class Agent:
            pending: Deferred = Deferred()

            def drain(self) -> Deferred:
                return self.pending

        agent = Agent()
        drain = tap._Drain(agent, clock, timeout=5)
        drain.startService()
        d = drain.stopService()
        self.assertNoResult(d)
        agent.pending.callback(None)
        self.successResultOf(d)
        agent.pending = Deferred()
        drain.startService()
        d = drain.stopService()
        clock.advance(5)
        self.successResultOf(d)
