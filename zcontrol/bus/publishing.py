# -*- test-case-name: tests.test_bus_local -*-
"""
Publishing the event of a state change that is already committed.

Note [after commit]: once the store has committed a state change, the operation has
succeeded; failing to announce it must not fail it, nor hold whoever waits for it (a host's
chain slot, the node's shutdown). L{publish_after_commit} publishes with bounded retries
and logs, and never errbacks.

Decision: log and retry, not an outbox. Why:
 - Events here are notifications about state whose truth is in the store (a host's status,
   a VM's state). The bus's event queues are non-durable and their messages expire, so a
   node that was down or reconnecting misses events whatever the publisher does: every
   subscriber must already reconcile from the store (the host tracker's pings, the VM
   sync). An outbox would make the hand-over to the broker reliable and nothing after it.
 - An outbox needs the event row written in the same transaction as the state change; the
   IStore contract has no such transaction, and it would add a write to every state change.
 - What fails in practice is a broker blip or a reconnection, which a few retries spanning
   some seconds ride out. When they do not, the event is logged at error level with its
   topic and id, and the next reconciliation repairs the subscribers' view.
Revisit it when an event drives work that no reconciliation repeats (billing, audit): that
needs an outbox table written in the state change's transaction and relayed by a loop.

Consequences for subscribers: an event may arrive twice (a publish whose confirm was lost is
retried; the event keeps its C{id}, so a subscriber can drop the duplicate), late, or out
of order with a later event of the same resource (a retried one can be overtaken): compare
with the store rather than trust the order.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from zcontrol._defer import maybe_deferred
from zcontrol.bus.message import Event
from zcontrol.core.errors import SYS, from_failure

__all__ = ["publish_after_commit"]

log = Logger()

#: Failures that no retry can cure: the event itself is wrong (cannot be encoded, too large).
PERMANENT = frozenset({SYS.INVALID_ARGUMENT_ERROR, SYS.UNKNOWN_MESSAGE_ERROR})


def publish_after_commit(
    bus: Any,
    event: Event,
    clock: Any,
    *,
    attempts: int = 5,
    initial_delay: float = 0.5,
    max_delay: float = 8.0,
    attempt_timeout: float = 10.0,
    total_timeout: float = 30.0,
) -> Deferred[bool]:
    """
    Publish C{event} on C{bus} for a state change already committed (Note [after commit]).

    Each attempt waits at most C{attempt_timeout} seconds for the bus to take the event; a
    failed attempt is retried after C{initial_delay} seconds, doubling up to C{max_delay},
    C{attempts} times in all (spanning about 15 s with the defaults), and never past
    C{total_timeout} seconds from the call; a permanent failure (C{SYS.1007},
    C{SYS.1008}: the event cannot be encoded or is too large) is not retried. Every
    failure is logged; giving up is logged at error level with the event's topic and id.
    So whoever waits for it (a service's stop) waits at most C{total_timeout} seconds.

    @param clock: times the retries and the attempt timeout (C{IReactorTime}).
    @return: a Deferred that never errbacks, firing with True once the bus took the event,
        or False when it gave up (or was cancelled: cancelling stops the retries).
    """
    result: Deferred[bool] = Deferred(lambda d: stop())
    state: dict[str, Any] = {"attempt": 0, "delay": initial_delay, "call": None,
                             "inner": None}
    started = clock.seconds()
    what = f"{type(event).type_name} {event.id} (topic {type(event).topic})"

    def stop() -> None:
        if not result.called:
            log.warn("publishing {what} was cancelled", what=what)
            result.callback(False)
        call, inner = state["call"], state["inner"]
        state["call"] = state["inner"] = None
        if call is not None and call.active():
            call.cancel()
        if inner is not None and not inner.called:
            inner.cancel()

    def attempt() -> None:
        state["call"] = None
        if result.called:
            return
        state["attempt"] += 1
        inner = maybe_deferred(bus.publish, event)
        left = total_timeout - (clock.seconds() - started)
        inner.addTimeout(max(0.001, min(attempt_timeout, left)), clock)
        state["inner"] = inner
        inner.addCallbacks(published, failed)

    def published(_: Any) -> None:
        state["inner"] = None
        if state["attempt"] > 1:
            log.info("published {what} at attempt {n}", what=what, n=state["attempt"])
        if not result.called:
            result.callback(True)

    def failed(reason: Failure) -> None:
        state["inner"] = None
        if result.called:
            return
        err = from_failure(reason)
        delay = state["delay"]
        if err.code in PERMANENT or state["attempt"] >= attempts \
                or clock.seconds() + delay - started >= total_timeout:
            log.error("giving up publishing {what} after {n} attempt(s): {error} (the "
                      "state change stands; subscribers catch up from the store)",
                      what=what, n=state["attempt"], error=str(err))
            result.callback(False)
            return
        state["delay"] = min(delay * 2, max_delay)
        log.warn("publishing {what} failed (attempt {n} of {total}): {error}; retrying in "
                 "{delay:g} s", what=what, n=state["attempt"], total=attempts,
                 error=str(err), delay=delay)
        state["call"] = clock.callLater(delay, attempt)

    attempt()
    return result
