# -*- test-case-name: tests.test_db_contract -*-
"""
The store component of backup storage and images (the backup storage and image services).
"""

from __future__ import annotations

from zcontrol.db.components.base import StoreComponent

__all__ = ["ImagesComponent"]


class ImagesComponent(StoreComponent):
    """
    Store operations of backup storage and images (the backup storage and image services), run on the store's one pool.
    """
