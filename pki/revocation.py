"""Revocation: marking certificates revoked in the store, audited, with listeners told.

A revocation is a database write and nothing more (Boulder's way): in the same transaction
it records a revocation event (for delta CRLs), advances the issuer's revocation marker (which
makes the next CRL due, pki/crl_publisher.py) and forgets the certificate's pre-signed OCSP
response, so the validation authority answers the next request live from the certificates
table and says `revoked` from the moment of the commit, even when the revoking process holds
no OCSP signer key. Listeners then re-sign the response or schedule a CRL where they can.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.clock import Clock
from pki.errors import ErrorKind, PKIError, bad_request, conflict, not_found
from pki.store import (
    CertificateRecord,
    CertificateStatus,
    Database,
    DeviceState,
    Session,
    audit,
    session_scope,
)
from pki.store.revocation_models import RevocationStore

REASONS = {r.value: r for r in x509.ReasonFlags}
# removeFromCRL is a delta CRL marker, not a reason to revoke for (RFC 5280 §5.3.1).
REVOCATION_REASONS = {k: v for k, v in REASONS.items() if v is not x509.ReasonFlags.remove_from_crl}

# The profile of OCSP-signer certificates (RFC 6960 §4.2.2.2 delegated responders).
OCSP_SIGNER_PROFILE = "ocsp-signer"

# Bulk revocations touch at most this many certificates per call.
MAX_BULK = 100_000

# What a certificate is used for, when revoking it takes more than an ordinary revocation.
_GUARDED_USES = {
    ExtendedKeyUsageOID.OCSP_SIGNING: "an OCSP-signer",
    ExtendedKeyUsageOID.SERVER_AUTH: "a TLS-server",
}


def guarded_kind(record: CertificateRecord) -> str | None:
    """Names what a certificate is when revoking it needs the admin role or --ca, else None.

    CA certificates, OCSP signers, TLS servers (the CA front's and brokers') and every
    certificate whose key this CA holds in its token: revoking one stops the service or a
    broker, not one device.
    """
    if record.key_uri is not None:
        return "a token-key"
    if record.cert_der is None:
        return None
    cert = x509.load_der_x509_certificate(record.cert_der)
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "a CA"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return next((name for oid, name in _GUARDED_USES.items() if oid in usages), None)


def _check_guarded(record: CertificateRecord, allow_guarded: bool, verb: str) -> None:
    kind = guarded_kind(record)
    if kind is not None and not allow_guarded:
        raise PKIError(
            ErrorKind.FORBIDDEN,
            f"certificate {record.serial_hex} is {kind} certificate: to {verb} it needs the "
            "admin role (admin API) or --ca (pki command)",
        )


def parse_reason(text: str) -> x509.ReasonFlags:
    """Parses a reason given by RFC 5280 name (keyCompromise, superseded, ...)."""
    try:
        return REVOCATION_REASONS[text]
    except (KeyError, TypeError):
        allowed = ", ".join(sorted(REVOCATION_REASONS))
        raise bad_request(
            f"unknown revocation reason {str(text)[:40]!r} (one of: {allowed})"
        ) from None


@dataclasses.dataclass(frozen=True)
class Revoked:
    """Revoked describes a revocation that is now committed."""

    issuer_id: str
    serial_hex: str
    reason: x509.ReasonFlags
    changed: bool  # False when the certificate already stood revoked for that reason


RevocationListener = Callable[[Revoked], None]


@dataclasses.dataclass(frozen=True)
class BulkRevoked:
    """BulkRevoked lists what one bulk revocation changed."""

    revoked: tuple[Revoked, ...]
    devices: tuple[str, ...]


class RevocationService:
    """RevocationService revokes certificates; listeners re-sign OCSP and schedule CRLs."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self.listeners: list[RevocationListener] = []

    def revoke(
        self,
        serial_hex: str,
        reason: x509.ReasonFlags,
        *,
        actor: str,
        issuer_id: str | None = None,
        allow_guarded: bool = False,
    ) -> Revoked:
        """Revokes a certificate; idempotent, and a reason may only be raised to keyCompromise.

        A certificate on hold (certificateHold) may also be revoked for good with any reason,
        as RFC 5280 §5.3.1 lets a hold become permanent. A CA, OCSP-signer, TLS-server or
        token-key certificate (guarded_kind) is revoked only with allow_guarded.
        """
        _check_reason(reason)
        now = self.clock.now()
        with session_scope(self.db) as session:
            store = RevocationStore(session)
            record = store.certificates.by_serial(serial_hex, issuer_id, for_update=True)
            _check_guarded(record, allow_guarded, "revoke")
            result = _revoke_record(store, record, reason, now)
            if result.changed:
                store.write_changes()
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="certificate.revoked",
                    target=f"{record.issuer_id}/{record.serial_hex}",
                    details={"reason": reason.value},
                )
        self._tell(result)
        return result

    def revoke_devices(
        self,
        *,
        device_ids: Sequence[str] = (),
        batch: str | None = None,
        reason: x509.ReasonFlags,
        actor: str,
    ) -> BulkRevoked:
        """Revokes every issued certificate of the listed devices or of a batch, in one audited
        transaction: all of them or none."""
        _check_reason(reason)
        if bool(device_ids) == (batch is not None):
            raise bad_request("name either devices or a batch")
        now = self.clock.now()
        with session_scope(self.db) as session:
            store = RevocationStore(session)
            reader = store.reader
            devices = list(device_ids) if batch is None else reader.devices_of_batch(batch)
            if not devices:
                raise not_found(f"no devices in batch {batch!r}")
            if len(devices) > MAX_BULK:
                raise bad_request(f"at most {MAX_BULK} devices per bulk revocation")
            known = store.known_devices(devices)
            records = reader.active_of_devices(devices)
            if batch is None and not records and not known:
                raise not_found("none of the devices is known")
            results = tuple(_revoke_record(store, r, reason, now) for r in records)
            for device_id in known:
                _set_device(store, device_id, reason, now)
            # One marker step per issuer for the whole list: the next CRL holds all or none.
            store.write_changes()
            audit.append(
                session,
                at=now,
                actor=actor,
                action="certificate.bulk_revoked",
                target=f"batch/{batch}" if batch is not None else "devices",
                details={
                    "reason": reason.value,
                    "devices": sorted(devices),
                    "certificates": [f"{r.issuer_id}/{r.serial_hex}" for r in results],
                },
            )
        for result in results:
            self._tell(result)
        return BulkRevoked(results, tuple(sorted(devices)))

    def release(
        self,
        serial_hex: str,
        *,
        actor: str,
        issuer_id: str | None = None,
        allow_guarded: bool = False,
    ) -> Revoked:
        """Releases a certificate from certificateHold; the next delta CRL says removeFromCRL."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            store = RevocationStore(session)
            record = store.certificates.by_serial(serial_hex, issuer_id, for_update=True)
            _check_guarded(record, allow_guarded, "release")
            if (
                record.status is not CertificateStatus.REVOKED
                or record.revocation_reason != x509.ReasonFlags.certificate_hold.value
            ):
                raise conflict(f"certificate {record.serial_hex} is not on hold")
            record.status = CertificateStatus.ISSUED
            record.revoked_at = None
            record.revocation_reason = None
            store.events.add(record, "released", None, now)
            if record.device_id is not None:
                device = store.device(record.device_id)
                if device is not None and device.state is DeviceState.SUSPENDED:
                    device.state = DeviceState.ENROLLED
                    device.updated_at = now
            store.write_changes()
            audit.append(
                session,
                at=now,
                actor=actor,
                action="certificate.released",
                target=f"{record.issuer_id}/{record.serial_hex}",
                details={},
            )
            result = Revoked(
                record.issuer_id, record.serial_hex, x509.ReasonFlags.remove_from_crl, True
            )
        self._tell(result)
        return result

    def revoke_device_in(
        self, session: Session, device_id: str, reason: x509.ReasonFlags, now: datetime.datetime
    ) -> list[Revoked]:
        """Revokes every active certificate of a device (issued, or on hold) in the caller's
        transaction; the caller audits, commits and then calls `notify`."""
        _check_reason(reason)
        store = RevocationStore(session)
        records = store.reader.active_of_devices([device_id])
        results = [_revoke_record(store, r, reason, now) for r in records]
        # Like every revoking transaction: events stored, markers advanced (the next CRLs are
        # due), stale pre-signed responses dropped (docs/revocation.md).
        store.write_changes()
        return results

    def notify(self, results: Sequence[Revoked]) -> None:
        """Tells the listeners (OCSP re-signing, CRL scheduling) of committed revocations."""
        for result in results:
            self._tell(result)

    def _tell(self, result: Revoked) -> None:
        for listener in self.listeners:
            listener(result)


def _check_reason(reason: x509.ReasonFlags) -> None:
    if not isinstance(reason, x509.ReasonFlags) or reason is x509.ReasonFlags.remove_from_crl:
        raise bad_request("removeFromCRL is not a revocation reason")


def _revoke_record(
    store: RevocationStore,
    record: CertificateRecord,
    reason: x509.ReasonFlags,
    now: datetime.datetime,
) -> Revoked:
    """Marks one certificate revoked in the store's transaction; no commit, no audit.

    The record must have been read under a row lock (by_serial(for_update=True)): the rules
    below decide on its current state, and two revocations at once must not both decide on
    the state before either committed (a lost update would replace keyCompromise)."""
    serial_hex = record.serial_hex
    if record.status in (CertificateStatus.PENDING, CertificateStatus.ABANDONED):
        raise conflict(f"certificate {serial_hex} was never issued")
    changed = True
    action = "revoked"
    if record.status is CertificateStatus.REVOKED:
        current = REASONS.get(record.revocation_reason or "unspecified")
        if current == reason:
            changed = False
        elif reason is x509.ReasonFlags.key_compromise:
            action = "reason_changed"  # RFC 5280 allows a later, graver reason; the date stays
        elif current is x509.ReasonFlags.certificate_hold:
            action = "reason_changed"  # a hold made permanent (RFC 5280 §5.3.1)
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
        # write_changes() also drops the stored response: a "good" one must not outlive this
        # commit (invariant 5).
        store.events.add(record, action, reason.value, now)
        if record.profile == OCSP_SIGNER_PROFILE:
            # Invariant 5, a revoked signer is never used again: what it pre-signed goes in
            # the same commit, and the next pre-signing run signs it anew with a valid signer.
            store.responses.forget_signed_by(record.issuer_id, serial_hex)
        if record.device_id is not None:
            _set_device(store, record.device_id, reason, now)
    return Revoked(record.issuer_id, serial_hex, reason, changed)


def _set_device(
    store: RevocationStore, device_id: str, reason: x509.ReasonFlags, now: datetime.datetime
) -> None:
    device = store.device(device_id)
    if device is None or reason is x509.ReasonFlags.superseded:
        return
    if reason is x509.ReasonFlags.certificate_hold:
        if device.state is DeviceState.ENROLLED:
            device.state = DeviceState.SUSPENDED
            device.updated_at = now
        return
    if device.state is not DeviceState.DECOMMISSIONED:
        device.state = DeviceState.REVOKED
        device.updated_at = now
