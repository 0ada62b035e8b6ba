"""EST login failures through Flask's test client: one empty 401 for all, throttled per address."""

from __future__ import annotations

import base64
import datetime

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from api import errors
from api.est.views import create_blueprint
from pki.clock import FixedClock
from pki.device import DeviceService
from pki.enrollment import EnrollmentService
from pki.est_config import load_est_config
from pki.revocation import RevocationService
from pki.store import AuditEvent, CertificateRecord, Database, session_scope
from pki.store.enrollment_models import EnrollmentSecret
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy, build_hierarchy
from tests.unit.pki.test_enrollment import _Issuers

X, Y = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def hierarchy(sqlite_db: Database) -> Hierarchy:
    return build_hierarchy(sqlite_db)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(datetime.datetime.now(datetime.UTC))


@pytest.fixture
def service(hierarchy: Hierarchy, clock: FixedClock) -> EnrollmentService:
    est = load_est_config(hierarchy.config)
    return EnrollmentService(
        db=hierarchy.db,
        clock=clock,
        config=hierarchy.config,
        est=est,
        issuance=hierarchy.issuance,
        issuers=_Issuers(hierarchy),
        devices=DeviceService(hierarchy.db, clock, max_failures=5, lockout=est.lockout),
        revocation=RevocationService(hierarchy.db, clock),
    )


@pytest.fixture
def client(service: EnrollmentService) -> FlaskClient:
    app = Flask("est-test")
    errors.install(app, plain=True)
    app.register_blueprint(create_blueprint(service, service.est))
    return app.test_client()


def _enroll(
    client: FlaskClient, device_id: str, secret: str | None, address: str, *, csr_id: str = ""
) -> TestResponse:
    csr, _ = device_csr(csr_id or device_id)
    headers = {"Content-Type": "application/pkcs10"}
    if secret is not None:
        token = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return client.post(
        "/.well-known/est/simpleenroll",
        data=base64.encodebytes(der(csr)),
        headers=headers,
        environ_base={"REMOTE_ADDR": address},
    )


def _wire(response: TestResponse) -> tuple[str, list[tuple[str, str]], bytes]:
    headers = sorted((k, v) for k, v in response.headers.items() if k != "Date")
    return response.status, headers, response.get_data()


def _stored(db: Database) -> tuple[int, int, list[str]]:
    with session_scope(db) as s:
        certs = s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one()
        events = s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
        states = [st.value for st in s.execute(select(EnrollmentSecret.state)).scalars()]
    return int(certs), int(events), states


def _secret(service: EnrollmentService, device_id: str) -> str:
    service.devices.add(device_id, actor="t")
    return service.devices.new_secret(device_id, actor="t").secret


class TestFailedLogin:
    def test_every_failure_is_the_same_empty_401(
        self, client: FlaskClient, service: EnrollmentService, clock: FixedClock
    ) -> None:
        secret = _secret(service, "D-1")
        used = _secret(service, "D-2")
        assert _enroll(client, "D-2", used, X).status_code == 200
        expired = _secret(service, "D-3")
        clock.advance(service.est.secret_lifetime)
        fresh = _secret(service, "D-4")
        before = _stored(service.db)
        answers = {
            "unknown": _enroll(client, "NO-SUCH-DEVICE", "guess", X),
            "wrong": _enroll(client, "D-1", "guess", X),
            "used": _enroll(client, "D-2", used, X),
            "expired": _enroll(client, "D-3", expired, X),
            "not an ID": _enroll(client, "no such device!", "guess", X, csr_id="D-1"),
        }
        for _ in range(5):
            _enroll(client, "D-4", "guess", Y)
        answers["locked"] = _enroll(client, "D-4", fresh, Y)
        wires = {name: _wire(r) for name, r in answers.items()}
        first = wires["unknown"]
        assert first[0] == "401 UNAUTHORIZED" and first[2] == b""
        assert ("Content-Length", "0") in first[1]
        assert ("WWW-Authenticate", errors.BASIC_CHALLENGE) in first[1]
        assert all(w == first for w in wires.values()), wires
        certs, _events, states = _stored(service.db)
        assert (certs, states) == (before[0], before[2])
        # The lock-out held only on Y: the same secret from X enrolls.
        assert _enroll(client, "D-1", secret, X).status_code == 401  # X failed once on D-1
        assert _enroll(client, "D-4", fresh, X).status_code == 200

    def test_five_bad_tries_from_x_do_not_lock_out_y(
        self, client: FlaskClient, service: EnrollmentService
    ) -> None:
        secret = _secret(service, "D-1")
        for _ in range(5):
            assert _enroll(client, "D-1", "guess", X).status_code == 401
        before = _stored(service.db)
        assert _enroll(client, "D-1", secret, X).status_code == 401
        assert _stored(service.db)[0::2] == before[0::2]
        assert _enroll(client, "D-1", secret, Y).status_code == 200

    def test_no_credentials_is_the_same_challenge(self, client: FlaskClient) -> None:
        bare = _enroll(client, "D-1", None, X)
        wrong = _enroll(client, "NO-SUCH-DEVICE", "guess", X)
        assert _wire(bare) == _wire(wrong)
