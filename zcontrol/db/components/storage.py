# -*- test-case-name: tests.test_db_contract -*-
"""
The store component of primary storage: LocalStorage host refs, NFS host refs, image caches, local capacity (the primary storage service).
"""

from __future__ import annotations

from zcontrol.db.components.base import StoreComponent

__all__ = ["StorageComponent"]


class StorageComponent(StoreComponent):
    """
    Store operations of primary storage: LocalStorage host refs, NFS host refs, image caches, local capacity (the primary storage service), run on the store's one pool.
    """
