"""`pki init --dev` leaves the data directory 0700 and the database files 0600."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

from tests.integration.conftest import DevCA, make_dev_ca


def _stat(path: Path) -> str:
    return subprocess.run(
        ["stat", "-c", "%a", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_init_dev_makes_data_directory_0700_and_database_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    old = os.umask(0o022)
    try:
        ca: DevCA = make_dev_ca(data_dir)
        db = ca.data_dir / "pki.db"
        # A reader keeps the WAL and shared-memory files beside the database while it is open.
        conn = sqlite3.connect(db)
        try:
            conn.execute("SELECT count(*) FROM certificates").fetchone()
            files = sorted(p.name for p in data_dir.glob("pki.db*"))
            assert files == ["pki.db", "pki.db-shm", "pki.db-wal"]
            assert {f: _stat(data_dir / f) for f in files} == dict.fromkeys(files, "600")
        finally:
            conn.close()
    finally:
        os.umask(old)
    assert _stat(data_dir) == "700"
