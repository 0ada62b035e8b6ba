"""The VA's health and downloads when the database or a signer key is away."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import cast

import pytest
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from flask.testing import FlaskClient

from api.runtime import Runtime
from api.va import create_va_app
from pki.clock import SystemClock
from pki.crl_publisher import CRLPublisher
from pki.errors import ErrorKind, PKIError
from pki.ocsp_responder import NO_SIGNER, OCSPResponderConfig
from pki.store import Database
from pki.store.db import sqlite_path
from tests.unit.pki.conftest import Hierarchy, build_hierarchy
from tests.unit.pki.test_revocation_support import add_ocsp_signer
from tests.unit.pki.test_store_faults import _connections_refused

PATHS = ("/crl/devices.crl", "/crl/devices-delta.crl", "/ca/devices.der")


class VARuntime:
    """What the VA uses of a Runtime: the database, the clock and OCSP-signer keys."""

    def __init__(self, db: Database, keys: Mapping[str, object] | None = None) -> None:
        self.db = db
        self.clock = SystemClock()
        self.keys = keys or {}

    def load_key(self, uri: str) -> object:
        if uri not in self.keys:
            raise PKIError(ErrorKind.UNAVAILABLE, f"key {uri} is not in the token")
        return self.keys[uri]


@pytest.fixture
def hierarchy(db: Database) -> Hierarchy:
    return build_hierarchy(db)


def va_client(db: Database, keys: Mapping[str, object] | None = None) -> FlaskClient:
    runtime = cast(Runtime, VARuntime(db, keys))
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


def test_healthz_is_503_when_one_issuer_with_a_signer_cannot_sign(hierarchy: Hierarchy) -> None:
    h = hierarchy
    keys: dict[str, CertificateIssuerPrivateKeyTypes] = {}
    add_ocsp_signer(h, keys, "devices")
    # Only the devices CA has a signer: the root without one is no failure.
    healthy = va_client(h.db, dict(keys)).get("/healthz")
    assert healthy.status_code == 200
    assert healthy.get_json()["ocsp_signers"] == {"devices": "ok", "root": NO_SIGNER}
    add_ocsp_signer(h, keys, "root")
    (root_key,) = [uri for uri in keys if uri.startswith("memory:root-")]
    without_root = {uri: k for uri, k in keys.items() if uri != root_key}
    response = va_client(h.db, without_root).get("/healthz")
    assert response.status_code == 503
    report = response.get_json()
    assert report["status"] == "unavailable"
    assert report["ocsp_signers"]["devices"] == "ok"
    assert report["ocsp_signers"]["root"] == f"key {root_key} is not in the token"
    assert va_client(h.db, dict(keys)).get("/healthz").status_code == 200
