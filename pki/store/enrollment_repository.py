"""Repositories of the device registry and enrollment: devices, bindings, secrets, failures."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, case, delete, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, object_session
from sqlalchemy.sql.elements import ColumnElement

from pki.errors import internal, not_found
from pki.store.enrollment_models import (
    ApprovalState,
    AuthFailure,
    DeviceBinding,
    EnrollmentSecret,
    PendingApproval,
    SecretState,
)
from pki.store.models import CertificateRecord, CertificateStatus, Device, DeviceState, UTCDateTime


def session_of(obj: object) -> Session:
    """Returns the session an ORM object belongs to, to join its transaction."""
    session = object_session(obj)
    if session is None:
        raise internal("record is not attached to a session")
    return session


@dataclasses.dataclass(frozen=True)
class LoginState:
    """LoginState is what checking a one-time secret needs: the device state and its secrets."""

    state: DeviceState
    # (secret id, stored hash, expiry) of each active secret, newest first.
    secrets: tuple[tuple[int, str, datetime.datetime], ...]
    # (secret id, stored hash) of the newest spent secret that bought a certificate: its
    # retry with the same key gets that certificate again.
    spent: tuple[int, str] | None = None


def login_state(session: Session, device_id: str) -> LoginState | None:
    """Reads a device's login state in one query; None for an unknown device."""
    query = (
        select(
            Device.state,
            EnrollmentSecret.id,
            EnrollmentSecret.secret_hash,
            EnrollmentSecret.expires_at,
            EnrollmentSecret.state,
        )
        .select_from(Device)
        .outerjoin(
            EnrollmentSecret,
            and_(
                EnrollmentSecret.device_id == Device.id,
                or_(
                    EnrollmentSecret.state == SecretState.ACTIVE,
                    and_(
                        EnrollmentSecret.state == SecretState.USED,
                        EnrollmentSecret.certificate_id.is_not(None),
                    ),
                ),
            ),
        )
        .where(Device.id == device_id)
        .order_by(EnrollmentSecret.id.desc())
    )
    rows = session.execute(query).all()
    if not rows:
        return None
    return LoginState(
        state=rows[0][0],
        secrets=tuple((r[1], r[2], r[3]) for r in rows if r[4] is SecretState.ACTIVE),
        spent=next(((r[1], r[2]) for r in rows if r[4] is SecretState.USED), None),
    )


class DeviceRepository:
    """DeviceRepository stores the registered devices."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, device_id: str, *, for_update: bool = False) -> Device | None:
        if not for_update:
            return self.session.get(Device, device_id)
        query = select(Device).where(Device.id == device_id).with_for_update()
        return self.session.execute(query).scalar_one_or_none()

    def get(self, device_id: str, *, for_update: bool = False) -> Device:
        device = self.find(device_id, for_update=for_update)
        if device is None:
            raise not_found(f"no device {device_id!r}")
        return device

    def existing(self, device_ids: Iterable[str]) -> dict[str, Device]:
        ids = list(device_ids)
        found: dict[str, Device] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.session.execute(select(Device).where(Device.id.in_(chunk))).scalars()
            found.update({d.id: d for d in rows})
        return found

    def add(self, device: Device) -> Device:
        self.session.add(device)
        self.session.flush()
        return device

    def ever_enrolled(self, device: Device) -> bool:
        """Says whether a device left `registered` or was ever issued a certificate."""
        if device.state is not DeviceState.REGISTERED:
            return True
        query = select(CertificateRecord.id).where(
            CertificateRecord.device_id == device.id,
            CertificateRecord.status != CertificateStatus.PENDING,
        )
        return self.session.execute(query.limit(1)).first() is not None

    def add_all(self, devices: Sequence[Device]) -> None:
        self.session.add_all(devices)
        self.session.flush()

    def list(
        self,
        *,
        state: DeviceState | None = None,
        batch: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Sequence[Device]:
        query = select(Device)
        if state is not None:
            query = query.where(Device.state == state)
        if batch is not None:
            query = query.where(Device.batch == batch)
        query = query.order_by(Device.id).limit(limit).offset(offset)
        return self.session.execute(query).scalars().all()


class SecretRepository:
    """SecretRepository stores one-time enrollment secrets (their hashes)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, secret: EnrollmentSecret) -> EnrollmentSecret:
        self.session.add(secret)
        self.session.flush()
        return secret

    def active(self, device_id: str) -> Sequence[EnrollmentSecret]:
        query = (
            select(EnrollmentSecret)
            .where(EnrollmentSecret.device_id == device_id)
            .where(EnrollmentSecret.state == SecretState.ACTIVE)
            .order_by(EnrollmentSecret.id.desc())
        )
        return self.session.execute(query).scalars().all()

    def labels_of(self, secret_id: int) -> str | None:
        """Returns the labels column of a secret (None: the default label only)."""
        query = select(EnrollmentSecret.labels).where(EnrollmentSecret.id == secret_id)
        return self.session.execute(query).scalar_one_or_none()

    def replace_active(self, device_id: str) -> int:
        """Retires a device's unused secrets; returns how many there were."""
        result = self.session.execute(
            update(EnrollmentSecret)
            .where(EnrollmentSecret.device_id == device_id)
            .where(EnrollmentSecret.state == SecretState.ACTIVE)
            .values(state=SecretState.REPLACED)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def get(self, secret_id: int) -> EnrollmentSecret | None:
        return self.session.get(EnrollmentSecret, secret_id)

    def consume(
        self, secret_id: int, now: datetime.datetime, certificate_id: int | None = None
    ) -> bool:
        """Marks a secret used if it still is active; False when another request got it first."""
        # One conditional UPDATE: of two transactions racing for one secret, the second
        # waits on the row lock and then matches no row (PostgreSQL), or waits for the
        # write lock and sees the first one's commit (SQLite BEGIN IMMEDIATE).
        result = self.session.execute(
            update(EnrollmentSecret)
            .where(EnrollmentSecret.id == secret_id)
            .where(EnrollmentSecret.state == SecretState.ACTIVE)
            .where(EnrollmentSecret.expires_at > now)
            .values(state=SecretState.USED, used_at=now, certificate_id=certificate_id)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0) == 1

    def delete_of_device(self, device_id: str) -> int:
        """Deletes every secret of a device (hashes included); returns how many there were."""
        result = self.session.execute(
            delete(EnrollmentSecret)
            .where(EnrollmentSecret.device_id == device_id)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


@dataclasses.dataclass(frozen=True)
class FailureCount:
    """FailureCount is a login-failure counter after one more failure was added."""

    failures: int
    locked_until: datetime.datetime | None


class AuthFailureRepository:
    """AuthFailureRepository counts failed logins per source address and (device, address)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def locked(self, keys: Sequence[tuple[str, str]], now: datetime.datetime) -> bool:
        """Says whether any of the (device ID, address) counters is locked at `now` (one query)."""
        query = (
            select(func.count())
            .select_from(AuthFailure)
            .where(or_(*(_key(device_id, address) for device_id, address in keys)))
            .where(AuthFailure.locked_until > now)
        )
        return bool(self.session.execute(query).scalar_one())

    def add(
        self,
        device_id: str,
        address: str,
        now: datetime.datetime,
        *,
        limit: int,
        window: datetime.timedelta,
    ) -> FailureCount:
        """Adds one failure to a counter in one statement (an upsert); locks it at `limit`.

        A counter whose last failure is older than `window`, or whose lock-out has served
        its time, counts afresh; a locked counter keeps counting but its lock is not extended.
        """
        table = AuthFailure.__table__
        c = table.c
        at = literal(now, UTCDateTime)
        stale = literal(now - window, UTCDateTime)
        failures = case(
            (c.locked_until > at, c.failures + 1),
            (c.locked_until.is_not(None), 1),
            (c.last_failure_at <= stale, 1),
            else_=c.failures + 1,
        )
        locked_until = case(
            (c.locked_until > at, c.locked_until),
            (failures >= limit, literal(now + window, UTCDateTime)),
            else_=None,
        )
        first_lock = now + window if limit <= 1 else None
        values = {
            "device_id": device_id,
            "address": address,
            "failures": 1,
            "last_failure_at": now,
            "locked_until": first_lock,
        }
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        upsert = (
            insert(AuthFailure)
            .values(values)
            .on_conflict_do_update(
                index_elements=[c.device_id, c.address],
                set_={"failures": failures, "locked_until": locked_until, "last_failure_at": at},
            )
            .returning(AuthFailure.failures, AuthFailure.locked_until)
        )
        row = self.session.execute(upsert).one()
        return FailureCount(failures=row[0], locked_until=row[1])

    def of_device(self, device_id: str) -> FailureCount | None:
        """Sums a device's counters over all addresses, with its latest lock-out."""
        query = select(func.sum(AuthFailure.failures), func.max(AuthFailure.locked_until)).where(
            AuthFailure.device_id == device_id
        )
        total, until = self.session.execute(query).one()
        if total is None:
            return None
        return FailureCount(failures=int(total), locked_until=until)

    def reset(self, device_id: str) -> int:
        """Forgets a device's failed logins from every address (one DELETE); returns how many."""
        result = self.session.execute(
            delete(AuthFailure)
            .where(AuthFailure.device_id == device_id)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def prune(self, before: datetime.datetime) -> int:
        """Deletes counters whose last failure and lock-out are both before `before`."""
        result = self.session.execute(
            delete(AuthFailure)
            .where(AuthFailure.last_failure_at < before)
            .where(or_(AuthFailure.locked_until.is_(None), AuthFailure.locked_until < before))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _key(device_id: str, address: str) -> ColumnElement[bool]:
    return and_(AuthFailure.device_id == device_id, AuthFailure.address == address)


class BindingRepository:
    """BindingRepository stores how each device may enroll."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, device_id: str) -> DeviceBinding | None:
        return self.session.get(DeviceBinding, device_id)

    def add(self, binding: DeviceBinding) -> DeviceBinding:
        self.session.add(binding)
        self.session.flush()
        return binding

    def add_all(self, bindings: Sequence[DeviceBinding]) -> None:
        self.session.add_all(bindings)
        self.session.flush()


class ApprovalRepository:
    """ApprovalRepository stores requests that wait for an operator."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, device_id: str, label: str, csr_sha256: str) -> PendingApproval | None:
        query = (
            select(PendingApproval)
            .where(PendingApproval.device_id == device_id)
            .where(PendingApproval.label == label)
            .where(PendingApproval.csr_sha256 == csr_sha256)
            .where(PendingApproval.state != ApprovalState.ISSUED)
            .order_by(PendingApproval.id.desc())
            .limit(1)
        )
        return self.session.execute(query).scalar_one_or_none()

    def find_by_id(self, approval_id: int, *, for_update: bool = False) -> PendingApproval | None:
        query = select(PendingApproval).where(PendingApproval.id == approval_id)
        if for_update:
            query = query.with_for_update()
        return self.session.execute(query).scalar_one_or_none()

    def get(self, approval_id: int) -> PendingApproval:
        row = self.session.get(PendingApproval, approval_id)
        if row is None:
            raise not_found(f"no pending approval {approval_id}")
        return row

    def add(self, row: PendingApproval) -> PendingApproval:
        self.session.add(row)
        self.session.flush()
        return row

    def by_state(
        self, state: ApprovalState, device_id: str | None = None
    ) -> Sequence[PendingApproval]:
        query = select(PendingApproval).where(PendingApproval.state == state)
        if device_id is not None:
            query = query.where(PendingApproval.device_id == device_id)
        return self.session.execute(query.order_by(PendingApproval.id)).scalars().all()

    def delete_of_device(self, device_id: str) -> int:
        """Deletes every request of a device (their CSRs included); returns how many."""
        result = self.session.execute(
            delete(PendingApproval)
            .where(PendingApproval.device_id == device_id)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
