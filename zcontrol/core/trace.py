# -*- test-case-name: tests.test_trace -*-
"""
The trace id of the work running in this context: one id per job (a VM's create, start, ...)
that rides every bus message the job sends, every agent command (the C{X-Trace-Id} header)
and every log line it causes, so that C{grep <id>} over the node's and the agents' logs
tells one job's story.

A bus sets it while a handler runs (L{trace_scope}, with the handled message's
C{trace_id}) and stamps it on every message sent while it is current (unless the message
has one); the agent client sends it in a header; the node's log observer
(L{zcontrol.core.tracelog}) adds it to every log event emitted while it is current.

Note [trace propagation]: it is a context variable, exactly like
L{zcontrol.core.deadline}: C{Deferred.fromCoroutine} runs a coroutine in a copy of the
context it was created in, and the chain-task queue runs its tasks in the submitter's
context, so both carry it. Code written with explicit callbacks that fire later runs in the
context of whoever fires them, and should enter L{trace_scope} itself.
"""

from __future__ import annotations

import contextvars
import uuid
from typing import Any, Callable

__all__ = ["current_trace_id", "new_trace_id", "trace_scope"]

_trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "zcontrol_trace_id", default=None
)


def current_trace_id() -> str | None:
    """
    The trace id of the job running in this context, or None.
    """
    return _trace_id.get()


def new_trace_id() -> str:
    """
    A fresh trace id: 32 lowercase hex digits (a uuid4, the form of ZStack's uuids).
    """
    return uuid.uuid4().hex


def trace_scope(trace_id: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """
    Call C{fn(*args)} with C{trace_id} (or None: no trace) as the current trace id, and
    return what it returns.
    """
    token = _trace_id.set(trace_id)
    try:
        return fn(*args)
    finally:
        _trace_id.reset(token)
