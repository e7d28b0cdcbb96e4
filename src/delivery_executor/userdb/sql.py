"""``sql:URL`` user databases: SQLite (stdlib, in a thread) and PostgreSQL (asyncpg).

The query takes the address (``local@domain``, lowercased, without extension)
as its one bound parameter, written ``$1`` for every backend and never
substituted into the text; it returns zero or one row whose columns are any of
``home``, ``mail``, ``uid``, ``gid``, ``quota_rule``, ``sieve`` (others are
ignored, NULL means unknown). No row: unknown user (``550 5.1.1``). A database
that cannot be reached, or a query that fails: ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..errors import UserdbUnavailable
from .base import UserKey, UserRecord

__all__ = ["PostgresUserdb", "SqliteUserdb", "sql_userdb"]

_FIELDS = ("home", "mail", "uid", "gid", "quota_rule", "sieve")
_PARAM = re.compile(r"\$1(?![0-9])")


def _record(row: Mapping[str, Any] | None, key: UserKey) -> UserRecord | None:
    if row is None:
        return None
    fields = {k: str(row[k]) for k in _FIELDS if k in row and row[k] is not None}
    try:
        return UserRecord().merged(fields, key)
    except ValueError as exc:
        raise UserdbUnavailable(f"sql: user {key.user}: {exc}") from exc


def _check_query(query: str) -> str:
    if not isinstance(query, str) or not _PARAM.search(query):
        raise ValueError(f"--user-query must use $1 for the address, not {query!r}")
    return query


class SqliteUserdb:
    """``sql:sqlite:///PATH``: one read-only connection, queried in a worker thread.

    As in SQLAlchemy URLs, ``sqlite:///users.db`` is relative and
    ``sqlite:////var/lib/users.db`` absolute. The file is ``stat``-ed on every
    lookup, as the other file databases are: one renamed over it (a rebuild)
    is opened afresh, where the old connection would keep reading the old file."""

    def __init__(self, path: str, query: str) -> None:
        self.path = path
        # sqlite3 numbers parameters ?1; $1 would be a *named* one.
        self.query = _PARAM.sub("?1", _check_query(query))
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) that _conn reads
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteUserdb({self.path!r})"

    def reload(self) -> None:
        """Nothing cached: every lookup queries."""

    async def aclose(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def lookup(self, key: UserKey, /) -> UserRecord | None:
        """Run the query for ``key.user`` off the loop."""
        try:
            row = await asyncio.to_thread(self._query, key.user)
        except (sqlite3.Error, OSError) as exc:
            raise UserdbUnavailable(f"sql:sqlite {self.path}: {exc}") from exc
        return _record(row, key)

    def _query(self, user: str) -> dict[str, Any] | None:
        with self._lock:
            st = os.stat(self.path)
            if self._conn is not None and self._file != (st.st_dev, st.st_ino):
                self._conn.close()  # replaced: the connection still reads the old file
                self._conn = None
            if self._conn is None:
                self._file = (st.st_dev, st.st_ino)
                uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                self._conn.row_factory = sqlite3.Row
            try:
                row = self._conn.execute(self.query, (user,)).fetchone()
            except sqlite3.Error:
                self._conn.close()  # a fresh connection next time (file replaced, ...)
                self._conn = None
                raise
        return None if row is None else dict(zip(row.keys(), tuple(row), strict=True))


class PostgresUserdb:
    """``sql:postgresql://...``: an asyncpg pool of at most ``max_size`` connections.

    The pool is made on first use, on the loop that uses it. Needs ``asyncpg``
    (``pip install delivery-executor[userdb]``). Each lookup waits at most
    ``timeout`` seconds for a connection and the answer.
    """

    def __init__(self, dsn: str, query: str, *, max_size: int = 4, timeout: float = 5.0) -> None:
        import asyncpg  # noqa: F401  (fail at configuration time if missing)

        self.dsn = dsn
        self.query = _check_query(query)
        self.max_size = max_size
        self.timeout = timeout
        self._pool: Any = None
        self._making: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return "PostgresUserdb(...)"  # the DSN may hold a password

    def reload(self) -> None:
        """Nothing cached: every lookup queries."""

    async def aclose(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def lookup(self, key: UserKey, /) -> UserRecord | None:
        """Run the query for ``key.user`` on a pooled connection."""
        try:
            pool = await self._get_pool()
            row = await pool.fetchrow(self.query, key.user, timeout=self.timeout)
        except Exception as exc:  # refused, reset, timed out, bad SQL: all "cannot answer"
            raise UserdbUnavailable(f"sql:postgresql: {type(exc).__name__}: {exc}") from exc
        return _record(None if row is None else dict(row.items()), key)

    async def _get_pool(self) -> Any:
        import asyncpg

        if self._pool is not None:
            return self._pool
        if self._making is None:
            self._making = asyncio.Lock()
        async with self._making:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=self.max_size, timeout=self.timeout
                )
        return self._pool


def sql_userdb(url: str, query: str | None) -> SqliteUserdb | PostgresUserdb:
    """The backend for ``url`` (``sqlite:///PATH`` or ``postgresql://...``)."""
    if not query:
        raise ValueError("sql: user databases need --user-query")
    if url.startswith("sqlite:///"):
        return SqliteUserdb(url[len("sqlite:///") :], query)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresUserdb(url, query)
    raise ValueError(f"sql: URL must be sqlite:///PATH or postgresql://..., not {url!r}")
