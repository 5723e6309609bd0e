# -*- test-case-name: tests.test_trace -*-
"""
Trace ids in log lines: a log observer, installed first on a log publisher, that gives
every event emitted while a trace id is current a C{trace_id} key and makes its text end in
C{[trace=<id>]}, so that C{grep <id>} over a node's or an agent's log finds the lines of one
job (see L{zcontrol.core.trace}).

Events are emitted synchronously in the emitter's context (C{Logger.emit} calls the
publisher, which calls its observers in order), so an observer that runs before the ones
that write can read the emitter's context variables. An event that already carries a
C{trace_id} (the agent logs the id it read from a command's header) keeps it. An event
with no trace id costs one function call and one dictionary lookup.

The agent never imports C{zcontrol}: the node passes its context variable's reader as
C{current}; the agent passes none (its events name their trace id themselves).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import LogPublisher, globalLogPublisher

__all__ = ["TRACE_SUFFIX", "TraceLogObserver", "install_trace_observer"]

#: What is appended to the format of an event that has a trace id.
TRACE_SUFFIX = " [trace={trace_id}]"


class TraceLogObserver:
    """
    Adds C{trace_id} (from C{current()}, when the event has none) and the
    L{TRACE_SUFFIX} to the C{log_format} of events that have a trace id. Not an observer
    that writes: it must run before those that do (see L{install_trace_observer}).
    """

    def __init__(self, current: Callable[[], str | None] | None = None) -> None:
        self._current = current

    def __call__(self, event: dict[str, Any]) -> None:
        trace_id = event.get("trace_id")
        if trace_id is None:
            if self._current is None:
                return
            trace_id = self._current()
            if trace_id is None:
                return
            event["trace_id"] = trace_id
        if event.get("log_trace_suffixed"):
            return
        fmt = event.get("log_format")
        if isinstance(fmt, str):
            event["log_format"] = fmt + TRACE_SUFFIX
            event["log_trace_suffixed"] = True


def install_trace_observer(current: Callable[[], str | None] | None = None,
                           publisher: LogPublisher = globalLogPublisher) -> TraceLogObserver:
    """
    Put a L{TraceLogObserver} in front of C{publisher}'s observers (at most one: an
    existing one is replaced), so that the observers writing log files see its changes,
    whether they were added before or after it. Returns it.

    C{LogPublisher} has no public way to insert first: this uses its C{_observers} list,
    and falls back on C{addObserver} (last) if that ever changes.
    """
    observer = TraceLogObserver(current)
    observers = getattr(publisher, "_observers", None)
    if isinstance(observers, list):
        observers[:] = [o for o in observers if not isinstance(o, TraceLogObserver)]
        observers.insert(0, observer)
    else:
        publisher.addObserver(observer)
    return observer
