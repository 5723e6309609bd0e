# -*- test-case-name: tests.test_bus_local -*-
"""
The sender side shared by every bus: the table of sends waiting for a reply, their timeouts,
and deadline propagation.

Note [timer wheel]: a bus with tens of thousands of sends outstanding must not pay one
C{callLater} (a heap entry and a DelayedCall object, ~300 bytes, plus O(log n) heap work) per
send. Deadlines are rounded up to a tick (C{resolution}, 50 ms by default) and the sends of one
tick share one C{callLater}; a completed send leaves its bucket at once, and an emptied bucket
cancels its timer. A timeout therefore fires up to one tick late, never early.

Note [deadline propagation]: while a handler runs, the deadline of the message it handles is
in a context variable, L{zcontrol.core.deadline} (L{current_deadline} and L{deadline_scope}
are re-exported here for the bus's callers); see the Note there.

Note [one exchange per send]: a reply finds its waiter by the request's C{id}. A message
object that was already sent (the bus set its C{deadline}) goes out again as a copy under a
fresh id (L{exchange_of}): sending one object twice gives two exchanges, and a resend after
a timeout never takes the late reply of the first attempt. The copy matters on the
in-process paths, where the receiver holds the very object sent and reads its id when it
replies. A different message that reuses an id still waiting is refused at once (SYS.1007)
rather than replacing the waiter, whose Deferred would then never fire.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zcontrol.bus.message import Message, NeedReplyMessage, Reply, new_id
from zcontrol.core.deadline import current_deadline, deadline_scope
from zcontrol.core.errors import SYS, ErrorCode, error_code
from zcontrol.core.trace import current_trace_id

__all__ = ["PendingTable", "current_deadline", "deadline_scope", "exchange_of", "stamp_trace"]

log = Logger()

def stamp_trace(msg: Message) -> None:
    """
    Give C{msg} the current trace id (L{zcontrol.core.trace}) unless it carries one: a
    message sent while a job's trace id is current belongs to that job.
    """
    if msg.trace_id is None:
        msg.trace_id = current_trace_id()


def exchange_of(msg: NeedReplyMessage) -> NeedReplyMessage:
    """
    The message to send for C{msg}: C{msg} itself the first time, a copy under a fresh id
    when it was sent before (its C{deadline} is set). See Note [one exchange per send].
    """
    if msg.deadline is None:
        return msg
    return attrs.evolve(msg, id=new_id())


class _Envelope:
    __slots__ = ("d", "msg_id", "name", "timeout", "target", "tick")

    def __init__(self, d: Deferred, msg_id: str, name: str, timeout: float, target: str | None,
                 tick: int):
        self.d = d
        self.msg_id = msg_id
        self.name = name
        self.timeout = timeout
        self.target = target
        self.tick = tick


class PendingTable:
    """
    Sends waiting for a reply. Each gets exactly one answer: the reply, a timeout, a cancel,
    or a node failure, whichever comes first; later ones are dropped (and logged).
    """

    def __init__(self, clock: Any, default_timeout: float = 1800.0, resolution: float = 0.05):
        self._clock = clock
        self.default_timeout = default_timeout
        self.resolution = resolution
        self._pending: dict[str, _Envelope] = {}
        self._buckets: dict[int, dict[str, _Envelope]] = {}
        self._timers: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._pending

    def prepare(self, msg: NeedReplyMessage, timeout: float | None) -> float:
        """
        Resolve the message's timeout and deadline (own timeout, capped by the parent's
        deadline) and write them into the message. Returns the time left.
        """
        now = self._clock.seconds()
        if timeout is None:
            timeout = msg.timeout if msg.timeout is not None else self.default_timeout
        deadline = now + timeout
        parent = current_deadline()
        if parent is not None and parent < deadline:
            deadline = parent
        msg.deadline = deadline
        msg.timeout = deadline - now
        msg.created_at = now
        return msg.timeout

    def add(self, msg: NeedReplyMessage, target: str | None = None) -> Deferred[Reply]:
        """
        Wait for the reply to C{msg} (already L{prepare}d). The Deferred has already fired
        when the message cannot be sent: its deadline passed (SYS.1001), or its id is still
        waiting for the reply of another send (SYS.1007, the waiter in place is kept); the
        caller checks C{d.called} before sending.
        """
        d: Deferred[Reply] = Deferred(self._cancel)
        if msg.id in self._pending:
            d.callback(Reply.failure(error_code(
                SYS.INVALID_ARGUMENT_ERROR,
                f"{msg.describe()}: message id {msg.id} is already waiting for a reply; "
                "every send needs its own id",
                field="id", message_id=msg.id), msg.id))
            return d
        left = msg.deadline - self._clock.seconds()
        if left <= 0:
            d.callback(self._timeout_reply(msg.id, msg.describe(), msg.timeout or 0.0))
            return d
        tick = math.ceil(msg.deadline / self.resolution)
        env = _Envelope(d, msg.id, msg.describe(), msg.timeout, target, tick)
        d._zenv = env  # type: ignore[attr-defined]
        self._pending[msg.id] = env
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            self._timers[tick] = self._clock.callLater(
                max(0.0, tick * self.resolution - self._clock.seconds()), self._expire, tick
            )
        bucket[msg.id] = env
        return d

    def _remove(self, env: _Envelope) -> None:
        if self._pending.get(env.msg_id) is env:
            del self._pending[env.msg_id]
        bucket = self._buckets.get(env.tick)
        if bucket is not None:
            bucket.pop(env.msg_id, None)
            if not bucket:
                del self._buckets[env.tick]
                timer = self._timers.pop(env.tick, None)
                if timer is not None and timer.active():
                    timer.cancel()

    def complete(self, reply: Reply) -> bool:
        """
        Deliver C{reply} to its waiter. False (and a log line) for a late or unknown reply.
        """
        env = self._pending.get(reply.correlation_id)
        if env is None:
            log.info(
                "dropping a reply for no waiting message (late, duplicate or unknown): "
                "{correlation_id}",
                correlation_id=reply.correlation_id,
            )
            return False
        self._remove(env)
        env.d.callback(reply)
        return True

    def fail(self, msg_id: str, error: ErrorCode) -> bool:
        """
        Answer one waiter with an error reply.
        """
        env = self._pending.get(msg_id)
        if env is None:
            return False
        self._remove(env)
        env.d.callback(Reply.failure(error, msg_id))
        return True

    def fail_target(self, target: str, error: ErrorCode) -> int:
        """
        Answer every waiter whose message went to node C{target} (it left) with C{error}.
        """
        ids = [e.msg_id for e in self._pending.values() if e.target == target]
        for msg_id in ids:
            self.fail(msg_id, error)
        return len(ids)

    def fail_all(self, error: ErrorCode) -> int:
        ids = list(self._pending)
        for msg_id in ids:
            self.fail(msg_id, error)
        return len(ids)

    def _timeout_reply(self, msg_id: str, name: str, timeout: float) -> Reply:
        return Reply.failure(
            error_code(SYS.TIMEOUT, f"{name} timeout after {timeout:g} seconds",
                       message_id=msg_id),
            msg_id,
        )

    def _expire(self, tick: int) -> None:
        # Runs from the reactor: nothing may raise out of here (a DelayedCall that raises is
        # only logged, and the sends after the faulty one would never be answered).
        self._timers.pop(tick, None)
        bucket = self._buckets.pop(tick, None) or {}
        due = []
        for env in bucket.values():
            if self._pending.get(env.msg_id) is env:
                del self._pending[env.msg_id]
                due.append(env)
        for env in due:
            try:
                log.warn("{name} timeout after {timeout:g} seconds", name=env.name,
                         timeout=env.timeout)
                if not env.d.called:
                    env.d.callback(self._timeout_reply(env.msg_id, env.name, env.timeout))
            except Exception:
                log.failure("answering the timeout of {name} failed", name=env.name)

    def _cancel(self, d: Deferred) -> None:
        env = getattr(d, "_zenv", None)
        if env is not None and self._pending.get(env.msg_id) is env:
            self._remove(env)
            d.callback(Reply.failure(error_code(SYS.CANCEL, f"{env.name} was cancelled"),
                                     env.msg_id))
