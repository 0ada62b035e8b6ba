"""Repositories: the queries the domain needs, one class per table."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pki.errors import ErrorKind, PKIError, conflict, not_found
from pki.store.models import CertificateRecord, CertificateStatus, IssuerRecord


def certificate_summary(r: CertificateRecord) -> dict[str, Any]:
    """Describes a certificate record as JSON-ready data (never the DER or TBS)."""
    return {
        "serial": r.serial_hex,
        "issuer": r.issuer_id,
        "status": r.status.value,
        "profile": r.profile,
        "subject": r.subject,
        "sans": json.loads(r.sans),
        "device_id": r.device_id,
        "not_before": r.not_before.isoformat(),
        "not_after": r.not_after.isoformat(),
        "fingerprint_sha256": r.fingerprint_sha256,
        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        "revocation_reason": r.revocation_reason,
    }


class IssuedSummary(NamedTuple):
    """IssuedSummary is what superseding needs to know of an issued device certificate."""

    id: int
    serial_hex: str
    issuer_id: str
    profile: str
    device_id: str | None
    issued_at: datetime.datetime | None


class DuplicateSerial(PKIError):
    """DuplicateSerial says the database refused a serial already used by the issuer."""

    def __init__(self, issuer_id: str, serial_hex: str) -> None:
        super().__init__(ErrorKind.CONFLICT, f"serial {serial_hex} already used by {issuer_id}")


def _is_serial_clash(e: IntegrityError) -> bool:
    text = str(e.orig).lower()
    return "uq_certificates_issuer_serial" in text or ("unique" in text and "serial_hex" in text)


class IssuerRepository:
    """IssuerRepository stores the CA certificates the service knows."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, issuer_id: str) -> IssuerRecord:
        record = self.session.get(IssuerRecord, issuer_id)
        if record is None:
            raise not_found(f"no such issuer: {issuer_id!r}")
        return record

    def find(self, issuer_id: str) -> IssuerRecord | None:
        return self.session.get(IssuerRecord, issuer_id)

    def all(self) -> Sequence[IssuerRecord]:
        return self.session.execute(select(IssuerRecord).order_by(IssuerRecord.id)).scalars().all()

    def add(self, record: IssuerRecord) -> IssuerRecord:
        self.session.add(record)
        self.session.flush()
        return record


class CertificateRepository:
    """CertificateRepository stores certificates from pending to issued to revoked."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add_pending(
        self,
        *,
        issuer_id: str,
        serial_hex: str,
        profile: str,
        subject: str,
        sans: list[str],
        device_id: str | None,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        tbs_der: bytes,
        at: datetime.datetime,
    ) -> CertificateRecord:
        record = CertificateRecord(
            issuer_id=issuer_id,
            serial_hex=serial_hex,
            profile=profile,
            status=CertificateStatus.PENDING,
            subject=subject,
            sans=json.dumps(sans),
            device_id=device_id,
            not_before=not_before,
            not_after=not_after,
            tbs_der=tbs_der,
            created_at=at,
        )
        self.session.add(record)
        try:
            self.session.flush()
        except IntegrityError as e:
            if _is_serial_clash(e):
                raise DuplicateSerial(issuer_id, serial_hex) from None
            raise
        return record

    def mark_issued(
        self, record_id: int, *, cert_der: bytes, fingerprint_sha256: str, at: datetime.datetime
    ) -> None:
        """Stores the signed certificate of a pending record in one UPDATE (no load first).

        A row a sweep marked abandoned while its request was still signing is recorded as
        issued too: a signed certificate is always recorded (record-before-sign), and
        "abandoned" means never signed. Any other state is a conflict the client may retry."""
        result = self.session.execute(
            update(CertificateRecord)
            .where(CertificateRecord.id == record_id)
            .where(
                CertificateRecord.status.in_(
                    [CertificateStatus.PENDING, CertificateStatus.ABANDONED]
                )
            )
            .values(
                status=CertificateStatus.ISSUED,
                cert_der=cert_der,
                fingerprint_sha256=fingerprint_sha256,
                issued_at=at,
            )
            .execution_options(synchronize_session=False)
        )
        if int(getattr(result, "rowcount", 0) or 0) != 1:
            raise conflict(f"certificate record {record_id} is no longer pending; retry later")

    def pending_of_device(self, device_id: str) -> Sequence[CertificateRecord]:
        """Lists a device's pending rows, newest first."""
        query = (
            select(CertificateRecord)
            .where(CertificateRecord.device_id == device_id)
            .where(CertificateRecord.status == CertificateStatus.PENDING)
            .order_by(CertificateRecord.id.desc())
        )
        return self.session.execute(query).scalars().all()

    def newest_issued(self, device_id: str, profile: str) -> CertificateRecord | None:
        """Returns a device's newest issued certificate of a profile, if any."""
        query = (
            select(CertificateRecord)
            .where(CertificateRecord.device_id == device_id)
            .where(CertificateRecord.profile == profile)
            .where(CertificateRecord.status == CertificateStatus.ISSUED)
            .order_by(CertificateRecord.id.desc())
            .limit(1)
        )
        return self.session.execute(query).scalar_one_or_none()

    def stale_pending(self, created_before: datetime.datetime) -> Sequence[CertificateRecord]:
        """Lists pending rows recorded before a time, oldest first."""
        query = (
            select(CertificateRecord)
            .where(CertificateRecord.status == CertificateStatus.PENDING)
            .where(CertificateRecord.created_at < created_before)
            .order_by(CertificateRecord.id)
        )
        return self.session.execute(query).scalars().all()

    def abandon(self, record_id: int) -> bool:
        """Marks a pending row abandoned (never released); False if it is no longer pending."""
        result = self.session.execute(
            update(CertificateRecord)
            .where(CertificateRecord.id == record_id)
            .where(CertificateRecord.status == CertificateStatus.PENDING)
            .values(status=CertificateStatus.ABANDONED)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0) == 1

    def issued_of_device(self, device_id: str | None) -> list[IssuedSummary]:
        """Lists the issued certificates of one device (None: of every device), oldest first."""
        query = select(
            CertificateRecord.id,
            CertificateRecord.serial_hex,
            CertificateRecord.issuer_id,
            CertificateRecord.profile,
            CertificateRecord.device_id,
            CertificateRecord.issued_at,
        ).where(CertificateRecord.status == CertificateStatus.ISSUED)
        if device_id is not None:
            query = query.where(CertificateRecord.device_id == device_id)
        else:
            query = query.where(CertificateRecord.device_id.is_not(None))
        rows = self.session.execute(query.order_by(CertificateRecord.id))
        return [IssuedSummary(*row) for row in rows]

    def issued_der_of_device(self, device_id: str) -> list[bytes]:
        """Returns the DER of a device's issued (not revoked) certificates, newest first."""
        rows = self.session.execute(
            select(CertificateRecord.cert_der)
            .where(
                CertificateRecord.device_id == device_id,
                CertificateRecord.status == CertificateStatus.ISSUED,
            )
            .order_by(CertificateRecord.id.desc())
        )
        return [der for (der,) in rows if der is not None]

    def issuer_revocation(self, issuer_id: str, serial_hex: str) -> str | None:
        """Returns the revocation reason of an issuer's own certificate, None while it stands.

        One indexed lookup: the certificate is the one with the issuer's serial under its
        parent (a root's under itself); an issuer whose certificate was never recorded here
        (imported) stands."""
        parent = (
            select(func.coalesce(IssuerRecord.parent_id, IssuerRecord.id))
            .where(IssuerRecord.id == issuer_id)
            .scalar_subquery()
        )
        row = self.session.execute(
            select(CertificateRecord.status, CertificateRecord.revocation_reason).where(
                CertificateRecord.issuer_id == parent, CertificateRecord.serial_hex == serial_hex
            )
        ).first()
        if row is None or row[0] is not CertificateStatus.REVOKED:
            return None
        return str(row[1] or "unspecified")

    def get(self, record_id: int) -> CertificateRecord:
        record = self.session.get(CertificateRecord, record_id)
        if record is None:
            raise not_found(f"no certificate record {record_id}")
        return record

    def by_serial(
        self, serial_hex: str, issuer_id: str | None = None, *, for_update: bool = False
    ) -> CertificateRecord:
        """Finds a certificate by serial; for_update locks its row until the transaction ends.

        The lock makes a read-decide-write (a revocation's reason rules) see the row as the
        last committer left it (PostgreSQL SELECT ... FOR UPDATE; SQLite's write transaction
        already holds the database's write lock, and SQLAlchemy omits the clause there)."""
        query = select(CertificateRecord).where(CertificateRecord.serial_hex == serial_hex)
        if issuer_id is not None:
            query = query.where(CertificateRecord.issuer_id == issuer_id)
        if for_update:
            # populate_existing: a row already in the session is refreshed from the locked read.
            query = query.with_for_update().execution_options(populate_existing=True)
        records = self.session.execute(query).scalars().all()
        if not records:
            raise not_found(f"no certificate with serial {serial_hex}")
        if len(records) > 1:
            raise not_found(f"serial {serial_hex} is ambiguous: name the issuer")
        return records[0]

    def list(
        self,
        *,
        device_id: str | None = None,
        status: CertificateStatus | None = None,
        issuer_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Sequence[CertificateRecord]:
        query = select(CertificateRecord)
        if device_id is not None:
            query = query.where(CertificateRecord.device_id == device_id)
        if status is not None:
            query = query.where(CertificateRecord.status == status)
        if issuer_id is not None:
            query = query.where(CertificateRecord.issuer_id == issuer_id)
        query = query.order_by(CertificateRecord.id).limit(limit).offset(offset)
        return self.session.execute(query).scalars().all()
