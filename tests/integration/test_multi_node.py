"""Two CA fronts, two VAs and two schedulers on one PostgreSQL database, as real processes:
enrollments and revocations split over both fronts end on every CRL and OCSP answer, each
due CRL is published once, and the audit log verifies."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from sqlalchemy import select

from pki.clock import SystemClock
from pki.device import DeviceService
from pki.store import Database, session_scope
from pki.store.revocation_models import CRLRecord, RevocationEvent
from tests.csrs import der, device_csr
from tests.integration.conftest import PKI, DevCA
from tests.integration.test_va_support import (
    VAServer,
    admin_token,
    ocsp_ask,
    responder_serial,
    serve_ca,
    serve_va,
)

pytestmark = pytest.mark.slow

DEVICES = 500
REVOKED = 50
CLIENTS = 8
EST = "/.well-known/est/simpleenroll"
DEADLINE = 180.0


@contextlib.contextmanager
def scheduler(ca: DevCA, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `pki scheduler run` every second, publishing at once after revocations."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PKI, "scheduler", "run", "--interval", "1", "--revocation-delay", "0"],
            env=ca.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def register(ca: DevCA) -> dict[str, str]:
    """Registers the devices in one CSV import and draws a one-time secret for each."""
    ids = [f"MN-{i:04d}" for i in range(DEVICES)]
    db = Database(ca.db_url())
    try:
        service = DeviceService(db, SystemClock())
        service.import_csv("id,model\n" + "".join(f"{d},sensor\n" for d in ids), actor="test")
        return {d: service.new_secret(d, actor="test").secret for d in ids}
    finally:
        db.dispose()


def crl_serials(va: VAServer) -> set[int]:
    r = requests.get(f"{va.url}/crl/devices.crl", timeout=30)
    assert r.status_code == 200
    return {e.serial_number for e in x509.load_der_x509_crl(r.content)}


@pytest.mark.parametrize("dev_ca_any", ["postgres"], indirect=True)
def test_two_fronts_two_vas_two_schedulers_on_one_database(
    dev_ca_any: DevCA, tmp_path: Path
) -> None:
    ca = dev_ca_any
    secrets = register(ca)
    operator = admin_token(ca, "operator")
    issuer = x509.load_pem_x509_certificate(ca.cert("devices.pem").read_bytes())
    verify = str(ca.cert("chain.pem"))
    logs = [tmp_path / "scheduler-a.log", tmp_path / "scheduler-b.log"]
    with contextlib.ExitStack() as stack:
        fronts = [stack.enter_context(serve_ca(ca, tmp_path)) for _ in range(2)]
        vas = [stack.enter_context(serve_va(ca, tmp_path, workers=1)) for _ in range(2)]
        for path in logs:
            stack.enter_context(scheduler(ca, path))

        def enroll(index_and_id: tuple[int, str]) -> tuple[int, x509.Certificate | str]:
            index, device_id = index_and_id
            csr, _key = device_csr(device_id)
            r = requests.post(
                fronts[index % 2] + EST,
                data=base64.encodebytes(der(csr)),
                auth=(device_id, secrets[device_id]),
                headers={"Content-Type": "application/pkcs10"},
                verify=verify,
                timeout=120,
            )
            if r.status_code != 200:
                return r.status_code, r.text
            (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
            return 200, cert

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            enrolled = list(pool.map(enroll, enumerate(secrets)))
        refused = [r for r in enrolled if r[0] != 200]
        assert not refused, refused[:3]
        certs = [c for _, c in enrolled if isinstance(c, x509.Certificate)]
        assert len({c.serial_number for c in certs}) == DEVICES

        to_revoke = certs[:: DEVICES // REVOKED]
        assert len(to_revoke) == REVOKED

        def revoke(index_and_cert: tuple[int, x509.Certificate]) -> int:
            index, cert = index_and_cert
            r = requests.post(
                f"{fronts[index % 2]}/api/v1/certificates/{cert.serial_number:x}/revoke",
                json={"reason": "keyCompromise"},
                headers={"Authorization": f"Bearer {operator}"},
                verify=verify,
                timeout=60,
            )
            return r.status_code

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            assert list(pool.map(revoke, enumerate(to_revoke))) == [200] * REVOKED

        # From the commit on, both VAs say revoked; a neighbour stays good.
        for va in vas:
            for cert in to_revoke:
                response = ocsp_ask(va, cert, issuer, nonce=False)
                responder_serial(response)
                assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
                assert response.revocation_reason is x509.ReasonFlags.key_compromise
            kept = ocsp_ask(va, certs[1], issuer, nonce=False)
            assert kept.certificate_status is ocsp.OCSPCertStatus.GOOD

        # The schedulers publish a CRL with every revoked serial, served by either VA.
        wanted = {c.serial_number for c in to_revoke}
        deadline = time.monotonic() + DEADLINE
        while not all(wanted <= crl_serials(va) for va in vas):
            assert time.monotonic() < deadline, "revoked serials missing from the CRL"
            time.sleep(0.5)
        for va in vas:
            assert certs[1].serial_number not in crl_serials(va)

    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            rows = s.execute(
                select(CRLRecord.crl_number, CRLRecord.is_delta, CRLRecord.this_update)
                .add_columns(CRLRecord.crl_der)
                .where(CRLRecord.issuer_id == "devices", CRLRecord.crl_der.is_not(None))
                .order_by(CRLRecord.id)
            ).all()
            event_times = list(
                s.execute(
                    select(RevocationEvent.at).where(RevocationEvent.issuer_id == "devices")
                ).scalars()
            )
    finally:
        db.dispose()
    numbers = [row[0] for row in rows]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    full = [
        (this_update, {e.serial_number for e in x509.load_der_x509_crl(crl_der)})
        for _, is_delta, this_update, crl_der in rows
        if not is_delta
    ]
    # One CRL per due period: each full CRL after the first was due, because it lists more
    # than the one before, or a revocation came between the two thisUpdates (whole seconds).
    for (before_at, before), (after_at, after) in itertools.pairwise(full):
        between = [at for at in event_times if before_at <= at <= after_at]
        assert after > before or between, (before_at, after_at)
    for path in logs:
        text = path.read_text()
        assert "failed" not in text and "Traceback" not in text, text[-3000:]
    assert ca.pki("audit", "verify").returncode == 0
