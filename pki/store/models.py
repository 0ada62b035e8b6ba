"""SQLAlchemy models of issuers, certificates, devices and the audit log."""

from __future__ import annotations

import datetime
import enum

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """UTCDateTime stores aware datetimes as naive UTC and gives them back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(
        self, value: datetime.datetime | None, dialect: object
    ) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(datetime.UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: datetime.datetime | None, dialect: object
    ) -> datetime.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC)


def _values(e: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in e]


class Base(DeclarativeBase):
    pass


class CertificateStatus(enum.Enum):
    """Lifecycle of a certificate row; `pending` rows have a TBS but no signature yet.

    An `abandoned` row is a pending one that was never released: its request failed and
    was superseded by a retry with another key, or it outlived the sweep age.
    """

    PENDING = "pending"
    ISSUED = "issued"
    REVOKED = "revoked"
    ABANDONED = "abandoned"


class DeviceState(enum.Enum):
    REGISTERED = "registered"
    ENROLLED = "enrolled"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    DECOMMISSIONED = "decommissioned"


class IssuerRecord(Base):
    """IssuerRecord is a CA this service signs with (or whose certificates it knows)."""

    __tablename__ = "issuers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("issuers.id"))
    subject: Mapped[str] = mapped_column(Text)
    key_uri: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # root | intermediate
    # Empty while the issuer's own certificate is still pending (a root ceremony records
    # the issuer before its self-signed certificate is signed).
    cert_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    fingerprint_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    # Advanced by every transaction that changes the revocation state of a certificate of this
    # issuer. The row lock of the update orders those transactions, so the values follow the
    # commit order: a CRL that read marker M holds every change up to M (pki/crl_publisher.py).
    revocation_marker: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Set by `pki issuer retire`: the issuer signs nothing more; its CRLs and OCSP answers
    # are still published for what it issued.
    retired_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


class CertificateRecord(Base):
    """CertificateRecord is one certificate, recorded as pending before it is signed."""

    __tablename__ = "certificates"
    __table_args__ = (
        # Serial numbers are unique per issuer: RFC 5280 4.1.2.2 "It MUST be unique for
        # each certificate issued by a given CA". The database enforces it, not the code.
        UniqueConstraint("issuer_id", "serial_hex", name="uq_certificates_issuer_serial"),
        Index("ix_certificates_device", "device_id"),
        Index("ix_certificates_status", "issuer_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    serial_hex: Mapped[str] = mapped_column(String(40))
    profile: Mapped[str] = mapped_column(String(64))
    status: Mapped[CertificateStatus] = mapped_column(
        Enum(
            CertificateStatus,
            name="certificate_status",
            native_enum=False,
            length=16,
            values_callable=_values,
        )
    )
    subject: Mapped[str] = mapped_column(Text)
    sans: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of "type:value"
    device_id: Mapped[str | None] = mapped_column(String(128))
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    tbs_der: Mapped[bytes] = mapped_column(LargeBinary)
    cert_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    fingerprint_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    # Set for certificates whose key this CA holds in its token (OCSP signers).
    key_uri: Mapped[str | None] = mapped_column(Text)


class Device(Base):
    """Device is a registered device identity, its state and its enrollment secret hash."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(128))
    batch: Mapped[str | None] = mapped_column(String(128), index=True)
    state: Mapped[DeviceState] = mapped_column(
        Enum(
            DeviceState, name="device_state", native_enum=False, length=16, values_callable=_values
        )
    )
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """AuditEvent is one append-only, hash-chained entry of the audit log."""

    __tablename__ = "audit_events"

    # seq is assigned as predecessor + 1 and is unique, so a deleted row leaves a gap.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """AuditHead is the single row that appenders lock to chain events one at a time."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """AuditCheckpoint is the chain's head at one moment, signed with the audit key."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), index=True)
    event_hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
