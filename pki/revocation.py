"""Revocation: marking certificates revoked in the store, audited, with listeners told."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cryptography import x509

from pki.clock import Clock
from pki.errors import bad_request, conflict
from pki.store import CertificateStatus, Database, DeviceState, audit, session_scope
from pki.store.models import Device
from pki.store.repository import CertificateRepository

REASONS = {r.value: r for r in x509.ReasonFlags}


def parse_reason(text: str) -> x509.ReasonFlags:
    """Parses a reason given by RFC 5280 name (keyCompromise, superseded, ...)."""
    try:
        return REASONS[text]
    except KeyError:
        allowed = ", ".join(sorted(REASONS))
        raise bad_request(f"unknown revocation reason {text!r} (one of: {allowed})") from None


@dataclasses.dataclass(frozen=True)
class Revoked:
    """Revoked describes a revocation that is now committed."""

    issuer_id: str
    serial_hex: str
    reason: x509.ReasonFlags
    changed: bool  # False when the certificate already stood revoked for that reason


RevocationListener = Callable[[Revoked], None]


class RevocationService:
    """RevocationService revokes certificates; listeners re-sign OCSP and schedule CRLs."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self.listeners: list[RevocationListener] = []

    def revoke(
        self, serial_hex: str, reason: x509.ReasonFlags, *, actor: str, issuer_id: str | None = None
    ) -> Revoked:
        """Revokes a certificate; idempotent, and a reason may only be raised to keyCompromise."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            record = CertificateRepository(session).by_serial(serial_hex, issuer_id)
            if record.status is CertificateStatus.PENDING:
                raise conflict(f"certificate {serial_hex} was never issued")
            changed = True
            if record.status is CertificateStatus.REVOKED:
                current = REASONS.get(record.revocation_reason or "unspecified")
                if current == reason:
                    changed = False
                elif reason is x509.ReasonFlags.key_compromise:
                    pass  # RFC 5280 allows a later, graver reason; the date stays
                else:
                    raise conflict(
                        f"certificate {serial_hex} is already revoked "
                        f"({record.revocation_reason}); only keyCompromise may follow"
                    )
            if changed:
                if record.revoked_at is None:
                    record.revoked_at = now
                record.status = CertificateStatus.REVOKED
                record.revocation_reason = reason.value
                if record.device_id is not None:
                    device = session.get(Device, record.device_id)
                    if device is not None and reason is not x509.ReasonFlags.superseded:
                        device.state = DeviceState.REVOKED
                        device.updated_at = now
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="certificate.revoked",
                    target=f"{record.issuer_id}/{serial_hex}",
                    details={"reason": reason.value},
                )
            result = Revoked(record.issuer_id, serial_hex, reason, changed)
        for listener in self.listeners:
            listener(result)
        return result
