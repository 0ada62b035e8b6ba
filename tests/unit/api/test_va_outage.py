"""The VA's downloads while the database is away: 503 with Retry-After, one log line each."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import cast

import pytest
from flask.testing import FlaskClient

from api.runtime import Runtime
from api.va import create_va_app
from pki.clock import SystemClock
from pki.crl_publisher import CRLPublisher
from pki.ocsp_responder import OCSPResponderConfig
from pki.store import Database
from pki.store.db import sqlite_path
from tests.unit.pki.conftest import Hierarchy, build_hierarchy
from tests.unit.pki.test_store_faults import _connections_refused

PATHS = ("/crl/devices.crl", "/crl/devices-delta.crl", "/ca/devices.der")


class VARuntime:
    """What the VA's download routes use of a Runtime: the database and the clock."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.clock = SystemClock()

    def load_key(self, uri: str) -> object:
        raise AssertionError(f"no key is opened to serve downloads ({uri})")


@pytest.fixture
def hierarchy(db: Database) -> Hierarchy:
    return build_hierarchy(db)


def va_client(db: Database) -> FlaskClient:
    runtime = cast(Runtime, VARuntime(db))
    return create_va_app(runtime, OCSPResponderConfig()).test_client()


@contextlib.contextmanager
def database_away(db: Database) -> Iterator[None]:
    """Makes the database unreachable: PostgreSQL refuses connections; in place of the SQLite
    file stands a directory, which SQLite cannot open."""
    if not db.is_sqlite:
        with _connections_refused(db):
            yield
        return
    path = sqlite_path(db.url)
    assert path is not None
    db.engine.dispose()
    aside = path.with_name(path.name + ".away")
    path.rename(aside)
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()
        aside.rename(path)


def test_downloads_answer_503_with_retry_after_while_the_database_is_away(
    hierarchy: Hierarchy, caplog: pytest.LogCaptureFixture
) -> None:
    h = hierarchy
    CRLPublisher(h.db, SystemClock(), h.config.ca.urls, lint_crls=False).publish(h.devices)
    client = va_client(h.db)
    assert [client.get(p).status_code for p in PATHS] == [200, 200, 200]
    caplog.clear()
    caplog.set_level(logging.INFO)
    with database_away(h.db):
        responses = [client.get(p) for p in PATHS]
    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(int(r.headers["Retry-After"]) > 0 for r in responses)
    assert {r.get_data(as_text=True) for r in responses} == {"database unavailable\n"}
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # One line per refused request, none with a traceback.
    assert len(records) == len(PATHS)
    assert [r for r in records if r.exc_info] == []
    assert [client.get(p).status_code for p in PATHS] == [200, 200, 200]


def test_unknown_issuer_still_404(hierarchy: Hierarchy) -> None:
    client = va_client(hierarchy.db)
    assert client.get("/crl/nope.crl").status_code == 404
    assert client.get("/ca/nope.der").status_code == 404
