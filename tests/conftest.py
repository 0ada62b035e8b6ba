"""Fixtures shared by all tests: databases (SQLite always, PostgreSQL when configured)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pki.store import Database

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "ca-config"


def _postgres_base() -> str | None:
    return os.environ.get("PKI_TEST_POSTGRES_URL") or None


def _admin_url(base: str) -> str:
    if base.startswith("postgresql://"):
        return "postgresql+psycopg://" + base[len("postgresql://") :]
    return base


@pytest.fixture(scope="session")
def postgres_server() -> str | None:
    """Returns the PostgreSQL server URL, or None when the suite runs without it."""
    base = _postgres_base()
    if base is None:
        if os.environ.get("PKI_REQUIRE_POSTGRES") == "1":
            pytest.fail("PKI_REQUIRE_POSTGRES=1 but PKI_TEST_POSTGRES_URL is not set")
        return None
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(_admin_url(base), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # the server is the thing under question here
        if os.environ.get("PKI_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at {base} is unreachable: {e}")
        return None
    return base


def fresh_postgres_database(base: str, template: str | None = None) -> tuple[str, str]:
    """Creates a database on the server (empty, or a copy of a template) and returns (url, name)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"pki_test_{secrets.token_hex(6)}"
    engine = create_engine(_admin_url(base), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        copy = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    engine.dispose()
    url = make_url(_admin_url(base)).set(database=name)
    return url.render_as_string(hide_password=False), name


def drop_postgres_database(base: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_admin_url(base), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yields the URL of an empty database: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pki.db'}"
        return
    base = request.getfixturevalue("postgres_server")
    if base is None:
        pytest.skip("PostgreSQL not configured (set PKI_TEST_POSTGRES_URL)")
    url, name = fresh_postgres_database(base)
    try:
        yield url
    finally:
        drop_postgres_database(base, name)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """Yields a migrated database on each configured backend."""
    database = Database(database_url)
    database.upgrade()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """Yields a migrated SQLite database, for tests where the backend does not matter."""
    database = Database(f"sqlite:///{tmp_path / 'pki.db'}")
    database.upgrade()
    try:
        yield database
    finally:
        database.dispose()
