"""One device, one identity, on the real servers: racing re-enrollments, decommissioning.

A CA front and a VA under gunicorn on one database (SQLite and PostgreSQL); what a client
received is checked with `openssl ocsp` against the VA.
"""

from __future__ import annotations

import base64
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import func, select

from pki.store import AuditEvent, CertificateRecord, CertificateStatus, Database, session_scope
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import (
    VAServer,
    issue_device,
    openssl_ocsp,
    serve_ca,
    serve_va,
)

EST = "/.well-known/est"
RACERS = 8


class Servers:
    """Servers is a CA front and a VA on one demo CA."""

    def __init__(self, ca: DevCA, url: str, va: VAServer, work: Path) -> None:
        self.ca, self.url, self.va, self.work = ca, url, va, work

    def post(self, path: str, body: bytes, **kwargs: object) -> requests.Response:
        return requests.post(
            self.url + EST + path,
            data=body,
            headers={"Content-Type": "application/pkcs10"},
            verify=str(self.ca.cert("chain.pem")),
            timeout=60,
            **kwargs,  # type: ignore[arg-type]
        )

    def enroll(self, device_id: str) -> tuple[Path, Path]:
        """Registers and enrolls a device over EST; returns its certificate and key files."""
        self.ca.pki("device", "add", device_id, "--model", "m1", "--batch", "b7")
        secret = self.ca.pki("device", "secret", device_id, "--stdout").stdout.strip()
        csr, key = device_csr(device_id)
        r = self.post("/simpleenroll", base64.encodebytes(der(csr)), auth=(device_id, secret))
        assert r.status_code == 200, r.text
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
        cert_path, key_path = self.work / f"{device_id}.pem", self.work / f"{device_id}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def statuses(self, device_id: str) -> list[tuple[CertificateStatus, str | None]]:
        db = Database(self.ca.db_url())
        try:
            with session_scope(db) as s:
                rows = s.execute(
                    select(CertificateRecord.status, CertificateRecord.revocation_reason)
                    .where(CertificateRecord.device_id == device_id)
                    .order_by(CertificateRecord.id)
                ).all()
                return [(r[0], r[1]) for r in rows]
        finally:
            db.dispose()


@pytest.fixture
def servers(dev_ca_any: DevCA, tmp_path: Path) -> Iterator[Servers]:
    with serve_ca(dev_ca_any, tmp_path) as url, serve_va(dev_ca_any, tmp_path) as va:
        yield Servers(dev_ca_any, url, va, tmp_path)


def _ocsp_status(servers: Servers, cert_path: Path) -> str:
    result = openssl_ocsp(servers.ca, servers.va, "-cert", cert_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_eight_concurrent_reenrollments_one_wins(servers: Servers) -> None:
    cert_path, key_path = servers.enroll("RACE-RE-1")
    barrier = threading.Barrier(RACERS)

    def reenroll(_: int) -> tuple[int, bytes]:
        csr, _key = device_csr("RACE-RE-1")  # each client with a key of its own
        body = base64.encodebytes(der(csr))
        barrier.wait()
        r = servers.post("/simplereenroll", body, cert=(str(cert_path), str(key_path)))
        return r.status_code, r.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=RACERS) as pool:
        results = list(pool.map(reenroll, range(RACERS)))

    codes = sorted(code for code, _ in results)
    assert codes == [200] + [409] * (RACERS - 1), results
    # The database: the old certificate superseded, exactly one new one issued.
    assert servers.statuses("RACE-RE-1") == [
        (CertificateStatus.REVOKED, "superseded"),
        (CertificateStatus.ISSUED, None),
    ]
    # What the one client received is good in OCSP.
    (body,) = [content for code, content in results if code == 200]
    (new,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    new_path = servers.work / "race-new.pem"
    new_path.write_bytes(new.public_bytes(serialization.Encoding.PEM))
    assert f"{new_path}: good" in _ocsp_status(servers, new_path)


def test_decommission_revokes_every_active_certificate_and_erases(servers: Servers) -> None:
    enrolled, _key = servers.enroll("DECOM-1")
    # A second active certificate of the device, issued by an operator.
    extra = issue_device(servers.ca, servers.work / "extra", "DECOM-1")
    for path in (enrolled, extra.path):
        assert f"{path}: good" in _ocsp_status(servers, path)
    db = Database(servers.ca.db_url())
    try:
        with session_scope(db) as s:
            events_before = s.execute(select(func.max(AuditEvent.seq))).scalar_one()
    finally:
        db.dispose()

    out = servers.ca.pki("device", "decommission", "DECOM-1").stdout

    serials = {
        format(x509.load_pem_x509_certificate(p.read_bytes()).serial_number, "x")
        for p in (enrolled, extra.path)
    }
    assert {line.split()[1] for line in out.splitlines() if line.startswith("revoked ")} == (
        serials
    )
    assert "erased: model, batch, 1 enrollment secret(s)" in out
    # OCSP says revoked at once (no CRL or pre-signing round in between).
    for path in (enrolled, extra.path):
        answer = _ocsp_status(servers, path)
        assert f"{path}: revoked" in answer and "Reason: cessationOfOperation" in answer
    shown = servers.ca.pki("device", "show", "DECOM-1").stdout
    assert '"model": null' in shown and '"batch": null' in shown
    assert '"state": "decommissioned"' in shown
    # The audit trail grew by what the decommission did, and is intact.
    db = Database(servers.ca.db_url())
    try:
        with session_scope(db) as s:
            actions = (
                s.execute(
                    select(AuditEvent.action)
                    .where(AuditEvent.seq > events_before)
                    .order_by(AuditEvent.seq)
                )
                .scalars()
                .all()
            )
    finally:
        db.dispose()
    assert actions == ["certificate.revoked", "certificate.revoked", "device.decommissioned"]
    servers.ca.pki("audit", "verify")
    assert servers.statuses("DECOM-1") == [(CertificateStatus.REVOKED, "cessationOfOperation")] * 2
