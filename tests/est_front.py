"""An EST front over an in-memory-key hierarchy, driven through Flask's test client."""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from api import errors
from api.est.views import create_blueprint
from pki.clock import SystemClock
from pki.device import DeviceService
from pki.enrollment import EnrollmentService
from pki.est_config import load_est_config
from pki.issuer import Issuer
from pki.revocation import RevocationService
from pki.store import CertificateRecord, Device, session_scope
from pki.store.enrollment_models import AuthFailure, EnrollmentSecret, PendingApproval
from tests.unit.pki.conftest import Hierarchy

EST = "/.well-known/est"


class _Issuers:
    def __init__(self, h: Hierarchy) -> None:
        self.by_id = {"root": h.root, "devices": h.devices}

    def issuer(self, issuer_id: str) -> Issuer:
        return self.by_id[issuer_id]


class ESTFront:
    """ESTFront is the EST blueprint of the CA front over a hierarchy, with a test client."""

    def __init__(self, h: Hierarchy) -> None:
        self.h = h
        self.est = load_est_config(h.config)
        clock = SystemClock()
        self.devices = DeviceService(h.db, clock, max_failures=self.est.max_failures)
        self.service = EnrollmentService(
            db=h.db,
            clock=clock,
            config=h.config,
            est=self.est,
            issuance=h.issuance,
            issuers=_Issuers(h),
            devices=self.devices,
            revocation=RevocationService(h.db, clock),
        )
        app = Flask("est-test")
        errors.install(app, plain=True)
        app.register_blueprint(create_blueprint(self.service, self.est))
        self.client: FlaskClient = app.test_client()

    def register(self, device_id: str, labels: list[str] | None = None, **attrs: Any) -> str:
        """Registers a device and draws its one-time secret (for `labels`, or the default)."""
        self.devices.add(device_id, actor="test", **attrs)
        return self.devices.new_secret(device_id, actor="test", labels=labels).secret

    def enroll(self, device_id: str, secret: str, csr_der: bytes, label: str = "") -> Any:
        """POSTs simpleenroll with HTTP Basic credentials."""
        auth = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
        path = f"{EST}/{label}/simpleenroll" if label else f"{EST}/simpleenroll"
        return self.client.post(
            path,
            data=base64.b64encode(csr_der),
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/pkcs10"},
        )

    def snapshot(self) -> tuple[list[Any], ...]:
        """Every row a request could add or change: certificates, devices, secrets, counters."""
        with session_scope(self.h.db) as s:
            return (
                [
                    (r.serial_hex, r.status, r.device_id)
                    for r in s.execute(select(CertificateRecord)).scalars()
                ],
                [(d.id, d.state, d.updated_at) for d in s.execute(select(Device)).scalars()],
                [(e.id, e.state, e.used_at) for e in s.execute(select(EnrollmentSecret)).scalars()],
                [(f.device_id, f.failures) for f in s.execute(select(AuthFailure)).scalars()],
                [(p.id, p.state) for p in s.execute(select(PendingApproval)).scalars()],
            )


def issued(response: Any) -> x509.Certificate:
    """The one certificate of a certs-only EST answer."""
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.data))
    return cert
