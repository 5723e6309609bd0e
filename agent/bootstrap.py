# -*- test-case-name: tests.test_agent_bootstrap -*-
"""
The bootstrap token file shared by a management node and its agents.

An agent accepts C{/host/connect} only with the operator's bootstrap token (see L{agent.app},
Trust). Both sides read it from a file holding the token (surrounding whitespace ignored).
L{ensure_token_file} creates such a file when it is missing, atomically: a fresh
C{secrets.token_urlsafe(32)} is written to a temporary file created with mode C{0600}, flushed
to disk, then hard-linked into place. C{link()} never replaces, so two processes racing to
create the file (C{make run} and C{make run-agent} started together) end up with the one
token that won; neither a crash nor a race leaves a half-written file. A file that exists but
is empty or unreadable is an error naming it, never silently replaced (that would lock out
every agent holding the old token).

The management node uses it for C{<data_dir>/agent-token} (L{TOKEN_FILE}) when no token is
configured; C{python -m agent.bootstrap PATH} does the same from a shell (C{make run-agent}
runs it before starting the agent, so either may start first). This module is under
C{agent/} because the agent never imports C{zcontrol}.
"""

from __future__ import annotations

import errno
import os
import secrets
import sys

__all__ = ["FILL_ADVICE", "RECREATE_ADVICE", "TOKEN_FILE", "TokenFileError", "ensure_token_file",
           "read_token_file", "write_new_file"]

#: The token file's name in a management node's data directory.
TOKEN_FILE = "agent-token"

#: Largest token file read (bytes): a token is one short line.
_MAX_SIZE = 4096


class TokenFileError(ValueError):
    """
    A bootstrap token file cannot be read, created, or holds no token; the message names it.
    """


#: What to do about an empty token file that the reader does not create (an agent's
#: C{--bootstrap-token-file}, a node's C{agents.bootstrap_token_file}).
FILL_ADVICE = "write the bootstrap token into it"

#: ... and about one that L{ensure_token_file} creates when it is missing (a node's
#: C{<data_dir>/agent-token}, C{python -m agent.bootstrap PATH}).
RECREATE_ADVICE = "write a token into it, or delete it to have a new one created"


def read_token_file(path: str, if_empty: str = FILL_ADVICE) -> str:
    """
    The token in the file at C{path}, stripped of surrounding whitespace.

    @param if_empty: the advice the error for an empty file ends with, right for the caller
        (only a caller that creates missing files may advise deleting it): L{FILL_ADVICE},
        L{RECREATE_ADVICE} or the caller's own.
    @raise TokenFileError: the file cannot be read, is not UTF-8 text, is empty or larger
        than 4096 bytes.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SIZE + 1)
    except OSError as e:
        raise TokenFileError(f"cannot read the bootstrap token file {path}: {e.strerror}"
                             ) from None
    if len(raw) > _MAX_SIZE:
        raise TokenFileError(f"the bootstrap token file {path} is larger than {_MAX_SIZE} "
                             "bytes: it holds one token")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"the bootstrap token file {path} is not UTF-8 text") from None
    if not token:
        raise TokenFileError(f"the bootstrap token file {path} is empty; {if_empty}")
    return token


def write_new_file(path: str, data: bytes, mode: int = 0o600) -> bool:
    """
    Create the file C{path} holding C{data}, atomically and never replacing one that exists:
    the data goes to a temporary file beside it (created with C{mode}), is flushed to disk,
    then hard-linked into place (C{link} fails if C{path} exists, so of two racing creators
    one wins and the other learns it), and the directory is synced. Also used for the
    management node's id file (L{zcontrol.identity}).

    @return: True if this call created C{path}; False if it already existed.
    @raise OSError: the directory or file cannot be created or written
        (C{NotADirectoryError} if the directory exists but is not one).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        # makedirs would say "File exists", naming neither the culprit nor the problem
        raise NotADirectoryError(errno.ENOTDIR, f"{directory} is not a directory", directory)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def ensure_token_file(path: str) -> tuple[str, bool]:
    """
    The token in the file at C{path}, creating the file (mode C{0600}, and its directory)
    with a fresh token if it does not exist.

    @return: C{(token, created)}: C{created} is true if this call wrote the file.
    @raise TokenFileError: as L{read_token_file}, or the file cannot be created.
    """
    if os.path.lexists(path):
        return read_token_file(path, RECREATE_ADVICE), False
    token = secrets.token_urlsafe(32)
    try:
        created = write_new_file(path, token.encode("ascii") + b"\n", 0o600)
    except OSError as e:
        raise TokenFileError(f"cannot create the bootstrap token file {path}: {e.strerror}"
                             ) from None
    if not created:  # another creator won the race: its token is the one
        return read_token_file(path, RECREATE_ADVICE), False
    return token, True


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m agent.bootstrap PATH}: create the token file at PATH if it is missing.
    Prints nothing to stdout (the token stays in the file); exit status 1 with the reason on
    stderr if the file cannot be read or created.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m agent.bootstrap PATH  (creates the bootstrap token file "
              "PATH, mode 0600, if it is missing)", file=sys.stderr)
        return 2
    try:
        _token, created = ensure_token_file(args[0])
    except TokenFileError as e:
        print(f"agent.bootstrap: {e}", file=sys.stderr)
        return 1
    if created:
        print(f"created the bootstrap token file {args[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    raise SystemExit(main())
