"""
L{agent.bootstrap}: the bootstrap token file a management node and its agents share, created
once, atomically, readable only by its owner.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from agent import bootstrap, tap
from agent.bootstrap import TokenFileError, ensure_token_file, read_token_file
from zcontrol.config import AgentsConfig, ConfigError


class EnsureTokenFileTests(SynchronousTestCase):
    """
    L{ensure_token_file} and L{read_token_file}.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.dir, "sub", bootstrap.TOKEN_FILE)

    def test_creates_once(self) -> None:
        """
        The first call creates the file (and its directory) with a fresh URL-safe token, mode
        0600 and no temporary file left; later calls return the same token.
        """
        token, created = ensure_token_file(self.path)
        self.assertTrue(created)
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), [bootstrap.TOKEN_FILE])
        self.assertEqual(read_token_file(self.path), token)
        self.assertEqual(ensure_token_file(self.path), (token, False))
        other, created = ensure_token_file(os.path.join(self.dir, "other"))
        self.assertTrue(created)
        self.assertNotEqual(other, token)

    def test_lost_race_reads_the_winner(self) -> None:
        """
        When another process creates the file between the existence check and the link, the
        winner's token is returned and the file is not replaced.
        """
        os.makedirs(os.path.dirname(self.path))
        real_lexists = os.path.lexists

        def lexists(path: str) -> bool:
            if path == self.path:
                with open(self.path, "w") as f:
                    f.write("winner\n")
                return False
            return real_lexists(path)

        self.patch(os, "path", _PathWith(os.path, lexists))
        self.assertEqual(ensure_token_file(self.path), ("winner", False))
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.path))),
                         [bootstrap.TOKEN_FILE])

    def test_bad_file_is_never_replaced(self) -> None:
        """
        An empty, oversized or non-UTF-8 file is an error naming it, and stays as it is.
        """
        os.makedirs(os.path.dirname(self.path))
        for content in (b"", b" \n\t", b"x" * 5000, b"\xff\xfe"):
            with open(self.path, "wb") as f:
                f.write(content)
            e = self.assertRaises(TokenFileError, ensure_token_file, self.path)
            self.assertIn(self.path, str(e))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_unreadable(self) -> None:
        """
        A missing file read, or a file that cannot be created, is a L{TokenFileError}.
        """
        e = self.assertRaises(TokenFileError, read_token_file, self.path)
        self.assertIn(self.path, str(e))
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        e = self.assertRaises(TokenFileError, ensure_token_file,
                              os.path.join(blocker, "agent-token"))
        self.assertIn("cannot create", str(e))

    def test_empty_file_advice_fits_the_reader(self) -> None:
        """
        Fault (new-user trial): C{twistd zagent --bootstrap-token-file emptyfile} said
        "delete it to have a new one created", but the agent never creates it (only the
        node and C{python -m agent.bootstrap} do), nor does a node read the file its
        C{agents.bootstrap_token_file} names. Readers that do not create the file (the
        agent, a node's configured file) advise filling it; those that do
        (L{ensure_token_file}, C{python -m agent.bootstrap}) also advise deleting it.
        """
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write(" \n")
        for message in [
            str(self.assertRaises(TokenFileError, read_token_file, self.path)),
            str(self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  ["--bootstrap-token-file", self.path])),
            str(self.assertRaises(ConfigError,
                                  AgentsConfig(bootstrap_token_file=self.path).token)),
        ]:
            self.assertIn(f"{self.path} is empty", message)
            self.assertNotIn("delete", message)
            self.assertNotIn("created", message)
        agent = str(self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                      ["--bootstrap-token-file", self.path]))
        self.assertIn("copy the management node's bootstrap token into it", agent)
        self.assertIn("write the bootstrap token into it", str(
            self.assertRaises(TokenFileError, read_token_file, self.path)))
        creator = str(self.assertRaises(TokenFileError, ensure_token_file, self.path))
        self.assertIn("delete it to have a new one created", creator)
        self.assertIn("delete it to have a new one created", str(self.assertRaises(
            ConfigError, AgentsConfig().token, os.path.dirname(self.path))))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(bootstrap.main([self.path]), 1)
        self.assertIn("delete it to have a new one created", err.getvalue())

    def test_directory_that_is_a_file(self) -> None:
        """
        Creating a file in a "directory" that is a regular file says that it is not a
        directory, naming it (it said "File exists").
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        e = self.assertRaises(NotADirectoryError, bootstrap.write_new_file,
                              os.path.join(blocker, "x"), b"data")
        self.assertIn(f"{blocker} is not a directory", str(e))
        e = self.assertRaises(TokenFileError, ensure_token_file,
                              os.path.join(blocker, "agent-token"))
        self.assertIn("not a directory", str(e))

    def test_command_line(self) -> None:
        """
        C{python -m agent.bootstrap PATH} creates the file if missing and keeps it otherwise;
        the token is never printed.
        """
        run = [sys.executable, "-m", "agent.bootstrap", self.path]
        first = subprocess.run(run, capture_output=True, text=True, timeout=60)
        self.assertEqual(first.returncode, 0, first.stderr)
        token = read_token_file(self.path)
        second = subprocess.run(run, capture_output=True, text=True, timeout=60)
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual(read_token_file(self.path), token)
        for out in (first, second):
            self.assertNotIn(token, out.stdout + out.stderr)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(bootstrap.main([]), 2)
        self.assertIn("usage", err.getvalue())


class _PathWith:
    """
    C{os.path} with C{lexists} replaced.
    """

    def __init__(self, real: object, lexists: object) -> None:
        self._real = real
        self.lexists = lexists

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)
