"""pki.store under database faults: one `unavailable` error, stale connections replaced."""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

from pki.errors import ErrorKind, PKIError
from pki.store import Database, audit, session_scope
from pki.store.lean import LeanQuery
from pki.store.models import AuditHead, IssuerRecord

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
ISSUER_BY_ID = select(IssuerRecord.subject).where(IssuerRecord.id == "root").limit(1)


def _terminate_others(db: Database) -> int:
    """Ends every other connection to the database from a connection of its own."""
    other = Database(db.url)
    try:
        with other.engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        other.dispose()
    return int(killed)


@contextlib.contextmanager
def _connections_refused(db: Database) -> Iterator[None]:
    """Refuses new connections to the test database and ends the open ones, then undoes it."""
    name = db.engine.url.database
    admin = Database(db.url.rsplit("/", 1)[0] + "/postgres")
    try:
        with admin.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
        yield
    finally:
        with admin.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def _add_issuer(db: Database) -> None:
    with session_scope(db) as session:
        session.add(
            IssuerRecord(
                id="root",
                subject="CN=Root",
                key_uri="pkcs11:object=root",
                kind="root",
                created_at=NOW,
            )
        )
        audit.append(session, at=NOW, actor="test", action="issuer.added", target="root")


def _head(db: Database) -> tuple[int, str]:
    with session_scope(db) as session:
        head = session.get(AuditHead, 1)
        assert head is not None
        return head.seq, head.hash


@pytest.fixture
def pg_db(db: Database) -> Database:
    if db.is_sqlite:
        pytest.skip("needs a database server")
    return db


def test_terminated_connections_are_replaced_without_an_error(pg_db: Database) -> None:
    _add_issuer(pg_db)
    query = LeanQuery(pg_db, ISSUER_BY_ID)
    assert query.first() == ("CN=Root",)
    # Pooled connections too: one is idle in the pool, one is held by the lean query.
    with session_scope(pg_db) as session:
        assert session.get(IssuerRecord, "root") is not None
    assert _terminate_others(pg_db) >= 2
    assert query.first() == ("CN=Root",)
    with session_scope(pg_db) as session:
        assert session.get(IssuerRecord, "root") is not None
    pg_db.check_write()
    query.close()


def test_refused_connections_are_unavailable_until_back(pg_db: Database) -> None:
    _add_issuer(pg_db)
    query = LeanQuery(pg_db, ISSUER_BY_ID)
    assert query.first() == ("CN=Root",)
    with _connections_refused(pg_db):
        failures: list[PKIError] = []
        for attempt in (
            query.first,
            pg_db.ping,
            pg_db.check_write,
            lambda: _head(pg_db),
            lambda: pg_db.read_session().__enter__(),
        ):
            with pytest.raises(PKIError) as caught:
                attempt()
            failures.append(caught.value)
        assert [f.kind for f in failures] == [ErrorKind.UNAVAILABLE] * 5
        # The message names no statement and no parameter.
        assert {f.message for f in failures} == {"database unavailable"}
    assert query.first() == ("CN=Root",)
    pg_db.check_write()
    query.close()


def test_check_write_commits_and_leaves_the_chain_as_it_was(db: Database) -> None:
    _add_issuer(db)
    before = _head(db)
    db.check_write()
    assert _head(db) == before
    with session_scope(db) as session:
        assert audit.verify(session).ok


def _on_connect(db: Database, statement: str) -> None:
    def run(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(statement)
        cur.close()

    db.engine.dispose()
    event.listen(db.engine, "connect", run)


def test_unwritable_sqlite_fails_the_write_check_not_reads(sqlite_db: Database) -> None:
    _add_issuer(sqlite_db)
    _on_connect(sqlite_db, "PRAGMA query_only = ON")
    sqlite_db.ping()
    with pytest.raises(PKIError) as caught:
        sqlite_db.check_write()
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    with pytest.raises(PKIError) as appended, session_scope(sqlite_db) as session:
        audit.append(session, at=NOW, actor="test", action="x", target="y")
    assert appended.value.kind is ErrorKind.UNAVAILABLE


def test_full_sqlite_database_is_unavailable(sqlite_db: Database) -> None:
    _add_issuer(sqlite_db)
    with sqlite_db.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
    # No page beyond the current ones: the next write that needs one fails as on a full disk.
    _on_connect(sqlite_db, f"PRAGMA max_page_count = {pages}")
    with pytest.raises(PKIError) as caught, session_scope(sqlite_db) as session:
        for n in range(200):
            audit.append(session, at=NOW, actor="test", action="fill", target="x" * 400 + str(n))
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    assert isinstance(caught.value.__cause__, Exception)
    assert "full" in str(caught.value.__cause__)


def test_little_free_space_fails_the_sqlite_write_check(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add_issuer(sqlite_db)
    sqlite_db.check_write()
    usage = shutil.disk_usage("/")
    monkeypatch.setattr("pki.store.db.shutil.disk_usage", lambda _path: usage._replace(free=4096))
    with pytest.raises(PKIError, match="disk full") as caught:
        sqlite_db.check_write()
    assert caught.value.kind is ErrorKind.UNAVAILABLE


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to fill up (needs the right to mount, as root in a container)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_fails_writes_and_the_write_check(small_disk: Path) -> None:
    db = Database(f"sqlite:///{small_disk / 'pki.db'}")
    try:
        db.upgrade()
        _add_issuer(db)
        db.check_write()
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
        with pytest.raises(PKIError) as checked:
            db.check_write()
        assert checked.value.kind is ErrorKind.UNAVAILABLE
        with pytest.raises(PKIError) as written, session_scope(db) as session:
            for n in range(2000):
                audit.append(
                    session, at=NOW, actor="test", action="fill", target="x" * 500 + str(n)
                )
        assert written.value.kind is ErrorKind.UNAVAILABLE
        filler.unlink()
        db.check_write()
    finally:
        db.dispose()
