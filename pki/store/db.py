"""Database: one engine per process, SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "Session", "alembic_config", "session_scope"]

from pki.errors import ErrorKind, PKIError

MIGRATIONS = Path(__file__).parent / "migrations"


class Closeable(Protocol):
    def close(self) -> None: ...


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (the VA) run beside one writer; foreign keys are off by default
    # in SQLite and the schema relies on them.
    dbapi_conn.isolation_level = None  # let the begin hook below issue BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


READ_ONLY = "pki_read_only"


def _sqlite_begin_immediate(conn: Any) -> None:
    # A deferred transaction that reads and then writes can fail with "database is
    # locked" when another writer got in between; taking the write lock up front makes
    # concurrent writers queue on busy_timeout instead. A read-only connection (reader(),
    # read_session()) needs no write lock: with it, readers queued behind each other and
    # behind every writer.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def unavailable(exc: BaseException) -> PKIError | None:
    """Returns the `unavailable` domain error for a failure of the database itself, else None.

    Lost or refused connections, a full disk, a read-only file or a lock wait that timed out
    say nothing about the request: the caller may try again later (HTTP 503, OCSP tryLater).
    The message names no statement and no parameter; the cause keeps the driver's error.
    """
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return PKIError(ErrorKind.UNAVAILABLE, "database unavailable")
    return None


@contextlib.contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        error = unavailable(exc)
        if error is None:
            raise
        raise error from exc
    except PoolTimeoutError as exc:
        raise PKIError(ErrorKind.UNAVAILABLE, "database unavailable") from exc


# Below this much free space on its file system a SQLite database reports itself full.
MIN_FREE_BYTES = 1 << 20

# The probe row of check_write(): the audit head, which every audited write locks anyway.
_PROBE = "UPDATE audit_head SET seq = seq + :step WHERE id = 1"


def sqlite_path(url: str) -> Path | None:
    """Returns the file of a SQLite URL, or None for another database or an in-memory one."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(parsed.database)


def create_private_file(path: Path) -> None:
    """Creates an empty SQLite file readable by its owner only, in a 0700 directory if new.

    SQLite gives the -wal and -shm files it creates the database file's permission bits,
    so they are 0600 too. An existing file or directory keeps the mode its operator gave it.
    """
    if path.exists():
        return
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first
    except OSError as e:
        raise PKIError(ErrorKind.CONFIG, f"cannot create the database file {path}: {e}") from e
    os.close(fd)


class Database:
    """Database owns the engine and hands out sessions; it never leaks driver errors."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            path = sqlite_path(url)
            if path is not None:
                create_private_file(path)
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._pid = os.getpid()
        # Objects holding a connection outside the pool (pki.store.lean), closed by dispose().
        self._detached: weakref.WeakSet[Closeable] = weakref.WeakSet()

    def session(self) -> Session:
        """Returns a new session; after a fork the inherited pool is dropped first."""
        if os.getpid() != self._pid:
            # Connections must not be shared across fork (gunicorn workers).
            self.engine.dispose(close=False)
            self._pid = os.getpid()
        return self._sessions()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Connection]:
        """Yields a connection for one read-only transaction (no write lock on SQLite)."""
        if os.getpid() != self._pid:
            self.engine.dispose(close=False)
            self._pid = os.getpid()
        with _domain_errors(), self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read_session(self) -> Iterator[Session]:
        """Yields a session over one read-only transaction (no write lock on SQLite)."""
        with self.reader() as conn, Session(bind=conn) as session:
            yield session

    def upgrade(self) -> None:
        """Brings the schema to the newest migration."""
        with self.engine.begin() as conn:
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")

    def ping(self) -> None:
        """Checks that the database answers."""
        with self.reader() as conn:
            conn.exec_driver_sql("SELECT 1")

    def check_write(self) -> None:
        """Commits a write that changes nothing, so a full disk or read-only store shows."""
        # Two updates of the audit head that cancel out: the row's page is written (a single
        # update to the same value is skipped by SQLite), the transaction commits through the
        # journal or WAL, and the chain is as it was.
        with _domain_errors(), self.engine.begin() as conn:
            conn.execute(text(_PROBE), {"step": 1})
            conn.execute(text(_PROBE), {"step": -1})
        if self.is_sqlite and self.engine.url.database:
            # SQLite writes into its WAL file until a checkpoint must grow the database
            # file, so a write can still pass on a full disk that fails the next enrollment.
            free = shutil.disk_usage(Path(self.engine.url.database).resolve().parent).free
            if free < MIN_FREE_BYTES:
                raise PKIError(ErrorKind.UNAVAILABLE, "database disk full")

    def has_schema(self) -> bool:
        return inspect(self.engine).has_table("certificates")

    def schema_is_current(self) -> bool:
        """Tells whether every migration that ships with the package has been applied."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        heads = set(ScriptDirectory.from_config(alembic_config(self.url)).get_heads())
        with self.engine.connect() as conn:
            applied = set(MigrationContext.configure(conn).get_current_heads())
        return applied == heads

    def track_detached(self, holder: Closeable) -> None:
        """Has dispose() close a holder of a connection taken out of the pool."""
        self._detached.add(holder)

    def dispose(self) -> None:
        for holder in list(self._detached):
            holder.close()
        self.engine.dispose()


def alembic_config(url: str) -> AlembicConfig:
    """Builds the Alembic configuration for the migrations that ship with the package."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def session_scope(db: Database) -> Iterator[Session]:
    """Runs a block in one transaction: commit on success, roll back on any error."""
    session = db.session()
    try:
        with _domain_errors():
            yield session
            session.commit()
    except BaseException:
        # Rolling back over a lost connection only invalidates it; the first error counts.
        with contextlib.suppress(DBAPIError):
            session.rollback()
        raise
    finally:
        session.close()
