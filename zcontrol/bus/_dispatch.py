# -*- test-case-name: tests.test_bus_local -*-
"""
The receiver side shared by every bus: run a service handler and turn whatever it does into
exactly one reply; match event topics; run event handlers without letting one break another.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from zcontrol.bus._pending import deadline_scope
from zcontrol.bus.message import Event, Message, NeedReplyMessage, Reply
from zcontrol.core.errors import SYS, error_code, from_failure
from zcontrol.core.trace import trace_scope

__all__ = ["call_handler", "deliver_event", "topic_matches"]

log = Logger()


@lru_cache(maxsize=4096)
def _topic_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)?")
        elif word == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(word))
    # '#' may match zero words, which also swallows its neighbouring dot.
    rx = r"\.".join(parts)
    rx = rx.replace(r"\.(?:[^.]+(?:\.[^.]+)*)?", r"(?:\.[^.]+)*")
    rx = rx.replace(r"(?:[^.]+(?:\.[^.]+)*)?\.", r"(?:[^.]+\.)*")
    return re.compile(rf"^{rx}$")


def topic_matches(pattern: str, topic: str) -> bool:
    """
    AMQP topic matching: words are dot-separated, C{*} matches exactly one word, C{#} zero or
    more words.
    """
    return _topic_regex(pattern).match(topic) is not None


def call_handler(
    handler: Callable[[Any], Any],
    msg: Message,
    service_id: str,
    on_reply: Callable[[Reply], None],
) -> Deferred | None:
    """
    Run C{handler(msg)} with the message's deadline as the current deadline and its
    C{trace_id} as the current trace id (L{zcontrol.core.trace}), and hand its
    outcome to C{on_reply} as a Reply (for a L{NeedReplyMessage}; a plain message's outcome
    is only logged when it fails). Returns the Deferred of an asynchronous handler, so that
    the bus can wait for it when stopping, or None.
    """
    needs_reply = isinstance(msg, NeedReplyMessage)

    def fail(reason: Failure) -> None:
        err = from_failure(reason)
        if err.code == SYS.INTERNAL:
            log.failure(
                "handler of {service} failed on {message}",
                reason,
                service=service_id,
                message=msg.describe(),
            )
            err = error_code(SYS.INTERNAL, f"{service_id}: {err.details}")
        if needs_reply:
            on_reply(Reply.failure(err, msg.id))
        else:
            log.error("{message} failed in {service}: {error}", message=msg.describe(),
                      service=service_id, error=str(err))

    def done(result: Any) -> None:
        if not needs_reply:
            return
        if isinstance(result, Reply):
            on_reply(result)
        elif result is not None:
            on_reply(Reply.failure(error_code(
                SYS.INTERNAL,
                f"{service_id}: the handler returned {type(result).__name__}, not a Reply",
            ), msg.id))
        # None: the handler replies later through bus.reply.

    try:
        result = trace_scope(msg.trace_id, _run_handler, handler, msg)
    except Exception:
        fail(Failure())
        return None
    if isinstance(result, Deferred):
        result.addCallbacks(done, fail)
        result.addErrback(lambda f: log.failure("bus reply path failed", f))
        return result
    try:
        done(result)
    except Exception:
        log.failure("bus reply path failed")
    return None


def _run_handler(handler: Callable[[Any], Any], msg: Message) -> Any:
    result = deadline_scope(getattr(msg, "deadline", None), handler, msg)
    if hasattr(result, "__await__") and hasattr(result, "send"):
        result = deadline_scope(getattr(msg, "deadline", None), Deferred.fromCoroutine,
                                result)
    return result


def deliver_event(handlers: list[tuple[str, Callable[[Event], Any]]], event: Event) -> None:
    """
    Call every handler whose pattern matches the event's topic. A handler that raises or
    returns a failing Deferred is logged; the others still run.
    """
    topic = type(event).topic
    for pattern, handler in handlers:
        if not topic_matches(pattern, topic):
            continue
        try:
            result = handler(event)
        except Exception:
            log.failure("event handler for {pattern} failed on {topic}", pattern=pattern,
                        topic=topic)
            continue
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f, p=pattern: log.failure("event handler for {pattern} failed", f,
                                                 pattern=p)
            )
