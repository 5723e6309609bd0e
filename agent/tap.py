# -*- test-case-name: tests.test_agent_tap -*-
"""
C{twistd zagent}: one agent process serving many simulated hosts.

The only place in C{agent/} that imports the global reactor is L{makeService}.
"""

from __future__ import annotations

import gc
import os
import random
from typing import Any

from twisted.application import internet, service
from twisted.logger import Logger
from twisted.python import usage

from agent.app import AgentApp, CallbackPolicy, Faults, TaskMemory
from agent.bootstrap import TokenFileError, read_token_file
from agent.http import (
    DEFAULT_BACKLOG,
    DEFAULT_POOL_SIZE,
    QuietSite,
    make_http_client,
    make_pool,
    server_tls_options,
    trust_root_from_pem,
)
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig, parse_latency
from agent.tracelog import install_trace_observer

__all__ = ["NO_TOKEN", "Options", "PLUGINS", "build_agent", "makeService"]

log = Logger()

#: Plugin name -> (dotted class path, description).
PLUGINS: dict[str, tuple[str, str]] = {
    "kvm": ("agent.kvm.KvmPlugin", "KVM host: /host/capacity, /host/fact, /vm/*"),
    "console": ("agent.console.ConsolePlugin", "console proxy: /console/*"),
    "vrouter": ("agent.vrouter.VRouterPlugin", "virtual router: /vrouter/*"),
    "sftpbackupstorage": ("agent.sftpbackupstorage.SftpBackupStoragePlugin",
                          "simulated Sftp backup storage: /sftpbackupstorage/*"),
    "storage": ("agent.storage.StoragePlugin",
                "primary storage on the host: /localstorage/*, /nfsprimarystorage/*"),
}


def _rate(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a rate is between 0 and 1: {value}")
    return rate


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError(f"must be at least 1: {value}")
    return n


class Options(usage.Options):
    """
    Options of C{twistd zagent}.
    """

    synopsis = "[options]"
    longdesc = (
        "Runs a zcontrol agent serving --hosts simulated hosts on one port. Host <i> "
        "(0 <= i < hosts) is addressed by the path prefix /hosts/<i>/ (host 0 also without "
        "prefix): its base URL is http://<ip>:<port>/hosts/<i>. Plugins: "
        + "; ".join(f"{name} ({desc})" for name, (_, desc) in PLUGINS.items())
        + ". Framework URIs on every host: /host/echo, /host/connect, /host/ping (synchronous)."
        " Latency: --latency PATH=DIST, repeatable, DIST one of const:S, uniform:A,B, "
        "normal:MU,SIGMA, exp:MEAN (seconds); PATH '*' is the default, e.g. "
        "--latency '*=const:0' --latency /vm/start=uniform:1,5. "
        "Trust: a /host/connect must carry the bootstrap token given by --bootstrap-token-file "
        "(or --bootstrap-token): the management node's [agents] bootstrap_token, by default "
        "the one it keeps in <data_dir>/agent-token. Without a token the agent refuses to "
        "start, unless --insecure-no-token lets anyone who reaches it connect its hosts. "
        "--tls-cert/--tls-key serve HTTPS; --tls-ca is the CA "
        "(or self-signed certificate) the management node's HTTPS callback URL is checked "
        "against."
    )

    optParameters = [
        ["port", "p", 7070, "TCP port to listen on (0: any).", int],
        ["interface", "i", "127.0.0.1", "Interface to listen on."],
        ["backlog", None, DEFAULT_BACKLOG, "listen() backlog (Twisted's default of 50 "
         "overflows under callback load).", _positive],
        ["hosts", "n", 1, "Number of simulated hosts served by this process.", _positive],
        ["plugins", None, "kvm,console,vrouter,storage,sftpbackupstorage",
         "Comma-separated plugins: " + ", ".join(PLUGINS) + "."],
        ["error-rate", None, 0.0, "Probability that a simulated operation fails.", _rate],
        ["never-callback-rate", None, 0.0,
         "Probability that an accepted command never calls back.", _rate],
        ["crash-after-accept-rate", None, 0.0,
         "Probability that a host crashes (forgets everything) right after accepting.", _rate],
        ["cpu", None, 32, "CPUs per simulated host.", _positive],
        ["memory", None, 128, "GiB of memory per simulated host.", _positive],
        ["local-disk", None, 2048, "GiB of local disk (LocalStorage) per simulated host.",
         _positive],
        ["nfs-capacity", None, 10240, "GiB of each simulated NFS export.", _positive],
        ["callback-pool", None, DEFAULT_POOL_SIZE,
         "Persistent connections kept per management node for callbacks.", _positive],
        ["callback-concurrency", None, DEFAULT_POOL_SIZE, "Callbacks POSTed at once.",
         _positive],
        ["callback-attempts", None, 15, "Attempts to deliver a callback.", _positive],
        ["callback-timeout", None, 30.0, "Timeout of one callback POST, seconds.", float],
        ["callback-time-slice", None, 0.02, "Seconds of callback POSTing per reactor turn "
         "(0: one per turn; negative: POST inside the accepting request).", float],
        ["task-memory", None, 3600.0, "Seconds a task uuid is remembered for deduplication.",
         float],
        ["seed", None, None, "Random seed (latency and fault draws).", int],
        ["bootstrap-token-file", None, None,
         "File whose content (stripped) is the token a /host/connect must carry."],
        ["bootstrap-token", None, None,
         "The token a /host/connect must carry (visible in the process list: prefer "
         "--bootstrap-token-file)."],
        ["tls-cert", None, None, "PEM certificate (chain) to serve HTTPS with."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["tls-ca", None, None,
         "PEM CA certificate(s) to check the management node's HTTPS certificate against "
         "(default: the platform's CAs)."],
    ]

    optFlags = [
        ["insecure-no-token", None, "Run without a bootstrap token: anyone who reaches this "
         "agent can connect its hosts and command them (tests and demos only)."],
        ["gc-freeze", None, "gc.freeze() after start-up and raise GC thresholds "
         "(large pending tables are dominated by the cyclic GC)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["latency"] = {}
        self["tls-options"] = None
        self["trust-root"] = None

    def opt_latency(self, value: str) -> None:
        """
        PATH=DIST: latency of a command (repeatable); PATH '*' is the default.
        """
        path, sep, dist = value.partition("=")
        if not sep:
            raise usage.UsageError(f"--latency takes PATH=DIST, not {value!r}")
        try:
            self["latency"][path.strip()] = parse_latency(dist)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        names = [n.strip() for n in self["plugins"].split(",") if n.strip()]
        unknown = [n for n in names if n not in PLUGINS]
        if unknown:
            raise usage.UsageError(f"unknown plugin(s) {unknown}; known: {list(PLUGINS)}")
        self["plugins"] = names
        token, path = self["bootstrap-token"], self["bootstrap-token-file"]
        if token is not None and path is not None:
            raise usage.UsageError("give --bootstrap-token or --bootstrap-token-file, not both")
        if path is not None:
            try:
                # the agent never creates it: the node (or python -m agent.bootstrap) does
                token = read_token_file(path, _FILL_TOKEN_FILE)
            except TokenFileError as e:
                raise usage.UsageError(f"--bootstrap-token-file: {e}") from None
        if token is not None:
            token = token.strip()
            if not token:
                raise usage.UsageError("the bootstrap token is empty")
        if token is not None and self["insecure-no-token"]:
            raise usage.UsageError("--insecure-no-token contradicts the bootstrap token given")
        self["bootstrap-token"] = token
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        try:
            self["tls-options"] = (None if self["tls-cert"] is None
                                   else server_tls_options(self["tls-cert"], self["tls-key"]))
            self["trust-root"] = (None if self["tls-ca"] is None
                                  else trust_root_from_pem(self["tls-ca"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        # Last, so that a wrong value among the other options is reported as such.
        _require_token(self)


#: What to do about an empty --bootstrap-token-file.
_FILL_TOKEN_FILE = (
    "copy the management node's bootstrap token into it (by default the node's "
    "<data_dir>/agent-token), or pass that file instead")

#: Why an agent without a token does not start, and what to pass instead.
NO_TOKEN = (
    "no bootstrap token: anyone who can reach this agent could connect its hosts and "
    "command them. Give --bootstrap-token-file PATH (the management node's token file: by "
    "default <data_dir>/agent-token, e.g. var/agent-token for `make run`; create one with "
    "`python -m agent.bootstrap PATH`) or --bootstrap-token TOKEN, or pass "
    "--insecure-no-token to accept any connect (tests and demos only).")


def _require_token(options: Options) -> None:
    if options["bootstrap-token"] is None and not options["insecure-no-token"]:
        raise usage.UsageError(NO_TOKEN)


def _readable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


def build_agent(options: Options, reactor: Any) -> AgentApp:
    """
    The L{AgentApp} described by C{options}, on C{reactor}.
    """
    from twisted.python.reflect import namedAny

    rng = random.Random(options["seed"])
    config = SimulatorConfig(
        clock=reactor,
        rng=rng,
        latency=dict(options["latency"]),
        error_rate=options["error-rate"],
        cpu_num=options["cpu"],
        memory=options["memory"] * 1024**3,
        local_disk=options["local-disk"] * 1024**3,
        nfs_capacity=options["nfs-capacity"] * 1024**3,
    )
    cluster = SimulatedCluster(config)
    pool = make_pool(reactor, options["callback-pool"])
    policy = CallbackPolicy(
        max_attempts=options["callback-attempts"],
        timeout=options["callback-timeout"],
        concurrency=options["callback-concurrency"],
        time_slice=None if options["callback-time-slice"] < 0 else options["callback-time-slice"],
    )
    return AgentApp(
        clock=reactor,
        http=make_http_client(reactor, pool, trust_root=options["trust-root"]),
        backend_factory=cluster.backends,
        plugins=[namedAny(PLUGINS[name][0])() for name in options["plugins"]],
        host_count=options["hosts"],
        faults=Faults(
            never_callback_rate=options["never-callback-rate"],
            crash_after_accept_rate=options["crash-after-accept-rate"],
        ),
        policy=policy,
        rng=rng,
        tasks=TaskMemory(reactor, ttl=options["task-memory"]),
        reset_host=cluster.reset,
        bootstrap_token=options["bootstrap-token"],
    )


class _Drain(service.Service):
    """
    On stop, waits (at most C{timeout} seconds) for the agent's accepted commands to call
    back. Added before the TCP server, so it stops after it: no new command comes in.
    """

    def __init__(self, agent: AgentApp, clock: Any, timeout: float = 30.0) -> None:
        self._agent = agent
        self._clock = clock
        self._timeout = timeout

    def stopService(self) -> Any:
        super().stopService()
        d = self._agent.drain()
        d.addTimeout(self._timeout, self._clock)
        return d.addErrback(lambda f: None)


class _GCFreeze(service.Service):
    def startService(self) -> None:
        super().startService()
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)


def makeService(options: Options) -> service.IService:
    """
    The agent service: a TCP (or, with C{--tls-cert}, TLS) server with the configured backlog
    serving the agent's site.

    @raise usage.UsageError: no bootstrap token and no C{--insecure-no-token} (checked here
        too, for options that did not go through L{Options.postOptions}).
    """
    from twisted.internet import reactor

    _require_token(options)
    # The lines of a traced command end in [trace=<id>] (agent.tracelog).
    install_trace_observer()
    agent = build_agent(options, reactor)
    if agent.bootstrap_token is None:
        log.warn("--insecure-no-token: anyone reaching this agent can connect its hosts and "
                 "command them (give --bootstrap-token-file)")
    path = options["bootstrap-token-file"]
    if path is not None and _readable_by_others(path):
        log.warn("the bootstrap token file {path} is readable by other users: chmod 600 it",
                 path=path)
    site = QuietSite(agent.app.resource())
    top = service.MultiService()
    _Drain(agent, reactor).setServiceParent(top)
    if options["tls-options"] is not None:
        server = internet.SSLServer(
            options["port"], site, options["tls-options"], backlog=options["backlog"],
            interface=options["interface"]
        )
    else:
        server = internet.TCPServer(
            options["port"], site, backlog=options["backlog"], interface=options["interface"]
        )
    server.setServiceParent(top)
    if options["gc-freeze"]:
        _GCFreeze().setServiceParent(top)
    return top
