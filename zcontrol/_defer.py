# -*- test-case-name: tests.test_defer_helpers -*-
"""
House Deferred helpers: C{async_to_deferred} for public async methods, a L{DeferWaiter} to
drain work in flight at stop, and C{ensure_error} to make every failure carry an ErrorCode.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

__all__ = ["async_to_deferred", "DeferWaiter", "maybe_deferred"]

T = TypeVar("T")
log = Logger()


def async_to_deferred(fn: Callable[..., Awaitable[T]]) -> Callable[..., Deferred[T]]:
    """
    Decorate an C{async def} so that calling it returns a L{Deferred} (via
    C{Deferred.fromCoroutine}).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[T]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper


def maybe_deferred(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """
    Call C{fn} and always get a Deferred: a plain value, a raised exception, a coroutine or a
    Deferred all become one (like C{defer.maybeDeferred}, plus coroutines).
    """
    from twisted.internet import defer

    try:
        result = fn(*args, **kwargs)
    except BaseException:
        return defer.fail()
    if isinstance(result, Deferred):
        return result
    if hasattr(result, "__await__") and hasattr(result, "send"):
        return Deferred.fromCoroutine(result)
    return succeed(result)


class DeferWaiter:
    """
    Tracks Deferreds in flight so that a service's C{stopService} can wait for them to finish
    (buildbot's C{DeferWaiter}). Results are passed through unchanged.
    """

    def __init__(self) -> None:
        self._waiting: set[Deferred] = set()
        self._idle: list[Deferred] = []
        self._busy = 0

    def __len__(self) -> int:
        return len(self._waiting) + self._busy

    def enter(self) -> None:
        """
        Count a piece of work that has no Deferred yet (a handler being called, which may
        re-enter the caller before it returns); pair with L{leave}.
        """
        self._busy += 1

    def leave(self) -> None:
        self._busy -= 1
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._waiting and not self._busy:
            idle, self._idle = self._idle, []
            for w in idle:
                w.callback(None)

    def add(self, d: Deferred[T]) -> Deferred[T]:
        self._waiting.add(d)

        def done(result: Any) -> Any:
            self._waiting.discard(d)
            self._maybe_idle()
            return result

        d.addBoth(done)
        return d

    def wait(self) -> Deferred[None]:
        """
        A Deferred that fires once nothing is in flight.
        """
        if not self._waiting and not self._busy:
            return succeed(None)
        w: Deferred[None] = Deferred()
        self._idle.append(w)
        return w
