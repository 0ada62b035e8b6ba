"""SQLAlchemy models of revocation publishing: stored CRLs, pre-signed OCSP, admin tokens."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from pki.errors import ErrorKind, PKIError, not_found
from pki.store.db import Database
from pki.store.lean import LeanQuery
from pki.store.models import (
    Base,
    CertificateRecord,
    CertificateStatus,
    Device,
    IssuerRecord,
    UTCDateTime,
)
from pki.store.repository import CertificateRepository

_ID = BigInteger().with_variant(Integer, "sqlite")
# Rows per IN (...) list: SQLite allows 32,766 bound parameters per statement.
_IN_CHUNK = 10_000


class CRLRecord(Base):
    """CRLRecord is one CRL of an issuer; the number is reserved before the CRL is signed.

    Full and delta CRLs share one numbering sequence per issuer (RFC 5280 §5.2.4), and the
    unique constraint lets concurrent publishers race for a number and retry on a clash.
    crl_der stays empty while the CRL is being signed; readers only see rows that have it.
    """

    __tablename__ = "crls"
    __table_args__ = (
        UniqueConstraint("issuer_id", "crl_number", name="uq_crls_issuer_number"),
        Index("ix_crls_issuer_delta", "issuer_id", "is_delta", "crl_number"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    # CRL numbers are allocated one by one from 1, so 63 bits last forever.
    crl_number: Mapped[int] = mapped_column(BigInteger)
    is_delta: Mapped[bool] = mapped_column(Boolean, default=False)
    base_number: Mapped[int | None] = mapped_column(BigInteger)
    this_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    entries: Mapped[int] = mapped_column(Integer, default=0)
    crl_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    # The issuer's revocation marker, read before the entries: the CRL holds every change up
    # to it. None on CRLs published before markers existed.
    marker: Mapped[int | None] = mapped_column(BigInteger)


class RevocationEvent(Base):
    """RevocationEvent records each change of a certificate's revocation state, for delta CRLs.

    action is "revoked", "reason_changed" or "released" (removed from certificateHold); marker
    is the issuer's revocation marker that the event's transaction advanced to.
    """

    __tablename__ = "revocation_events"
    __table_args__ = (
        Index("ix_revocation_events_issuer_at", "issuer_id", "at"),
        Index("ix_revocation_events_issuer_marker", "issuer_id", "marker"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"))
    serial_hex: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32))
    at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    marker: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class OCSPResponseRecord(Base):
    """OCSPResponseRecord is the pre-signed OCSP response of one certificate (RFC 5019).

    status is the CertStatus the response states ("good", "revoked", "unknown"); the
    responder serves the bytes only while it equals the certificate's current status.
    """

    __tablename__ = "ocsp_responses"

    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"), primary_key=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    serial_hex: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    this_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    next_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    signer_serial_hex: Mapped[str] = mapped_column(String(40))
    response_der: Mapped[bytes] = mapped_column(LargeBinary)


class AdminToken(Base):
    """AdminToken is a bearer token of the admin API, kept only as its SHA-256 hash."""

    __tablename__ = "admin_tokens"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    disabled_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime)


# --- repositories -----------------------------------------------------------------------------
# They live beside the models because only pki.store may speak SQL (import-linter contract).


@dataclasses.dataclass(frozen=True)
class CertificateState:
    """CertificateState is what OCSP and CRLs need of a certificate row."""

    certificate_id: int
    issuer_id: str
    serial_hex: str
    status: CertificateStatus
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None
    revocation_reason: str | None


_STATE_COLUMNS = (
    CertificateRecord.id,
    CertificateRecord.issuer_id,
    CertificateRecord.serial_hex,
    CertificateRecord.status,
    CertificateRecord.not_after,
    CertificateRecord.revoked_at,
    CertificateRecord.revocation_reason,
)


def _state(row: Any) -> CertificateState:
    return CertificateState(*row)


class CertificateStateReader:
    """CertificateStateReader is the read-only face of the certificates table for OCSP and CRLs."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def by_serials(self, issuer_id: str, serials_hex: Iterable[str]) -> dict[str, CertificateState]:
        """Returns the state of each listed serial the issuer has a row for."""
        wanted = sorted(set(serials_hex))
        if not wanted:
            return {}
        rows = self.session.execute(
            select(*_STATE_COLUMNS).where(
                CertificateRecord.issuer_id == issuer_id, CertificateRecord.serial_hex.in_(wanted)
            )
        ).all()
        return {row[2]: _state(row) for row in rows}

    def revoked_unexpired(self, issuer_id: str, now: datetime.datetime) -> list[CertificateState]:
        """Returns every revoked certificate of the issuer that has not expired yet."""
        rows = self.session.execute(
            select(*_STATE_COLUMNS)
            .where(
                CertificateRecord.issuer_id == issuer_id,
                CertificateRecord.status == CertificateStatus.REVOKED,
                CertificateRecord.not_after > now,
            )
            .order_by(CertificateRecord.id)
        ).all()
        return [_state(r) for r in rows]

    def revoked_entries(
        self, issuer_id: str, now: datetime.datetime
    ) -> Iterator[tuple[str, datetime.datetime | None, str | None]]:
        """Yields (serial_hex, revoked_at, reason) of every revoked, unexpired certificate.

        The full-CRL query: three columns through Core rather than whole states, as a CRL of
        10^6 entries spent most of its time building row objects. The rows come in batches
        (yield_per; a server-side cursor on PostgreSQL) for a caller that turns them into
        something else: it never holds 10^6 rows and 10^6 of its own objects at once. Read it
        to the end inside the session."""
        query = (
            select(
                CertificateRecord.serial_hex,
                CertificateRecord.revoked_at,
                CertificateRecord.revocation_reason,
            )
            .where(
                CertificateRecord.issuer_id == issuer_id,
                CertificateRecord.status == CertificateStatus.REVOKED,
                CertificateRecord.not_after > now,
            )
            .order_by(CertificateRecord.id)
            .execution_options(yield_per=10_000)
        )
        for batch in self.session.connection().execute(query).partitions():
            yield from batch

    def marker(self, issuer_id: str) -> int:
        """Returns the issuer's revocation marker: every change up to it has committed."""
        value = self.session.execute(
            select(IssuerRecord.revocation_marker).where(IssuerRecord.id == issuer_id)
        ).scalar_one_or_none()
        if value is None:
            raise not_found(f"no issuer {issuer_id!r}")
        return int(value)

    def changed_after(self, issuer_id: str, marker: int) -> list[CertificateState]:
        """Returns the certificates whose revocation state changed after the marker."""
        changed = (
            select(RevocationEvent.certificate_id)
            .where(RevocationEvent.issuer_id == issuer_id, RevocationEvent.marker > marker)
            .distinct()
        )
        rows = self.session.execute(
            select(*_STATE_COLUMNS)
            .where(CertificateRecord.id.in_(changed))
            .order_by(CertificateRecord.id)
        ).all()
        return [_state(r) for r in rows]

    def first_change_after(self, issuer_id: str, marker: int) -> datetime.datetime | None:
        """Returns when the issuer's earliest revocation change after the marker happened."""
        value = self.session.execute(
            select(func.min(RevocationEvent.at)).where(
                RevocationEvent.issuer_id == issuer_id, RevocationEvent.marker > marker
            )
        ).scalar_one_or_none()
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value

    def needing_response(
        self,
        issuer_id: str,
        now: datetime.datetime,
        refresh_before: datetime.datetime,
        *,
        after_id: int,
        limit: int,
    ) -> list[CertificateState]:
        """Returns issued or revoked, unexpired certificates whose stored response is missing,
        older than refresh_before, or states another status than the certificate has now."""
        stored = aliased(OCSPResponseRecord)
        signer = aliased(CertificateRecord)
        rows = self.session.execute(
            select(*_STATE_COLUMNS)
            .outerjoin(stored, stored.certificate_id == CertificateRecord.id)
            .outerjoin(
                signer,
                and_(
                    signer.issuer_id == stored.issuer_id,
                    signer.serial_hex == stored.signer_serial_hex,
                ),
            )
            .where(
                CertificateRecord.issuer_id == issuer_id,
                CertificateRecord.id > after_id,
                CertificateRecord.status.in_([CertificateStatus.ISSUED, CertificateStatus.REVOKED]),
                CertificateRecord.not_after > now,
                or_(
                    stored.certificate_id.is_(None),
                    signer.id.is_(None),
                    signer.status != CertificateStatus.ISSUED,  # its signer was revoked
                    stored.this_update <= refresh_before,
                    stored.next_update <= now,
                    and_(
                        CertificateRecord.status == CertificateStatus.ISSUED,
                        stored.status != "good",
                    ),
                    and_(
                        CertificateRecord.status == CertificateStatus.REVOKED,
                        stored.status != "revoked",
                    ),
                ),
            )
            .order_by(CertificateRecord.id)
            .limit(limit)
        ).all()
        return [_state(r) for r in rows]

    def newest_signers(self, now: datetime.datetime) -> dict[str, tuple[bytes, str]]:
        """Returns per issuer the newest valid OCSP-signer certificate whose key is in the token,
        as (certificate DER, key URI)."""
        rows = self.session.execute(
            select(
                CertificateRecord.issuer_id, CertificateRecord.cert_der, CertificateRecord.key_uri
            )
            .where(
                CertificateRecord.profile == "ocsp-signer",
                CertificateRecord.status == CertificateStatus.ISSUED,
                CertificateRecord.key_uri.is_not(None),
                CertificateRecord.cert_der.is_not(None),
                CertificateRecord.not_before <= now,
                CertificateRecord.not_after > now,
            )
            .order_by(CertificateRecord.not_before, CertificateRecord.id)
        ).all()
        newest: dict[str, tuple[bytes, str]] = {}
        for issuer_id, cert_der, key_uri in rows:
            if cert_der is not None and key_uri is not None:
                newest[issuer_id] = (cert_der, key_uri)  # later rows are newer
        return newest

    def signer_not_after(self, issuer_id: str) -> datetime.datetime | None:
        """Returns when the issuer's longest-lived issued OCSP-signer certificate expires."""
        value = self.session.execute(
            select(func.max(CertificateRecord.not_after)).where(
                CertificateRecord.issuer_id == issuer_id,
                CertificateRecord.profile == "ocsp-signer",
                CertificateRecord.status == CertificateStatus.ISSUED,
                CertificateRecord.key_uri.is_not(None),
            )
        ).scalar_one_or_none()
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value

    def active_of_devices(self, device_ids: Sequence[str]) -> list[CertificateRecord]:
        """Returns the active certificates (issued, or on hold) of the listed devices, locked
        for update in id order."""
        if not device_ids:
            return []
        on_hold = (CertificateRecord.status == CertificateStatus.REVOKED) & (
            CertificateRecord.revocation_reason == "certificateHold"
        )
        return list(
            self.session.execute(
                select(CertificateRecord)
                .where(
                    CertificateRecord.device_id.in_(sorted(set(device_ids))),
                    (CertificateRecord.status == CertificateStatus.ISSUED) | on_hold,
                )
                .order_by(CertificateRecord.id)
                .with_for_update()
            )
            .scalars()
            .all()
        )

    def devices_of_batch(self, batch: str) -> list[str]:
        """Returns the ids of the devices registered in a batch."""
        return list(
            self.session.execute(select(Device.id).where(Device.batch == batch).order_by(Device.id))
            .scalars()
            .all()
        )


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    """StoredResponse is what the responder needs of a pre-signed response: bytes and states."""

    response_der: bytes
    status: str  # the CertStatus the response states
    this_update: datetime.datetime
    next_update: datetime.datetime
    current: CertificateStatus  # the certificate's status now


_SIGNER = aliased(CertificateRecord, name="signer")

# The signer join keeps a response whose signer was revoked (or is unknown) from being served:
# RFC 6960 §4.2.2.2 has clients reject it, and invariant 5 has a revoked signer never used.
# It costs one more lookup on the (issuer_id, serial_hex) unique index, in the same query.
_FRESH_RESPONSE = (
    select(
        OCSPResponseRecord.response_der,
        OCSPResponseRecord.status,
        OCSPResponseRecord.this_update,
        OCSPResponseRecord.next_update,
        CertificateRecord.status,
    )
    .join(CertificateRecord, CertificateRecord.id == OCSPResponseRecord.certificate_id)
    .join(
        _SIGNER,
        and_(
            _SIGNER.issuer_id == OCSPResponseRecord.issuer_id,
            _SIGNER.serial_hex == OCSPResponseRecord.signer_serial_hex,
            _SIGNER.status == CertificateStatus.ISSUED,
        ),
    )
    .where(
        CertificateRecord.issuer_id == bindparam("issuer_id"),
        CertificateRecord.serial_hex == bindparam("serial_hex"),
        CertificateRecord.not_after > bindparam("now"),
        OCSPResponseRecord.next_update > bindparam("now"),
    )
    .limit(1)
)


_STATE_BY_SERIAL = select(*_STATE_COLUMNS).where(
    CertificateRecord.issuer_id == bindparam("issuer_id"),
    CertificateRecord.serial_hex == bindparam("serial_hex"),
)


class CertificateStates:
    """CertificateStates looks up certificate states one serial at a time, for live OCSP.

    The same hot path as FreshResponses (pki.store.lean). RFC 5019 clients ask for one
    certificate per request; a request for several costs one indexed lookup each."""

    def __init__(self, db: Database) -> None:
        self._query = LeanQuery(db, _STATE_BY_SERIAL)

    def by_serials(self, issuer_id: str, serials_hex: Iterable[str]) -> dict[str, CertificateState]:
        """Returns the state of each listed serial the issuer has a row for."""
        found: dict[str, CertificateState] = {}
        for serial in sorted(set(serials_hex)):
            row = self._query.first(issuer_id=issuer_id, serial_hex=serial)
            if row is not None:
                found[serial] = _state(row)
        return found

    def close(self) -> None:
        self._query.close()


class FreshResponses:
    """FreshResponses finds a certificate's unexpired pre-signed response and current status.

    The OCSP hot path: one compiled query on a connection of its own (pki.store.lean)."""

    def __init__(self, db: Database) -> None:
        self._query = LeanQuery(db, _FRESH_RESPONSE)

    def find(
        self, issuer_id: str, serial_hex: str, now: datetime.datetime
    ) -> StoredResponse | None:
        row = self._query.first(issuer_id=issuer_id, serial_hex=serial_hex, now=now)
        if row is None:
            return None
        return StoredResponse(row[0], row[1], row[2], row[3], row[4])

    def close(self) -> None:
        self._query.close()


_RESPONSE_COLUMNS = tuple(c.key for c in OCSPResponseRecord.__table__.columns)


class OCSPResponseRepository:
    """OCSPResponseRepository stores pre-signed OCSP responses, one per certificate."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def fresh(
        self, issuer_id: str, serial_hex: str, now: datetime.datetime
    ) -> tuple[OCSPResponseRecord, CertificateStatus] | None:
        """Returns the stored response and the certificate's current status, if not expired."""
        row = self.session.execute(
            select(OCSPResponseRecord, CertificateRecord.status)
            .join(CertificateRecord, CertificateRecord.id == OCSPResponseRecord.certificate_id)
            .where(
                CertificateRecord.issuer_id == issuer_id,
                CertificateRecord.serial_hex == serial_hex,
                CertificateRecord.not_after > now,
                OCSPResponseRecord.next_update > now,
            )
        ).first()
        if row is None:
            return None
        return row[0], row[1]

    def put(self, record: OCSPResponseRecord) -> None:
        """Stores a response, replacing the certificate's previous one."""
        self.put_all([record])

    def put_all(self, records: Sequence[OCSPResponseRecord]) -> None:
        """Stores responses, each replacing its certificate's previous one, in one statement.

        An upsert (INSERT ... ON CONFLICT DO UPDATE) rather than a read-then-write merge: two
        writers of one certificate's response (a pre-signing job and a revocation's re-sign)
        both succeed, the last one's response stands, neither fails on the primary key."""
        if not records:
            return
        rows = [{c: getattr(r, c) for c in _RESPONSE_COLUMNS} for r in records]
        dialect = self.session.get_bind().dialect.name
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        statement = insert(OCSPResponseRecord)
        statement = statement.on_conflict_do_update(
            index_elements=[OCSPResponseRecord.certificate_id],
            set_={c: statement.excluded[c] for c in _RESPONSE_COLUMNS if c != "certificate_id"},
        )
        self.session.execute(statement, rows)

    def of_issuer(self, issuer_id: str) -> list[tuple[str, bytes]]:
        """Returns every stored response of an issuer as (serial, DER)."""
        rows = self.session.execute(
            select(OCSPResponseRecord.serial_hex, OCSPResponseRecord.response_der).where(
                OCSPResponseRecord.issuer_id == issuer_id
            )
        ).all()
        return [(serial, bytes(der)) for serial, der in rows]

    def forget(self, certificate_id: int) -> None:
        """Removes a certificate's stored response (its status changed)."""
        self.forget_all([certificate_id])

    def forget_all(self, certificate_ids: Sequence[int]) -> None:
        """Removes the stored responses of certificates whose status changed."""
        ids = sorted(set(certificate_ids))
        for start in range(0, len(ids), _IN_CHUNK):
            self.session.execute(
                delete(OCSPResponseRecord)
                .where(OCSPResponseRecord.certificate_id.in_(ids[start : start + _IN_CHUNK]))
                .execution_options(synchronize_session=False)
            )

    def forget_signed_by(self, issuer_id: str, signer_serial_hex: str) -> int:
        """Removes every stored response an OCSP signer signed (the signer was revoked)."""
        result = self.session.execute(
            delete(OCSPResponseRecord).where(
                OCSPResponseRecord.issuer_id == issuer_id,
                OCSPResponseRecord.signer_serial_hex == signer_serial_hex,
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def count(self, issuer_id: str | None = None) -> int:
        query = select(func.count()).select_from(OCSPResponseRecord)
        if issuer_id is not None:
            query = query.where(OCSPResponseRecord.issuer_id == issuer_id)
        return int(self.session.execute(query).scalar_one())


class CRLNumberClash(PKIError):
    """CRLNumberClash says another publisher took the CRL number first."""

    def __init__(self, issuer_id: str, number: int) -> None:
        super().__init__(ErrorKind.CONFLICT, f"CRL number {number} of {issuer_id} is taken")


class CRLRepository:
    """CRLRepository reserves CRL numbers and stores signed CRLs."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def reserve(
        self,
        issuer_id: str,
        *,
        is_delta: bool,
        base_number: int | None,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        marker: int,
    ) -> CRLRecord:
        """Reserves the next CRL number of the issuer; raises CRLNumberClash when raced."""
        number = self.highest_number(issuer_id) + 1
        record = CRLRecord(
            issuer_id=issuer_id,
            crl_number=number,
            is_delta=is_delta,
            base_number=base_number,
            this_update=this_update,
            next_update=next_update,
            entries=0,
            crl_der=None,
            created_at=this_update,
            marker=marker,
        )
        self.session.add(record)
        try:
            self.session.flush()
        except IntegrityError:
            raise CRLNumberClash(issuer_id, number) from None
        return record

    def add_signed(
        self,
        issuer_id: str,
        *,
        crl_number: int,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        entries: int,
        crl_der: bytes,
        marker: int,
        created_at: datetime.datetime,
    ) -> CRLRecord:
        """Stores a full CRL signed elsewhere; raises CRLNumberClash when its number is taken."""
        record = CRLRecord(
            issuer_id=issuer_id,
            crl_number=crl_number,
            is_delta=False,
            base_number=None,
            this_update=this_update,
            next_update=next_update,
            entries=entries,
            crl_der=crl_der,
            created_at=created_at,
            marker=marker,
        )
        self.session.add(record)
        try:
            self.session.flush()
        except IntegrityError:
            raise CRLNumberClash(issuer_id, crl_number) from None
        return record

    def highest_number(self, issuer_id: str) -> int:
        """Returns the issuer's highest CRL number, reserved or signed (0 when none)."""
        highest = self.session.execute(
            select(func.max(CRLRecord.crl_number)).where(CRLRecord.issuer_id == issuer_id)
        ).scalar_one_or_none()
        return int(highest or 0)

    def get(self, record_id: int) -> CRLRecord:
        record = self.session.get(CRLRecord, record_id)
        if record is None:
            raise not_found(f"no CRL record {record_id}")
        return record

    def latest(self, issuer_id: str, *, is_delta: bool) -> CRLRecord | None:
        """Returns the signed CRL of the issuer with the highest number, full or delta."""
        return (
            self.session.execute(
                select(CRLRecord)
                .where(
                    CRLRecord.issuer_id == issuer_id,
                    CRLRecord.is_delta == is_delta,
                    CRLRecord.crl_der.is_not(None),
                )
                .order_by(CRLRecord.crl_number.desc())
                .limit(1)
            )
            .scalars()
            .first()
        )

    def current_delta(self, issuer_id: str) -> CRLRecord | None:
        """Returns the newest signed delta CRL whose base is the newest signed full CRL.

        RFC 5280 §5.2.4: a delta lists the changes since the complete CRL it names; one that
        names an older base is not served beside a newer full CRL."""
        base = self.latest(issuer_id, is_delta=False)
        if base is None:
            return None
        delta = self.latest(issuer_id, is_delta=True)
        if delta is None or delta.base_number != base.crl_number:
            return None
        return delta

    def numbers(self, issuer_id: str) -> list[int]:
        """Returns the issuer's signed CRL numbers in the order they were stored."""
        return list(
            self.session.execute(
                select(CRLRecord.crl_number)
                .where(CRLRecord.issuer_id == issuer_id, CRLRecord.crl_der.is_not(None))
                .order_by(CRLRecord.id)
            )
            .scalars()
            .all()
        )

    def discard(self, record_id: int) -> None:
        """Drops a reservation whose CRL was never signed; its number stays unused."""
        self.session.execute(
            delete(CRLRecord).where(CRLRecord.id == record_id, CRLRecord.crl_der.is_(None))
        )


class RevocationEventRepository:
    """RevocationEventRepository records revocation state changes under the issuers' markers."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._queued: list[dict[str, Any]] = []

    def add(
        self, record: CertificateRecord, action: str, reason: str | None, at: datetime.datetime
    ) -> None:
        """Queues a change; write() stores the queue under the issuers' next markers."""
        self._queued.append(
            {
                "issuer_id": record.issuer_id,
                "certificate_id": record.id,
                "serial_hex": record.serial_hex,
                "action": action,
                "reason": reason,
                "at": at,
            }
        )

    def queued_certificates(self) -> list[int]:
        """Returns the ids of the certificates whose changes are queued."""
        return [e["certificate_id"] for e in self._queued]

    def write(self) -> dict[str, int]:
        """Advances the marker of each issuer with queued changes, stores the changes under it
        and returns the new markers; the last write of a revoking transaction.

        The certificate rows are written (locked) first and each issuer row after them, in
        issuer order, the same order in every revoking transaction: concurrent revocations
        queue on the issuer row rather than deadlock, and take marker values in the order
        they commit. A transaction that commits after a publisher read marker M has a marker
        above M, which makes the next CRL due (pki/crl_publisher.py)."""
        if not self._queued:
            return {}
        self.session.flush()
        markers: dict[str, int] = {}
        for issuer_id in sorted({e["issuer_id"] for e in self._queued}):
            self.session.execute(
                update(IssuerRecord)
                .where(IssuerRecord.id == issuer_id)
                .values(revocation_marker=IssuerRecord.revocation_marker + 1)
                .execution_options(synchronize_session=False)
            )
            markers[issuer_id] = CertificateStateReader(self.session).marker(issuer_id)
        self.session.execute(
            insert(RevocationEvent),
            [{**e, "marker": markers[e["issuer_id"]]} for e in self._queued],
        )
        self._queued.clear()
        return markers


class AdminTokenRepository:
    """AdminTokenRepository stores admin API tokens by hash."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, record: AdminToken) -> AdminToken:
        self.session.add(record)
        self.session.flush()
        return record

    def by_hash(self, token_sha256: str) -> AdminToken | None:
        return (
            self.session.execute(select(AdminToken).where(AdminToken.token_sha256 == token_sha256))
            .scalars()
            .first()
        )


class RevocationStore:
    """RevocationStore bundles what a revocation writes in one transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.certificates = CertificateRepository(session)
        self.reader = CertificateStateReader(session)
        self.events = RevocationEventRepository(session)
        self.responses = OCSPResponseRepository(session)
        self._devices: dict[str, Device] = {}

    def device(self, device_id: str) -> Device | None:
        loaded = self._devices.get(device_id)
        return loaded if loaded is not None else self.session.get(Device, device_id)

    def known_devices(self, device_ids: Sequence[str]) -> list[str]:
        """Returns which of the listed device ids are registered, and keeps their rows, so
        that changing them one by one reads nothing more."""
        wanted = sorted(set(device_ids))
        for start in range(0, len(wanted), _IN_CHUNK):
            rows = self.session.execute(
                select(Device).where(Device.id.in_(wanted[start : start + _IN_CHUNK]))
            ).scalars()
            self._devices.update((d.id, d) for d in rows)
        return sorted(d for d in wanted if d in self._devices)

    def write_changes(self) -> dict[str, int]:
        """Ends a revoking transaction's writes: drops the changed certificates' pre-signed
        OCSP responses, stores the queued events and advances the issuers' markers."""
        self.responses.forget_all(self.events.queued_certificates())
        return self.events.write()
