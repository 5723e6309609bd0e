# -*- test-case-name: tests.test_db_contract -*-
"""
Jobs: create, finish, list and claim the running jobs of a management node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail

from zcontrol.core.errors import SYS, ErrorCode, OperationError
from zcontrol.db.components.base import (
    Db,
    StoreComponent,
    _cols,
    _row,
    _uuid,
)
from zcontrol.db.query import resource


def running_jobs_thd(db: Db, node_uuid: str) -> list[dict]:
    res = resource("job")
    node_uuid = _uuid("management_node_uuid", node_uuid)
    return [
        _row(res, r)
        for r in db.all(
            f"SELECT {_cols(res)} FROM jobs WHERE management_node_uuid = ? AND state = ?"
            " ORDER BY create_date, uuid",
            (node_uuid, "Running"),
        )
    ]


def claim_jobs_thd(db: Db, from_node: str, to_node: str, now: float) -> list[dict]:
    """
    Move every running job of C{from_node} to C{to_node} in one UPDATE: two claimers never
    get the same job.
    """
    res = resource("job")
    from_node = _uuid("from_node_uuid", from_node)
    to_node = _uuid("to_node_uuid", to_node)
    return [
        _row(res, r)
        for r in db.all(
            "UPDATE jobs SET management_node_uuid = ?, last_op_date = ?"
            " WHERE management_node_uuid = ? AND state = ?"
            f" RETURNING {_cols(res)}",
            (to_node, now, from_node, "Running"),
        )
    ]


class JobsComponent(StoreComponent):
    """
    Jobs (see L{IStore}).
    """

    def create_job(self, uuid: str, api_name: str, api_message: Any, management_node_uuid: str,
                   resource_uuid: str | None = None, account_uuid: str | None = None
                   ) -> Deferred:
        return self.insert("job", {
            "uuid": uuid,
            "apiName": api_name,
            "apiMessage": api_message,
            "managementNodeUuid": management_node_uuid,
            "resourceUuid": resource_uuid,
            "accountUuid": account_uuid,
            "state": "Running",
        })

    def finish_job(self, uuid: str, result: Any = None, error: ErrorCode | None = None
                   ) -> Deferred:
        now = self._now()
        changes: dict[str, Any] = {"finishDate": now}
        if error is not None:
            if not isinstance(error, ErrorCode):
                return fail(OperationError.of(
                    SYS.INVALID_ARGUMENT_ERROR,
                    f"a job error is an ErrorCode, not {type(error).__name__}", field="error"))
            changes.update(state="Failed", error=error.to_dict())
        else:
            # A result that is not JSON is refused by the edge check (SYS.1007, "result").
            changes.update(state="Succeeded", result=result)
        return self.update("job", uuid, changes, {"state": "Running"})

    def running_jobs(self, management_node_uuid: str) -> Deferred:
        return self._run(running_jobs_thd, management_node_uuid)

    def claim_jobs(self, from_node_uuid: str, to_node_uuid: str) -> Deferred:
        return self._run(claim_jobs_thd, from_node_uuid, to_node_uuid, self._now())
