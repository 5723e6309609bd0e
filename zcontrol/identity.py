# -*- test-case-name: tests.test_node -*-
"""
The management node's identity: one id that survives restarts, so that a restarted node finds
the resources (hosts, jobs) it owned (the bus's ring routes each resource uuid to a node id,
and the management-node table is keyed by it).

How the id is chosen (L{resolve_node_id}), first match wins:
 1. C{node.id} in the config (or C{--node-id}): used as given.
 2. The file L{NODE_ID_FILE} in the data directory: read at every start. On the first start
    it is created with a fresh uuid (hex), atomically: written to a temporary file, flushed
    to disk, then hard-linked into place, so that neither a crash nor two starts racing can
    leave a half-written file or two different ids. A file that is empty or does not hold
    a valid id is a startup error (L{ConfigError}) naming the file, never silently replaced:
    a node that takes a new id loses its resources to the ring's rebalancing.
 3. No persistent state (the store is C{sqlite://:memory:}): a fresh uuid, and a warning is
    logged, since such a node owns nothing after a restart anyway.

Every start logs, at info level, the id in use and where it came from (C{management node id
<id> (from node.id config | from <data_dir>/node-id | fresh, in-memory store)}), so that a
changed id (a hand-edited file, a copied data directory) shows in the log.

Two nodes must not share an id: two nodes with one id answer each other's requests and
delete each other's heartbeat row. An explicit C{node.id} must therefore be unique per node,
and a data directory belongs to one node: L{with_node_id} locks it first
(L{zcontrol.datadir}), so a second node started on the same directory fails at once. Do not
copy a data directory (or a VM image holding it) to make a second node; delete
L{NODE_ID_FILE} from the copy instead.
"""

from __future__ import annotations

import os
import re
import uuid

import attrs
from twisted.logger import Logger

from agent.bootstrap import write_new_file
from zcontrol.config import Config, ConfigError
from zcontrol.datadir import check_data_dir, lock_data_dir

__all__ = ["NODE_ID_FILE", "resolve_node_id", "with_node_id"]

log = Logger()

#: The file, in the data directory, that keeps the node id across restarts.
NODE_ID_FILE = "node-id"

# Ids end up in AMQP queue names and in the management-node table: keep them short and
# printable.
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _is_ephemeral(config: Config) -> bool:
    url = config.store.url
    return url.startswith("sqlite://") and url[len("sqlite://"):] in (":memory:", "/:memory:")


def _check(node_id: str, source: str) -> str:
    if not _VALID_ID.fullmatch(node_id):
        raise ConfigError(
            f"{source}: {node_id!r} is not a valid management-node id (1-64 characters of "
            "letters, digits, '.', '_' and '-', starting with a letter or digit)")
    return node_id


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(1024)
    except OSError as e:
        raise ConfigError(f"cannot read the management-node id file {path}: {e.strerror}"
                          ) from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if not text or not _VALID_ID.fullmatch(text):
        raise ConfigError(
            f"the management-node id file {path} is corrupt (expected one id, found "
            f"{raw[:80]!r}); restore it, or delete it to give this node a new id (its "
            "resources then move to other nodes)")
    return text


def _create(data_dir: str, path: str) -> str:
    node_id = uuid.uuid4().hex
    if not write_new_file(path, node_id.encode("ascii") + b"\n", 0o644):
        return _read(path)  # a start that lost a race reads the winner's id
    log.info("new management-node id {node_id} kept in {path}", node_id=node_id, path=path)
    return node_id


def _resolve(config: Config) -> tuple[str, str]:
    if config.node_id:
        return _check(config.node_id, "node.id"), "from node.id config"
    if _is_ephemeral(config):
        node_id = uuid.uuid4().hex
        log.warn("the store is in memory: this management node gets a fresh id {node_id} "
                 "that will not survive a restart (set node.id to fix one)", node_id=node_id)
        return node_id, "fresh, in-memory store"
    check_data_dir(config.data_dir)
    path = os.path.join(config.data_dir, NODE_ID_FILE)
    if os.path.lexists(path):
        return _read(path), f"from {path}"
    try:
        return _create(config.data_dir, path), f"from {path}, created now"
    except OSError as e:
        raise ConfigError(f"cannot create the management-node id file {path}: {e.strerror}"
                          ) from None


def resolve_node_id(config: Config) -> str:
    """
    This node's id, chosen as the module docstring says; may create the id file. Logs the
    id and where it came from (info).

    @raise ConfigError: an invalid explicit id, a data directory that is not a directory, or
        an id file that is unreadable or corrupt.
    """
    node_id, source = _resolve(config)
    log.info("management node id {node_id} ({source})", node_id=node_id, source=source)
    return node_id


def with_node_id(config: Config) -> Config:
    """
    C{config} with its C{node_id} resolved by L{resolve_node_id}, after taking the data
    directory's lock (L{zcontrol.datadir.lock_data_dir}) unless the store is in memory (such
    a node keeps nothing it could share). The lock is kept for the process lifetime (the
    kernel releases it when the process exits); if the id cannot be resolved it is released
    at once.

    @raise ConfigError: the data directory is in use by another process (naming it and the
        holder's PID) or cannot be locked, or as L{resolve_node_id}.
    """
    lock = None if _is_ephemeral(config) else lock_data_dir(config.data_dir)
    try:
        return attrs.evolve(config, node_id=resolve_node_id(config))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
