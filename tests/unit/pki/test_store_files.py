"""The SQLite files the service creates are its owner's alone: 0600 files in a 0700 directory."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from pki.store import Database
from pki.store.db import sqlite_path


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("loose_umask")
def test_new_database_and_its_wal_and_shm_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "data" / "pki.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
        with db.engine.connect() as conn:
            # While a connection is open in WAL mode, SQLite keeps -wal and -shm beside it.
            conn.execute(text("SELECT count(*) FROM certificates")).scalar_one()
            files = sorted(p.name for p in path.parent.iterdir())
            assert files == ["pki.db", "pki.db-shm", "pki.db-wal"]
            assert {name: _mode(path.parent / name) for name in files} == dict.fromkeys(
                files, 0o600
            )
        assert _mode(path.parent) == 0o700
    finally:
        db.dispose()


@pytest.mark.usefixtures("loose_umask")
def test_existing_directory_and_file_keep_their_modes(tmp_path: Path) -> None:
    path = tmp_path / "pki.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    tmp_path.chmod(0o750)
    Database(f"sqlite:///{path}").dispose()
    assert _mode(path) == 0o640 and _mode(tmp_path) == 0o750


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////var/lib/pki/pki.db", Path("/var/lib/pki/pki.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://u@h/db", None),
    ],
)
def test_sqlite_path(url: str, expected: Path | None) -> None:
    assert sqlite_path(url) == expected
