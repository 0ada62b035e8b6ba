"""Repositories: the queries the domain needs, one class per table."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pki.errors import ErrorKind, PKIError, not_found
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

    def get(self, record_id: int) -> CertificateRecord:
        record = self.session.get(CertificateRecord, record_id)
        if record is None:
            raise not_found(f"no certificate record {record_id}")
        return record

    def by_serial(self, serial_hex: str, issuer_id: str | None = None) -> CertificateRecord:
        query = select(CertificateRecord).where(CertificateRecord.serial_hex == serial_hex)
        if issuer_id is not None:
            query = query.where(CertificateRecord.issuer_id == issuer_id)
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
