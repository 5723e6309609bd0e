# -*- test-case-name: tests.test_scheduler -*-
"""
Allocator strategies: how the hosts that passed every filter are ordered, the first being
chosen (and the next ones tried when a concurrent allocation took the first one's
capacity). Each is a total order (ties broken by uuid), so a decision is deterministic and
the store can apply the same order in SQL (C{ORDER BY} on the columns of L{Strategy.order}).

Names (an instance offering's C{allocatorStrategy}):
 - C{FirstFitHostAllocatorStrategy}, and ZStack's C{DefaultHostAllocatorStrategy}
   (the default, also for None): the host with the smallest uuid. ZStack's default picks at
   random among the fitting hosts; here the default is deterministic first-fit: it packs
   hosts (large hosts stay free for large VMs), decisions can be checked, and concurrent
   allocators racing for the same host are arbitrated by the store's reservation (the
   loser tries the next host). Spreading is what least-used is for.
 - C{LeastUsedHostAllocatorStrategy}, and ZStack's C{LeastVmPreferredHostAllocatorStrategy}:
   the host with the most available memory, then the most available CPUs, then the
   smallest uuid. ZStack's counts VMs per host; free capacity is the measure kept in the
   hosts table (no count of VMs per decision), and it spreads VMs the same way when they
   are of similar sizes.
 - ZStack's C{LastHostPreferredAllocatorStrategy}: the request's C{last_host_uuid} (the
   VM's last host) when it is given and passes every filter, else first-fit
   (L{Strategy.prefers_last_host}; the allocator tries that host first).

L{STRATEGIES} is the one list of names: the offering service validates an instance
offering's C{allocatorStrategy} against it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs

from zcontrol.scheduler.model import HostView

__all__ = [
    "DEFAULT_STRATEGY",
    "FIRST_FIT",
    "LAST_HOST_PREFERRED",
    "LEAST_USED",
    "STRATEGIES",
    "Strategy",
    "order_hosts",
    "strategy_named",
]


@attrs.frozen
class Strategy:
    """
    A strategy: its name, the sort key of a host (smallest first) and the same order as
    C{(HostView attribute, descending)} pairs for SQL.

    @ivar prefers_last_host: the request's C{last_host_uuid}, when it passes every filter,
        is chosen before any other host.
    """

    name: str
    key: Callable[[HostView], Any]
    order: tuple[tuple[str, bool], ...]
    prefers_last_host: bool = False


FIRST_FIT = Strategy("FirstFitHostAllocatorStrategy", lambda h: (h.uuid,), (("uuid", False),))
LEAST_USED = Strategy(
    "LeastUsedHostAllocatorStrategy",
    lambda h: (-h.available_memory, -h.available_cpu, h.uuid),
    (("available_memory", True), ("available_cpu", True), ("uuid", False)),
)
LAST_HOST_PREFERRED = Strategy("LastHostPreferredAllocatorStrategy", FIRST_FIT.key,
                               FIRST_FIT.order, prefers_last_host=True)
DEFAULT_STRATEGY = FIRST_FIT

#: Strategy name -> L{Strategy} (ZStack's names and ours).
STRATEGIES: dict[str, Strategy] = {
    "DefaultHostAllocatorStrategy": FIRST_FIT,
    FIRST_FIT.name: FIRST_FIT,
    "LeastVmPreferredHostAllocatorStrategy": LEAST_USED,
    LEAST_USED.name: LEAST_USED,
    LAST_HOST_PREFERRED.name: LAST_HOST_PREFERRED,
}


def strategy_named(name: str | None) -> Strategy:
    """
    The strategy called C{name} (None: the default, first-fit).

    @raise KeyError: for an unknown name (the service checks names first).
    """
    return DEFAULT_STRATEGY if name is None else STRATEGIES[name]


def order_hosts(strategy: Strategy, hosts: Iterable[HostView]) -> list[HostView]:
    """
    C{hosts} in C{strategy}'s order, the one to choose first.
    """
    return sorted(hosts, key=strategy.key)
