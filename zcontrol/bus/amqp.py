# -*- test-case-name: tests.test_bus_amqp -*-
"""
The bus over RabbitMQ (ZStack's C{CloudBusImpl2}), on txAMQP.

Topology (C{prefix} is prepended to every exchange and queue name; it is empty in
production and random in tests):
 - exchange C{P2P} (topic, alternate exchange C{NO_ROUTE}): requests, posts and replies;
 - exchange C{BROADCAST} (topic): events, routing key = the event's topic;
 - exchange C{NO_ROUTE} (fanout): what P2P cannot route, and what service queues
   dead-letter (expired or rejected), into the shared queue C{zcontrol.NO_ROUTE}, which
   every node consumes: a request found there is answered C{SYS.1009} (no route) or
   C{SYS.1011} (dead-lettered), so that its sender does not wait for the timeout;
 - per node and service, queue C{zcontrol.message.<service>.<node>} bound to P2P with key
   C{<service>.<node>} (no per-request queues, ZSTACK_FACTS §1);
 - per node, reply queue C{zcontrol.message.cloudbus.<node>} (key C{cloudbus.<node>}) and
   event queue C{zcontrol.event.<node>} bound to BROADCAST with each subscribed pattern and
   C{zcontrol.node.*} (membership heartbeats).
Queues are non-durable and not exclusive, so that they outlive a dropped connection (the
consumers come back when it is re-established); an unused queue expires after
C{queue_expires}; a clean stop deletes the node's queues. Messages are non-persistent with a
per-message TTL (the time the sender will still wait, at most C{message_ttl}).

Publisher confirms are on: a request the broker refuses (nack), returns (mandatory, no queue
even behind the alternate exchange) or loses with the connection is answered at once with
C{SYS.1011} or C{SYS.1016}; a post or a publish fires its Deferred only on the broker's ack.

Membership: every node publishes a heartbeat every C{heartbeat_interval} seconds on C{clock};
a node not heard from for C{heartbeat_misses} intervals leaves the ring, and the sends that
were waiting on it are answered C{SYS.1012}. A node that stops says so at once. Membership
can be fed from elsewhere instead (C{heartbeat_interval=None} and L{AMQPBus.set_members}).
Note [who may judge]: a node counts its peers' missed heartbeats only while it can hear
them: its connection is up, its event queue is consumed, and its own previous heartbeat came
back through the broker. Otherwise silence says nothing about the peers (during a broker
outage every node would evict every other and own everything when it reconnects: a
split-brain window), so the round is not counted; after a reconnection the counts restart
from zero.

Note [lost queues]: a queue of this node can be deleted while the connection stays up (an
operator, a broker policy). The bus asks for RabbitMQ's consumer cancel notification
(client capability C{consumer_cancel_notify}), and on C{basic.cancel} declares the queue
again, binds and consumes it. Losing the reply queue loses the replies on their way: the
sends waiting for them are answered C{SYS.1016} at once, and new sends are refused with
C{SYS.1016} until the queue is back (L{AMQPBus.connected} is False meanwhile).

Note [message size]: RabbitMQ closes the channel on a message over its C{max_message_size}
(128 MiB by default in 3.x, 16 MiB in 4.x), which drops every send in flight on the
connection. The bus checks each encoded body against C{max_message_size} (8 MiB by default,
C{bus.max_message_size} in the config) before publishing: only that send fails, with
C{SYS.1007} naming the size and the limit. An oversized reply is replaced by such an error
reply. Messages delivered by the local short-cut are not encoded and not checked.

Two clocks: C{reactor} runs the I/O and the reconnection backoff; C{clock} times message
timeouts and heartbeats (tests give a L{task.Clock} there and keep the real reactor for I/O).
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Iterable

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.endpoint import AMQEndpoint
from zope.interface import implementer

from agent.codec import loads
from zcontrol._defer import DeferWaiter
from zcontrol.bus._amqp_proto import BusFactory, BusProtocol
from zcontrol.bus._dispatch import call_handler, deliver_event
from zcontrol.bus._pending import PendingTable, exchange_of, stamp_trace
from zcontrol.bus.interfaces import IBus, ISubscription
from zcontrol.bus.local import BusSendMixin, _EventualQueue
from zcontrol.bus.message import (
    DecodeError,
    Event,
    Message,
    NeedReplyMessage,
    Registry,
    Reply,
    envelope_error,
    new_id,
)
from zcontrol.bus.message import registry as default_registry
from zcontrol.bus.ring import ConsistentHashRing
from zcontrol.core.errors import SYS, OperationError, error_code

__all__ = ["AMQPBus", "Topology"]

log = Logger()

CHANNEL = 1
# AMQP "type" property: what a message is, readable without decoding its body.
REQUEST, POST, REPLY, EVENT, NODE = "req", "msg", "reply", "event", "node"


@attrs.frozen
class Topology:
    """
    Exchange and queue names of one bus cluster (see the module docstring).
    """

    prefix: str = ""

    @property
    def p2p(self) -> str:
        return f"{self.prefix}P2P"

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}BROADCAST"

    @property
    def no_route(self) -> str:
        return f"{self.prefix}NO_ROUTE"

    @property
    def no_route_queue(self) -> str:
        return f"{self.prefix}zcontrol.NO_ROUTE"

    def service_queue(self, service_id: str, node_id: str) -> str:
        return f"{self.prefix}zcontrol.message.{service_id}.{node_id}"

    def reply_queue(self, node_id: str) -> str:
        return f"{self.prefix}zcontrol.message.cloudbus.{node_id}"

    def event_queue(self, node_id: str) -> str:
        return f"{self.prefix}zcontrol.event.{node_id}"

    @staticmethod
    def service_key(service_id: str, node_id: str) -> str:
        return f"{service_id}.{node_id}"

    @staticmethod
    def reply_key(node_id: str) -> str:
        return f"cloudbus.{node_id}"


NODE_TOPIC = "zcontrol.node.*"

#: The default largest encoded message body (bytes): below the broker's own default limit
#: (RabbitMQ 3.x: 128 MiB; 4.x: 16 MiB), so that an oversized message fails alone.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024


@implementer(ISubscription)
@attrs.define(eq=False)
class _Subscription:
    pattern: str
    handler: Callable[[Event], Any]
    _bus: AMQPBus
    ready: Deferred = attrs.field(factory=Deferred)
    active: bool = True

    def cancel(self) -> Deferred:
        if self.active:
            self.active = False
            self._bus._unsubscribe(self)
        return succeed(None)


def _fire(d: Deferred, value: Any = None) -> None:
    if not d.called:
        d.callback(value)


@implementer(IBus)
class AMQPBus(BusSendMixin):
    """
    An L{IBus} over RabbitMQ.

    @param reactor: runs the connection (C{IReactorTCP} and C{IReactorTime}); reconnection
        backoff uses its time.
    @param clock: times message timeouts and heartbeats; the reactor by default.
    @param prefix: prepended to every exchange and queue name (isolates clusters and tests).
    @param message_ttl: the longest a message waits in a queue (seconds).
    @param queue_expires: an unused queue of this node is deleted by the broker after this
        (seconds); None keeps it.
    @param heartbeat_interval: seconds between membership heartbeats (on C{clock}); None
        disables them (feed L{set_members} instead).
    @param heartbeat_misses: a peer not heard from for this many intervals leaves.
    @param local_shortcut: deliver in-process (no broker round trip) the messages that this
        node owns and serves, as ZStack's later bus does.
    @param retry_policy: reconnection delays, C{attempt -> seconds}.
    @param start_attempts: connection attempts before L{start} fails with C{SYS.1016}.
    @param amqp_heartbeat: AMQP heartbeat (seconds, 0 = off), so that a dead peer or a
        silent network drop is noticed and the connection re-established.
    @param connection_name: the C{connection_name} client property (RabbitMQ shows it);
        C{zcontrol-bus-<node id>} by default.
    @param prefetch: unacknowledged deliveries per consumer (deliveries are acknowledged
        as soon as they are decoded and dispatched, batched per read).
    @param max_message_size: the largest encoded body (bytes) the bus publishes; a larger
        send, post or publish fails alone with C{SYS.1007} (Note [message size]). Keep it
        below the broker's C{max_message_size}.
    """

    def __init__(
        self,
        reactor: Any,
        clock: Any = None,
        *,
        node_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 5672,
        username: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        prefix: str = "",
        registry: Registry = default_registry,
        default_timeout: float = 1800.0,
        timer_resolution: float = 0.05,
        message_ttl: float = 300.0,
        queue_expires: float | None = 600.0,
        heartbeat_interval: float | None = 5.0,
        heartbeat_misses: int = 6,
        vnodes: int = 500,
        prefetch: int = 2000,
        local_shortcut: bool = False,
        drain_timeout: float = 30.0,
        retry_policy: Callable[[int], float] | None = None,
        start_attempts: int = 5,
        amqp_heartbeat: int = 30,
        connection_name: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ):
        if max_message_size < 1:
            raise ValueError("max_message_size must be a positive number of bytes")
        self.node_id = node_id or new_id()
        if "." in self.node_id or "#" in self.node_id or "*" in self.node_id:
            raise ValueError("a node id cannot contain '.', '*' or '#'")
        self.registry = registry
        self.topology = Topology(prefix)
        self.connection_name = connection_name or f"zcontrol-bus-{self.node_id}"
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._pending = PendingTable(self._clock, default_timeout, timer_resolution)
        self._services: dict[str, Callable[[Any], Any]] = {}
        self._subs: list[_Subscription] = []
        self._handlers: list[tuple[str, Callable[[Event], Any]]] = []
        self._inflight = DeferWaiter()
        self._ring = ConsistentHashRing([self.node_id], vnodes=vnodes)
        self._missed: dict[str, int] = {}
        self._heard: dict[str, list[Deferred]] = {}
        self._member_waiters: list[tuple[int, Deferred]] = []
        self._left_waiters: dict[str, list[Deferred]] = {}
        self._message_ttl = message_ttl
        self._queue_args: dict[str, Any] = {
            "x-dead-letter-exchange": self.topology.no_route,
            "x-dead-letter-routing-key": "dead-message",
        }
        if queue_expires is not None:
            self._queue_args["x-expires"] = int(queue_expires * 1000)
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_misses = heartbeat_misses
        self._prefetch = prefetch
        self._local_shortcut = local_shortcut
        self._local = _EventualQueue(reactor)
        self._drain_timeout = drain_timeout
        self._start_attempts = start_attempts
        self._endpoint = AMQEndpoint(reactor, host, port, username=username, password=password,
                                     vhost=vhost, heartbeat=amqp_heartbeat, timeout=10)
        self._factory = BusFactory(reactor, self.connection_name)
        self._retry_policy = retry_policy or backoffPolicy(initialDelay=0.1, maxDelay=5.0)
        self._service: ClientService | None = None
        self._beat_loop: LoopingCall | None = None
        # per connection
        self._proto: BusProtocol | None = None  # set once the connection is ready
        self._writer: BusProtocol | None = None  # set as soon as it can publish
        self._channel: Any = None
        self._open_channel: Any = None  # as soon as it is open (lost-queue recovery)
        self._consuming: set[str] = set()
        self._seq = 0
        self._unconfirmed: dict[int, tuple] = {}
        self._unconfirmed_order: collections.deque[int] = collections.deque()
        self._returned: set[str] = set()
        self._ack_tag = 0
        self._ready_waiters: list[Deferred] = []
        # consumers the broker cancelled (their queue was deleted), being re-established
        self._lost_consumers: set[str] = set()
        self._recover_again: set[str] = set()  # cancelled again while being re-established
        # our last heartbeat has not come back through the broker yet (Note [who may judge])
        self._echo_pending = False
        self._max_message_size = max_message_size
        self._running = False
        self._stopped = False

    # lifecycle

    def start(self) -> Deferred[None]:
        self._refusal: str | None = None
        endpoint = _DetachingEndpoint(self._endpoint, self._connect_failed)
        self._service = ClientService(endpoint, self._factory,
                                      retryPolicy=self._retry_policy, clock=self._reactor,
                                      prepareConnection=self._prepare)
        self._service.startService()
        d = self._service.whenConnected(failAfterFailures=self._start_attempts)

        def connected(_: Any) -> None:
            self._running = True
            if self._heartbeat_interval is not None:
                self._beat_loop = LoopingCall(self._beat)
                self._beat_loop.clock = self._clock
                self._beat_loop.start(self._heartbeat_interval, now=False)
                self._publish_node("hello")

        def failed(reason: Failure) -> Deferred:
            service, self._service = self._service, None
            # stopService() cannot run inside ClientService's own callback (automat
            # refuses re-entrance): leave it to the next reactor turn.
            d2: Deferred[None] = Deferred()
            self._reactor.callLater(0, lambda: service.stopService().chainDeferred(d2))

            def raise_(_: Any) -> None:
                why = self._refusal or reason.getErrorMessage()
                raise OperationError(error_code(
                    SYS.IO_ERROR,
                    f"cannot connect to RabbitMQ ({self._endpoint._host}:"
                    f"{self._endpoint._port}): {why}"))

            return d2.addBoth(raise_)

        return d.addCallbacks(connected, failed)

    async def _prepare_async(self, proto: BusProtocol) -> None:
        topo = self.topology
        proto.handler = self
        self._consuming = set()
        self._lost_consumers = set()
        self._recover_again = set()
        self._seq = 0
        self._fail_unconfirmed(error_code(
            SYS.IO_ERROR, f"the connection of management node {self.node_id} to RabbitMQ "
            "was replaced before the broker confirmed"))
        self._returned.clear()
        self._ack_tag = 0
        ch = await proto.channel(CHANNEL)
        await ch.channel_open()
        self._open_channel = ch
        await ch.basic_qos(prefetch_count=min(self._prefetch, 65535))
        await ch.confirm_select()
        # Consumers start before the connection is declared ready: replies and NO_ROUTE
        # answers they produce meanwhile must go out (sends still wait for readiness).
        self._writer = proto
        await ch.exchange_declare(exchange=topo.no_route, type="fanout")
        await ch.exchange_declare(exchange=topo.p2p, type="topic",
                                  arguments={"alternate-exchange": topo.no_route})
        await ch.exchange_declare(exchange=topo.broadcast, type="topic")
        await ch.queue_declare(queue=topo.no_route_queue)
        await ch.queue_bind(queue=topo.no_route_queue, exchange=topo.no_route, routing_key="")
        ch.basic_consume(queue=topo.no_route_queue, consumer_tag="noroute", nowait=True)
        rq = topo.reply_queue(self.node_id)
        await ch.queue_declare(queue=rq, arguments=self._queue_args)
        await ch.queue_bind(queue=rq, exchange=topo.p2p, routing_key=topo.reply_key(self.node_id))
        ch.basic_consume(queue=rq, consumer_tag="reply", no_ack=True, nowait=True)
        eq = topo.event_queue(self.node_id)
        await ch.queue_declare(queue=eq, arguments=self._queue_args)
        # from here on, subscribe() and register_service() use the channel themselves
        self._channel = ch
        for pattern in {NODE_TOPIC} | {s.pattern for s in self._subs}:
            ch.queue_bind(queue=eq, exchange=topo.broadcast, routing_key=pattern, nowait=True)
        ch.basic_consume(queue=eq, consumer_tag="event", no_ack=True, nowait=True)
        # services registered meanwhile are picked up by the loop
        while True:
            todo = [s for s in self._services if s not in self._consuming]
            for service_id in todo:
                self._declare_service(ch, service_id)
            await self._barrier(ch)
            if not todo:
                break
        if proto.transport is None or proto.transport.disconnecting:
            raise OperationError(error_code(SYS.IO_ERROR, "connection lost while preparing"))
        self._proto = proto
        # Note [who may judge]: the silence of the outage says nothing about the peers.
        self._restart_heartbeat_counts()
        for sub in self._subs:
            _fire(sub.ready)
        if not self._lost_consumers:
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                _fire(w)
        if self._running:
            log.info("bus of {node} reconnected to RabbitMQ", node=self.node_id)
            self._publish_node("hello")

    def _connect_failed(self, reason: Failure) -> None:
        """
        A connection attempt failed. A refused login while starting ends the start (no
        retries: another attempt with the same credentials is refused again).
        """
        text = _refusal_text(reason)
        if text is None or self._running or self._service is None:
            return
        self._refusal = f"RabbitMQ refused the login ({text})"
        service = self._service
        # not inside ClientService's own callback (automat refuses re-entrance); stopping
        # it fails the start's whenConnected with CancelledError
        self._reactor.callLater(0, service.stopService)

    def _prepare(self, proto: Any) -> Deferred:
        # ClientService hands over a proxy of the protocol: attributes set on the proxy
        # would not reach the protocol.
        while not isinstance(proto, BusProtocol) and hasattr(proto, "_protocol"):
            proto = proto._protocol
        d = Deferred.fromCoroutine(self._prepare_async(proto))

        def failed(reason: Failure) -> Failure:
            log.failure("preparing the AMQP connection failed", reason)
            proto.handler = None
            if self._proto is None:
                self._channel = self._writer = self._open_channel = None
            return reason

        return d.addErrback(failed)

    def _declare_service(self, ch: Any, service_id: str) -> Deferred:
        topo = self.topology
        q = topo.service_queue(service_id, self.node_id)
        self._consuming.add(service_id)
        ch.queue_declare(queue=q, arguments=self._queue_args, nowait=True)
        ch.queue_bind(queue=q, exchange=topo.p2p,
                      routing_key=topo.service_key(service_id, self.node_id), nowait=True)
        # Note [consume-ok]: RabbitMQ may send consume-ok after the answer to a later
        # synchronous method (seen when the queue is deleted meanwhile), which would
        # mismatch txAMQP's FIFO of responses: consume without waiting and use qos-ok,
        # which the channel sends in order, as the barrier.
        ch.basic_consume(queue=q, consumer_tag=f"s.{service_id}", nowait=True)
        return self._barrier(ch)

    def _barrier(self, ch: Any) -> Deferred:
        """
        A Deferred firing once the broker has processed what this channel sent so far.
        """
        return ch.basic_qos(prefetch_count=min(self._prefetch, 65535))

    def amqp_lost(self, proto: BusProtocol, reason: Failure) -> None:
        """
        The connection dropped: answer what it carried, wait for the reconnection.
        """
        if proto is not self._proto and self._proto is not None:
            return
        self._proto = None
        self._writer = None
        self._channel = self._open_channel = None
        why = getattr(proto, "channel_error", None) or reason.getErrorMessage()
        err = error_code(SYS.IO_ERROR,
                         f"the connection of management node {self.node_id} to RabbitMQ "
                         f"was lost: {why}")
        if self._running:
            log.warn("bus of {node} lost its RabbitMQ connection: {reason}", node=self.node_id,
                     reason=reason.getErrorMessage())
        self._lost_consumers = set()
        self._recover_again = set()
        # Every post and publish awaiting its confirm is answered now (issue 8 item 2).
        self._fail_unconfirmed(err)
        # The requests and the replies they wait for travelled on this connection: answer
        # the waiters now rather than at their timeout.
        self._fail_remote_pending(err)
        for sub in self._subs:
            if sub.ready.called:
                sub.ready = Deferred()

    def _fail_unconfirmed(self, err: Any) -> None:
        """
        Fail every post and publish still waiting for the broker's confirm with C{err};
        requests in the table need nothing (their waiters are answered by the caller).
        """
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        self._unconfirmed_order.clear()
        self._returned.clear()
        for kind, target, _msg_id in unconfirmed.values():
            if kind in (POST, EVENT) and target is not None and not target.called:
                try:
                    target.errback(OperationError(err))
                except Exception:
                    log.failure("answering an unconfirmed {kind} failed", kind=kind)

    def _fail_remote_pending(self, err: Any) -> None:
        """
        Answer every waiting send whose reply comes through the broker with C{err} (local
        short-cut sends are unaffected).
        """
        for env in list(self._pending._pending.values()):
            if not (self._local_shortcut and env.target == self.node_id):
                self._pending.fail(env.msg_id, err)

    # lost queues (Note [lost queues])

    def amqp_cancelled(self, channel: int, consumer_tag: str) -> None:
        """
        The broker cancelled one of our consumers (its queue was deleted): declare the
        queue again and consume it; answer the sends whose replies were in a lost reply
        queue.
        """
        if self._stopped or self._writer is None:
            return
        topo = self.topology
        if consumer_tag == "reply":
            queue = topo.reply_queue(self.node_id)
        elif consumer_tag == "event":
            queue = topo.event_queue(self.node_id)
        elif consumer_tag == "noroute":
            queue = topo.no_route_queue
        elif consumer_tag.startswith("s.") and consumer_tag[2:] in self._services:
            queue = topo.service_queue(consumer_tag[2:], self.node_id)
        else:
            log.info("the broker cancelled consumer {tag} (not ours any more)",
                     tag=consumer_tag)
            return
        log.warn("the broker cancelled consumer {tag} of {node}: queue {queue} was deleted; "
                 "declaring it again", tag=consumer_tag, node=self.node_id, queue=queue)
        first = consumer_tag not in self._lost_consumers
        if not first:
            self._recover_again.add(consumer_tag)
        self._lost_consumers.add(consumer_tag)
        if consumer_tag == "reply":
            self._fail_remote_pending(error_code(
                SYS.IO_ERROR,
                f"the reply queue {queue} of management node {self.node_id} was deleted "
                "while the reply was on its way", queue=queue))
        ch = self._open_channel
        if first and ch is not None:
            d = Deferred.fromCoroutine(self._redeclare(ch, consumer_tag))
            d.addErrback(lambda f: log.warn(
                "declaring queue {queue} again failed: {error}", queue=queue,
                error=f.getErrorMessage()))

    async def _redeclare(self, ch: Any, consumer_tag: str) -> None:
        while True:
            await self._redeclare_once(ch, consumer_tag)
            if ch is not self._open_channel:
                return  # the connection was replaced meanwhile: preparing it redid all
            if consumer_tag not in self._recover_again:
                break
            # the new consumer was cancelled too (the queue deleted again): once more
            self._recover_again.discard(consumer_tag)
        self._lost_consumers.discard(consumer_tag)
        log.info("queue of consumer {tag} of {node} is back", tag=consumer_tag,
                 node=self.node_id)
        if consumer_tag == "event":
            self._restart_heartbeat_counts()
        if not self._lost_consumers and self._proto is not None:
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                _fire(w)

    async def _redeclare_once(self, ch: Any, consumer_tag: str) -> None:
        topo = self.topology
        if consumer_tag == "reply":
            rq = topo.reply_queue(self.node_id)
            ch.queue_declare(queue=rq, arguments=self._queue_args, nowait=True)
            ch.queue_bind(queue=rq, exchange=topo.p2p, routing_key=topo.reply_key(self.node_id),
                          nowait=True)
            ch.basic_consume(queue=rq, consumer_tag="reply", no_ack=True, nowait=True)
        elif consumer_tag == "event":
            eq = topo.event_queue(self.node_id)
            ch.queue_declare(queue=eq, arguments=self._queue_args, nowait=True)
            for pattern in {NODE_TOPIC} | {s.pattern for s in self._subs}:
                ch.queue_bind(queue=eq, exchange=topo.broadcast, routing_key=pattern,
                              nowait=True)
            ch.basic_consume(queue=eq, consumer_tag="event", no_ack=True, nowait=True)
        elif consumer_tag == "noroute":
            ch.queue_declare(queue=topo.no_route_queue, nowait=True)
            ch.queue_bind(queue=topo.no_route_queue, exchange=topo.no_route, routing_key="",
                          nowait=True)
            ch.basic_consume(queue=topo.no_route_queue, consumer_tag="noroute", nowait=True)
        elif consumer_tag[2:] in self._services:
            self._declare_service(ch, consumer_tag[2:])
        await self._barrier(ch)

    def stop(self) -> Deferred[None]:
        if self._stopped:
            return succeed(None)
        self._stopped = True
        self._running = False
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._beat_loop is not None and self._beat_loop.running:
            self._beat_loop.stop()
        # take no more requests (what is still queued is lost with the queues: its senders
        # get SYS.1012 when they hear that this node left)
        if self._channel is not None and self._writer is not None:
            for service_id in self._consuming:
                self._channel.basic_cancel(consumer_tag=f"s.{service_id}", nowait=True)
        d = self._inflight.wait()
        d.addTimeout(self._drain_timeout, self._clock)
        try:
            await d
        except Exception:
            log.warn("bus of {node} stopped with {n} handlers still running",
                     node=self.node_id, n=len(self._inflight))
        self._pending.fail_all(
            error_code(SYS.CANCEL, f"the bus of management node {self.node_id} stopped"))
        proto, ch = self._proto, self._channel
        if proto is not None and ch is not None:
            try:
                self._publish_node("left")
                topo = self.topology
                for service_id in list(self._consuming):
                    ch.queue_delete(queue=topo.service_queue(service_id, self.node_id),
                                    nowait=True)
                ch.queue_delete(queue=topo.event_queue(self.node_id), nowait=True)
                await ch.queue_delete(queue=topo.reply_queue(self.node_id))
                # a clean AMQP close, so that the broker does not log a lost client
                ch0 = await proto.channel(0)
                closing = ch0.connection_close(reply_code=200, reply_text="bus stopping")
                closing.addTimeout(2, self._reactor)
                await closing
            except Exception:
                log.failure("cleaning up the queues of {node} failed", node=self.node_id)
        self._proto = self._writer = None
        if proto is not None:
            proto.handler = None
        self._fail_unconfirmed(error_code(
            SYS.CANCEL, f"the bus of management node {self.node_id} stopped before the "
            "broker confirmed"))
        if self._service is not None:
            await self._service.stopService()
        waiters, self._ready_waiters = self._ready_waiters, []
        for w in waiters:
            _fire(w)

    def _simulate_crash(self) -> Deferred:
        """
        Tests: die without a word (no 'left' heartbeat, queues left behind).
        """
        self._stopped = True
        self._running = False
        if self._beat_loop is not None and self._beat_loop.running:
            self._beat_loop.stop()
        proto, self._proto, self._writer = self._proto, None, None
        if proto is not None:
            proto.handler = None
        self._pending.fail_all(error_code(SYS.CANCEL, "crashed"))
        self._fail_unconfirmed(error_code(SYS.CANCEL, "crashed"))
        service, self._service = self._service, None
        return service.stopService() if service is not None else succeed(None)

    # membership

    def owner_of(self, resource_uuid: str) -> str:
        return self._ring.owner(resource_uuid) or self.node_id

    @property
    def members(self) -> frozenset[str]:
        """
        The live management nodes as this node sees them.
        """
        return self._ring.nodes

    def set_members(self, nodes: Iterable[str]) -> None:
        """
        Replace the membership (from the management-node table, say): nodes that are gone
        are answered for as if their heartbeat had expired. This node is always a member.
        """
        nodes = set(nodes) | {self.node_id}
        for node in self._ring.nodes - nodes:
            self._node_left(node, "not in the membership any more")
        for node in nodes - self._ring.nodes:
            self._node_joined(node)

    def when_members(self, count: int) -> Deferred[None]:
        """
        A Deferred firing once at least C{count} nodes are members (tests, start-up).
        """
        if len(self._ring) >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._member_waiters.append((count, d))
        return d

    @property
    def connected(self) -> bool:
        """
        Whether the bus has a ready connection to the broker now, with all its queues
        (False while a queue the broker deleted is declared again).
        """
        return self._proto is not None and not self._lost_consumers

    def when_connected(self) -> Deferred[None]:
        """
        A Deferred firing once the bus has a ready connection (its topology declared and
        its consumers back); at once if it has one.
        """
        if self.connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def when_heard(self, node_id: str) -> Deferred[None]:
        """
        A Deferred firing at the next heartbeat received from C{node_id} (tests).
        """
        d: Deferred[None] = Deferred()
        self._heard.setdefault(node_id, []).append(d)
        return d

    def when_left(self, node_id: str) -> Deferred[None]:
        """
        A Deferred firing once C{node_id} is not a member (at once if it is not).
        """
        if node_id not in self._ring:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._left_waiters.setdefault(node_id, []).append(d)
        return d

    def _node_joined(self, node: str) -> None:
        if self._ring.add(node):
            log.info("management node {node} joined (seen from {me})", node=node,
                     me=self.node_id)
            self._missed[node] = 0
            waiters = [(c, d) for c, d in self._member_waiters if c <= len(self._ring)]
            self._member_waiters = [(c, d) for c, d in self._member_waiters
                                    if c > len(self._ring)]
            for _, d in waiters:
                _fire(d)

    def _node_left(self, node: str, why: str) -> None:
        if node == self.node_id:
            return
        self._missed.pop(node, None)
        if self._ring.remove(node):
            log.warn("management node {node} left ({why})", node=node, why=why)
            for d in self._left_waiters.pop(node, []):
                _fire(d)
            self._pending.fail_target(node, error_code(
                SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR,
                f"management node {node} left ({why})", node_id=node))

    def _beat(self) -> None:
        # The loop must survive anything (a LoopingCall stops for good at the first
        # exception, and membership would freeze without a word).
        try:
            self._beat_once()
        except Exception:
            log.failure("membership heartbeat of {node} failed (the loop goes on)",
                        node=self.node_id)

    def _can_judge(self) -> bool:
        """
        Whether this node can hear its peers now (Note [who may judge]).
        """
        return (self._proto is not None and "event" not in self._lost_consumers
                and not self._echo_pending)

    def _beat_once(self) -> None:
        judge = self._can_judge()
        if self._writer is not None:
            self._echo_pending = True
        self._publish_node("beat")
        if not judge:
            if self._missed:
                log.info("bus of {node} cannot hear the broker: not counting its peers' "
                         "heartbeats this round", node=self.node_id)
            return
        for node in list(self._missed):
            self._missed[node] += 1
            if self._missed[node] > self._heartbeat_misses:
                self._node_left(node, f"no heartbeat for {self._heartbeat_misses} intervals")

    def _restart_heartbeat_counts(self) -> None:
        self._echo_pending = False
        for node in self._missed:
            self._missed[node] = 0

    def _publish_node(self, op: str) -> None:
        body = json.dumps({"node": self.node_id, "op": op}).encode()
        if self._writer is not None:
            self._publish(self.topology.broadcast, f"zcontrol.node.{op}", body, kind=NODE,
                          expiration=self._ttl(self._heartbeat_interval or 5.0))

    def _on_node(self, body: bytes) -> None:
        try:
            doc = loads(body, self._max_message_size)  # the one parser: nothing else escapes
            node, op = doc["node"], doc["op"]
            if type(node) is not str or type(op) is not str:
                raise TypeError("node and op are strings")
        except (ValueError, KeyError, TypeError):
            log.error("dropping a malformed node heartbeat: {body!r}", body=body[:200])
            return
        if node == self.node_id:
            # our own heartbeat came back: the path through the broker works
            self._echo_pending = False
            for d in self._heard.pop(node, []):
                _fire(d)
            return
        if op == "left":
            self._node_left(node, "it stopped")
            return
        if self._heartbeat_interval is None:
            return
        self._missed[node] = 0
        if node not in self._ring:
            self._node_joined(node)
        if op == "hello" and self._running:
            self._publish_node("beat")
        for d in self._heard.pop(node, []):
            _fire(d)

    # publishing

    def _ttl(self, seconds: float | None) -> str:
        ttl = self._message_ttl if seconds is None else min(seconds, self._message_ttl)
        return str(max(1, int(ttl * 1000)))

    def _publish(self, exchange: str, key: str, body: bytes, track: tuple | None = None,
                 **props: Any) -> None:
        self._writer.publish(CHANNEL, exchange, key, body, **props)
        self._seq += 1
        if track is not None:
            self._unconfirmed[self._seq] = track
            self._unconfirmed_order.append(self._seq)

    def amqp_confirm(self, channel: int, tag: int, multiple: bool, ok: bool) -> None:
        if multiple:
            order, table = self._unconfirmed_order, self._unconfirmed
            while order and order[0] <= tag:
                entry = table.pop(order.popleft(), None)
                if entry is not None:
                    self._confirmed(entry, ok)
        else:
            entry = self._unconfirmed.pop(tag, None)
            if entry is not None:
                self._confirmed(entry, ok)

    def _confirmed(self, entry: tuple, ok: bool) -> None:
        kind, target, msg_id = entry
        if kind == REQUEST:
            if not ok:
                self._pending.fail(msg_id, error_code(
                    SYS.UNDELIVERABLE_ERROR, f"the broker refused message {msg_id} (nack)"))
            return
        if msg_id in self._returned:
            self._returned.discard(msg_id)
            target.errback(OperationError(error_code(
                SYS.UNDELIVERABLE_ERROR, f"message {msg_id} could not be routed")))
        elif not ok:
            target.errback(OperationError(error_code(
                SYS.UNDELIVERABLE_ERROR, f"the broker refused message {msg_id} (nack)")))
        else:
            target.callback(None)

    def amqp_return(self, channel: int, code: int, text: str, exchange: str, key: str,
                    props: dict, body: bytes) -> None:
        msg_id = props.get("message-id")
        kind = props.get("type")
        log.warn("the broker returned {kind} {message_id} to {exchange}/{key}: {code} {text}",
                 kind=kind, message_id=msg_id, exchange=exchange, key=key, code=code, text=text)
        if kind == REQUEST and msg_id:
            self._pending.fail(msg_id, error_code(
                SYS.UNDELIVERABLE_ERROR,
                f"message {msg_id} to {key} is undeliverable: {code} {text}"))
        elif msg_id and kind in (POST, EVENT):
            self._returned.add(msg_id)

    # services

    def register_service(self, service_id: str, handler: Callable[[Any], Any]) -> Deferred:
        """
        See L{IBus.register_service}. Returns a Deferred firing once the service's queue is
        consumed (at once if it already was): a peer's send made after that reaches it.
        """
        if "#" in service_id or "*" in service_id:
            raise ValueError("a service id cannot contain '*' or '#'")
        self._services[service_id] = handler
        if service_id in self._consuming:
            return succeed(None)
        if self._channel is not None:
            d = self._declare_service(self._channel, service_id)
            return d.addCallback(lambda _: None)
        w: Deferred[None] = Deferred()
        self._ready_waiters.append(w)
        return w

    def unregister_service(self, service_id: str) -> None:
        if self._services.pop(service_id, None) is None:
            return
        if service_id in self._consuming and self._channel is not None:
            self._consuming.discard(service_id)
            ch = self._channel
            ch.basic_cancel(consumer_tag=f"s.{service_id}", nowait=True)
            ch.queue_delete(queue=self.topology.service_queue(service_id, self.node_id),
                            nowait=True)

    def _target(self, msg: Message) -> str:
        if msg.resource_uuid:
            return self.owner_of(msg.resource_uuid)
        return self.node_id

    # sending

    def send(self, message: NeedReplyMessage, timeout: float | None = None) -> Deferred[Reply]:
        if not isinstance(message, NeedReplyMessage):
            return fail(OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"send() takes a NeedReplyMessage, not {type(message).__name__}"))
        bad = envelope_error(message)
        if bad is not None:
            return fail(OperationError(bad))
        message = exchange_of(message)
        stamp_trace(message)
        left = self._pending.prepare(message, timeout)
        message.reply_to = self.node_id
        target = self._target(message)
        d = self._pending.add(message, target)
        if d.called:
            return d
        if self._local_shortcut and target == self.node_id \
                and message.service_id in self._services:
            self._local.put(self._deliver_local, message)
            return d
        try:
            if "reply" in self._lost_consumers:
                raise OperationError.of(
                    SYS.IO_ERROR, f"the reply queue of management node {self.node_id} is "
                    "being declared again: no reply could reach it")
            body = self._wire_body(message, message.describe())
        except OperationError as e:
            self._pending.fail(message.id, e.error)
            return d
        self._publish(self.topology.p2p,
                      self.topology.service_key(message.service_id, target), body,
                      (REQUEST, None, message.id), mandatory=True, kind=REQUEST,
                      message_id=message.id, reply_to=self.node_id, expiration=self._ttl(left))
        return d

    def post(self, message: Message) -> Deferred[None]:
        bad = envelope_error(message)
        if bad is not None:
            return fail(OperationError(bad))
        stamp_trace(message)
        if isinstance(message, NeedReplyMessage):
            message.reply_to = None
        message.created_at = self._clock.seconds()
        target = self._target(message)
        if self._local_shortcut and target == self.node_id \
                and message.service_id in self._services:
            self._local.put(self._deliver_local, message)
            return succeed(None)
        try:
            body = self._wire_body(message, message.describe())
        except OperationError:
            return fail()
        d: Deferred[None] = Deferred()
        self._publish(self.topology.p2p,
                      self.topology.service_key(message.service_id, target), body,
                      (POST, d, message.id), mandatory=True, kind=POST,
                      message_id=message.id, expiration=self._ttl(None))
        return d

    def reply(self, request: NeedReplyMessage, reply: Reply) -> None:
        reply.correlation_id = request.id
        reply_to = request.reply_to
        if not reply_to:
            return
        if self._local_shortcut and reply_to == self.node_id:
            self._local.put(self._pending.complete, reply)
            return
        self._send_reply(reply_to, reply, request.deadline)

    def _send_reply(self, reply_to: str, reply: Reply, deadline: float | None) -> None:
        if self._writer is None:
            log.warn("dropping the reply to {message_id}: not connected to RabbitMQ",
                     message_id=reply.correlation_id)
            return
        try:
            body = self.registry.encode(reply)
        except Exception as e:
            log.error("cannot encode the reply to {message_id}: {e}",
                      message_id=reply.correlation_id, e=e)
            body = self.registry.encode(Reply.failure(
                error_code(SYS.INTERNAL, f"cannot encode the reply: {e}"), reply.correlation_id))
        if len(body) > self._max_message_size:
            err = self._too_large(f"the reply to {reply.correlation_id}", len(body))
            log.error("{error}", error=err.details)
            body = self.registry.encode(Reply.failure(err, reply.correlation_id))
        left = None if deadline is None else max(0.001, deadline - self._clock.seconds())
        self._publish(self.topology.p2p, self.topology.reply_key(reply_to), body,
                      mandatory=True, kind=REPLY, correlation_id=reply.correlation_id,
                      expiration=self._ttl(left))

    # receiving

    def amqp_flush(self, proto: BusProtocol) -> None:
        if self._ack_tag:
            tag, self._ack_tag = self._ack_tag, 0
            proto.ack(CHANNEL, tag, multiple=True)

    def amqp_deliver(self, channel: int, tag: str, delivery_tag: int, exchange: str,
                     key: str, props: dict, body: bytes) -> None:
        try:
            if tag == "reply":
                self._on_reply(props, body)
            elif tag == "event":
                if props.get("type") == NODE:
                    self._on_node(body)
                else:
                    self._on_event(body)
            elif tag == "noroute":
                self._ack_tag = delivery_tag
                self._on_no_route(exchange, key, props, body)
            elif tag.startswith("s."):
                self._ack_tag = delivery_tag
                self._on_request(tag[2:], props, body)
            else:
                log.error("delivery for an unknown consumer {tag}", tag=tag)
        except Exception:
            log.failure("bus delivery failed ({tag}, {message_id})", tag=tag,
                        message_id=props.get("message-id"))

    def _on_request(self, service_id: str, props: dict, body: bytes) -> None:
        kind = props.get("type")
        reply_to = props.get("reply-to") if kind == REQUEST else None
        try:
            msg = self.registry.decode(body, self._max_message_size)
            if not isinstance(msg, Message):
                raise DecodeError(error_code(
                    SYS.INVALID_ARGUMENT_ERROR,
                    f"{type(msg).type_name} is not a message"), getattr(msg, "id", None))
        except DecodeError as e:
            msg_id = e.message_id or props.get("message-id")
            log.error("rejecting message {message_id} to {service}: {error}",
                      message_id=msg_id, service=service_id, error=str(e.error))
            if reply_to and msg_id:
                self._send_reply(reply_to, Reply.failure(e.error, msg_id), None)
            return
        if isinstance(msg, NeedReplyMessage):
            msg.reply_to = reply_to
        if self._stopped:
            if reply_to:
                self._send_reply(reply_to, Reply.failure(error_code(
                    SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR,
                    f"management node {self.node_id} is stopping", node_id=self.node_id),
                    msg.id), None)
            return
        handler = self._services.get(service_id)
        if handler is None:
            err = error_code(SYS.NO_ROUTE_ERROR,
                             f"no service {service_id!r} on management node {self.node_id}",
                             service_id=service_id)
            if reply_to:
                self._send_reply(reply_to, Reply.failure(err, msg.id), None)
            return
        self._handle(handler, msg, service_id)

    def _handle(self, handler: Callable[[Any], Any], msg: Message, service_id: str) -> None:
        if isinstance(msg, NeedReplyMessage) and msg.deadline is not None \
                and msg.deadline <= self._clock.seconds():
            log.warn("skipping {message}: its deadline passed before it was handled",
                     message=msg.describe())
            return
        self._inflight.enter()
        try:
            d = call_handler(handler, msg, service_id, lambda r: self.reply(msg, r))
        finally:
            self._inflight.leave()
        if d is not None:
            self._inflight.add(d)

    def _deliver_local(self, msg: Message) -> None:
        handler = self._services.get(msg.service_id)
        if handler is None:
            err = error_code(SYS.NO_ROUTE_ERROR,
                             f"no service {msg.service_id!r} on management node {self.node_id}",
                             service_id=msg.service_id)
            if isinstance(msg, NeedReplyMessage) and msg.reply_to:
                self._pending.fail(msg.id, err)
            return
        self._handle(handler, msg, msg.service_id)

    def _on_reply(self, props: dict, body: bytes) -> None:
        try:
            reply = self.registry.decode(body, self._max_message_size)
            if not isinstance(reply, Reply):
                raise DecodeError(error_code(
                    SYS.INVALID_ARGUMENT_ERROR, f"{type(reply).type_name} is not a reply"))
        except DecodeError as e:
            correlation_id = props.get("correlation-id", "")
            log.error("undecodable reply to {message_id}: {error}", message_id=correlation_id,
                      error=str(e.error))
            reply = Reply.failure(e.error, correlation_id)
        self._pending.complete(reply)

    def _on_event(self, body: bytes) -> None:
        try:
            event = self.registry.decode(body, self._max_message_size)
            if not isinstance(event, Event):
                raise DecodeError(error_code(
                    SYS.INVALID_ARGUMENT_ERROR, f"{type(event).type_name} is not an event"))
        except DecodeError as e:
            log.error("dropping event {event_id}: {error}", event_id=e.message_id,
                      error=str(e.error))
            return
        if self._running:
            deliver_event(self._handlers, event)

    def _on_no_route(self, exchange: str, key: str, props: dict, body: bytes) -> None:
        kind = props.get("type")
        msg_id = props.get("message-id") or props.get("correlation-id")
        reply_to = props.get("reply-to")
        deaths = (props.get("headers") or {}).get("x-death")
        if deaths:
            death = deaths[0] if isinstance(deaths, list) and deaths else {}
            reason = death.get("reason", "?") if isinstance(death, dict) else "?"
            queue = death.get("queue", "?") if isinstance(death, dict) else "?"
            err = error_code(SYS.UNDELIVERABLE_ERROR,
                             f"message {msg_id} was dead-lettered from {queue} ({reason})")
        else:
            err = error_code(SYS.NO_ROUTE_ERROR,
                             f"no route for message {msg_id} (routing key {key!r}): the "
                             "service is not served on the destination node",
                             routing_key=key)
        if kind == REQUEST and reply_to and msg_id:
            log.info("answering {message_id}: {error}", message_id=msg_id, error=err.details)
            self._send_reply(reply_to, Reply.failure(err, msg_id), None)
        else:
            log.warn("dropping unroutable {kind} {message_id}: {error}", kind=kind,
                     message_id=msg_id, error=err.details)

    # events

    def _wire_body(self, obj: Any, what: str) -> bytes:
        """
        The bytes to publish for C{obj}.

        @raise OperationError: SYS.1016 while not connected, SYS.1007 if it cannot be
            encoded or its body is over C{max_message_size} (Note [message size]).
        """
        if self._proto is None:
            raise OperationError.of(
                SYS.IO_ERROR, f"management node {self.node_id} is not connected to RabbitMQ")
        try:
            body = self.registry.encode(obj)
        except Exception as e:
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                    f"cannot encode {what}: {e}") from None
        if len(body) > self._max_message_size:
            raise OperationError(self._too_large(what, len(body)))
        return body

    def _too_large(self, what: str, size: int) -> Any:
        return error_code(
            SYS.INVALID_ARGUMENT_ERROR,
            f"{what} is {size} bytes encoded, over the bus limit of "
            f"{self._max_message_size} bytes (bus.max_message_size)",
            field="message size", size=size, limit=self._max_message_size)

    def publish(self, event: Event) -> Deferred[None]:
        event.node_id = self.node_id
        event.created_at = self._clock.seconds()
        try:
            body = self._wire_body(event, f"event {event.id}")
        except OperationError:
            return fail()
        d: Deferred[None] = Deferred()
        self._publish(self.topology.broadcast, type(event).topic, body, (EVENT, d, event.id),
                      kind=EVENT, message_id=event.id, expiration=self._ttl(None))
        return d

    def subscribe(self, pattern: str, handler: Callable[[Event], Any]) -> ISubscription:
        sub = _Subscription(pattern, handler, self)
        self._subs.append(sub)
        self._handlers = [(s.pattern, s.handler) for s in self._subs]
        ch = self._channel
        if ch is not None:
            d = ch.queue_bind(queue=self.topology.event_queue(self.node_id),
                              exchange=self.topology.broadcast, routing_key=pattern)
            d.addCallbacks(lambda _: _fire(sub.ready),
                           lambda f: log.info("binding {pattern} failed: {f}", pattern=pattern,
                                              f=f.getErrorMessage()))
        return sub

    def _unsubscribe(self, sub: _Subscription) -> None:
        self._subs = [s for s in self._subs if s is not sub]
        self._handlers = [(s.pattern, s.handler) for s in self._subs]
        ch = self._channel
        if ch is not None and not any(s.pattern == sub.pattern for s in self._subs) \
                and sub.pattern != NODE_TOPIC:
            d = ch.queue_unbind(queue=self.topology.event_queue(self.node_id),
                                exchange=self.topology.broadcast, routing_key=sub.pattern)
            d.addErrback(lambda f: log.info("unbinding {pattern} failed: {f}",
                                            pattern=sub.pattern, f=f.getErrorMessage()))


def delete_topology(bus: AMQPBus) -> Deferred:
    """
    Delete the shared exchanges and the NO_ROUTE queue of C{bus}'s prefix, through its
    connection (tests clean up after themselves with this).
    """
    ch = bus._channel
    if ch is None:
        return succeed(None)
    topo = bus.topology

    async def go() -> None:
        await ch.queue_delete(queue=topo.no_route_queue)
        for ex in (topo.p2p, topo.broadcast, topo.no_route):
            await ch.exchange_delete(exchange=ex)

    return Deferred.fromCoroutine(go())


def _refusal_text(reason: Failure) -> str | None:
    """
    The broker's reply text if C{reason} is the broker refusing the login or the vhost
    (C{ACCESS_REFUSED}, AMQP reply code 403), else None.
    """
    e = reason.value
    # txAMQP's Closed carries the broker's connection.close method (reply_code, reply_text)
    method = e.args[0] if getattr(e, "args", None) else None
    text = getattr(method, "reply_text", None)
    if isinstance(text, str) and text.startswith("ACCESS_REFUSED"):
        return text
    return None


@implementer(IStreamClientEndpoint)
class _DetachingEndpoint:
    """
    Wraps the AMQP endpoint (connect, then log in) for L{ClientService}.

    ClientService (Twisted 26.x) has no transition for the loss of a connection whose
    connect attempt already failed: a login the broker refuses, then the broker closing
    the socket, logged C{automat NoTransition} as an Unhandled Error on every attempt. On
    a failed attempt this wrapper detaches the connection from ClientService (the
    proxy's C{_lostNotification}, private: checked with C{hasattr}) and closes it, then
    tells C{on_failure}.
    """

    def __init__(self, endpoint: Any, on_failure: Callable[[Failure], None]):
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> Deferred:
        built: list[Any] = []
        d = self._endpoint.connect(_RecordingFactory(factory, built))

        def failed(reason: Failure) -> Failure:
            for proto in built:
                if hasattr(proto, "_lostNotification"):
                    proto._lostNotification = lambda _reason: None
                transport = getattr(proto, "transport", None)
                if transport is not None:
                    transport.loseConnection()
            self._on_failure(reason)
            return reason

        return d.addErrback(failed)


class _RecordingFactory:
    """
    A protocol factory that remembers the protocols it built (and passes everything
    else, e.g. txAMQP's C{set_vhost}, to the factory it wraps).
    """

    def __init__(self, factory: Any, built: list[Any]):
        self._factory = factory
        self._built = built

    def buildProtocol(self, addr: Any) -> Any:
        proto = self._factory.buildProtocol(addr)
        if proto is not None:
            self._built.append(proto)
        return proto

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)
