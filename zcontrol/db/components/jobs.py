# -*- test-case-name: tests.test_db_contract -*-
"""
Jobs: create, finish, list and claim the running jobs of a management node, and journal
the flows a job completed (L{record_job_flow_thd}, the store side of
L{zcontrol.core.journal}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail

from zcontrol.core.errors import SYS, ErrorCode, OperationError
from zcontrol.db.components.base import (
    Db,
    StoreComponent,
    _cols,
    _not_found,
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


def record_job_flow_thd(db: Db, uuid: str, management_node_uuid: str, name: str, took: Any,
                        now: float) -> dict:
    """
    Append C{{"name": name, "took": took}} to the job's C{flows}, atomically: in one write
    transaction, a compare-and-swap on the job being C{Running}, owned by
    C{management_node_uuid} and its C{flows} being what was read. Idempotent: when the last
    recorded flow is already this one with the same C{took} (a retry after a lost
    acknowledgement), the row is returned unchanged.

    @return: the job row.
    @raise OperationError: C{SYS.1007} (field C{flow}) when C{name} is not a non-empty
        string or C{took} not a JSON object; C{SYS.1003} when no such job; C{SYS.1005} (change-resource-state) when the job is not
        C{Running} or not owned by that node (its C{details} name both), e.g. another node
        claimed it.
    """
    res = resource("job")
    uuid = _uuid("uuid", uuid)
    node = _uuid("management_node_uuid", management_node_uuid)
    if not isinstance(name, str) or not name:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "a flow's name is a non-empty string",
                                field="flow")
    if not isinstance(took, dict):
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                f"what flow {name!r} took is a JSON object, not"
                                f" {type(took).__name__}", field="flow")
    entry = {"name": name, "took": took}
    with db.transaction():
        db.dialect.lock_row(db, "jobs", uuid)
        row = db.one("SELECT flows, state, management_node_uuid FROM jobs WHERE uuid = ?",
                     (uuid,))
        if row is None:
            raise _not_found(res, uuid)
        old, state, owner = row
        if state != "Running" or owner != node:
            raise OperationError.of(
                SYS.CHANGE_RESOURCE_STATE_ERROR,
                f"job {uuid}: cannot record flow {name!r}: the job is {state}, owned by"
                f" {owner} (expected Running, owned by {node})",
                resource="job", uuid=uuid, actual={"state": state, "managementNodeUuid": owner})
        flows = json.loads(old or "[]")
        if not (flows and flows[-1] == entry):
            flows.append(entry)
            changed = db.run(
                "UPDATE jobs SET flows = ?, last_op_date = ? WHERE uuid = ? AND state = ?"
                " AND management_node_uuid = ? AND flows = ?",
                (res.field("flows").to_db(flows), now, uuid, "Running", node, old))
            if changed != 1:  # pragma: no cover - excluded by the transaction and the lock
                raise OperationError.of(SYS.CHANGE_RESOURCE_STATE_ERROR,
                                        f"job {uuid} changed while recording flow {name!r}",
                                        resource="job", uuid=uuid)
        return _row(res, db.one(f"SELECT {_cols(res)} FROM jobs WHERE uuid = ?", (uuid,)))


def _owned_running(db: Db, res: Any, uuid: str, node: str, what: str) -> tuple:
    """
    Lock the job row and check it is C{Running} and owned by C{node}.

    @return: the row's C{(rollback_error, rolled_back)}.
    @raise OperationError: C{SYS.1003} (no such job), C{SYS.1005} (not Running or not owned).
    """
    db.dialect.lock_row(db, "jobs", uuid)
    row = db.one("SELECT state, management_node_uuid, rollback_error, rolled_back FROM jobs"
                 " WHERE uuid = ?", (uuid,))
    if row is None:
        raise _not_found(res, uuid)
    state, owner, rollback_error, rolled_back = row
    if state != "Running" or owner != node:
        raise OperationError.of(
            SYS.CHANGE_RESOURCE_STATE_ERROR,
            f"job {uuid}: cannot {what}: the job is {state}, owned by {owner} (expected"
            f" Running, owned by {node})",
            resource="job", uuid=uuid, actual={"state": state, "managementNodeUuid": owner})
    return rollback_error, rolled_back


def begin_job_rollback_thd(db: Db, uuid: str, management_node_uuid: str, error: dict,
                           now: float) -> dict:
    """
    Mark the job I{rolling back} with C{error} (its C{rollbackError}), a compare-and-swap on
    the job being C{Running} and owned by C{management_node_uuid}. Idempotent: a job already
    rolling back keeps its first error.

    @return: the job row.
    @raise OperationError: C{SYS.1003} when no such job; C{SYS.1005} when the job is not
        C{Running} or not owned by that node (e.g. another node claimed it).
    """
    res = resource("job")
    uuid = _uuid("uuid", uuid)
    node = _uuid("management_node_uuid", management_node_uuid)
    if not isinstance(error, dict):
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "a job error is a JSON object",
                                field="error")
    with db.transaction():
        old, _ = _owned_running(db, res, uuid, node, "start its rollback")
        if old is None:
            db.run("UPDATE jobs SET rollback_error = ?, last_op_date = ? WHERE uuid = ?",
                   (res.field("rollbackError").to_db(error), now, uuid))
        return _row(res, db.one(f"SELECT {_cols(res)} FROM jobs WHERE uuid = ?", (uuid,)))


def record_job_rollback_thd(db: Db, uuid: str, management_node_uuid: str, name: str,
                            now: float) -> dict:
    """
    Append flow C{name} to the job's C{rolledBack} (its rollback completed), a
    compare-and-swap as L{begin_job_rollback_thd}'s; idempotent.

    @return: the job row.
    @raise OperationError: C{SYS.1007} (field C{flow}), C{SYS.1003}, C{SYS.1005} as
        L{begin_job_rollback_thd}.
    """
    res = resource("job")
    uuid = _uuid("uuid", uuid)
    node = _uuid("management_node_uuid", management_node_uuid)
    if not isinstance(name, str) or not name:
        raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR, "a flow's name is a non-empty string",
                                field="flow")
    with db.transaction():
        _, old = _owned_running(db, res, uuid, node, f"record the rollback of flow {name!r}")
        done = json.loads(old or "[]")
        if name not in done:
            done.append(name)
            db.run("UPDATE jobs SET rolled_back = ?, last_op_date = ? WHERE uuid = ?",
                   (res.field("rolledBack").to_db(done), now, uuid))
        return _row(res, db.one(f"SELECT {_cols(res)} FROM jobs WHERE uuid = ?", (uuid,)))


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

    def finish_job(self, uuid: str, result: Any = None, error: ErrorCode | None = None,
                   management_node_uuid: str | None = None) -> Deferred:
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
        expected = {"state": "Running"}
        if management_node_uuid is not None:
            expected["managementNodeUuid"] = management_node_uuid
        return self.update("job", uuid, changes, expected)

    def record_job_flow(self, uuid: str, management_node_uuid: str, name: str, took: Any
                        ) -> Deferred:
        return self._run(record_job_flow_thd, uuid, management_node_uuid, name, took,
                         self._now())

    def begin_job_rollback(self, uuid: str, management_node_uuid: str, error: ErrorCode
                           ) -> Deferred:
        if not isinstance(error, ErrorCode):
            return fail(OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR,
                f"a job error is an ErrorCode, not {type(error).__name__}", field="error"))
        return self._run(begin_job_rollback_thd, uuid, management_node_uuid, error.to_dict(),
                         self._now())

    def record_job_rollback(self, uuid: str, management_node_uuid: str, name: str
                            ) -> Deferred:
        return self._run(record_job_rollback_thd, uuid, management_node_uuid, name,
                         self._now())

    def running_jobs(self, management_node_uuid: str) -> Deferred:
        return self._run(running_jobs_thd, management_node_uuid)

    def claim_jobs(self, from_node_uuid: str, to_node_uuid: str) -> Deferred:
        return self._run(claim_jobs_thd, from_node_uuid, to_node_uuid, self._now())
