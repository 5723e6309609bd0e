# -*- test-case-name: tests.test_db_contract -*-
"""
The store component of L2 and L3 networks, IP ranges, DNS, network service refs (the network services).
"""

from __future__ import annotations

from zcontrol.db.components.base import StoreComponent

__all__ = ["NetworksComponent"]


class NetworksComponent(StoreComponent):
    """
    Store operations of L2 and L3 networks, IP ranges, DNS, network service refs (the network services), run on the store's one pool.
    """
