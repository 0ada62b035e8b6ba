"""Outages of the token and the database on the real servers (gunicorn, SoftHSM, PostgreSQL):
503 + Retry-After and tryLater while they last, service back without a restart, no 500."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import shutil
import subprocess
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
from tests.integration.conftest import PKI, DevCA, free_port
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


# Counts the PIN logins (python-pkcs11 Token.open with a PIN, i.e. C_Login) of every process
# started with it on PYTHONPATH: one line with the process ID per login.
LOGIN_SPY = """
import os

import hsm.token

_find_token = hsm.token._Library.find_token


class _Spied:
    def __init__(self, token):
        self._token = token

    def open(self, **kwargs):
        if "user_pin" in kwargs:
            with open(os.environ["FAULTS_LOGIN_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")
        return self._token.open(**kwargs)

    def __getattr__(self, name):
        return getattr(self._token, name)


def _spied_find_token(self, label):
    return _Spied(_find_token(self, label))


hsm.token._Library.find_token = _spied_find_token
"""


def test_wrong_pin_is_tried_once_per_worker(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = dev_ca
    # The CA front's token PIN (pki init --dev gives each token its own PIN file).
    pin_file = ca.data_dir / "secrets" / "ca-user.pin"
    assert pin_file.is_file()
    pin_file.write_text("wrong-0000\n")
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(LOGIN_SPY)
    logins = tmp_path / "logins"
    logins.touch()
    env = ca.env | {
        "PYTHONPATH": os.pathsep.join([str(spy_dir), os.environ.get("PYTHONPATH", "")]),
        "FAULTS_LOGIN_LOG": str(logins),
    }
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log_path = tmp_path / "ca-front-wrong-pin.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PKI, "serve", "ca", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Both workers have booted (and tried their PIN) once two processes logged in.
        deadline = time.monotonic() + 60
        while len(set(logins.read_text().split())) < 2:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        answers = []
        while len(answers) < 20:
            assert time.monotonic() < deadline, log_path.read_text()
            with contextlib.suppress(requests.ConnectionError):
                answers.append(front_get(ca, url, "/healthz"))
        assert [a.status_code for a in answers] == [503] * 20
        assert {a.json()["token"] for a in answers} == {"unavailable"}
        refused = enroll(ca, url, ("NOPIN-0001", "secret"))
        assert refused.status_code in (401, 503), refused.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    pids = logins.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2, pids
    assert "wrong-0000" not in log_path.read_text()
    assert_no_traceback(log_path)


def _unwritable_front(
    config_dir: Path, data_dir: Path, env: dict[str, str], pragma: str, device: tuple[str, str]
) -> dict[str, object]:
    """Runs in a fresh process (SoftHSM reads its configuration once per process): the CA
    front app through Flask's test client, every database connection opened with `pragma`."""
    import logging

    from sqlalchemy import event

    from api.app_ca import create_ca_app
    from api.runtime import Runtime

    records: list[tuple[str, str, bool]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelname, record.getMessage(), record.exc_info is not None))

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    runtime = Runtime.open(config_dir, data_dir, environ=env)
    client = create_ca_app(runtime).test_client()
    operator = runtime.environ["FAULTS_OPERATOR"]

    def on_connect(dbapi_conn: object, _record: object) -> None:
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute(pragma)
        cur.close()

    runtime.db.engine.dispose()
    event.listen(runtime.db.engine, "connect", on_connect)
    csr, _ = device_csr(device[0])
    credentials = base64.b64encode(f"{device[0]}:{device[1]}".encode()).decode()
    responses = {
        "healthz": client.get("/healthz"),
        "est": client.post(
            f"{EST}/simpleenroll",
            data=base64.b64encode(der(csr)),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {credentials}"},
        ),
        "admin": client.get(
            "/api/v1/certificates/01", headers={"Authorization": f"Bearer {operator}"}
        ),
    }
    return {
        "status": {name: r.status_code for name, r in responses.items()},
        "retry_after": {name: r.headers.get("Retry-After") for name, r in responses.items()},
        "healthz": responses["healthz"].get_json(),
        "records": records,
    }


@pytest.mark.parametrize("registry", ["dev_ca"], indirect=True)
def test_read_only_sqlite_answers_503(dev_ca: DevCA, registry: Devices) -> None:
    operator = admin_token(dev_ca, "operator")
    device = registry.new()
    registry.db.dispose()
    env = dev_ca.env | {"FAULTS_OPERATOR": operator}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        result = pool.submit(
            _unwritable_front,
            dev_ca.config_dir,
            dev_ca.data_dir,
            env,
            "PRAGMA query_only = ON",
            device,
        ).result(timeout=120)
    assert result["status"] == {"healthz": 503, "est": 503, "admin": 503}
    assert result["healthz"] == {"status": "degraded", "database": "unavailable", "token": "ok"}
    retry_after = result["retry_after"]
    assert isinstance(retry_after, dict)
    assert int(retry_after["est"]) > 0 and int(retry_after["admin"]) > 0
    records = result["records"]
    assert isinstance(records, list)
    # One line per refused request, none with a traceback.
    assert not [r for r in records if r[2]]
    lines = [r[1] for r in records if r[0] != "INFO"]
    assert len(lines) == 3, records
    assert lines[0].startswith("health check: database unavailable")
    assert lines[1].startswith("POST /.well-known/est/simpleenroll: database unavailable")
    assert lines[2].startswith("GET /api/v1/certificates/01: database unavailable")
