# -*- test-case-name: tests.test_db_contract -*-
"""
Persistence: one L{IStore} interface, two backends (embedded SQLite, PostgreSQL) and an
in-memory store for tests, the resource catalogue and the API query language.

Open a store with L{open_store}, then C{start()} it (connect, migrate) and C{stop()} it
(drain, close) from the node's service::

    store = open_store("sqlite:///var/zcontrol.db", reactor)
    store = open_store("postgresql://postgres@127.0.0.1:5432/zcontrol", reactor, pool_size=8)
    store = open_store("memory://", reactor)      # tests: no threads, no files
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from zcontrol.db._store import Holder, QueryResult
from zcontrol.db.interfaces import DB, IStore
from zcontrol.db.query import RESOURCES, Condition, Query, query_from_params

__all__ = [
    "DB",
    "Holder",
    "RESOURCES",
    "Condition",
    "IStore",
    "Query",
    "QueryResult",
    "open_store",
    "query_from_params",
]


def open_store(url: str, reactor: Any, **options: Any) -> IStore:
    """
    Build (not start) the store for C{url}.

    @param url: C{sqlite:///abs/path.db}, C{sqlite://:memory:} (one connection),
        C{postgresql://user@host:port/dbname} (C{postgres://} too; any libpq URI), or
        C{memory://} / C{memory://name} (L{zcontrol.db.memory.MemoryStore}: no threads, no
        files; stores of the same name share one database).
    @param reactor: the reactor (injected, never the global one).
    @param options: C{pool_size} (threads and connections, 1..16; default 2 for SQLite, 8
        for PostgreSQL); C{busy_timeout_ms} for SQLite; C{connect_timeout} (s),
        C{statement_timeout_ms} (a statement running longer fails with C{SYS.1001}) and
        C{synchronous_commit} (default True) for PostgreSQL; C{shuffle} and C{seed} for
        the memory store.
    @raise ValueError: an unknown scheme or a relative SQLite path.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        rest = url[len("sqlite://"):]
        if rest in (":memory:", "/:memory:"):
            from zcontrol.db.sqlite import SQLiteStore

            options.setdefault("pool_size", 1)
            return SQLiteStore(":memory:", reactor, **options)
        if not rest.startswith("/"):
            raise ValueError(f"an SQLite URL needs an absolute path (sqlite:///abs/path.db): {url!r}")
        from zcontrol.db.sqlite import SQLiteStore

        # sqlite:////abs/path (four slashes, as some tools write it) is the same file.
        return SQLiteStore("/" + rest.lstrip("/"), reactor, **options)
    if scheme == "memory":
        from zcontrol.db.memory import MemoryStore

        name = url[len("memory://"):].strip("/") or None
        return MemoryStore(reactor, name=name, **options)
    if scheme in ("postgresql", "postgres"):
        from zcontrol.db.postgres import PostgresStore

        return PostgresStore(url, reactor, **options)
    raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}")
