# -*- test-case-name: tests.test_db_contract -*-
"""
The store component of zones and clusters (the zone and cluster services).
"""

from __future__ import annotations

from zcontrol.db.components.base import StoreComponent

__all__ = ["ZonesComponent"]


class ZonesComponent(StoreComponent):
    """
    Store operations of zones and clusters (the zone and cluster services), run on the store's one pool.
    """
