"""Enrollment that survives failures and races: one request per device, retries complete.

DESIGN.md invariant 2, "failures never strand a device". A request runs the issuance
cycle (docs/issuance-cycle.md) under the device's lock (pki.store.device_lock), taken
after authentication and the CSR checks and before anything is recorded or signed:

- A second request for the device while one is in flight gets a conflict (409) at once;
  nothing is recorded or signed for it.
- The one-time secret is spent, the device marked enrolled and the approval used in the
  transaction that records the certificate as issued, never earlier: a request that fails
  after its pending record leaves the secret usable.
- Under the lock no other request of the device is in flight, so every pending row of the
  device was left by a request that failed. A retry with the same public key completes the
  newest such row (built and linted again, and signed only if its TBS is the recorded
  one); the others are abandoned (audited) when the retry's certificate is recorded.
- A retry whose certificate was issued but never reached the device (same secret or same
  current certificate, same public key) gets that certificate again.
"""

from __future__ import annotations

import dataclasses
import hashlib

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from pki.clock import Clock
from pki.config import ProfileConfig
from pki.csr import CertificateRequest
from pki.device import BAD_SECRET, DeviceService, forbidden, unauthorized
from pki.errors import conflict
from pki.idevid import IDevID
from pki.issuer import IssuanceService, Issued, Issuer
from pki.serial import serial_hex
from pki.store import CertificateRecord, CertificateStatus, Database, Session, audit, session_scope
from pki.store.device_lock import device_lock
from pki.store.enrollment_models import ApprovalState, SecretState
from pki.store.enrollment_repository import ApprovalRepository, SecretRepository
from pki.store.repository import CertificateRepository


@dataclasses.dataclass(frozen=True)
class Grant:
    """Grant is an authenticated, checked request: who asked, how, and what it renews."""

    label: str
    device_id: str
    method: str
    secret_id: int | None = None
    register: bool = False
    # The manufacturer certificate an IDevID enrollment authenticated with (bound on use).
    idevid: IDevID | None = None
    # SHA-256 of the approved CSR on a label with manual approval (not for re-enrollment).
    approval_digest: str | None = None
    # Re-enrollment: the serial of the certificate being renewed.
    renews: str | None = None


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tbs_spki(tbs_der: bytes) -> bytes:
    return bytes(asn1_x509.TbsCertificate.load(tbs_der)["subject_public_key_info"].dump())


def _issued(record_id: int, serial_hex: str, cert_der: bytes) -> Issued:
    cert = x509.load_der_x509_certificate(cert_der)
    return Issued(
        cert, cert_der, record_id, int(serial_hex, 16), hashlib.sha256(cert_der).hexdigest()
    )


class EnrollmentCycle:
    """EnrollmentCycle issues a device's certificate under its lock, completing retries."""

    def __init__(
        self, db: Database, clock: Clock, issuance: IssuanceService, devices: DeviceService
    ) -> None:
        self.db = db
        self.clock = clock
        self.issuance = issuance
        self.devices = devices

    def issue(
        self, grant: Grant, issuer: Issuer, profile: ProfileConfig, request: CertificateRequest
    ) -> Issued:
        """Issues (or completes, or hands out again) the device's certificate for a request."""
        actor = f"est:{grant.label}"
        spki = _spki(request.public_key)
        with device_lock(self.db, grant.device_id) as session:
            # Reads on a session of their own: on SQLite the lock's session must not begin
            # its write transaction before the pending row is committed.
            with self.db.read_session() as reader:
                certs = CertificateRepository(reader)
                newest = certs.newest_issued(grant.device_id, profile.name)
                newest_row = (
                    (newest.id, newest.serial_hex, newest.cert_der) if newest is not None else None
                )
                stranded = list(certs.pending_of_device(grant.device_id))
                for row in stranded:
                    reader.expunge(row)
                secret = (
                    SecretRepository(reader).get(grant.secret_id)
                    if grant.secret_id is not None
                    else None
                )
                secret_state = secret.state if secret is not None else None
            if grant.secret_id is not None and secret_state is not SecretState.ACTIVE:
                # Spent (or replaced) since authentication, by a request that held the lock
                # before this one: nothing is recorded or signed for this one.
                return self.resend(grant, request)
            # Only the device's newest certificate renews (RFC 7030 4.2.2 names one
            # successor): another request renewed it first, and only that request's own
            # retry (same key) gets the successor.
            if grant.renews is not None and newest_row is None:
                raise forbidden(f"the client certificate {grant.renews} is revoked")
            if (
                grant.renews is not None
                and newest_row is not None
                and newest_row[1] != grant.renews
            ):
                record_id, serial, cert_der = newest_row
                if cert_der is not None:
                    key = x509.load_der_x509_certificate(cert_der).public_key()
                    if _spki(key) == spki:
                        return _issued(record_id, serial, cert_der)
                raise conflict(
                    f"the client certificate {grant.renews} is superseded by a newer one "
                    f"(serial {serial})"
                )
            resumable = next(
                (
                    r
                    for r in stranded
                    if r.profile == profile.name
                    and r.issuer_id == issuer.issuer_id
                    and _tbs_spki(r.tbs_der) == spki
                ),
                None,
            )

            abandoned: list[CertificateRecord] = []

            def on_issued(record_id: int) -> None:
                others = [r for r in stranded if r.id != record_id]
                abandoned.extend(self._record(session, grant, record_id, others))

            issued = None
            if resumable is not None:
                issued = self.issuance.complete(
                    issuer,
                    profile,
                    request,
                    resumable,
                    actor=actor,
                    issued_session=session,
                    on_issued=on_issued,
                )
            if issued is None:
                issued = self.issuance.issue(
                    issuer,
                    profile,
                    request,
                    actor=actor,
                    issued_session=session,
                    on_issued=on_issued,
                )
            self._audit(session, grant, issued, abandoned)
        return issued

    def resend(self, grant: Grant, request: CertificateRequest) -> Issued:
        """Hands out again the certificate a spent secret bought, to a request with its key."""
        assert grant.secret_id is not None
        with self.db.read_session() as session:
            secret = SecretRepository(session).get(grant.secret_id)
            certificate_id = secret.certificate_id if secret is not None else None
            record = (
                CertificateRepository(session).get(certificate_id)
                if certificate_id is not None
                else None
            )
            found = (
                (record.id, record.serial_hex, record.cert_der, record.status)
                if record is not None
                else None
            )
        if found is None or found[3] is not CertificateStatus.ISSUED or found[2] is None:
            raise unauthorized(BAD_SECRET)
        record_id, serial, cert_der, _status = found
        assert cert_der is not None
        if _spki(x509.load_der_x509_certificate(cert_der).public_key()) != _spki(
            request.public_key
        ):
            raise unauthorized(BAD_SECRET)
        now = self.clock.now()
        with session_scope(self.db) as session:
            audit.append(
                session,
                at=now,
                actor=f"device:{grant.device_id}",
                action="enrollment.resent",
                target=grant.device_id,
                details={"label": grant.label, "serial": serial},
            )
        return _issued(record_id, serial, cert_der)

    def _record(
        self,
        session: Session,
        grant: Grant,
        record_id: int,
        stranded: list[CertificateRecord],
    ) -> list[CertificateRecord]:
        # The issued transaction: the secret is spent, the device enrolled, the approval
        # used and the stranded rows abandoned only together with the issued certificate.
        self.devices.record_enrollment(
            session,
            grant.device_id,
            grant.secret_id,
            record_id,
            register=grant.register,
            idevid=grant.idevid,
        )
        if grant.approval_digest is not None:
            approval = ApprovalRepository(session).find(
                grant.device_id, grant.label, grant.approval_digest
            )
            if approval is None or approval.state is not ApprovalState.APPROVED:
                raise forbidden("the request is no longer approved")
            approval.state = ApprovalState.ISSUED
        certs = CertificateRepository(session)
        return [row for row in stranded if certs.abandon(row.id)]

    def _audit(
        self, session: Session, grant: Grant, issued: Issued, abandoned: list[CertificateRecord]
    ) -> None:
        now = self.clock.now()
        for row in abandoned:
            audit.append(
                session,
                at=now,
                actor=f"device:{grant.device_id}",
                action="certificate.abandoned",
                target=f"{row.issuer_id}/{row.serial_hex}",
                details={"device_id": grant.device_id, "why": "superseded by a retry"},
            )
        audit.append(
            session,
            at=now,
            actor=f"device:{grant.device_id}",
            action="device.enrolled",
            target=grant.device_id,
            details={
                "label": grant.label,
                "method": grant.method,
                "serial": serial_hex(issued.serial),
            },
        )
