# -*- test-case-name: tests.test_node -*-
"""
C{twistd zcontrol}: options and C{makeService}. This is the only module that imports the
global reactor, and only inside L{makeService}.
"""

from __future__ import annotations

from twisted.python import usage

from zcontrol import __version__
from zcontrol.config import ConfigError, load_config

__all__ = ["Options", "exit_with_status_after_run", "makeService"]


def exit_with_status_after_run(status: int) -> None:
    """
    Make this process exit with C{status} once twistd is done.

    twistd's runner has no exit status: after the reactor stops it removes the pidfile,
    stops its log observers and returns, and the process exits 0 (only an exit I{signal}
    is passed on). An C{atexit} handler runs after all that; it flushes stdout and stderr
    and ends the process with C{os._exit(status)} (raising C{SystemExit} in an C{atexit}
    handler does not change the status). It skips the C{atexit} handlers registered before
    it; by then the reactor, its thread pool and the log observers are stopped.
    """
    import atexit
    import os
    import sys

    def exit_() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110 - a closed stream must not keep the status 0
                pass
        os._exit(status)

    atexit.register(exit_)


def _port_number(text: str) -> int:
    """
    A TCP port number, 0..65535 (0: any free port).

    @raise ValueError: not an integer in that range (twistd reports a usage error).
    """
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"a port number is 0..65535, not {port}")
    return port


class Options(usage.Options):
    """
    Options of a management node. Each one overrides the config file, which overrides the
    defaults (LocalBus, SQLite under the data directory, HTTP on 127.0.0.1:8080).
    """

    synopsis = "[options]"
    longdesc = ("Run a zcontrol management node. With no options it runs on the embedded "
                "defaults: the in-process bus and SQLite under ./var.")

    optParameters = [
        ["config", "c", None, "TOML config file (see zcontrol.config)."],
        ["node-id", None, None, "This management node's id (default: the one kept in "
                                   "<data-dir>/node-id, created on the first start)."],
        ["data-dir", "d", None, "Directory for this node's id, agents' bootstrap token, lock "
                                "file and default SQLite store (default: ./var)."],
        ["db", None, None, "Store URL: sqlite:////abs/path.db, sqlite://:memory:, "
                           "postgresql://user@host:port/dbname or memory://."],
        ["bus", None, None, "Bus backend: local (in-process, default) or amqp (RabbitMQ)."],
        ["amqp-url", None, None, "RabbitMQ URL (default amqp://guest:guest@127.0.0.1:5672/)."],
        ["http-port", "p", None, "HTTP port for agent callbacks (and the API to come) (default 8080; "
                                 "0 = any).", _port_number],
        ["http-interface", None, None, "HTTP interface (default 127.0.0.1)."],
        ["public-url", None, None, "Base URL agents use to call back (default from the "
                                   "interface and port)."],
        # No converters on numbers: load_config converts and checks them, and its errors
        # name the key (bus.message_timeout must be a float: 'abc').
        ["message-timeout", None, None, "Default bus message timeout in seconds (1800)."],
        ["drain-timeout", None, None, "Seconds each part of the node may take to stop "
                                      "(SIGTERM) before its work is failed (20)."],
    ]

    def opt_version(self) -> None:
        """
        Print zcontrol's version and exit.
        """
        print(f"zcontrol {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self["config_tree"] = load_config(self["config"], {
                "node": {"id": self["node-id"], "data_dir": self["data-dir"]},
                "store": {"url": self["db"]},
                "bus": {"backend": self["bus"], "amqp_url": self["amqp-url"],
                        "message_timeout": self["message-timeout"]},
                "http": {"port": self["http-port"], "interface": self["http-interface"],
                         "public_url": self["public-url"]},
                "shutdown": {"drain_timeout": self["drain-timeout"]},
            })
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    """
    The management node's root service, for twistd.
    """
    from twisted.internet import reactor

    from zcontrol.core.tracelog import install_node_trace_observer
    from zcontrol.node import make_node

    # The thread budget of a node is 16 OS threads: the reactor thread, the store's pool
    # (at most 8) and a few for name resolution.
    reactor.suggestThreadPoolSize(4)
    # Every log line caused by a job names its trace id (before twistd adds its file
    # observer; installed first on the publisher either way).
    install_node_trace_observer()

    def give_up(_reason):
        # The cause is logged already (one line, see OrderedMultiService); stop and exit 1.
        exit_with_status_after_run(1)
        if reactor.running:
            reactor.stop()

    try:
        return make_node(options["config_tree"], reactor, on_start_failure=give_up)
    except (ConfigError, OSError) as e:  # e.g. a corrupt node-id file, a data directory
        # that cannot be created: say so in one line, not a traceback
        raise SystemExit(f"zcontrol: {e}") from None
