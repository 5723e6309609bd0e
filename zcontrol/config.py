# -*- test-case-name: tests.test_node -*-
"""
The management node's configuration: one frozen tree, built once from defaults, an optional
TOML file and command-line options (in that order of precedence, last wins), then passed
down. There is no global configuration.

A config file looks like::

    [node]
    id = "mn-1"                 # default: kept in <data_dir>/node-id (zcontrol.identity)
    data_dir = "/var/lib/zcontrol"  # one node's: node-id, agent-token, lock, SQLite store
                                # (default ./var; locked by one node, zcontrol.datadir)

    [store]
    url = "postgresql://postgres@127.0.0.1:5432/zcontrol"   # default: SQLite in data_dir
    pool_size = 4

    [bus]
    backend = "amqp"            # "local" (default) or "amqp"
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    message_timeout = 1800
    max_message_size = 8388608  # bytes (AMQP): keep below the broker's max_message_size
    prefix = "cloud-a."         # before every AMQP exchange and queue name (default none):
                                # clouds sharing one broker never see each other's nodes

    [http]
    port = 8080
    interface = "127.0.0.1"
    backlog = 1024
    public_url = "http://10.0.0.5:8080"   # what agents call back; default from interface/port
    tls_cert = "/etc/zcontrol/mn.pem"      # serve HTTPS (agents' callbacks) with this chain
    tls_key = "/etc/zcontrol/mn.key"

    [agents]
    bootstrap_token_file = "/etc/zcontrol/agent-token"  # or bootstrap_token = "...";
                                # default: kept in <data_dir>/agent-token (agent.bootstrap)
    tls_ca = "/etc/zcontrol/agents-ca.pem"  # checks agents' HTTPS certificates
    pool_size = 1000            # persistent connections per agent endpoint
    max_in_flight = 1000        # agent requests in flight at once (default: pool_size)
    max_in_flight_per_host = 32 # ... to one agent base URL
    accept_timeout = 30         # seconds an agent has to answer a POST (it answers at once)

    [host]                      # the host service (see HostConfig for every key)
    ping_interval = 60
    command_timeout = 300
    host_sync_level = 10

    [shutdown]
    drain_timeout = 20          # seconds each part of the node may take to stop
"""

from __future__ import annotations

import math
import os
import tomllib
import urllib.parse
from typing import Any, Mapping

import attrs
from twisted.logger import Logger

__all__ = ["AgentsConfig", "BusConfig", "Config", "ConfigError", "HostConfig", "HttpConfig",
           "ShutdownConfig", "StoreConfig", "VmConfig", "load_config"]


log = Logger()


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or invalid; the message says which.
    """


@attrs.frozen
class StoreConfig:
    """
    @ivar url: the store URL (C{--db}, C{[store] url}): C{sqlite:////abs/path.db} (an
        absolute path), C{sqlite://:memory:}, C{postgresql://user@host:port/dbname}
        (C{postgres://} too) or C{memory://} (see L{zcontrol.db.open_store}).
    @raise ConfigError: any other form, naming the option and the accepted forms.
    """

    url: str
    pool_size: int | None = None

    def __attrs_post_init__(self) -> None:
        url = self.url
        scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
        ok = sep and (
            (scheme == "sqlite" and (rest in (":memory:", "/:memory:") or
                                     (rest.startswith("/") and rest.strip("/") != "")))
            or scheme == "memory"
            or (scheme in ("postgresql", "postgres") and rest != ""))
        if not ok:
            raise ConfigError(
                f"store.url (--db) {url!r} is not a store URL; use sqlite:////abs/path.db "
                "(an absolute path), sqlite://:memory:, "
                "postgresql://user@host:port/dbname or memory://")


@attrs.frozen
class BusConfig:
    backend: str = "local"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    message_timeout: float = 1800.0
    heartbeat_interval: float = 5.0
    #: the largest encoded message body the AMQP bus publishes (bytes); 8 MiB stays below
    #: RabbitMQ's default max_message_size (3.x: 128 MiB, 4.x: 16 MiB)
    max_message_size: int = 8 * 1024 * 1024
    #: prepended to every AMQP exchange and queue name: clouds (or test runs) sharing one
    #: broker with different prefixes never see each other's nodes
    prefix: str = ""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.prefix, str) or len(self.prefix) > 64 or not all(
                c.isascii() and (c.isalnum() or c in "._-") for c in self.prefix):
            raise ConfigError("bus.prefix must be at most 64 ASCII letters, digits, '.', '_' or "
                              f"'-', not {self.prefix!r}")
        if self.backend not in ("local", "amqp"):
            raise ConfigError(f"bus.backend must be 'local' or 'amqp', not {self.backend!r}")
        if self.message_timeout <= 0:
            raise ConfigError("bus.message_timeout must be positive")
        if self.max_message_size < 1024:
            raise ConfigError("bus.max_message_size must be at least 1024 bytes")


@attrs.frozen
class HttpConfig:
    port: int = 8080
    interface: str = "127.0.0.1"
    backlog: int = 1024
    public_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("http.tls_cert and http.tls_key go together")
        if self.public_url is not None:
            _check_public_url(self.public_url)

    def callback_base(self, actual_port: int) -> str:
        """
        The base URL agents call back, given the port actually listened on.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.interface if self.interface not in ("", "0.0.0.0", "::") else "127.0.0.1"
        scheme = "http" if self.tls_cert is None else "https"
        return f"{scheme}://{host}:{actual_port}"


def _check_public_url(url: str) -> None:
    """
    Refuse a C{http.public_url} agents could not call back: it must be an absolute http or
    https URL with a host (and a valid port, if any), without credentials, query, fragment
    or whitespace; a path (a reverse proxy's prefix) is allowed.

    @raise ConfigError: naming C{http.public_url}.
    """
    def bad(why: str) -> ConfigError:
        return ConfigError(f"http.public_url {url!r} {why} (expected e.g. "
                           "\"http://10.0.0.5:8080\" or \"https://mn.example.com\")")

    if not url or url != url.strip() or any(c.isspace() or ord(c) < 32 for c in url):
        raise bad("is empty or holds whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise bad(f"is not a valid URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("must start with http:// or https://")
    if not parts.hostname:
        raise bad("has no host")
    if parts.username is not None or parts.password is not None:
        raise bad("must not hold credentials")
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        raise bad("must not have a query or fragment")


@attrs.frozen
class AgentsConfig:
    """
    How the node deals with agents.

    The bootstrap token is chosen, first match wins: C{bootstrap_token}, or the file
    C{bootstrap_token_file} names (which must exist); else the file C{agent-token} in the data
    directory, created with a fresh token on the first start (see L{token} and
    L{agent.bootstrap}).

    @ivar bootstrap_token: the token agents require at C{/host/connect} (C{twistd zagent
        --bootstrap-token-file}); C{bootstrap_token_file} names a file holding it instead.
    @ivar tls_ca: PEM CA certificate(s) agents' HTTPS certificates are checked against
        (default: the platform's CAs).
    @ivar pool_size: persistent HTTP connections the agent client keeps per agent endpoint
        (C{host:port}).
    @ivar max_in_flight: agent requests in flight at once, all agents together (None: as
        C{pool_size}); more wait in the node.
    @ivar max_in_flight_per_host: agent requests in flight at once to one agent base URL, so
        that hung hosts cannot take every slot (capped by C{max_in_flight}).
    @ivar accept_timeout: seconds an agent has to answer a POST (an asynchronous command's
        accept, a synchronous command's answer); a host that does not is treated as hung
        (see Note [hung hosts] in L{zcontrol.agentclient.client}).
    """

    bootstrap_token: str | None = None
    bootstrap_token_file: str | None = None
    tls_ca: str | None = None
    #: as agent.http.DEFAULT_POOL_SIZE (tests.test_node_trust checks they agree)
    pool_size: int = 1000
    max_in_flight: int | None = None
    #: as zcontrol.agentclient.client.DEFAULT_MAX_IN_FLIGHT_PER_HOST
    max_in_flight_per_host: int = 32
    accept_timeout: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.bootstrap_token is not None and self.bootstrap_token_file is not None:
            raise ConfigError("give agents.bootstrap_token or agents.bootstrap_token_file")
        if self.bootstrap_token is not None and not self.bootstrap_token.strip():
            raise ConfigError("agents.bootstrap_token is empty")
        for name in ("pool_size", "max_in_flight", "max_in_flight_per_host"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"agents.{name} must be at least 1, not {value!r}")
        if not 0 < self.accept_timeout < float("inf"):
            raise ConfigError("agents.accept_timeout must be a positive number of seconds, "
                              f"not {self.accept_timeout!r}")

    def token(self, data_dir: str | None = None) -> str | None:
        """
        The bootstrap token, chosen as the class docstring says.

        @param data_dir: the node's data directory; None: no default token file (the result
            is then None when no token is configured).
        @raise ConfigError: the configured file cannot be read or is empty, or the data
            directory is not a directory, or its file is corrupt or cannot be created.
        """
        from agent.bootstrap import TOKEN_FILE, TokenFileError, ensure_token_file, read_token_file

        if self.bootstrap_token is not None:
            return self.bootstrap_token.strip()
        try:
            if self.bootstrap_token_file is not None:
                return read_token_file(self.bootstrap_token_file)
            if data_dir is None:
                return None
            from zcontrol.datadir import check_data_dir

            check_data_dir(data_dir)
            path = os.path.join(data_dir, TOKEN_FILE)
            token, created = ensure_token_file(path)
        except TokenFileError as e:
            if self.bootstrap_token_file is not None:
                raise ConfigError(f"agents.bootstrap_token_file: {e}") from None
            raise ConfigError(f"{e} (it is the agents' default bootstrap token; fix it, or "
                              "set agents.bootstrap_token_file)") from None
        if created:
            log.info("new agents' bootstrap token kept in {path}: give agents that file "
                     "(twistd zagent --bootstrap-token-file {path})", path=path)
        return token


@attrs.frozen
class HostConfig:
    """
    Host service settings, the C{[host]} section (ZStack's C{host.xml} global config where
    it has one). Times are seconds.

    @ivar drain_timeout: how long a stop waits for the work in flight before failing it.
    @ivar max_pending_per_host: commands that may wait in one host's chain (beyond the
        C{host_sync_level} running); more are refused with C{CHAIN.1000}.
    """

    ping_interval: float = 60.0
    ping_timeout: float = 10.0
    ping_parallelism: int = 100
    max_ping_failures: int = 3
    auto_reconnect: bool = True
    vm_sync_on_ping: bool = True
    connect_timeout: float = 300.0
    echo_interval: float = 2.0
    echo_timeout: float = 5.0
    command_timeout: float = 300.0
    host_sync_level: int = 10
    max_pending_per_host: int = 1000
    agent_port: int = 7070
    send_command_url: str | None = None
    page_size: int = 1000
    drain_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        for name in ("ping_interval", "ping_timeout", "connect_timeout", "echo_interval",
                     "echo_timeout", "command_timeout", "ping_parallelism",
                     "max_ping_failures", "host_sync_level", "agent_port", "page_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"host.{name} must be positive, not {getattr(self, name)!r}")
        for name in ("drain_timeout", "max_pending_per_host"):
            if getattr(self, name) < 0:
                raise ConfigError(f"host.{name} must not be negative")


@attrs.frozen
class VmConfig:
    """
    VM service settings, the C{[vm]} section (ZStack's C{vm.xml} and C{kvm.xml} global config
    where it has one). Times are seconds.

    @ivar deletion_policy: ZStack's C{vm.deletionPolicy}: C{Delay} (a destroyed VM is
        C{Destroyed}, its volumes kept until expunged), C{Direct} (expunged at once) or
        C{Never} (kept Destroyed until an explicit expunge).
    @ivar expunge_period: ZStack's C{vm.expungePeriod}: how long a C{Delay}-destroyed VM
        waits before it is expunged automatically.
    @ivar expunge_interval: ZStack's C{vm.expungeInterval}: how often this node looks for
        VMs to expunge.
    @ivar stop_timeout: how long a graceful stop waits for the guest before forcing it off.
    @ivar command_timeout: the bound of one agent command a VM flow sends.
    @ivar probe_timeout: at recovery, the bound of one C{/vm/checkstate} probe.
    @ivar rollback_timeout: at recovery, the bound of one flow's rollback.
    @ivar recovery_parallelism: how many interrupted jobs are resolved at once at start.
    @ivar create_timeout: the bound of a whole create (every flow, waits included).
    @ivar recovery_interval: how often this node retries the resolution of its jobs that a
        recovery left C{Running} (a rollback that failed: the agent was unreachable).
    """

    deletion_policy: str = "Delay"
    expunge_period: float = 604800.0
    expunge_interval: float = 3600.0
    stop_timeout: float = 60.0
    command_timeout: float = 300.0
    probe_timeout: float = 60.0
    rollback_timeout: float = 300.0
    recovery_parallelism: int = 8
    create_timeout: float = 1800.0
    recovery_interval: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.deletion_policy not in ("Delay", "Direct", "Never"):
            raise ConfigError("vm.deletion_policy must be Delay, Direct or Never, not "
                              f"{self.deletion_policy!r}")
        for name in ("expunge_period", "expunge_interval", "stop_timeout", "command_timeout",
                     "probe_timeout", "rollback_timeout", "recovery_parallelism",
                     "create_timeout", "recovery_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vm.{name} must be positive, not {getattr(self, name)!r}")


@attrs.frozen
class ShutdownConfig:
    """
    The C{[shutdown]} section.

    @ivar drain_timeout: seconds each part of the node (host service, HTTP, agent client,
        bus, heartbeat, store) may take to stop; then its stop is abandoned (logged) and
        the next part stops, so a node always exits.
    """

    drain_timeout: float = 20.0

    def __attrs_post_init__(self) -> None:
        if self.drain_timeout < 0:
            raise ConfigError("shutdown.drain_timeout must not be negative")


@attrs.frozen
class Config:
    node_id: str | None  # None: chosen at start by zcontrol.identity.resolve_node_id
    data_dir: str
    store: StoreConfig
    bus: BusConfig = attrs.field(factory=BusConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    host: HostConfig = attrs.field(factory=HostConfig)
    shutdown: ShutdownConfig = attrs.field(factory=ShutdownConfig)
    agents: AgentsConfig = attrs.field(factory=AgentsConfig)
    vm: VmConfig = attrs.field(factory=VmConfig)


_SECTIONS: dict[str, dict[str, type]] = {
    "node": {"id": str, "data_dir": str},
    "store": {"url": str, "pool_size": int},
    "bus": {"backend": str, "amqp_url": str, "message_timeout": float,
            "heartbeat_interval": float, "max_message_size": int, "prefix": str},
    "http": {"port": int, "interface": str, "backlog": int, "public_url": str,
             "tls_cert": str, "tls_key": str},
    "agents": {"bootstrap_token": str, "bootstrap_token_file": str, "tls_ca": str,
               "pool_size": int, "max_in_flight": int, "max_in_flight_per_host": int,
               "accept_timeout": float},
    "host": {a.name: {"float": float, "int": int, "bool": bool}.get(a.type, str)  # type: ignore[call-overload]
             for a in attrs.fields(HostConfig)},
    "shutdown": {"drain_timeout": float},
    "vm": {a.name: {"float": float, "int": int, "bool": bool}.get(a.type, str)  # type: ignore[call-overload]
           for a in attrs.fields(VmConfig)},
}


def _coerce(section: str, key: str, value: Any) -> Any:
    kinds = _SECTIONS.get(section)
    if kinds is None:
        raise ConfigError(f"unknown config section [{section}]")
    kind = kinds.get(key)
    if kind is None:
        raise ConfigError(f"unknown config key {section}.{key}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false: {value!r}")
        return value
    what = f"a {kind.__name__}"  # tests.test_node.ConfigTests quotes "must be a int"
    try:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and isinstance(value, str):
            value = int(value)
        elif kind is float and isinstance(value, str):
            value = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{section}.{key} must be {what}: {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be {what}: {value!r}")
    # nan passes every "must be positive" check (all its comparisons are false) and breaks
    # timers later; inf is a wait without a bound
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{section}.{key} must be a finite number: {value!r}")
    return value


def load_config(path: str | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """
    Build the configuration: defaults, then the TOML file at C{path} (if any), then
    C{overrides} (C{{"section": {"key": value}}}, None values ignored).

    @raise ConfigError: an unreadable file, an unknown key or an invalid value.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for section, items in doc.items():
            if not isinstance(items, dict):
                raise ConfigError(f"config entry {section!r} must be a [section]")
            for key, value in items.items():
                values.setdefault(section, {})[key] = _coerce(section, key, value)
    for section, items in (overrides or {}).items():
        for key, value in items.items():
            if value is not None:
                values.setdefault(section, {})[key] = _coerce(section, key, value)

    node = values["node"]
    data_dir = os.path.abspath(node.get("data_dir", "var"))
    store = values["store"]
    url = store.get("url") or f"sqlite:///{os.path.join(data_dir, 'zcontrol.db')}"
    try:
        return Config(
            node_id=node.get("id") or None,
            data_dir=data_dir,
            store=StoreConfig(url=url, pool_size=store.get("pool_size")),
            bus=BusConfig(**values["bus"]),
            http=HttpConfig(**values["http"]),
            host=HostConfig(**values["host"]),
            shutdown=ShutdownConfig(**values["shutdown"]),
            agents=AgentsConfig(**values["agents"]),
            vm=VmConfig(**values["vm"]),
        )
    except TypeError as e:
        raise ConfigError(str(e)) from None
