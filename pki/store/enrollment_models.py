"""SQLAlchemy models of enrollment: bindings, one-time secrets, login failures, approvals."""

from __future__ import annotations

import datetime
import enum

from sqlalchemy import BigInteger, Enum, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from pki.store.models import Base, UTCDateTime, _values


class SecretState(enum.Enum):
    """Lifecycle of a one-time secret: usable once, or replaced by a newer one."""

    ACTIVE = "active"
    USED = "used"
    REPLACED = "replaced"


class ApprovalState(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    ISSUED = "issued"


class EnrollmentSecret(Base):
    """EnrollmentSecret is a one-time enrollment secret, kept only as a hash."""

    __tablename__ = "enrollment_secrets"
    __table_args__ = (Index("ix_enrollment_secrets_device_state", "device_id", "state"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    # "sha256$hash-hex"; rows written before it: "scrypt$N$r$p$salt-hex$hash-hex".
    secret_hash: Mapped[str] = mapped_column(String(256))
    state: Mapped[SecretState] = mapped_column(
        Enum(
            SecretState, name="secret_state", native_enum=False, length=16, values_callable=_values
        )
    )
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    # The EST labels it is valid on, comma-separated; NULL: the default label only.
    labels: Mapped[str | None] = mapped_column(String(1024))
    # The certificate the secret bought: a retry with the same secret and key gets it again.
    certificate_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("certificates.id")
    )


class EnrollMethod(enum.Enum):
    """How a device proves itself on its initial enrollment (re-enrollment: its certificate)."""

    SECRET = "secret"  # noqa: S105 (a method name)
    IDEVID = "idevid"


class DeviceBinding(Base):
    """DeviceBinding says how a device may enroll: by secret, or by one manufacturer's IDevID.

    A device without a binding (registered before bindings existed) is bound by its first
    enrollment. For IDevID devices the IDevID itself is bound on first use.
    """

    __tablename__ = "device_bindings"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    method: Mapped[EnrollMethod] = mapped_column(
        Enum(
            EnrollMethod,
            name="enroll_method",
            native_enum=False,
            length=16,
            values_callable=_values,
        )
    )
    # SHA-256 of the manufacturer trust anchor's DER (hex), for IDevID devices.
    manufacturer_sha256: Mapped[str | None] = mapped_column(String(64))
    # SHA-256 of the bound IDevID certificate's DER (hex), set on its first enrollment.
    idevid_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    idevid_issuer: Mapped[str | None] = mapped_column(String(512))
    idevid_serial: Mapped[str | None] = mapped_column(String(64))
    bound_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


class AuthFailure(Base):
    """AuthFailure counts failed logins of one (device ID, source address), or of an address.

    The per-address counter has the empty device ID. The device ID is whatever the client
    sent (not a foreign key): an unknown ID is counted exactly like a known one.
    """

    __tablename__ = "login_failures"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


class PendingApproval(Base):
    """PendingApproval is an authenticated request that waits for an operator's approval."""

    __tablename__ = "pending_approvals"
    __table_args__ = (Index("ix_pending_approvals_device_state", "device_id", "state"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    label: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(16))  # simpleenroll | serverkeygen
    csr_sha256: Mapped[str] = mapped_column(String(64))
    csr_der: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[ApprovalState] = mapped_column(
        Enum(
            ApprovalState,
            name="approval_state",
            native_enum=False,
            length=16,
            values_callable=_values,
        )
    )
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)
    decided_by: Mapped[str | None] = mapped_column(String(128))
