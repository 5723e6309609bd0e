# -*- test-case-name: tests.test_db_contract -*-
"""
Management nodes: heartbeats and the live node list.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.components.base import (
    Db,
    StoreComponent,
    _cols,
    _row,
)
from zcontrol.db.query import (
    Field,
    resource,
)


def heartbeat_thd(
    db: Db, uuid: str, hostname: str, port: int | None, state: str, now: float
) -> dict:
    """
    Insert or refresh a management node row in one upsert.
    """
    res = resource("managementNode")
    row = res.to_row({"uuid": uuid, "hostname": hostname, "port": port, "state": state})
    rows = db.all(
        "INSERT INTO management_nodes (uuid, hostname, port, state, heartbeat, join_date)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO UPDATE SET"
        " hostname = excluded.hostname, port = excluded.port, state = excluded.state,"
        f" heartbeat = excluded.heartbeat RETURNING {_cols(res)}",
        (row["uuid"], row["hostname"], row["port"], row["state"], now, now),
    )
    return _row(res, rows[0])


def live_nodes_thd(db: Db, max_age: Any, now: float) -> list[dict]:
    res = resource("managementNode")
    if max_age is None:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "max_age is required",
                                field="max_age")
    oldest = now - Field("max_age", "max_age", "float").to_db(max_age)
    return [
        _row(res, r)
        for r in db.all(
            f"SELECT {_cols(res)} FROM management_nodes WHERE heartbeat >= ? ORDER BY uuid",
            (oldest,),
        )
    ]


class NodesComponent(StoreComponent):
    """
    Management node heartbeats (see L{IStore}).
    """

    def heartbeat(self, uuid: str, hostname: str, port: int | None = None,
                  state: str = "RUNNING") -> Deferred:
        return self._run(heartbeat_thd, uuid, hostname, port, state, self._now())

    def live_management_nodes(self, max_age: float) -> Deferred:
        return self._run(live_nodes_thd, max_age, self._now())

    def delete_management_node(self, uuid: str) -> Deferred:
        return self.delete("managementNode", uuid)
