"""Helpers for the revocation, CRL publisher and OCSP responder tests (no tests here)."""

from __future__ import annotations

import datetime
import threading

from asn1crypto import ocsp as asn1_ocsp
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from pki.ceremony import CeremonyService
from pki.csr import check_request, load_csr
from pki.issuer import IssuanceService, Issued
from pki.ocsp import CertID
from pki.store import Device, DeviceState, session_scope
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy


class MovableClock:
    """MovableClock starts at the real time and moves only when a test says so."""

    def __init__(self) -> None:
        self._at = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self._lock = threading.Lock()

    def now(self) -> datetime.datetime:
        with self._lock:
            return self._at

    def advance(self, delta: datetime.timedelta) -> None:
        with self._lock:
            self._at += delta


def fast_issuance(h: Hierarchy) -> IssuanceService:
    """Issuance without pkilint, for tests that need many certificates quickly."""
    return IssuanceService(h.db, h.issuance.clock, h.config.ca.urls, lint_certificates=False)


def register_device(h: Hierarchy, device_id: str, batch: str | None = None) -> None:
    now = datetime.datetime.now(datetime.UTC)
    with session_scope(h.db) as s:
        s.add(
            Device(
                id=device_id,
                model="sensor",
                batch=batch,
                state=DeviceState.ENROLLED,
                created_at=now,
                updated_at=now,
            )
        )


def issue_device(
    h: Hierarchy, device_id: str = "DEV-0001", issuance: IssuanceService | None = None
) -> Issued:
    csr, _ = device_csr(device_id)
    profile = h.config.profile("device")
    request = check_request(load_csr(der(csr)), profile)
    return (issuance or h.issuance).issue(h.devices, profile, request, actor="test")


def add_ocsp_signer(
    h: Hierarchy, keys: dict[str, CertificateIssuerPrivateKeyTypes], issuer: str = "devices"
) -> Issued:
    """Issues an OCSP-signer certificate with an in-memory key, named memory:<serial> in keys."""
    key = ec.generate_private_key(ec.SECP256R1())
    uri = f"memory:{issuer}-ocsp-{len(keys)}"
    keys[uri] = key
    ca = h.devices if issuer == "devices" else h.root
    return CeremonyService(h.issuance).ocsp_signer(
        ca, h.config.profile("ocsp-signer"), key, key_uri=uri, actor="test"
    )


def ocsp_request(cert_ids: list[CertID], nonce: bytes | None = None) -> bytes:
    """Builds a DER OCSPRequest for CertIDs, with an RFC 8954 nonce when given."""
    tbs: dict[str, object] = {
        "request_list": [{"req_cert": asn1_ocsp.CertId.load(c.der)} for c in cert_ids]
    }
    if nonce is not None:
        tbs["request_extensions"] = [{"extn_id": "nonce", "extn_value": nonce}]
    return bytes(asn1_ocsp.OCSPRequest({"tbs_request": tbs}).dump())
