"""
A management node that cannot start says why in one line and exits non-zero; option and
store-URL mistakes are usage errors (issue 8, operator-facing faults).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zcontrol.config import ConfigError, StoreConfig
from zcontrol.core.errors import SYS, OperationError
from zcontrol.node import OrderedMultiService, start_failure_cause
from zcontrol.tap import Options

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class TwistdStartFailureTests(SynchronousTestCase):
    """
    C{twistd -n zcontrol} whose start fails after startup began.
    """

    def test_port_in_use_exits_1_with_one_line(self) -> None:
        """
        Fault (issue 8, start failure): a node whose HTTP port is taken logged "failed to
        start" with a traceback and exited with status 0. Now it exits 1, and one critical
        line names the address and the socket error, with no traceback.
        """
        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "zcontrol", "--data-dir", self.mktemp(),
             "--http-port", str(port)],
            capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        self.assertEqual(out.returncode, 1, text)
        lines = [line for line in text.splitlines() if "failed to start" in line]
        self.assertEqual(len(lines), 1, text)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertNotIn("Traceback", text)

    def test_port_out_of_range_is_a_usage_error(self) -> None:
        """
        Fault (issue 8, start failure): C{--http-port 99999} passed option parsing and failed
        at listen with an OverflowError traceback. It is a usage error naming the range.
        """
        for bad in ("99999", "-1", "65536"):
            with self.assertRaises(UsageError) as e:
                Options().parseOptions(["--http-port", bad])
            self.assertIn("0..65535", str(e.exception))
        self.assertEqual(Options().parseOptions(["--http-port", "65535"]), None)
        out = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "zcontrol", "--data-dir", self.mktemp(),
             "--http-port", "99999"], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
        self.assertIn("0..65535", out.stdout + out.stderr)
        self.assertNotIn("Traceback", out.stdout + out.stderr)


class StartFailureLogTests(SynchronousTestCase):
    """
    What OrderedMultiService logs when a child fails to start.
    """

    def test_cause_lines(self) -> None:
        """
        Fault (issue 8, start failure): the log said only "failed to start" plus a
        traceback. The cause line carries the error code's description and details, the
        listen address, or the config/OS error's text; only unexpected exceptions are
        flagged for a traceback.
        """
        e = OperationError.of(SYS.IO_ERROR, 'database "nosuchdb_xyz" does not exist')
        line, known = start_failure_cause(Failure(e))
        self.assertTrue(known)
        self.assertIn("SYS.1016", line)
        self.assertIn("nosuchdb_xyz", line)
        line, known = start_failure_cause(Failure(CannotListenError("", 80, OSError(13, "x"))))
        self.assertTrue(known)
        self.assertIn("*:80", line)
        self.assertEqual(start_failure_cause(Failure(ConfigError("http.tls_cert: bad"))),
                         ("http.tls_cert: bad", True))
        self.assertEqual(start_failure_cause(Failure(FileNotFoundError(2, "gone", "/c.pem"))),
                         ("[Errno 2] gone: '/c.pem'", True))
        self.assertEqual(start_failure_cause(Failure(KeyError("x"))), ("KeyError: 'x'", False))

    def test_one_critical_line_and_no_traceback(self) -> None:
        """
        Fault (issue 8, start failure): a known operator error was logged with
        C{log.failure} (a critical traceback). Now exactly one critical event, carrying the
        cause, and no failure event; the start-failure hook still runs.
        """
        from twisted.application.service import Service

        class Failing(Service):
            name = "store"

            def startService(self):
                raise OperationError.of(SYS.IO_ERROR, "no such database")

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        hooked: list[Failure] = []
        node = OrderedMultiService(on_start_failure=hooked.append)
        Failing().setServiceParent(node)
        self.failureResultOf(node.startService(), OperationError)
        critical = [ev for ev in events if ev.get("log_level") == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("no such database", critical[0]["cause"])
        self.assertFalse([ev for ev in events if "log_failure" in ev])
        self.assertEqual(len(hooked), 1)


class StoreUrlTests(SynchronousTestCase):
    """
    The store URL is checked where the configuration is built.
    """

    def test_malformed_urls_refused(self) -> None:
        """
        Fault (issue 8, store URL): C{--db postgresql//x} or C{sqlite://relative.db} passed
        the configuration and dumped C{ValueError: unknown store URL scheme ''} at start.
        Now a ConfigError (a usage error for twistd) names the option and the accepted forms.
        """
        for bad in ("postgresql//x", "sqlite://relative.db", "sqlite://", "sqlite:///",
                    "mysql://h/db", "postgresql://", "", "/abs/path.db"):
            with self.assertRaises(ConfigError, msg=bad) as e:
                StoreConfig(url=bad)
            for part in ("--db", "sqlite:////abs/path.db", "sqlite://:memory:",
                         "postgresql://", "memory://"):
                self.assertIn(part, str(e.exception))
        for good in ("sqlite:////abs/path.db", "sqlite:///abs/path.db", "sqlite://:memory:",
                     "postgresql://postgres@127.0.0.1:5432/zc", "postgres://h/db",
                     "memory://", "memory://shared"):
            self.assertEqual(StoreConfig(url=good).url, good)
        with self.assertRaises(UsageError) as e:
            Options().parseOptions(["--db", "postgresql//x"])
        self.assertIn("--db", str(e.exception))


class AMQPLoginRefusedTests(TestCase):
    """
    A management node whose RabbitMQ credentials are wrong (needs RabbitMQ on
    127.0.0.1:5672).
    """

    async def test_refused_login_says_so_without_retries(self) -> None:
        """
        Fault (issue 8, AMQP login): a wrong password gave one C{automat NoTransition}
        "Unhandled Error" traceback per connection attempt (ClientService cannot take the
        loss of a connection whose attempt already failed) and a final message that never
        said the login was refused. Now the start fails after one attempt with SYS.1016
        saying "RabbitMQ refused the login (ACCESS_REFUSED ...)", and nothing is logged as
        an unhandled error (trial fails the test on one).
        """
        from twisted.internet import reactor
        from twisted.internet.task import Clock

        from zcontrol.bus.amqp import AMQPBus

        bus = AMQPBus(reactor, Clock(), password="wrong-" + os.urandom(4).hex(),
                      start_attempts=5, retry_policy=lambda n: 0.01)
        attempts = []
        connect = bus._endpoint.connect

        def counting(factory):
            attempts.append(factory)
            return connect(factory)

        bus._endpoint.connect = counting
        with self.assertRaises(OperationError) as e:
            await bus.start()
        self.assertEqual(e.exception.error.code, SYS.IO_ERROR)
        self.assertIn("RabbitMQ refused the login (ACCESS_REFUSED", str(e.exception))
        self.assertEqual(len(attempts), 1)
        # let the refused connection's close reach the (detached) ClientService proxy
        for _ in range(5):
            d = Deferred()
            reactor.callLater(0.02, d.callback, None)
            await d
        self.assertEqual(self.flushLoggedErrors(), [])


class HttpTlsFilesTests(SynchronousTestCase):
    """
    The HTTP listener's TLS files.
    """

    def test_unreadable_cert_is_a_config_error(self) -> None:
        """
        Fault (issue 8, start failure): a missing C{[http] tls_cert} file failed the start
        with a bare ValueError (an unexpected exception, logged with its traceback). It is a
        ConfigError naming the option and the file, so the start logs one line.
        """
        from twisted.internet.task import Clock

        from zcontrol.config import load_config
        from zcontrol.node import HttpService

        missing = os.path.abspath(self.mktemp())
        config = load_config(None, {"node": {"data_dir": self.mktemp()},
                                    "http": {"port": 0}})
        config = attrs.evolve(config, http=attrs.evolve(config.http, tls_cert=missing,
                                                        tls_key=missing))
        from twisted.web.resource import Resource

        class Endpoint:
            def resource(self) -> Resource:
                return Resource()

        http = HttpService(Clock(), config, endpoint=Endpoint(), agents=None)
        with self.assertRaises(ConfigError) as e:
            http.startService()
        self.assertIn("http.tls_cert", str(e.exception))
        self.assertIn(missing, str(e.exception))
        line, known = start_failure_cause(Failure(e.exception))
        self.assertTrue(known)
