# -*- test-case-name: tests.test_db_contract -*-
"""
VM instances: the state compare-and-swap.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.db.components.base import Db, StoreComponent, _copy, _mapping, update_thd


def change_vm_state_thd(
    db: Db, vm_uuid: str, expected: Any, new: str, changes: dict | None, now: float
) -> dict:
    """
    The VM state compare-and-swap: one C{UPDATE ... WHERE uuid = ? AND state IN (...)}.
    """
    values = _mapping("changes", changes) if changes is not None else {}
    values["state"] = new
    return update_thd(db, "vmInstance", vm_uuid, values, {"state": expected}, now)


class VmsComponent(StoreComponent):
    """
    VM instance state (see L{IStore}).
    """

    def change_vm_state(self, vm_uuid: str, expected: Any, new: str,
                        changes: dict | None = None) -> Deferred:
        return self._run(change_vm_state_thd, vm_uuid, expected, new, _copy(changes),
                         self._now())
