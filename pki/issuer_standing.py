"""Whether an issuer may still sign: its own certificate unexpired and not revoked, not retired.

RFC 5280 6.1.3 (a)(2): a certificate is valid only if "at the current time, the certificate
is not revoked", and (a)(2) of each path step asks the same of the CA above it; a CA whose
certificate is revoked or expired makes everything it signs fail path validation. Such an
issuer signs nothing: no device, server or OCSP-signer certificate. Neither does an issuer
retired by `pki issuer retire` (intermediate rollover), whose CRLs and OCSP answers are still
published for what it issued until the last of its certificates expires.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from cryptography import x509

from pki.errors import ErrorKind, PKIError, not_found
from pki.serial import serial_hex
from pki.store import Database, Session, audit, session_scope
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


def retirement_problem(session: Session, issuer_id: str) -> str | None:
    """Says that an issuer is retired, and since when, or None (read in the caller's session)."""
    record = IssuerRepository(session).find(issuer_id)
    if record is None or record.retired_at is None:
        return None
    return f"issuer {issuer_id} is retired since {record.retired_at:%Y-%m-%dT%H:%M:%SZ}"


class Retired(Exception):
    """Retired carries a retirement problem out of the transaction that found it."""


def refused(
    db: Database,
    at: datetime.datetime,
    actor: str,
    issuer_id: str,
    problem: str,
    details: dict[str, object],
) -> PKIError:
    """Audits an issuance a retired issuer refused (its own transaction); the error to raise."""
    with session_scope(db) as session:
        audit.append(
            session,
            at=at,
            actor=actor,
            action="refused.issuance",
            target=issuer_id,
            details={**details, "why": problem},
        )
    return unfit(problem)


def retire(db: Database, at: datetime.datetime, issuer_id: str, *, actor: str) -> None:
    """Marks an issuer retired: it issues nothing more; its revocation data stays served."""
    with session_scope(db) as session:
        record = IssuerRepository(session).find(issuer_id)
        if record is None:
            raise not_found(f"no such issuer: {issuer_id!r}")
        if record.retired_at is not None:
            raise PKIError(
                ErrorKind.CONFLICT,
                f"issuer {issuer_id} is already retired since "
                f"{record.retired_at:%Y-%m-%dT%H:%M:%SZ}",
            )
        record.retired_at = at
        audit.append(
            session, at=at, actor=actor, action="issuer.retired", target=issuer_id, details={}
        )


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
            problem = (
                expiry_problem(issuer_id, certificate, now)
                or revocation_problem(certificates, issuer_id, certificate)
                or retirement_problem(session, issuer_id)
            )
            if problem:
                found[issuer_id] = problem
    return found
