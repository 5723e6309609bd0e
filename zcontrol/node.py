# -*- test-case-name: tests.test_node -*-
"""
The management node's root service: store → management-node heartbeat → bus → services →
HTTP, started one after the other (each waits for the previous one to be up) and stopped in
reverse, each stop waiting for the work that part still has in flight.

Twisted's own C{MultiService} starts children without waiting for their Deferreds; a node
whose bus came up before its store would take messages it cannot serve, hence
L{OrderedMultiService}.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from zcontrol.config import Config, ConfigError

__all__ = ["ComponentService", "HeartbeatService", "ManagementNode", "OrderedMultiService",
           "make_bus", "make_node"]

log = Logger()


class OrderedMultiService(MultiService):
    """
    A MultiService whose children start in order, each after the previous one's
    C{startService} Deferred fired, and stop in reverse order, each waited for.

    @ivar started: fires once every child is up, or fails with the first child's failure
        (the children already started are then stopped again).
    """

    def __init__(self, on_start_failure: Callable[[Failure], Any] | None = None):
        super().__init__()
        self._up: list[Service] = []
        self._on_start_failure = on_start_failure
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
        log.info("{n} services up", n=len(self._up))

    async def _stop_children(self) -> None:
        while self._up:
            child = self._up.pop()
            log.info("stopping {name}", name=child.name)
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)

    def _start_failed(self, reason: Failure) -> Failure:
        log.failure("the management node failed to start", reason)
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
        )
    from zcontrol.bus.local import LocalBus

    return LocalBus(reactor, node_id=config.node_id,
                    default_timeout=config.bus.message_timeout)


class ManagementNode(OrderedMultiService):
    """
    A management node: the root of the service tree built by L{make_node}.

    @ivar config: the frozen L{Config}.
    @ivar store: the L{zcontrol.db.IStore}.
    @ivar bus: the L{zcontrol.bus.IBus}.
    """

    def __init__(self, config: Config, reactor: Any, store: Any, bus: Any,
                 on_start_failure: Callable[[Failure], Any] | None = None):
        super().__init__(on_start_failure)
        self.config = config
        self.reactor = reactor
        self.store = store
        self.bus = bus


def make_node(config: Config, reactor: Any,
              on_start_failure: Callable[[Failure], Any] | None = None) -> ManagementNode:
    """
    Build (not start) a management node from C{config}.
    """
    from zcontrol.db import open_store

    if config.store.url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(config.store.url[len("sqlite://"):]), exist_ok=True)
    options = {}
    if config.store.pool_size:
        options["pool_size"] = config.store.pool_size
    store = open_store(config.store.url, reactor, **options)
    bus = make_bus(config, reactor)
    node = ManagementNode(config, reactor, store, bus, on_start_failure)
    ComponentService("store", store).setServiceParent(node)
    HeartbeatService(store, config.node_id, reactor,
                     config.bus.heartbeat_interval).setServiceParent(node)
    ComponentService("bus", bus).setServiceParent(node)
    return node
