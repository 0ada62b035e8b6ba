"""Whether an issuer may still sign: its own certificate unexpired and not revoked.

RFC 5280 6.1.3 (a)(2): a certificate is valid only if "at the current time, the certificate
is not revoked", and (a)(2) of each path step asks the same of the CA above it; a CA whose
certificate is revoked or expired makes everything it signs fail path validation. Such an
issuer signs nothing: no device, server or OCSP-signer certificate.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from cryptography import x509

from pki.errors import ErrorKind, PKIError
from pki.serial import serial_hex
from pki.store import Database
from pki.store.repository import CertificateRepository, IssuerRepository


def expiry_problem(
    issuer_id: str, certificate: x509.Certificate, now: datetime.datetime
) -> str | None:
    """Says why an issuer's certificate is out of its validity period, or None."""
    not_after = certificate.not_valid_after_utc
    if now >= not_after:
        return f"issuer {issuer_id}'s certificate expired at {not_after:%Y-%m-%dT%H:%M:%SZ}"
    return None


def revocation_problem(
    certificates: CertificateRepository, issuer_id: str, certificate: x509.Certificate
) -> str | None:
    """Says that an issuer's certificate is revoked, and why, or None (one indexed lookup)."""
    reason = certificates.issuer_revocation(issuer_id, serial_hex(certificate.serial_number))
    if reason is None:
        return None
    return f"issuer {issuer_id}'s certificate is revoked ({reason})"


def unfit(problem: str) -> PKIError:
    """The error of an issuer that may not sign: the service cannot issue (503)."""
    return PKIError(ErrorKind.UNAVAILABLE, f"{problem}: it issues nothing")


def problems(db: Database, now: datetime.datetime, issuer_ids: Iterable[str]) -> dict[str, str]:
    """Says, per issuer that may not sign, why; from the store alone (no token needed)."""
    found: dict[str, str] = {}
    with db.read_session() as session:
        certificates = CertificateRepository(session)
        issuers = IssuerRepository(session)
        for issuer_id in issuer_ids:
            record = issuers.find(issuer_id)
            if record is None or record.cert_der is None:
                continue
            certificate = x509.load_der_x509_certificate(record.cert_der)
            problem = expiry_problem(issuer_id, certificate, now) or revocation_problem(
                certificates, issuer_id, certificate
            )
            if problem:
                found[issuer_id] = problem
    return found
