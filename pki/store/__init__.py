"""Storage of the CA: SQLAlchemy models, the database handle and repositories."""

from pki.store.db import Database, Session, session_scope
from pki.store.models import (
    AuditEvent,
    Base,
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceState,
    IssuerRecord,
)

__all__ = [
    "AuditEvent",
    "Base",
    "CertificateRecord",
    "CertificateStatus",
    "Database",
    "Device",
    "DeviceState",
    "IssuerRecord",
    "Session",
    "session_scope",
]
