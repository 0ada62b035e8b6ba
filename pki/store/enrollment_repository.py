"""Repositories of the device registry and enrollment: devices, secrets, failures, approvals."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from pki.errors import internal, not_found
from pki.store.enrollment_models import (
    ApprovalState,
    AuthFailure,
    EnrollmentSecret,
    PendingApproval,
    SecretState,
)
from pki.store.models import Device, DeviceState


def session_of(obj: object) -> Session:
    """Returns the session an ORM object belongs to, to join its transaction."""
    session = object_session(obj)
    if session is None:
        raise internal("record is not attached to a session")
    return session


@dataclasses.dataclass(frozen=True)
class LoginState:
    """LoginState is what checking a one-time secret needs: device state, lock-out, secrets."""

    state: DeviceState
    locked_until: datetime.datetime | None
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
            AuthFailure.locked_until,
            EnrollmentSecret.id,
            EnrollmentSecret.secret_hash,
            EnrollmentSecret.expires_at,
            EnrollmentSecret.state,
        )
        .select_from(Device)
        .outerjoin(AuthFailure, AuthFailure.device_id == Device.id)
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
    spent = next(((r[2], r[3]) for r in rows if r[5] is SecretState.USED), None)
    return LoginState(
        state=rows[0][0],
        locked_until=rows[0][1],
        secrets=tuple((r[2], r[3], r[4]) for r in rows if r[5] is SecretState.ACTIVE),
        spent=spent,
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


class AuthFailureRepository:
    """AuthFailureRepository counts failed logins per device and remembers lock-outs."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, device_id: str) -> AuthFailure | None:
        return self.session.get(AuthFailure, device_id)

    def locked(self, device_id: str, *, create_at: datetime.datetime) -> AuthFailure:
        """Returns the device's counter row, locked for update, creating it at zero if needed."""
        query = select(AuthFailure).where(AuthFailure.device_id == device_id).with_for_update()
        row = self.session.execute(query).scalar_one_or_none()
        if row is not None:
            return row
        try:
            with self.session.begin_nested():
                row = AuthFailure(
                    device_id=device_id, failures=0, last_failure_at=create_at, locked_until=None
                )
                self.session.add(row)
        except IntegrityError:
            # Another failure for the same device created the row first.
            row = self.session.execute(query).scalar_one()
        return row

    def delete(self, device_id: str) -> bool:
        """Deletes a device's failure record; True if it had one."""
        result = self.session.execute(
            delete(AuthFailure)
            .where(AuthFailure.device_id == device_id)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0) > 0

    def reset(self, device_id: str) -> None:
        """Clears a device's failure count and lock-out, if it has any (one UPDATE)."""
        self.session.execute(
            update(AuthFailure)
            .where(AuthFailure.device_id == device_id)
            .where((AuthFailure.failures != 0) | AuthFailure.locked_until.is_not(None))
            .values(failures=0, locked_until=None)
            .execution_options(synchronize_session=False)
        )


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
