# -*- test-case-name: tests.test_node -*-
"""
The management node's root service: store → management-node heartbeat → bus → agent client →
HTTP (agents' callbacks) → services (host), started one after the other (each waits for the
previous one to be up) and stopped in reverse, each stop waiting for the work that part still
has in flight. HTTP comes up before the services because the first thing the host service
does is reconnect the hosts, whose answers arrive as callbacks.

Twisted's own C{MultiService} starts children without waiting for their Deferreds; a node
whose bus came up before its store would take messages it cannot serve, hence
L{OrderedMultiService}.

Note [bounded shutdown]: every child's stop may take at most C{shutdown.drain_timeout}
seconds; a stop still running then is cancelled and logged, and the next child stops, so
SIGTERM always ends in an exit. The host service drains its own work within
C{host.drain_timeout} (shorter) and then fails what is still in flight; the agent client then
fails the commands still pending (C{SYS.1017}, saying the node is stopping).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure

from zcontrol._defer import async_to_deferred
from zcontrol.config import Config, ConfigError

__all__ = ["AgentClientService", "ComponentService", "HeartbeatService", "HostComponent",
           "HttpService", "ManagementNode", "OrderedMultiService", "make_bus", "make_node",
           "start_failure_cause"]

log = Logger()


class OrderedMultiService(MultiService):
    """
    A MultiService whose children start in order, each after the previous one's
    C{startService} Deferred fired, and stop in reverse order, each waited for.

    @ivar started: fires once every child is up, or fails with the first child's failure
        (the children already started are then stopped again).
    """

    def __init__(self, on_start_failure: Callable[[Failure], Any] | None = None,
                 drain_timeout: float | None = None, clock: Any = None):
        """
        @param drain_timeout: seconds each child's stop may take (see Note [bounded
            shutdown]); None waits without a limit. Needs C{clock}.
        """
        super().__init__()
        self._up: list[Service] = []
        self._on_start_failure = on_start_failure
        self._drain_timeout = drain_timeout
        self._drain_clock = clock
        self.started: Deferred | None = None

    def startService(self) -> Deferred:
        Service.startService(self)
        self.started = Deferred.fromCoroutine(self._start_children())
        self.started.addErrback(self._start_failed)
        return self.started

    async def _start_children(self) -> None:
        for child in list(self):
            log.info("starting {name}", name=child.name)
            await maybeDeferred(child.startService)
            self._up.append(child)
        log.info("{n} node parts up", n=len(self._up))

    async def _stop_children(self) -> None:
        while self._up:
            child = self._up.pop()
            log.info("stopping {name}", name=child.name)
            try:
                d = maybeDeferred(child.stopService)
                if self._drain_timeout is not None and self._drain_clock is not None:
                    d = _bounded(d, self._drain_clock, self._drain_timeout, child.name)
                await d
            except Exception:
                log.failure("stopping {name} failed", name=child.name)

    def _start_failed(self, reason: Failure) -> Failure:
        # One line naming the cause for the operator; a traceback (at debug level) only for
        # an unexpected exception, not for the operator's errors (port, file, database).
        cause, known = start_failure_cause(reason)
        log.critical("the management node failed to start: {cause}", cause=cause)
        if not known:
            log.failure("start failure traceback", reason, level=LogLevel.debug)
        d = Deferred.fromCoroutine(self._stop_children())
        if self._on_start_failure is not None:
            d.addBoth(lambda _: self._on_start_failure(reason))
        return reason

    def stopService(self) -> Deferred:
        Service.stopService(self)
        starting = self.started if self.started is not None else succeed(None)
        # Let a start in progress finish (or fail) first, then stop what is up.
        d = Deferred()
        starting.addBoth(lambda _: d.callback(None))
        return d.addCallback(lambda _: Deferred.fromCoroutine(self._stop_children()))


def start_failure_cause(reason: Failure) -> tuple[str, bool]:
    """
    Why a start failed, in one line for the operator: an L{OperationError}'s error code
    (code, description, details), a listen error's address and reason, a configuration
    error's or an OS error's text; any other exception as C{<type>: <text>}.

    @return: C{(line, known)}; C{known} is False for an unexpected exception (whose
        traceback is worth logging).
    """
    from twisted.internet.error import CannotListenError

    from zcontrol.core.errors import OperationError

    e = reason.value
    if isinstance(e, OperationError):
        return str(e.error), True
    if isinstance(e, CannotListenError):
        return f"cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}", True
    if isinstance(e, (ConfigError, OSError)):
        return str(e), True
    return f"{type(e).__name__}: {e}", False


def _bounded(d: Deferred, clock: Any, seconds: float, name: str | None) -> Deferred:
    """
    C{d}, but fired (with None) after C{seconds} if it has not fired by then; C{d} is then
    cancelled and the overrun logged.
    """
    out: Deferred = Deferred()

    def overrun() -> None:
        log.error("stopping {name} took more than its {s}s drain limit; abandoning it",
                  name=name, s=seconds)
        d.cancel()
        if not out.called:
            out.callback(None)

    timer = clock.callLater(seconds, overrun)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        elif isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("stopping {name} failed after its drain limit", result, name=name)

    d.addBoth(done)
    return out


class ComponentService(Service):
    """
    A service around a component with C{start()} / C{stop()} methods returning Deferreds.
    """

    def __init__(self, name: str, component: Any):
        self.setName(name)
        self.component = component

    def startService(self) -> Deferred:
        Service.startService(self)
        return maybeDeferred(self.component.start)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return maybeDeferred(self.component.stop)


class HeartbeatService(Service):
    """
    Writes this node's row in the management-node table every C{interval} seconds (ZStack:
    5 s), and deletes it on a clean stop so that peers need not wait for it to expire.
    """

    name = "heartbeat"

    def __init__(self, store: Any, node_id: str, clock: Any, interval: float = 5.0,
                 port: int | None = None):
        self._store = store
        self._node_id = node_id
        self._interval = interval
        self._port = port
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock
        self._done: Deferred | None = None

    def _beat(self) -> Deferred:
        d = self._store.heartbeat(self._node_id, socket.gethostname(), self._port)
        # A failed heartbeat is logged; the next one tries again.
        d.addErrback(lambda f: log.failure("management-node heartbeat failed", f))
        return d

    def startService(self) -> Deferred:
        Service.startService(self)
        first = self._beat()
        self._done = self._loop.start(self._interval, now=False)
        return first

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        d = self._store.delete_management_node(self._node_id)
        d.addErrback(lambda f: log.failure("removing the management-node row failed", f))
        return d


def make_bus(config: Config, reactor: Any) -> Any:
    """
    The bus the configuration asks for (imported lazily: the AMQP backend needs txAMQP).
    """
    if config.bus.backend == "amqp":
        from zcontrol.bus.amqp import AMQPBus

        url = urlsplit(config.bus.amqp_url)
        if url.scheme != "amqp":
            raise ConfigError(f"bus.amqp_url must be an amqp:// URL: {config.bus.amqp_url!r}")
        vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
        return AMQPBus(
            reactor,
            node_id=config.node_id,
            host=url.hostname or "127.0.0.1",
            port=url.port or 5672,
            username=unquote(url.username or "guest"),
            password=unquote(url.password or "guest"),
            vhost=vhost,
            default_timeout=config.bus.message_timeout,
            heartbeat_interval=config.bus.heartbeat_interval,
            max_message_size=config.bus.max_message_size,
            prefix=config.bus.prefix,
        )
    from zcontrol.bus.local import LocalBus

    return LocalBus(reactor, node_id=config.node_id,
                    default_timeout=config.bus.message_timeout)


class HttpService(Service):
    """
    The node's HTTP listener: the agents' callback endpoint (the API mounts here later),
    with a deliberate listen backlog.

    @ivar base_url: the URL agents reach this node at, known once listening.
    """

    name = "http"

    def __init__(self, reactor: Any, config: Config, endpoint: Any, agents: Any):
        self._reactor = reactor
        self._config = config
        self._endpoint = endpoint
        self._agents = agents
        self._port: Any = None
        self.base_url: str | None = None

    def startService(self) -> None:
        from zcontrol.agentclient import CALLBACK_PATH, callback_site

        Service.startService(self)
        http = self._config.http
        self._factory = _TrackingFactory(callback_site(self._endpoint))
        if http.tls_cert is not None:
            from agent.http import server_tls_options

            try:
                tls = server_tls_options(http.tls_cert, http.tls_key)
            except ValueError as e:  # unreadable or not PEM: the operator's files
                raise ConfigError(f"http.tls_cert / http.tls_key: {e}") from None
            self._port = self._reactor.listenSSL(
                http.port, self._factory, tls, backlog=http.backlog, interface=http.interface)
        else:
            self._port = self._reactor.listenTCP(http.port, self._factory,
                                                 backlog=http.backlog,
                                                 interface=http.interface)
        self.base_url = http.callback_base(self._port.getHost().port)
        self._agents.callback_url = self.base_url + CALLBACK_PATH
        log.info("HTTP on {url} (agent callbacks at {cb})", url=self.base_url,
                 cb=self._agents.callback_url)

    def stopService(self) -> Deferred:
        """
        Stop listening, then close the connections still open (agents keep persistent
        ones) and wait until they are gone.
        """
        Service.stopService(self)
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        d = maybeDeferred(port.stopListening)
        d.addCallback(lambda _: self._factory.close_all())
        return d


class _TrackingFactory(WrappingFactory):
    """
    Knows its open connections, so that a stop can close them and wait.
    """

    def __init__(self, wrapped: Any):
        super().__init__(wrapped)
        self._gone: list[Deferred] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            gone, self._gone = self._gone, []
            for d in gone:
                d.callback(None)

    def close_all(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._gone.append(d)
        for p in list(self.protocols):
            # Unregister the channel as the transport's producer first (as
            # HTTPChannel.loseConnection does): a TLS transport with a producer never starts
            # its shutdown, and the connection lingers until the channel's idle timeout.
            p.transport.unregisterProducer()
            p.transport.loseConnection()
        return d


class AgentClientService(Service):
    """
    Owns the agent client: on stop, the commands still waiting for a callback are
    cancelled (SYS.1017) and the connection pool is closed.
    """

    name = "agents"

    def __init__(self, agents: Any):
        self.agents = agents

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self.agents.close("the management node is stopping")


class HostComponent(Service):
    """
    The host service: serves C{host} on the bus, pings its hosts, and at start reconnects the
    hosts this node owns (callback secrets live in memory, so a starting node agrees new
    ones). The reconnect runs in the background; its outcome is logged per host.
    """

    name = "host"

    def __init__(self, node: ManagementNode, http: HttpService, endpoint: Any):
        self._node = node
        self._http = http
        self._endpoint = endpoint
        self.service: Any = None
        #: fires with the number of hosts reconnected at start (None if that failed)
        self.reconnected: Deferred | None = None

    def startService(self) -> None:
        from zcontrol.agentclient.endpoint import SEND_COMMAND_PATH
        from zcontrol.services.host import HostService

        Service.startService(self)
        node = self._node
        config = attrs.evolve(node.config.host,
                              send_command_url=self._http.base_url + SEND_COMMAND_PATH)
        self.service = HostService(node.reactor, node.bus, node.store, node.agents, config)
        for path, handler in self.service.report_handlers().items():
            self._endpoint.on_report(path, handler)
        self.service.start()
        def reconnected(n: int) -> int:
            log.info("reconnected {n} hosts", n=n)
            return n

        def failed(f: Failure) -> None:
            log.failure("reconnecting hosts failed", f)

        self.reconnected = self.service.reconnect_all().addCallbacks(reconnected, failed)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self.service.stop() if self.service is not None else succeed(None)


class InventoryServices(Service):
    """
    The inventory services of L{zcontrol.services.registry.SERVICE_FACTORIES}, built and
    started in order after the host service, stopped in reverse order.
    """

    name = "inventory"

    def __init__(self, node: ManagementNode, host: HostComponent):
        self._node = node
        self._host = host
        self.services: list[Any] = []

    @async_to_deferred
    async def startService(self) -> None:
        from twisted.python.reflect import namedAny

        from zcontrol.services.registry import SERVICE_FACTORIES

        Service.startService(self)
        for dotted in SERVICE_FACTORIES:
            service = namedAny(dotted)(self._node)
            await maybeDeferred(service.start)
            self.services.append(service)
        log.info("inventory services up: {ids}",
                 ids=", ".join(s.service_id for s in self.services))

    @async_to_deferred
    async def stopService(self) -> None:
        Service.stopService(self)
        while self.services:
            await maybeDeferred(self.services.pop().stop)


class ManagementNode(OrderedMultiService):
    """
    A management node: the root of the service tree built by L{make_node}.

    @ivar config: the frozen L{Config}.
    @ivar store: the L{zcontrol.db.IStore}.
    @ivar bus: the L{zcontrol.bus.IBus}.
    @ivar agents: the L{zcontrol.agentclient.AgentClient}.
    """

    def __init__(self, config: Config, reactor: Any, store: Any, bus: Any, agents: Any,
                 on_start_failure: Callable[[Failure], Any] | None = None):
        super().__init__(on_start_failure, config.shutdown.drain_timeout, reactor)
        self.config = config
        self.reactor = reactor
        self.store = store
        self.bus = bus
        self.agents = agents


def _trust_root(config: Config) -> Any:
    if config.agents.tls_ca is None:
        return None
    from agent.http import trust_root_from_pem

    try:
        return trust_root_from_pem(config.agents.tls_ca)
    except ValueError as e:
        raise ConfigError(f"agents.tls_ca: {e}") from None


def make_node(config: Config, reactor: Any,
              on_start_failure: Callable[[Failure], Any] | None = None) -> ManagementNode:
    """
    Build (not start) a management node from C{config}. Its id is chosen (and on a first
    start persisted) by L{zcontrol.identity.resolve_node_id}; its agents' bootstrap token by
    L{zcontrol.config.AgentsConfig.token} (on a first start without a configured token,
    C{<data_dir>/agent-token} is created).

    @raise ConfigError: the node id or the bootstrap token cannot be chosen (e.g. a corrupt
        id or token file).
    """
    from zcontrol.agentclient import AgentClient, CallbackEndpoint
    from zcontrol.db import open_store
    from zcontrol.identity import with_node_id

    config = with_node_id(config)

    if config.store.url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(config.store.url[len("sqlite://"):]), exist_ok=True)
    options = {}
    if config.store.pool_size:
        options["pool_size"] = config.store.pool_size
    store = open_store(config.store.url, reactor, **options)
    bus = make_bus(config, reactor)
    # The callback URL is known once HTTP listens (the port may be chosen by the OS). The
    # bootstrap token: the configured one, else <data_dir>/agent-token (created on the first
    # start; AgentsConfig says how it is chosen).
    agents = AgentClient.create(reactor, "", pool_size=config.agents.pool_size,
                                max_in_flight=config.agents.max_in_flight,
                                max_in_flight_per_host=config.agents.max_in_flight_per_host,
                                bootstrap_token=config.agents.token(config.data_dir),
                                trust_root=_trust_root(config))
    endpoint = CallbackEndpoint(agents)
    agents.accept_timeout = config.agents.accept_timeout
    node = ManagementNode(config, reactor, store, bus, agents, on_start_failure)
    ComponentService("store", store).setServiceParent(node)
    HeartbeatService(store, config.node_id, reactor,
                     config.bus.heartbeat_interval).setServiceParent(node)
    ComponentService("bus", bus).setServiceParent(node)
    AgentClientService(agents).setServiceParent(node)
    http = HttpService(reactor, config, endpoint, agents)
    http.setServiceParent(node)
    host = HostComponent(node, http, endpoint)
    host.setServiceParent(node)
    InventoryServices(node, host).setServiceParent(node)
    return node
