# -*- test-case-name: tests.test_datadir -*-
"""
The management node's data directory (C{node.data_dir}, C{--data-dir}) and its lock.

The data directory holds the node's id (C{node-id}, L{zcontrol.identity}), the agents'
default bootstrap token (C{agent-token}, L{agent.bootstrap}), by default the SQLite store
(C{zcontrol.db}), and the lock file L{LOCK_FILE}. It belongs to one node: two nodes on one
directory would run with one id and one SQLite file, answer each other's requests, and on
the stop of one delete the other's queues and heartbeat row.

L{lock_data_dir} therefore takes an exclusive C{flock(2)} on C{<data_dir>/lock}
(C{LOCK_EX | LOCK_NB}) before the node id is resolved or the store opened
(L{zcontrol.identity.with_node_id}), and writes the holder's PID into the file. A second
node on the same directory fails at once with a L{ConfigError} naming the directory and that
PID; it never waits. The lock is kept for the process lifetime: the kernel releases it when
the process exits, however it exits (a crash or C{kill -9} leaves no stale lock: the file may
still hold the dead PID, but nobody holds the lock, so the next start takes it and rewrites
the PID; a clean exit clears the PID). The file is never deleted (deleting a lock file lets two processes lock two
different files).

Within one process the lock is re-entrant (counted): a test that stops a node and builds it
again on the same directory, in the same process, gets the lock it already holds; the lock
guards against other processes, which is how two nodes come to share a directory.
L{DataDirLock.release} undoes one L{lock_data_dir}; the node's stop does not call it (the
process exits after it), so a node holds its directory until its process ends.

C{flock} locks are inherited across C{fork} (C{twistd} daemonizes after building the node):
the forked child keeps the lock and rewrites the PID in the file with its own. C{flock} is
not reliable on some network file systems (old NFS): keep the data directory local.
The store's lock is not this one: a PostgreSQL store shared by several nodes is normal,
each with its own data directory.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os

from twisted.logger import Logger

from zcontrol.config import ConfigError

__all__ = ["LOCK_FILE", "DataDirLock", "check_data_dir", "lock_data_dir"]

log = Logger()

#: The lock file's name in the data directory.
LOCK_FILE = "lock"


def check_data_dir(data_dir: str) -> None:
    """
    Refuse a data directory that is, or lies under, something other than a directory (a
    regular file given as C{--data-dir}), before anything tries to create files in it.
    The directory itself need not exist yet.

    @raise ConfigError: naming C{node.data_dir} and the path that is not a directory.
    """
    path = os.path.abspath(data_dir)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "is" if path == os.path.abspath(data_dir) else f"lies under {path}, which is"
        raise ConfigError(f"node.data_dir {data_dir} {where} not a directory (--data-dir "
                          "names a directory for the node's id, token, lock and SQLite store)")


class DataDirLock:
    """
    This process's hold on a data directory's lock (see the module docstring).

    @ivar data_dir: the data directory.
    @ivar path: its lock file.
    """

    def __init__(self, data_dir: str, path: str, fd: int, key: tuple[int, int]) -> None:
        self.data_dir = data_dir
        self.path = path
        self._fd: int | None = fd
        self._key = key
        self._users = 1

    @property
    def held(self) -> bool:
        """
        True until the last L{release}.
        """
        return self._fd is not None

    def _write_pid(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        """
        Undo one L{lock_data_dir}; the last one clears the PID and releases the lock (another
        process may then take it). Releasing a released lock does nothing.
        """
        if self._fd is None:
            return
        self._users -= 1
        if self._users > 0:
            return
        fd, self._fd = self._fd, None
        _held.pop(self._key, None)
        try:
            os.ftruncate(fd, 0)  # still locked: nobody else is writing it
        except OSError:
            pass
        os.close(fd)  # releases the flock


#: the locks this process holds, by the data directory's (st_dev, st_ino)
_held: dict[tuple[int, int], DataDirLock] = {}


def _after_fork_in_child() -> None:
    # the child inherits the flock (it is on the open file description): it is the holder now
    for lock in list(_held.values()):
        try:
            lock._write_pid()
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _clear_at_exit() -> None:
    # a clean exit clears the PID, so that the file does not name a dead process; only the
    # process the file names clears it (a forking parent exiting must not clear its child's)
    for lock in list(_held.values()):
        try:
            if lock._fd is not None and os.pread(lock._fd, 32, 0).strip() == (
                    str(os.getpid()).encode("ascii")):
                os.ftruncate(lock._fd, 0)
        except OSError:
            pass


atexit.register(_clear_at_exit)


def _holder(path: str) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "PID unknown: it is starting or stopping"


def lock_data_dir(data_dir: str) -> DataDirLock:
    """
    Take the data directory's lock for this process (creating the directory if needed), or
    fail at once if another process holds it.

    @param data_dir: the data directory (C{node.data_dir}).
    @return: the lock; this process keeps it until it exits or calls
        L{DataDirLock.release} as many times as it called this function.
    @raise ConfigError: the directory is held by another process (the message names the
        directory and the holder's PID), is not a directory, or its lock file cannot be
        created.
    """
    check_data_dir(data_dir)
    path = os.path.join(data_dir, LOCK_FILE)
    try:
        os.makedirs(data_dir, exist_ok=True)
        st = os.stat(data_dir)
        key = (st.st_dev, st.st_ino)
        held = _held.get(key)
        if held is not None:
            held._users += 1
            return held
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot create the data directory's lock file {path}: "
                          f"{e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(
                f"the data directory {data_dir} is in use by another management node "
                f"({_holder(path)}, holding {path}); a data directory belongs to one node: "
                "stop that node, or give this one its own node.data_dir (--data-dir)"
            ) from None
        raise ConfigError(f"cannot lock the data directory's lock file {path}: "
                          f"{e.strerror}") from None
    lock = DataDirLock(data_dir, path, fd, key)
    try:
        lock._write_pid()
    except OSError as e:
        lock.release()
        raise ConfigError(f"cannot write the data directory's lock file {path}: "
                          f"{e.strerror}") from None
    _held[key] = lock
    log.info("data directory {data_dir} locked by this process ({path})", data_dir=data_dir,
             path=path)
    return lock
