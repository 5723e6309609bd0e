-- zcontrol schema, version 7: a job's journal (zcontrol.core.journal). Portable SQL as
-- version 1. `flows` is the JSON list of the flows the job completed, in order, each
-- {"name": <flow name>, "took": <JSON object: what the flow holds>}, appended (compare-and-swap
-- on the job being Running and owned by the writing node) BEFORE the next flow runs, so that
-- the node that resolves an interrupted job knows what to give back.
ALTER TABLE jobs ADD COLUMN flows TEXT NOT NULL DEFAULT '[]';
