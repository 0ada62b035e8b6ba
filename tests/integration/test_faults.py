"""Outages of the token and the database on the real servers (gunicorn, SoftHSM, PostgreSQL):
503 + Retry-After and tryLater while they last, service back without a restart, no 500."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from sqlalchemy import text

from pki.clock import SystemClock
from pki.device import DeviceService
from pki.store import Database
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import (
    DeviceCert,
    VAServer,
    admin_token,
    issue_device,
    serve_ca,
    serve_va,
)

EST = "/.well-known/est"
RECOVERY_DEADLINE = 10.0


class Devices:
    """Registers devices with one-time secrets straight through the registry (no token)."""

    def __init__(self, ca: DevCA, prefix: str) -> None:
        self.db = Database(ca.db_url())
        self.service = DeviceService(self.db, SystemClock())
        self.prefix = prefix
        self.count = 0

    def new(self) -> tuple[str, str]:
        self.count += 1
        device_id = f"{self.prefix}-{self.count:04d}"
        self.service.add(device_id, model="test", actor="test")
        return device_id, self.service.new_secret(device_id, actor="test").secret

    def close(self) -> None:
        self.db.dispose()


@pytest.fixture
def registry(request: pytest.FixtureRequest) -> Iterator[Devices]:
    ca: DevCA = request.getfixturevalue(request.param)
    devices = Devices(ca, "FLT")
    try:
        yield devices
    finally:
        devices.close()


def enroll(ca: DevCA, front: str, device: tuple[str, str]) -> requests.Response:
    device_id, secret = device
    csr, _ = device_csr(device_id)
    return requests.post(
        f"{front}{EST}/simpleenroll",
        data=base64.b64encode(der(csr)),
        auth=(device_id, secret),
        headers={"Content-Type": "application/pkcs10"},
        verify=str(ca.cert("chain.pem")),
        timeout=60,
    )


def front_get(ca: DevCA, front: str, path: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(front + path, headers=headers, verify=str(ca.cert("chain.pem")), timeout=60)


def ask_ocsp(ca: DevCA, va: VAServer, device: DeviceCert, *, nonce: bool) -> ocsp.OCSPResponse:
    issuer = x509.load_pem_x509_certificates(ca.cert("devices.pem").read_bytes())[0]
    sha1 = hashes.SHA1()  # noqa: S303 (the CertID hash OCSP clients send)
    builder = ocsp.OCSPRequestBuilder().add_certificate(device.certificate, issuer, sha1)
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    r = requests.post(
        va.ocsp_url,
        data=builder.build().public_bytes(Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return ocsp.load_der_ocsp_response(r.content)


def status_of(response: ocsp.OCSPResponse) -> str:
    """'good', 'revoked', 'unknown', or the response status when it is not successful."""
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return response.response_status.name.lower()
    return response.certificate_status.name.lower()


def token_dir(ca: DevCA) -> Path:
    conf = (ca.data_dir / "softhsm2.conf").read_text()
    found = re.search(r"^directories\.tokendir\s*=\s*(.+)$", conf, re.MULTILINE)
    assert found is not None, conf
    return Path(found.group(1).strip())


def assert_no_traceback(*logs: Path) -> None:
    for log in logs:
        content = log.read_text()
        assert "Traceback" not in content, content[-4000:]


def _va_logs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("va-*.log")) + sorted(tmp_path.glob("ca-front-*.log"))


@pytest.mark.parametrize("registry", ["dev_ca"], indirect=True)
def test_token_away_and_back(dev_ca: DevCA, registry: Devices, tmp_path: Path) -> None:
    ca = dev_ca
    good = issue_device(ca, tmp_path / "d", "tok-good")
    revoked = issue_device(ca, tmp_path / "d", "tok-revoked")
    ca.pki("revoke", revoked.serial_hex, "--reason", "keyCompromise")
    ca.pki("ocsp", "presign")
    tokens = token_dir(ca)
    away = tmp_path / "tokens-away"
    statuses: list[int] = []
    with serve_va(ca, tmp_path) as va, serve_ca(ca, tmp_path) as front:
        assert status_of(ask_ocsp(ca, va, good, nonce=True)) == "good"
        shutil.move(tokens, away)
        try:
            for _ in range(4):
                assert status_of(ask_ocsp(ca, va, good, nonce=True)) == "try_later"
                assert status_of(ask_ocsp(ca, va, good, nonce=False)) == "good"
                assert status_of(ask_ocsp(ca, va, revoked, nonce=False)) == "revoked"
            refused = enroll(ca, front, registry.new())
            statuses.append(refused.status_code)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) > 0
            health = front_get(ca, front, "/healthz")
            assert health.status_code == 503
            assert health.json()["token"] == "unavailable"
            assert requests.get(f"{va.url}/healthz", timeout=30).status_code == 503
            # A VA whose workers start during the outage serves what was pre-signed.
            with serve_va(ca, tmp_path, healthy=False) as late:
                assert status_of(ask_ocsp(ca, late, good, nonce=False)) == "good"
                assert status_of(ask_ocsp(ca, late, revoked, nonce=False)) == "revoked"
                assert status_of(ask_ocsp(ca, late, good, nonce=True)) == "try_later"
        finally:
            shutil.move(away, tokens)
        deadline = time.monotonic() + RECOVERY_DEADLINE
        live_ok = 0
        enrolled = False
        while live_ok < 4 or not enrolled:
            assert time.monotonic() < deadline, f"not back: live {live_ok}, EST {statuses}"
            if status_of(ask_ocsp(ca, va, good, nonce=True)) == "good":
                live_ok += 1
            else:
                live_ok = 0
            if not enrolled:
                r = enroll(ca, front, registry.new())
                statuses.append(r.status_code)
                assert r.status_code in (200, 503), r.text
                enrolled = r.status_code == 200
            time.sleep(0.1)
        assert front_get(ca, front, "/healthz").status_code == 200
        assert requests.get(f"{va.url}/healthz", timeout=30).status_code == 200
    assert 500 not in statuses
    assert_no_traceback(*_va_logs(tmp_path))


@contextlib.contextmanager
def connections_refused(ca: DevCA) -> Iterator[None]:
    """Refuses new connections to the CA's PostgreSQL database and ends the open ones."""
    assert ca.database_url is not None
    name = ca.database_url.rsplit("/", 1)[1]
    admin = Database(ca.database_url.rsplit("/", 1)[0] + "/postgres")
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


def terminate_backends(ca: DevCA) -> int:
    assert ca.database_url is not None
    db = Database(ca.database_url)
    try:
        with db.engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        db.dispose()
    return int(killed)


@pytest.fixture
def pg_ca(dev_ca_any: DevCA) -> DevCA:
    if dev_ca_any.database_url is None:
        pytest.skip("needs PostgreSQL")
    return dev_ca_any


@pytest.mark.parametrize("registry", ["pg_ca"], indirect=True)
def test_terminated_and_refused_database_connections(
    pg_ca: DevCA, registry: Devices, tmp_path: Path
) -> None:
    ca = pg_ca
    good = issue_device(ca, tmp_path / "d", "pg-good")
    ca.pki("ocsp", "presign")
    operator = admin_token(ca, "operator")
    cert_path = f"/api/v1/certificates/{good.serial_hex}"
    with serve_va(ca, tmp_path) as va, serve_ca(ca, tmp_path) as front:
        for _ in range(4):  # every worker has its connections open
            assert status_of(ask_ocsp(ca, va, good, nonce=False)) == "good"
            assert status_of(ask_ocsp(ca, va, good, nonce=True)) == "good"
            assert front_get(ca, front, cert_path, operator).status_code == 200
        assert enroll(ca, front, registry.new()).status_code == 200
        registry.db.dispose()

        # pg_terminate_backend of every connection: the next requests simply succeed.
        assert terminate_backends(ca) >= 2
        answers = [status_of(ask_ocsp(ca, va, good, nonce=nonce)) for nonce in (False, True) * 4]
        assert answers == ["good"] * 8
        statuses = [front_get(ca, front, cert_path, operator).status_code for _ in range(4)]
        statuses.append(enroll(ca, front, registry.new()).status_code)
        statuses += [front_get(ca, front, "/healthz").status_code]
        assert statuses == [200] * 6
        assert requests.get(f"{va.url}/healthz", timeout=30).status_code == 200
        registry.db.dispose()
        device = registry.new()  # registered before the database goes away
        registry.db.dispose()

        # The database refuses connections: 503 + Retry-After, tryLater, never a 500.
        with connections_refused(ca):
            refused = enroll(ca, front, device)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) > 0
            admin = front_get(ca, front, cert_path, operator)
            assert admin.status_code == 503, admin.text
            assert admin.json()["error"] == "unavailable"
            assert int(admin.headers["Retry-After"]) > 0
            health = front_get(ca, front, "/healthz")
            assert health.status_code == 503
            assert health.json()["database"] == "unavailable"
            for nonce in (False, True):
                assert status_of(ask_ocsp(ca, va, good, nonce=nonce)) == "try_later"
            assert requests.get(f"{va.url}/healthz", timeout=30).status_code == 503

        deadline = time.monotonic() + RECOVERY_DEADLINE
        while front_get(ca, front, "/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the CA front did not come back"
            time.sleep(0.1)
        assert status_of(ask_ocsp(ca, va, good, nonce=True)) == "good"
        assert enroll(ca, front, registry.new()).status_code == 200
    assert_no_traceback(*_va_logs(tmp_path))
