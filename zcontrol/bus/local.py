# -*- test-case-name: tests.test_bus_local -*-
"""
The in-process bus, the embedded default. Several L{LocalBus}es sharing a L{LocalBroker} are
several management nodes in one process (tests use that for routing and node loss); a lone
LocalBus makes its own broker.

Deliveries go through an eventual queue: a send returns before the handler runs, and a chain
of sends, replies and stepping sends never recurses (one C{callLater(0)} per batch, not per
message).

With C{copy=True} every message, reply and event crosses the bus encoded and decoded, as it
would over AMQP: handlers cannot share objects with senders, and the strict decoding runs.
The default passes objects as they are, which is several times faster; the contract suite
runs in both modes.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zcontrol._defer import DeferWaiter
from zcontrol.bus._dispatch import call_handler, deliver_event
from zcontrol.bus._pending import PendingTable, exchange_of, stamp_trace
from zcontrol.bus.interfaces import IBus, ISubscription
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
from zcontrol.bus.message import (
    registry as default_registry,
)
from zcontrol.bus.ring import ConsistentHashRing
from zcontrol.core.errors import SYS, OperationError, error_code, from_failure

__all__ = ["BusSendMixin", "LocalBroker", "LocalBus", "send_stepping"]

log = Logger()


class _EventualQueue:
    """
    Run callables on a later reactor turn, in order, in batches.
    """

    def __init__(self, scheduler: Any):
        self._scheduler = scheduler
        self._queue: collections.deque = collections.deque()
        self._call = None

    def put(self, fn: Callable, *args: Any) -> None:
        self._queue.append((fn, args))
        if self._call is None:
            self._call = self._scheduler.callLater(0, self._flush)

    def _flush(self) -> None:
        queue = self._queue
        try:
            # Bounded: what is queued while flushing waits for the next turn, so that the
            # reactor still gets to do I/O under a storm of local messages.
            for _ in range(len(queue)):
                fn, args = queue.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.failure("local bus delivery failed")
        finally:
            self._call = None
            if queue:
                self._call = self._scheduler.callLater(0, self._flush)


@attrs.define(eq=False)
class LocalBroker:
    """
    What the nodes of one process share: membership, the ring, and the delivery queue.
    """

    scheduler: Any
    vnodes: int = 500
    nodes: dict[str, LocalBus] = attrs.field(factory=dict)
    ring: ConsistentHashRing = attrs.field(default=None)
    queue: _EventualQueue = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        self.ring = ConsistentHashRing(vnodes=self.vnodes)
        self.queue = _EventualQueue(self.scheduler)

    def join(self, bus: LocalBus) -> None:
        self.nodes[bus.node_id] = bus
        self.ring.add(bus.node_id)

    def leave(self, bus: LocalBus) -> None:
        if self.nodes.get(bus.node_id) is bus:
            del self.nodes[bus.node_id]
            self.ring.remove(bus.node_id)
            err = error_code(
                SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR,
                f"management node {bus.node_id} left",
                node_id=bus.node_id,
            )
            for peer in list(self.nodes.values()):
                peer._pending.fail_target(bus.node_id, err)


@implementer(ISubscription)
@attrs.define(eq=False)
class _Subscription:
    pattern: str
    handler: Callable[[Event], Any]
    _bus: LocalBus
    ready: Deferred = attrs.field(factory=lambda: succeed(None))

    def cancel(self) -> Deferred:
        self._bus._subscriptions = [
            s for s in self._bus._subscriptions if s[1] is not self.handler or s[0] != self.pattern
        ]
        return succeed(None)


class BusSendMixin:
    """
    C{send_all} and C{send_stepping} on top of a bus's own C{send}: the same for every
    backend.
    """

    def send_all(self, messages: Iterable[NeedReplyMessage],
                 timeout: float | None = None) -> Deferred[list[Reply]]:
        return gatherResults([self.send(m, timeout) for m in messages])

    def send_stepping(self, messages: Iterable[NeedReplyMessage], parallelism: int,
                      on_reply: Callable[[NeedReplyMessage, Reply], Any]) -> Deferred[None]:
        return send_stepping(self, messages, parallelism, on_reply)


@implementer(IBus)
class LocalBus(BusSendMixin):
    """
    An in-process L{IBus}.

    @param clock: times the timeouts (C{IReactorTime}).
    @param scheduler: runs deliveries (C{callLater(0, ...)}); the clock by default.
    @param broker: shared with the other nodes of this process; a new one by default.
    """

    def __init__(
        self,
        clock: Any,
        node_id: str | None = None,
        broker: LocalBroker | None = None,
        scheduler: Any = None,
        registry: Registry = default_registry,
        default_timeout: float = 1800.0,
        timer_resolution: float = 0.05,
        copy: bool = False,
        drain_timeout: float = 30.0,
    ):
        self.node_id = node_id or new_id()
        self.registry = registry
        self._clock = clock
        self._broker = broker or LocalBroker(scheduler or clock)
        self._queue = self._broker.queue
        self._pending = PendingTable(clock, default_timeout, timer_resolution)
        self._services: dict[str, Callable[[Any], Any]] = {}
        self._subscriptions: list[tuple[str, Callable[[Event], Any]]] = []
        self._inflight = DeferWaiter()
        self._copy = copy
        self._drain_timeout = drain_timeout
        self._running = False

    # lifecycle

    def start(self) -> Deferred[None]:
        self._running = True
        self._broker.join(self)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if not self._running:
            return succeed(None)
        self._running = False
        d = self._inflight.wait()
        d.addTimeout(self._drain_timeout, self._clock)

        def drained(result: Any) -> None:
            if isinstance(result, Failure):
                log.warn("bus of {node} stopped with {n} handlers still running",
                         node=self.node_id, n=len(self._inflight))

        def left(_: Any) -> None:
            self._broker.leave(self)
            self._pending.fail_all(
                error_code(SYS.CANCEL, f"the bus of management node {self.node_id} stopped")
            )

        def after_queued(_: Any) -> Deferred[None]:
            # Replies the drained handlers queued are delivered before the waiters left
            # are answered.
            flushed: Deferred[None] = Deferred()
            self._queue.put(lambda: (left(None), flushed.callback(None)))
            return flushed

        return d.addBoth(drained).addCallback(after_queued)

    # services

    def register_service(self, service_id: str, handler: Callable[[Any], Any]) -> None:
        self._services[service_id] = handler

    def unregister_service(self, service_id: str) -> None:
        self._services.pop(service_id, None)

    def owner_of(self, resource_uuid: str) -> str:
        return self._broker.ring.owner(resource_uuid) or self.node_id

    def _target(self, msg: Message) -> str:
        if msg.resource_uuid:
            return self.owner_of(msg.resource_uuid)
        return self.node_id

    def _transfer(self, obj: Any, receiver: LocalBus) -> Any:
        if self._copy:
            return receiver.registry.decode(self.registry.encode(obj))
        if receiver.registry.get(type(obj).type_name) is not type(obj):
            raise DecodeError(error_code(
                SYS.UNKNOWN_MESSAGE_ERROR, f"unknown message type {type(obj).type_name!r}",
                type_name=type(obj).type_name), getattr(obj, "id", None))
        return obj

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
        self._pending.prepare(message, timeout)
        message.reply_to = self.node_id
        target = self._target(message)
        d = self._pending.add(message, target)
        if not d.called:
            self._queue.put(self._deliver, message, target)
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
        self._queue.put(self._deliver, message, target)
        return succeed(None)

    def _deliver(self, msg: Message, target: str) -> None:
        receiver = self._broker.nodes.get(target)
        if receiver is None or not receiver._running:
            self._answer_error(msg, error_code(
                SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR,
                f"management node {target} is not running", node_id=target))
            return
        handler = receiver._services.get(msg.service_id)
        if handler is None:
            self._answer_error(msg, error_code(
                SYS.NO_ROUTE_ERROR,
                f"no service {msg.service_id!r} on management node {target}",
                service_id=msg.service_id))
            return
        try:
            msg = self._transfer(msg, receiver)
        except DecodeError as e:
            log.error("rejecting {message_id}: {error}", message_id=e.message_id,
                      error=str(e.error))
            self._answer_error(msg, e.error)
            return
        receiver._handle(handler, msg)

    def _answer_error(self, msg: Message, err: Any) -> None:
        if isinstance(msg, NeedReplyMessage) and msg.reply_to:
            self._pending.fail(msg.id, err)
        else:
            log.error("dropping {message}: {error}", message=msg.describe(), error=str(err))

    def _handle(self, handler: Callable[[Any], Any], msg: Message) -> None:
        if isinstance(msg, NeedReplyMessage) and msg.deadline is not None \
                and msg.deadline <= self._clock.seconds():
            log.warn("skipping {message}: its deadline passed before it was handled",
                     message=msg.describe())
            return
        self._inflight.enter()
        try:
            d = call_handler(handler, msg, msg.service_id, lambda r: self.reply(msg, r))
            if d is not None:
                self._inflight.add(d)
        finally:
            self._inflight.leave()

    def reply(self, request: NeedReplyMessage, reply: Reply) -> None:
        reply.correlation_id = request.id
        sender = self._broker.nodes.get(request.reply_to or "")
        if sender is None:
            log.info("dropping a reply to {message}: its sender is gone",
                     message=request.describe())
            return
        self._queue.put(sender._receive_reply, self, reply)

    def _receive_reply(self, replier: LocalBus, reply: Reply) -> None:
        if self._copy:
            try:
                reply = self.registry.decode(replier.registry.encode(reply))
            except DecodeError as e:
                reply = Reply.failure(e.error, reply.correlation_id)
        self._pending.complete(reply)

    # events

    def publish(self, event: Event) -> Deferred[None]:
        event.node_id = self.node_id
        event.created_at = self._clock.seconds()
        for node in list(self._broker.nodes.values()):
            if node._subscriptions:
                self._queue.put(node._receive_event, self, event)
        return succeed(None)

    def _receive_event(self, publisher: LocalBus, event: Event) -> None:
        if not self._running:
            return
        if self._copy or publisher is not self:
            try:
                event = self._transfer(event, self)
            except DecodeError as e:
                log.error("dropping event {event_id}: {error}", event_id=e.message_id,
                          error=str(e.error))
                return
        deliver_event(list(self._subscriptions), event)

    def subscribe(self, pattern: str, handler: Callable[[Event], Any]) -> ISubscription:
        self._subscriptions.append((pattern, handler))
        return _Subscription(pattern, handler, self)


def send_stepping(bus: IBus, messages: Iterable[NeedReplyMessage], parallelism: int,
                  on_reply: Callable[[NeedReplyMessage, Reply], Any]) -> Deferred[None]:
    """
    L{IBus.send_stepping} on top of C{bus.send}: a window of C{parallelism} sends.

    Every message gets exactly one C{on_reply}: a send that errbacks or raises (a message
    that is not a L{NeedReplyMessage}, a bus that refuses it) counts as answered with an
    error reply carrying its ErrorCode, so the window never loses a slot. If iterating
    C{messages} raises, no further message is taken and the Deferred fails with that
    error once the sends in flight are answered.
    """
    if parallelism < 1:
        return fail(OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "parallelism must be >= 1",
                                      field="parallelism"))
    it = iter(messages)
    done: Deferred[None] = Deferred()
    state: dict[str, Any] = {"inflight": 0, "exhausted": False, "pumping": False,
                             "broken": None}

    def pump() -> None:
        # Replies that arrive synchronously (an immediate error reply) re-enter here: the
        # flag turns that recursion into another turn of this loop.
        if state["pumping"]:
            return
        state["pumping"] = True
        try:
            while state["inflight"] < parallelism and not state["exhausted"]:
                try:
                    msg = next(it)
                except StopIteration:
                    state["exhausted"] = True
                    break
                except Exception:
                    log.failure("send_stepping: iterating the messages failed")
                    state["exhausted"] = True
                    state["broken"] = Failure()
                    break
                state["inflight"] += 1
                try:
                    d = bus.send(msg)
                except Exception:
                    d = fail()
                d.addErrback(lambda f, m=msg: Reply.failure(from_failure(f),
                                                            getattr(m, "id", "")))
                d.addCallback(answered, msg)
        finally:
            state["pumping"] = False
        if state["exhausted"] and state["inflight"] == 0 and not done.called:
            if state["broken"] is not None:
                done.errback(state["broken"])
            else:
                done.callback(None)

    def answered(reply: Reply, msg: NeedReplyMessage) -> None:
        state["inflight"] -= 1
        try:
            on_reply(msg, reply)
        except Exception:
            log.failure("on_reply failed for {message}",
                        message=getattr(msg, "describe", lambda: repr(msg))())
        pump()

    pump()
    return done
