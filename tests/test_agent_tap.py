"""
C{twistd zagent}: the plugin is found, its options parse and its help lists the plugins and the
simulator options; it refuses to start without a bootstrap token unless told
C{--insecure-no-token}.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
                     "--port", "/hosts/<i>/", "--bootstrap-token-file", "--insecure-no-token"):
            self.assertIn(word, text)

    def test_parse(self) -> None:
        """
        Options parse into typed values; latency is repeatable.
        """
        options = tap.Options()
        options.parseOptions(["--port", "0", "--hosts", "1000", "--plugins", "kvm",
                              "--latency", "*=const:0.1", "--latency", "/vm/start=uniform:1,5",
                              "--error-rate", "0.1", "--backlog", "2048",
                              "--bootstrap-token", " tok "])
        self.assertEqual(options["hosts"], 1000)
        self.assertEqual(options["bootstrap-token"], "tok")
        self.assertEqual(options["plugins"], ["kvm"])
        self.assertEqual(str(options["latency"]["/vm/start"]), "uniform:1,5")
        self.assertEqual(options["backlog"], 2048)

    def test_bad_options(self) -> None:
        """
        Unknown plugins, bad rates and bad latencies are usage errors.
        """
        for argv in (["--plugins", "xen"], ["--error-rate", "2"], ["--latency", "x"],
                     ["--latency", "*=gamma:1"], ["--hosts", "0"]):
            e = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  argv + ["--insecure-no-token"])
            # The option's own fault is reported, not the missing token.
            self.assertNotIn("bootstrap token", str(e))

    def test_make_service(self) -> None:
        """
        makeService builds a TCP server with the configured backlog (not started), after the
        service that drains callbacks at stop.
        """
        options = tap.Options()
        options.parseOptions(["--port", "0", "--backlog", "777", "--hosts", "3", "--gc-freeze",
                              "--bootstrap-token", "tok"])
        service = tap.makeService(options)
        [_drain, server, _gc] = list(service)
        self.assertEqual(server.kwargs["backlog"], 777)
        self.assertFalse(server.running)


class TokenRequiredTests(SynchronousTestCase):
    """
    Issue 8 item 10, by default: an agent started without a bootstrap token used to accept
    any C{/host/connect}, only logging a warning, so C{make run-agent} gave the agent to
    anyone who could reach it.
    """

    def assertNamesTheOptions(self, message: str) -> None:
        for option in ("--bootstrap-token-file", "--bootstrap-token", "--insecure-no-token",
                       "agent-token"):
            self.assertIn(option, message)

    def test_refused_without_token(self) -> None:
        """
        Fault (issue 8 item 10, default): option parsing accepted no token at all. Now it is a
        usage error naming what to pass: --bootstrap-token-file, --bootstrap-token or
        --insecure-no-token.
        """
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--port", "0"])
        self.assertNamesTheOptions(str(e))

    def test_make_service_refuses_without_token(self) -> None:
        """
        makeService refuses too, for options that skipped postOptions (built in code).
        """
        options = tap.Options()
        options.parseOptions(["--port", "0", "--insecure-no-token"])
        options["insecure-no-token"] = False
        e = self.assertRaises(usage.UsageError, tap.makeService, options)
        self.assertNamesTheOptions(str(e))

    def test_insecure_no_token(self) -> None:
        """
        --insecure-no-token starts an open agent (warned about in the log); it cannot be
        combined with a token.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = tap.Options()
        options.parseOptions(["--port", "0", "--insecure-no-token"])
        self.assertIsNone(options["bootstrap-token"])
        service = tap.makeService(options)
        self.assertEqual(len(list(service)), 2)
        self.assertTrue(any("--insecure-no-token" in e.get("log_format", "") for e in events))
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                              ["--bootstrap-token", "t", "--insecure-no-token"])
        self.assertIn("--insecure-no-token", str(e))

    def test_token_file(self) -> None:
        """
        --bootstrap-token-file reads the token (stripped); no warning is logged then, unless
        the file is readable by other users. A missing or empty file is a usage error naming
        the file.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("secret-token\n")
        os.chmod(path, 0o600)
        options = tap.Options()
        options.parseOptions(["--port", "0", "--bootstrap-token-file", path])
        self.assertEqual(options["bootstrap-token"], "secret-token")
        tap.makeService(options)
        self.assertEqual([e for e in events if e.get("log_level") is not None
                          and e["log_level"].name in ("warn", "error")], [])
        os.chmod(path, 0o644)
        tap.makeService(options)
        [warning] = [e for e in events if e.get("log_level") is not None
                     and e["log_level"].name == "warn"]
        self.assertIn("chmod 600", warning["log_format"])
        for content in (None, "  \n"):
            bad = self.mktemp()
            if content is not None:
                with open(bad, "w") as f:
                    f.write(content)
            e = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  ["--bootstrap-token-file", bad])
            self.assertIn(bad, str(e))

    def test_twistd_refuses_to_start(self) -> None:
        """
        C{twistd -n zagent} without a token exits at once with status 1 and says what to pass,
        without listening.
        """
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "-n", "--pidfile=", "zagent", "--port", "0"],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
        self.assertNamesTheOptions(out.stdout + out.stderr)


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
