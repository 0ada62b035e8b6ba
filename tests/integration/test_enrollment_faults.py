"""Enrollment under faults on the real CA front (gunicorn, SoftHSM, PostgreSQL).

Requests are paused after their pending record without any hook in the product: the test
holds the row lock of each device's one-time secret, which the request's issued
transaction must take to spend it, and waits until PostgreSQL shows every request blocked
on it. Then the fault: the worker is killed (SIGKILL), or the service's database
connections are terminated. A third fault needs no pause: the token's directory is moved
away while devices enroll, and back. Every affected device must enroll on its first retry with the
same secret, and the database must end with one issued certificate per device.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine

from tests.conftest import drop_postgres_database, fresh_postgres_database
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_est import EST, _start, _stop, _wait_healthz

DEVICES = 3
DEADLINE = 30.0


@dataclasses.dataclass
class Front:
    """Front is a one-worker CA front on PostgreSQL, and the test's own connections to it."""

    ca: DevCA
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    engine: Engine

    def post(self, body: bytes, auth: tuple[str, str]) -> requests.Response:
        return requests.post(
            f"https://127.0.0.1:{self.port}{EST}/simpleenroll",
            data=body,
            auth=auth,
            headers={"Content-Type": "application/pkcs10"},
            verify=str(self.ca.cert("chain.pem")),
            timeout=60,
        )

    def worker_pid(self) -> int:
        """Returns the pid of the one gunicorn worker (a child of the master)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def rows(self, query: str, **params: object) -> list[tuple[object, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]


@pytest.fixture
def front(
    postgres_server: str | None,
    _dev_ca_pg_template: tuple[DevCA, str] | None,
    tmp_path: Path,
) -> Iterator[Front]:
    if postgres_server is None or _dev_ca_pg_template is None:
        pytest.skip("PostgreSQL not configured (set PKI_TEST_POSTGRES_URL)")
    template, template_name = _dev_ca_pg_template
    url, name = fresh_postgres_database(postgres_server, template=template_name)
    target = tmp_path / "ca"
    shutil.copytree(template.data_dir, target)
    conf = target / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(template.data_dir), str(target)))
    ca = DevCA(target, template.config_dir, url)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    process, port, log_path = _start(ca, tmp_path, workers=1)
    try:
        yield Front(ca, process, port, log_path, engine)
    finally:
        _stop(process)
        engine.dispose()
        drop_postgres_database(postgres_server, name)


def _register(front: Front, device_ids: list[str]) -> dict[str, str]:
    secrets = {}
    for device_id in device_ids:
        front.ca.pki("device", "add", device_id)
        secrets[device_id] = front.ca.pki("device", "secret", device_id, "--stdout").stdout.strip()
    return secrets


def _hold_secrets(conn: Connection, device_ids: list[str]) -> int:
    """Locks the devices' secret rows in an open transaction; returns that backend's pid."""
    conn.execute(
        text("SELECT id FROM enrollment_secrets WHERE device_id = ANY(:ids) FOR UPDATE"),
        {"ids": device_ids},
    )
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _wait_for(front: Front, what: str, query: str, want: int, **params: object) -> list[int]:
    """Polls a query of pids until it returns `want` rows, up to the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        pids = [int(str(r[0])) for r in front.rows(query, **params)]
        if len(pids) == want:
            return pids
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {len(pids)} of {want}\n{front.log_path.read_text()}")
        time.sleep(0.05)


BLOCKED = "SELECT pid FROM pg_stat_activity WHERE :blocker = ANY(pg_blocking_pids(pid))"


def _paused_requests(
    front: Front, secrets: dict[str, str], bodies: dict[str, bytes], blocker: Connection
) -> tuple[concurrent.futures.ThreadPoolExecutor, list[concurrent.futures.Future[object]], int]:
    """Starts one enrollment per device and returns once each waits on the test's lock."""
    blocker_pid = _hold_secrets(blocker, list(secrets))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(secrets))

    def enroll(device_id: str) -> object:
        try:
            return front.post(bodies[device_id], (device_id, secrets[device_id])).status_code
        except requests.exceptions.ConnectionError:
            return "dropped"

    futures = [pool.submit(enroll, d) for d in secrets]
    _wait_for(front, "requests blocked after their pending record", BLOCKED, len(secrets),
              blocker=blocker_pid)  # fmt: skip
    # Each request recorded its pending row (committed) before it blocked.
    pending = front.rows(
        "SELECT count(*) FROM certificates WHERE status = 'pending' AND device_id = ANY(:ids)",
        ids=list(secrets),
    )
    assert pending == [(len(secrets),)]
    return pool, futures, blocker_pid


def _retry_and_check(
    front: Front, secrets: dict[str, str], bodies: dict[str, bytes], first: list[object]
) -> None:
    stranded = dict(
        front.rows(
            "SELECT device_id, serial_hex FROM certificates WHERE status = 'pending' "
            "AND device_id = ANY(:ids)",
            ids=list(secrets),
        )
    )
    # The last device retries with another key: its stranded row is superseded.
    rekeyed = sorted(secrets)[-1]
    bodies = dict(bodies, **{rekeyed: base64.encodebytes(der(device_csr(rekeyed)[0]))})
    serials = {}
    for device_id, secret in secrets.items():
        r = front.post(bodies[device_id], (device_id, secret))
        assert r.status_code == 200, (device_id, r.status_code, r.text)
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
        assert isinstance(cert, x509.Certificate)
        serials[device_id] = format(cert.serial_number, "x")
    assert 500 not in first
    for device_id, serial in serials.items():
        # Same key: the stranded row itself was completed. Another key: a new serial.
        if device_id in stranded:
            assert (serial == stranded[device_id]) is (device_id != rekeyed)
    counts = front.rows(
        "SELECT device_id, status, count(*) FROM certificates WHERE device_id = ANY(:ids) "
        "GROUP BY device_id, status ORDER BY device_id, status",
        ids=list(secrets),
    )
    expected = [(d, "issued", 1) for d in sorted(secrets)]
    if rekeyed in stranded:
        expected.insert(expected.index((rekeyed, "issued", 1)), (rekeyed, "abandoned", 1))
    assert counts == expected
    assert front.rows("SELECT count(*) FROM certificates WHERE status = 'pending'") == [(0,)]
    used = front.rows(
        "SELECT count(*) FROM enrollment_secrets WHERE state = 'used' AND device_id = ANY(:ids)",
        ids=list(secrets),
    )
    assert used == [(len(secrets),)]


def _bodies(device_ids: list[str]) -> dict[str, bytes]:
    return {d: base64.encodebytes(der(device_csr(d)[0])) for d in device_ids}


def test_worker_killed_after_pending_record_devices_enroll_on_retry(front: Front) -> None:
    device_ids = [f"KILL-{i}" for i in range(DEVICES)]
    secrets, bodies = _register(front, device_ids), _bodies(device_ids)
    with front.engine.connect().execution_options(isolation_level="READ COMMITTED") as blocker:
        blocker.begin()
        pool, futures, blocker_pid = _paused_requests(front, secrets, bodies, blocker)
        waiting = [int(str(r[0])) for r in front.rows(BLOCKED, blocker=blocker_pid)]
        os.kill(front.worker_pid(), signal.SIGKILL)
        first = [f.result(timeout=DEADLINE) for f in futures]
        pool.shutdown()
        blocker.rollback()
    assert first == ["dropped"] * DEVICES
    # The killed worker's backends end once the lock they waited for is gone.
    gone = "SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"
    _wait_for(front, "backends of the killed worker still alive", gone, 0, pids=waiting)
    _wait_healthz(front.ca, front.process, front.port, front.log_path, healthy=True)
    _retry_and_check(front, secrets, bodies, first)


def test_database_connections_terminated_mid_request_devices_enroll_on_retry(
    front: Front,
) -> None:
    device_ids = [f"TERM-{i}" for i in range(DEVICES)]
    secrets, bodies = _register(front, device_ids), _bodies(device_ids)
    with front.engine.connect().execution_options(isolation_level="READ COMMITTED") as blocker:
        blocker.begin()
        pool, futures, blocker_pid = _paused_requests(front, secrets, bodies, blocker)
        terminated = front.rows(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND pid <> :blocker",
            blocker=blocker_pid,
        )
        assert len(terminated) >= DEVICES
        first = [f.result(timeout=DEADLINE) for f in futures]
        pool.shutdown()
        blocker.rollback()
    # Each paused request was answered, as an outage: never a 500.
    assert first == [503] * DEVICES
    _retry_and_check(front, secrets, bodies, first)


def _token_dir(ca: DevCA) -> Path:
    conf = (ca.data_dir / "softhsm2.conf").read_text()
    found = re.search(r"^directories\.tokendir\s*=\s*(.+)$", conf, re.MULTILINE)
    assert found is not None, conf
    return Path(found.group(1).strip())


def test_token_away_and_back_devices_enroll_on_retry(front: Front, tmp_path: Path) -> None:
    device_ids = [f"TOKEN-{i}" for i in range(DEVICES)]
    secrets, bodies = _register(front, device_ids), _bodies(device_ids)
    tokens, away = _token_dir(front.ca), tmp_path / "tokens-away"
    shutil.move(tokens, away)
    try:
        first: list[object] = [
            front.post(bodies[d], (d, secrets[d])).status_code for d in device_ids
        ]
    finally:
        shutil.move(away, tokens)
    assert first == [503] * DEVICES
    # The front finds its token again by itself (no restart): /healthz signs with it.
    _wait_healthz(front.ca, front.process, front.port, front.log_path, healthy=True)
    _retry_and_check(front, secrets, bodies, first)
