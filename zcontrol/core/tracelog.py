# -*- test-case-name: tests.test_trace -*-
"""
The node's trace-id log observer: L{agent.tracelog.TraceLogObserver} reading
L{zcontrol.core.trace.current_trace_id}, so that every log event emitted while a job's trace
id is current carries it (C{trace_id} key, C{[trace=<id>]} at the end of its text).
"""

from __future__ import annotations

from twisted.logger import LogPublisher, globalLogPublisher

from agent.tracelog import TraceLogObserver, install_trace_observer
from zcontrol.core.trace import current_trace_id

__all__ = ["install_node_trace_observer"]


def install_node_trace_observer(
    publisher: LogPublisher = globalLogPublisher,
) -> TraceLogObserver:
    """
    Install the node's trace observer first on C{publisher} (see
    L{agent.tracelog.install_trace_observer}). Returns it.
    """
    return install_trace_observer(current_trace_id, publisher)
