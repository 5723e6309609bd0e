# -*- test-case-name: tests.test_services_base -*-
"""
What every inventory service shares: serving a bus service id with one handler per message
type, per-resource serialisation through the chain-task queue, typed lookups that fail with
the service's own NOT_FOUND code, sending to other services, and publishing events after a
commit. A service keeps no state that a restart or another node could not rebuild from the
store: everything here is either configuration or work in flight.

A service subclass::

    class ZoneService(Service):
        service_id = "zone"

        @handles(CreateZoneMsg)
        async def create(self, msg: CreateZoneMsg) -> ZoneReply:
            ...

Messages about one resource are routed by the bus to the resource's owner node (the sender
sets C{resource_uuid}); there, L{Service.serialized} runs the operations on one resource one
at a time (ZStack's C{ChainTask} with C{syncLevel} 1 and the resource uuid as its signature:
"serialisation without locks", C{shared/ZSTACK_FACTS.md} section 3).
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, ClassVar, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from zcontrol._defer import DeferWaiter, maybe_deferred
from zcontrol.bus.message import Event, NeedReplyMessage, Reply
from zcontrol.bus.publishing import publish_after_commit
from zcontrol.core.chain import ChainTaskQueue
from zcontrol.core.errors import SYS, OperationError, from_failure
from zcontrol.services import validate

__all__ = ["Service", "handles", "reply_or_raise", "succeeds_if_gone"]

log = Logger()

F = TypeVar("F", bound=Callable[..., Any])


def handles(*message_types: type) -> Callable[[F], F]:
    """
    Mark a method of a L{Service} subclass as the handler of C{message_types}. The method
    takes the message and returns a Reply (or a Deferred or coroutine firing with one);
    raising an L{OperationError} answers with its ErrorCode.
    """

    def mark(fn: F) -> F:
        fn.__handles__ = message_types  # type: ignore[attr-defined]
        return fn

    return mark


def succeeds_if_gone(not_found: str, field: str = "uuid") -> Callable[[F], F]:
    """
    Make a delete handler idempotent, as ZStack's C{APIDelete*Msg} are
    (C{@APIParam(successIfResourceNotExisting = true)}): when the resource the message's
    C{field} names does not exist (the handler fails with C{not_found} naming that uuid), the
    delete succeeds with an empty reply (C{inventory} None), so that a retried delete whose
    first reply was lost, or two concurrent deletes, both succeed. A C{not_found} about
    another uuid (a dependent) still fails. Put it under L{handles}.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Any, msg: Any) -> Any:
            try:
                return await maybe_deferred(fn, self, msg)
            except OperationError as e:
                opaque = e.error.opaque
                if (e.error.code == not_found and opaque.get("uuid") == getattr(msg, field)
                        and opaque.get("field", field) == field):
                    return type(msg).reply_type()
                raise

        return handler  # type: ignore[return-value]

    return wrap


def reply_or_raise(reply: Reply) -> Reply:
    """
    C{reply} when it succeeded, else raise its ErrorCode as an L{OperationError} (so that a
    caller's own error wraps or passes on the callee's).
    """
    if not reply.success:
        assert reply.error is not None
        raise OperationError(reply.error)
    return reply


class Service:
    """
    The base of a bus service on one management node.

    @cvar service_id: the bus service id (ZStack's service id, e.g. C{"zone"}).
    @ivar clock: the reactor (or a L{twisted.internet.task.Clock} in tests).
    @ivar bus: the L{zcontrol.bus.interfaces.IBus}.
    @ivar store: the L{zcontrol.db.interfaces.IStore}.
    """

    service_id: ClassVar[str] = ""
    #: The C{Deferred} timeout (seconds) of messages this service sends to others, unless
    #: the message sets its own (the current deadline still caps it).
    send_timeout: ClassVar[float] = 300.0

    def __init__(self, clock: Any, bus: Any, store: Any,
                 queue: ChainTaskQueue | None = None) -> None:
        if not self.service_id:
            raise TypeError(f"{type(self).__name__} has no service_id")
        self.clock = clock
        self.bus = bus
        self.store = store
        self._own_queue = queue is None
        self.queue = queue if queue is not None else ChainTaskQueue(clock)
        self._waiter = DeferWaiter()
        self._handlers: dict[type, Callable[[Any], Any]] = {}
        for klass in reversed(type(self).__mro__):
            for name, member in vars(klass).items():
                for mtype in getattr(member, "__handles__", ()):
                    self._handlers[mtype] = getattr(self, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service_id!r}>"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Any:
        """
        Serve L{service_id} on the bus.

        @return: what the bus's C{register_service} returns (None, or a Deferred firing once
            peers can reach the service).
        """
        return self.bus.register_service(self.service_id, self.handle)

    def stop(self) -> Deferred[None]:
        """
        Stop serving and wait for the work in flight.
        """
        self.bus.unregister_service(self.service_id)
        d = self._waiter.wait()

        def close(result: Any) -> Any:
            if self._own_queue:
                self.queue.close(f"the {self.service_id} service stopped")
            return result

        return d.addBoth(close)

    # --- bus ----------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """
        The bus handler: dispatch on the message's type.
        """
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise OperationError.of(
                SYS.UNKNOWN_MESSAGE_ERROR,
                f"the {self.service_id} service does not handle {type(msg).__name__}",
                service=self.service_id, message=type(msg).__name__)
        return self._waiter.add(maybe_deferred(handler, msg))

    def send(self, msg: NeedReplyMessage, timeout: float | None = None) -> Deferred[Reply]:
        """
        Send C{msg} to another service (routed by its C{resource_uuid}) and fire with its
        reply when it succeeded; fail with the reply's ErrorCode when it did not.
        """
        if msg.timeout is None and timeout is None:
            timeout = self.send_timeout
        return self.bus.send(msg, timeout).addCallback(reply_or_raise)

    def publish(self, event: Event) -> None:
        """
        Publish C{event} (of a change already committed) in the background, with the bus's
        bounded retries (L{publish_after_commit}); a failure is logged.
        """
        self.background(publish_after_commit(self.bus, event, self.clock),
                        f"publishing {type(event).__name__}")

    def background(self, d: Deferred, what: str) -> Deferred:
        """
        Count C{d} as work in flight (L{stop} waits for it) and log its failure.
        """
        d.addErrback(lambda f: log.error("{service}: {what} failed: {error}",
                                         service=self.service_id, what=what,
                                         error=str(from_failure(f))))
        return self._waiter.add(d)

    # --- serialisation ------------------------------------------------------------------

    def serialized(self, key: str, fn: Callable[[], Awaitable[Any] | Any],
                   sync_level: int = 1) -> Deferred[Any]:
        """
        Run C{fn()} in the chain C{key} (e.g. C{"zone-<uuid>"}): the operations queued under
        one key run one at a time (C{sync_level}), in the order they were queued.
        """
        return self.queue.run(key, lambda: maybe_deferred(fn), sync_level=sync_level)

    # --- lookups ------------------------------------------------------------------------

    async def must_get(self, resource: str, uuid: Any, not_found: str,
                       field: str | None = None) -> dict[str, Any]:
        """
        The store row of C{resource} C{uuid}, or an L{OperationError} with the code
        C{not_found} (the service's NOT_FOUND) naming the uuid (and C{field}, the message
        field that carried it, when given). Anything but a uuid (L{validate.uuid}: not a
        string, blank, too long, control characters) is C{SYS.1007} naming C{field}, before
        the store sees it (the store's own edge check would name its column, C{uuid}).
        """
        validate.uuid(uuid, field or "uuid")
        row = await self.store.get(resource, uuid)
        if row is None:
            details: dict[str, Any] = {"resource": resource, "uuid": uuid}
            if field is not None:
                details["field"] = field
            raise OperationError.of(not_found, f"no {resource} with uuid {uuid}", **details)
        return row

    def ready(self) -> Deferred[None]:
        """
        A Deferred that has fired (for handlers that have nothing asynchronous to do).
        """
        return succeed(None)
