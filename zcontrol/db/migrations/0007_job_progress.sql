-- zcontrol schema, version 7: a job's journal (zcontrol.core.journal). Portable SQL as
-- version 1. `flows` is the JSON list of the flows the job completed, in order, each
-- {"name": <flow name>, "took": <JSON object: what the flow holds>}, appended (compare-and-swap
-- on the job being Running and owned by the writing node) BEFORE the next flow runs, so that
-- the node that resolves an interrupted job knows what to give back.
ALTER TABLE jobs ADD COLUMN flows TEXT NOT NULL DEFAULT '[]';
-- `rollback_error` (JSON ErrorCode, NULL while the job runs forward) is set, by a
-- compare-and-swap, BEFORE a failed job's rollbacks start: the job is then "rolling back" (still
-- Running: the state CHECK of version 1 is left alone, SQLite cannot alter it) and a recovery
-- never finishes it forward; it finishes the remaining rollbacks and fails the job with this
-- error. `rolled_back` is the JSON list of the flow names whose rollback completed.
ALTER TABLE jobs ADD COLUMN rollback_error TEXT;
ALTER TABLE jobs ADD COLUMN rolled_back TEXT NOT NULL DEFAULT '[]';
