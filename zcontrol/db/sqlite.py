# -*- test-case-name: tests.test_db_contract -*-
"""
The embedded SQLite backend: a file in WAL mode through C{sqlite3}, in the threads of an
L{adbapi.ConnectionPool} (C{check_same_thread=False}; C{PRAGMA}s set on every new connection).

Writers serialise in SQLite whatever the pool size, so the default pool is small; write
transactions start with C{BEGIN IMMEDIATE} and wait on C{busy_timeout} rather than failing.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from zcontrol.core.errors import SYS, ErrorCode, error_code
from zcontrol.db._store import AdbapiStore, Dialect
from zcontrol.db.interfaces import DB

__all__ = ["SQLiteDialect", "SQLiteStore"]

DEFAULT_POOL_SIZE = 2

_IO_WORDS = ("locked", "busy", "disk", "i/o", "unable to open", "readonly", "malformed", "full")


class SQLiteDialect(Dialect):
    """
    SQLite specifics.

    @ivar path: the database file, or C{":memory:"} (then the pool must have one thread).
    """

    name = "sqlite"
    dbapi_name = "sqlite3"

    def __init__(self, path: str, busy_timeout_ms: int = 10_000):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms

    def connect_args(self) -> tuple[tuple, dict]:
        return (self.path,), {
            "check_same_thread": False,
            "isolation_level": None,
            "timeout": self.busy_timeout_ms / 1000.0,
        }

    def openfun(self, raw: Any) -> None:
        cur = raw.cursor()
        try:
            for pragma in (
                f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}",
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                "PRAGMA foreign_keys = ON",
                "PRAGMA case_sensitive_like = ON",
            ):
                cur.execute(pragma)
        finally:
            cur.close()

    def begin_sql(self, write: bool) -> str:
        return "BEGIN IMMEDIATE" if write else "BEGIN"

    def map_error(self, exc: BaseException) -> ErrorCode | None:
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            if text.startswith("UNIQUE") or "PRIMARY KEY" in text:
                return error_code(DB.DUPLICATE, text)
            if text.startswith("FOREIGN KEY"):
                return error_code(DB.REFERENCE, text)
            return error_code(DB.CONSTRAINT, text)
        if isinstance(exc, (sqlite3.OperationalError, sqlite3.DatabaseError)) and any(
            w in text.lower() for w in _IO_WORDS
        ):
            return error_code(SYS.IO_ERROR, f"sqlite: {text}")
        if isinstance(exc, sqlite3.Error):
            return error_code(SYS.INTERNAL, f"sqlite: {type(exc).__name__}: {text}")
        return None


class SQLiteStore(AdbapiStore):
    """
    The store on SQLite (see L{zcontrol.db.interfaces.IStore}).
    """

    def __init__(self, path: str, reactor: Any, pool_size: int = DEFAULT_POOL_SIZE,
                 busy_timeout_ms: int = 10_000):
        if path == ":memory:" and pool_size != 1:
            raise ValueError("an in-memory SQLite store needs pool_size=1 (one connection)")
        super().__init__(SQLiteDialect(path, busy_timeout_ms), reactor, pool_size)
