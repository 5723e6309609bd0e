# -*- test-case-name: tests.test_bus_ring -*-
"""
The consistent-hash ring of management nodes (ZStack's C{ConsistentHash}): each node puts
C{vnodes} points on a 64-bit ring; a key belongs to the first point at or after its hash,
wrapping around. Adding or removing one of N nodes moves about 1/N of the keys, and only
those that go to or come from that node.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterable

__all__ = ["ConsistentHashRing"]


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class ConsistentHashRing:
    """
    A consistent-hash ring over node ids.

    @ivar vnodes: points per node (ZStack uses 500).
    """

    def __init__(self, nodes: Iterable[str] = (), vnodes: int = 500):
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self.vnodes = vnodes
        self._nodes: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []
        for node in nodes:
            self._nodes.add(node)
        self._rebuild()

    def _rebuild(self) -> None:
        pairs = sorted(
            (_hash(f"{node}#{i}"), node) for node in self._nodes for i in range(self.vnodes)
        )
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: str) -> bool:
        return node in self._nodes

    def add(self, node: str) -> bool:
        """
        Add C{node}; False if it was already there.
        """
        if node in self._nodes:
            return False
        self._nodes.add(node)
        self._rebuild()
        return True

    def remove(self, node: str) -> bool:
        """
        Remove C{node}; False if it was not there.
        """
        if node not in self._nodes:
            return False
        self._nodes.discard(node)
        self._rebuild()
        return True

    def set_nodes(self, nodes: Iterable[str]) -> None:
        """
        Replace the membership (e.g. from the management-node table).
        """
        nodes = set(nodes)
        if nodes != self._nodes:
            self._nodes = nodes
            self._rebuild()

    def owner(self, key: str) -> str | None:
        """
        The node owning C{key}, or None for an empty ring.
        """
        if not self._points:
            return None
        i = bisect.bisect_left(self._points, _hash(key))
        if i == len(self._points):
            i = 0
        return self._owners[i]
