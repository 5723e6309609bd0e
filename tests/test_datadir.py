"""
L{zcontrol.datadir} and its use by L{zcontrol.identity}: one management node per data
directory, a data directory that is a directory, and the node id logged at every start.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import warnings

from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from zcontrol import datadir
from zcontrol.config import ConfigError, load_config
from zcontrol.datadir import LOCK_FILE, lock_data_dir
from zcontrol.identity import NODE_ID_FILE, resolve_node_id, with_node_id
from zcontrol.node import make_node

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Resolves the node id for the data dir argv[1] as a node's start does, prints the id (or
#: the error), then holds the lock until its stdin closes.
_CHILD = """
import sys
from zcontrol.config import ConfigError, load_config
from zcontrol.identity import with_node_id
try:
    config = with_node_id(load_config(None, {"node": {"data_dir": sys.argv[1]}}))
except ConfigError as e:
    print("ERROR " + str(e), flush=True)
    raise SystemExit(1)
print("ID " + config.node_id, flush=True)
sys.stdin.read()
"""

#: Bound (seconds) on every wait for a child process.
_WAIT = 60


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Holder:
    """
    A child process that started a node's identity on a data dir and holds its lock.
    """

    def __init__(self, test: SynchronousTestCase, data: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, data], env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        test.addCleanup(self.stop)
        ready, _, _ = select.select([self.proc.stdout], [], [], _WAIT)
        if not ready:
            raise AssertionError(f"the lock holder did not answer within {_WAIT} s")
        self.line = self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(_WAIT)
        self.proc.stdout.close()


def _child_resolves(data: str) -> str:
    """
    Run the child to completion (its stdin closed at once): its one line of output.
    """
    done = subprocess.run([sys.executable, "-c", _CHILD, data], env=_env(), input="",
                          capture_output=True, text=True, timeout=_WAIT)
    return done.stdout.strip()


def _config(data: str, **store: str):
    return load_config(None, {"node": {"data_dir": data}, "store": store,
                              "http": {"port": 0}})


class DataDirLockTests(SynchronousTestCase):
    """
    The data directory's exclusive lock, taken by L{with_node_id} before the id is resolved
    and the store opened.
    """

    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())

    def test_second_node_on_one_data_dir_refused(self) -> None:
        """
        Fault (new-user trial): two management nodes could share one data dir: B, started
        on A's directory, ran with A's node id and A's SQLite file, and B's stop deleted A's
        queues under it. While another process holds the directory, a node's start here
        (L{with_node_id}, L{make_node}) fails at once with a ConfigError naming the
        directory and the holder's PID, and resolves no id; once the holder has exited
        (clearing the PID), the start succeeds with the same id and this process's PID in the lock file.
        """
        holder = Holder(self, self.data)
        self.assertTrue(holder.line.startswith("ID "), holder.line)
        node_id = holder.line[3:]
        with open(os.path.join(self.data, LOCK_FILE)) as f:
            self.assertEqual(f.read().strip(), str(holder.proc.pid))

        for start in (lambda: with_node_id(_config(self.data)),
                      lambda: make_node(_config(self.data), reactor)):
            e = self.assertRaises(ConfigError, start)
            self.assertIn(self.data, str(e))
            self.assertIn(f"PID {holder.proc.pid}", str(e))
            self.assertIn("in use by another management node", str(e))

        holder.stop()
        with open(os.path.join(self.data, LOCK_FILE)) as f:
            self.assertEqual(f.read(), "")  # a clean exit clears the PID
        config = with_node_id(_config(self.data))
        self.addCleanup(datadir._held[_key(self.data)].release)
        self.assertEqual(config.node_id, node_id)
        with open(os.path.join(self.data, LOCK_FILE)) as f:
            self.assertEqual(f.read().strip(), str(os.getpid()))
        # and now this process is the holder another process is refused by
        line = _child_resolves(self.data)
        self.assertTrue(line.startswith("ERROR "), line)
        self.assertIn(f"PID {os.getpid()}", line)

    def test_release_lets_another_process_in(self) -> None:
        """
        Within one process the lock is counted (a node stopped and built again in one
        process gets it back); after as many releases as takes, another process gets it,
        and the lock file no longer names this process.
        """
        first = lock_data_dir(self.data)
        second = with_node_id(_config(self.data))
        self.assertIsNotNone(second.node_id)
        self.assertIs(lock_data_dir(self.data), first)
        first.release()
        first.release()
        self.assertTrue(first.held)
        self.assertTrue(_child_resolves(self.data).startswith("ERROR "))
        first.release()
        self.assertFalse(first.held)
        first.release()  # a released lock: nothing
        with open(os.path.join(self.data, LOCK_FILE)) as f:
            self.assertEqual(f.read(), "")
        self.assertEqual(_child_resolves(self.data), f"ID {second.node_id}")
        again = lock_data_dir(self.data)
        self.addCleanup(again.release)
        self.assertIsNot(again, first)

    def test_failed_resolution_releases(self) -> None:
        """
        A start whose id cannot be resolved (a corrupt id file) does not keep the lock.
        """
        os.makedirs(self.data)
        with open(os.path.join(self.data, NODE_ID_FILE), "w") as f:
            f.write("not an id\n")
        self.assertRaises(ConfigError, with_node_id, _config(self.data))
        self.assertNotIn(_key(self.data), datadir._held)

    def test_in_memory_store_takes_no_lock(self) -> None:
        """
        A node with an in-memory store keeps nothing in the data dir it could share: no lock
        (and no directory) is created, and two such nodes may share one.
        """
        config = _config(self.data, url="sqlite://:memory:")
        a, b = with_node_id(config), with_node_id(config)
        self.assertNotEqual(a.node_id, b.node_id)
        self.assertFalse(os.path.exists(self.data))

    def test_fork_child_becomes_the_holder(self) -> None:
        """
        A forked child (C{twistd} daemonizing after building the node) inherits the lock and
        writes its own PID into the lock file.
        """
        lock = lock_data_dir(self.data)
        self.addCleanup(lock.release)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(status, 0)
        with open(lock.path) as f:
            self.assertEqual(f.read().strip(), str(pid))


def _key(data: str) -> tuple[int, int]:
    st = os.stat(data)
    return st.st_dev, st.st_ino


class DataDirNotADirectoryTests(SynchronousTestCase):
    """
    A data dir given as a regular file.
    """

    def test_regular_file_refused(self) -> None:
        """
        Fault (new-user trial): C{--data-dir afile} (a regular file) said "cannot create ...
        afile/node-id: File exists". Every user of the data dir (the lock, the node id, the
        agents' token, C{make_node}) now says that C{node.data_dir} is not a directory, for
        the file itself and for a path under it.
        """
        afile = os.path.abspath(self.mktemp())
        with open(afile, "w") as f:
            f.write("not a directory\n")
        for data in (afile, os.path.join(afile, "sub")):
            config = _config(data)
            for call, *args in [(lock_data_dir, data), (resolve_node_id, config),
                                (with_node_id, config), (make_node, config, reactor),
                                (config.agents.token, data)]:
                e = self.assertRaises(ConfigError, call, *args)
                self.assertIn("node.data_dir", str(e))
                self.assertIn("not a directory", str(e))
                self.assertIn(data, str(e))
            memory = _config(data, url="sqlite://:memory:")
            e = self.assertRaises(ConfigError, make_node, memory, reactor)
            self.assertIn("not a directory", str(e))
        with open(afile) as f:
            self.assertEqual(f.read(), "not a directory\n")


class NodeIdLogTests(SynchronousTestCase):
    """
    The id in use, logged at every start.
    """

    def resolve(self, config) -> tuple[str, list[str]]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            node_id = resolve_node_id(config)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return node_id, [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info
                         and e.get("log_namespace") == "zcontrol.identity"]

    def test_id_and_source_logged(self) -> None:
        """
        Fault (new-user trial): the node id in use was never logged on a restart, so a
        hand-edited C{node-id} holding a valid-looking but different id went unnoticed.
        Each resolution logs, at info level, the id and where it came from: the config, the
        data dir's file (created now or read), or a fresh id for an in-memory store.
        """
        data = os.path.abspath(self.mktemp())
        path = os.path.join(data, NODE_ID_FILE)
        first, lines = self.resolve(_config(data))
        self.assertIn(f"management node id {first} (from {path}, created now)", lines)
        with open(path, "w") as f:
            f.write("hand-edited\n")
        edited, lines = self.resolve(_config(data))
        self.assertEqual(edited, "hand-edited")
        self.assertEqual(lines, [f"management node id hand-edited (from {path})"])
        explicit, lines = self.resolve(load_config(None, {"node": {"data_dir": data,
                                                                   "id": "mn-9"}}))
        self.assertEqual(lines, ["management node id mn-9 (from node.id config)"])
        fresh, lines = self.resolve(_config(data, url="sqlite://:memory:"))
        self.assertEqual(lines, [f"management node id {fresh} (fresh, in-memory store)"])
