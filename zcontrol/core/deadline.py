# -*- test-case-name: tests.test_core_chain -*-
"""
The deadline of the work running in this context: an absolute time (seconds, on the bus's
clock) by which the message being handled must be answered, or None.

A bus sets it while a handler runs (L{deadline_scope}, with the handled message's
C{deadline}); the chain-task queue (L{zcontrol.core.chain}) carries it to tasks that wait for
a slot; the agent client (L{zcontrol.agentclient.client}) caps each call's timeout by it; a
service that starts background work clears it (C{deadline_scope(None, ...)}) so that the work
outlives the request that caused it.

Note [deadline propagation]: it is a context variable. C{Deferred.fromCoroutine} runs a
coroutine in a copy of the context it was created in, so an C{async def} handler's child
sends see the parent's deadline at every step; code written with explicit callbacks that
fire later should pass C{timeout=} itself. It lives in C{zcontrol.core}, which imports
nothing from the bus, so that the core can read it without depending on the bus.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable

__all__ = ["current_deadline", "deadline_scope"]

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "zcontrol_bus_deadline", default=None
)


def current_deadline() -> float | None:
    """
    The deadline of the message being handled in this context (absolute seconds on the
    bus's clock), or None.
    """
    return _deadline.get()


def deadline_scope(deadline: float | None, fn: Callable[..., Any], *args: Any) -> Any:
    """
    Call C{fn(*args)} with C{deadline} (absolute seconds on the bus's clock, or None) as
    the current deadline, and return what it returns.
    """
    token = _deadline.set(deadline)
    try:
        return fn(*args)
    finally:
        _deadline.reset(token)
