"""LeanQuery: one compiled SELECT on a long-lived DBAPI connection, for a hot read path.

The OCSP responder answers a pre-signed request with one indexed lookup. Through an ORM
session or even a Core connection, SQLAlchemy's pool checkout, transaction events and
result machinery cost several times the query itself (~70 µs against ~10 µs on SQLite).
LeanQuery compiles the statement once with the engine's dialect, keeps the column types'
bind and result processors, and runs it on its own connection in autocommit mode: a single
SELECT is its own transaction, so every lookup sees the latest committed state and no
snapshot is held between lookups.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select

from pki.errors import ErrorKind, PKIError
from pki.store.db import Database

Processor = Callable[[Any], Any] | None

# Bumped in a forked child. A connection opened before the fork belongs to the parent: the
# child must neither use it nor close it (closing a PostgreSQL connection sends Terminate on
# the shared socket), so it is kept here, unreferenced by any query, until the child exits.
_fork_generation = 0
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class LeanQuery:
    """LeanQuery runs one compiled SELECT; safe across threads (a lock) and forks (a pid)."""

    def __init__(self, db: Database, statement: Select[*tuple[Any, ...]]) -> None:
        self.db = db
        dialect = db.engine.dialect
        compiled = statement.compile(dialect=dialect)
        self._sql = compiled.string
        # Literal values the statement carries itself (a LIMIT); the rest come per call.
        self._defaults = {
            name: bind.value
            for name, bind in compiled.binds.items()
            if not bind.required and bind.value is not None
        }
        self._positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._bind: dict[str, Processor] = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        self._result: tuple[Processor, ...] = tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, None)
            for c in statement.selected_columns
        )
        self._errors: type[Exception] = dialect.loaded_dbapi.Error
        self._lock = threading.Lock()
        self._conn: Any = None
        self._generation = _fork_generation
        db.track_detached(self)

    def _connection(self) -> Any:
        if self._generation == _fork_generation and self._conn is not None:
            return self._conn
        if self._generation != _fork_generation:
            # Never reuse a connection inherited across fork; a new one per process.
            if self._conn is not None:
                _inherited.append(self._conn)
            self._conn = None
            self._generation = _fork_generation
        proxied = self.db.engine.raw_connection()
        proxied.detach()  # this connection is ours until close(), never back in the pool
        conn: Any = proxied.dbapi_connection
        if not self.db.is_sqlite:
            conn.autocommit = True  # psycopg: one statement, one transaction
        # SQLite: the engine's connect hook already set isolation_level=None (autocommit).
        self._conn = conn
        return conn

    def first(self, **params: Any) -> tuple[Any, ...] | None:
        """Returns the first row, with the columns' result processing, or None."""
        values = dict(self._defaults)
        values.update(params)
        for name, process in self._bind.items():
            if process is not None:
                values[name] = process(values[name])
        bound: Any = (
            tuple(values[n] for n in self._positions) if self._positions is not None else values
        )
        with self._lock:
            try:
                row = self._fetch(bound)
            except (self._errors, DBAPIError):
                # A connection the server dropped (a restart, pg_terminate_backend, a
                # failover) fails once, then a new one answers; a SELECT is safe to repeat.
                self._drop()
                try:
                    row = self._fetch(bound)
                except (self._errors, DBAPIError) as e:
                    self._drop()
                    raise PKIError(ErrorKind.UNAVAILABLE, "database unavailable") from e
        if row is None:
            return None
        return tuple(v if p is None else p(v) for v, p in zip(row, self._result, strict=True))

    def _fetch(self, bound: Any) -> Any:
        cur = self._connection().cursor()
        try:
            cur.execute(self._sql, bound)
            return cur.fetchone()
        finally:
            cur.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._errors):
                conn.close()

    def __del__(self) -> None:
        # A query dropped without close() (a responder rebuilt) must not leave its
        # connection to the garbage collector, which warns and closes it at random times.
        if getattr(self, "_conn", None) is not None and self._generation == _fork_generation:
            with contextlib.suppress(Exception):
                self._conn.close()

    def close(self) -> None:
        with self._lock:
            if self._generation == _fork_generation:
                self._drop()
            elif self._conn is not None:
                _inherited.append(self._conn)
            self._conn = None
