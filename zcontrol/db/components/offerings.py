# -*- test-case-name: tests.test_db_contract -*-
"""
The store component of instance and disk offerings (the offering service).
"""

from __future__ import annotations

from zcontrol.db.components.base import StoreComponent

__all__ = ["OfferingsComponent"]


class OfferingsComponent(StoreComponent):
    """
    Store operations of instance and disk offerings (the offering service), run on the store's one pool.
    """

    # Offerings need nothing beyond the generic insert/get/update/delete/query: no table
    # refers to them by a foreign key (a VM or volume copies what it needs), so a delete
    # is one statement.
