"""Job locks: one holder per scheduled job across any number of schedulers and machines.

PostgreSQL: a session-level advisory lock (pg_try_advisory_lock) keyed by a 64-bit hash of
the job's name, held on a connection of its own for the job's duration; the server drops it
when that connection ends, so a scheduler killed mid-job leaves nothing behind. SQLite has no
advisory locks: a row in job_locks, taken in a write transaction, names the holder and a
lease; a holder that died leaves the row until its lease expires.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import secrets
from collections.abc import Iterator

from sqlalchemy import String, delete, select, text
from sqlalchemy.orm import Mapped, mapped_column

from pki.store.db import Database, session_scope
from pki.store.models import Base, UTCDateTime

# A job that outlives its lease on SQLite may be started a second time by another scheduler.
DEFAULT_LEASE = datetime.timedelta(minutes=15)


class JobLockRecord(Base):
    """JobLockRecord is a held job lock on SQLite: who holds it and until when at the latest."""

    __tablename__ = "job_locks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)


def advisory_key(name: str) -> int:
    """Returns the signed 64-bit advisory-lock key of a job name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class JobLocks:
    """JobLocks hands a job to one holder at a time; the others are told it is taken."""

    def __init__(self, db: Database, *, lease: datetime.timedelta = DEFAULT_LEASE) -> None:
        self.db = db
        self.lease = lease
        self.owner = secrets.token_hex(16)

    @contextlib.contextmanager
    def hold(self, name: str, now: datetime.datetime) -> Iterator[bool]:
        """Yields True while this holder has the job's lock, False when another holds it."""
        if self.db.is_sqlite:
            with self._lease(name, now) as held:
                yield held
        else:
            with self._advisory(name) as held:
                yield held

    @contextlib.contextmanager
    def _advisory(self, name: str) -> Iterator[bool]:
        key = advisory_key(name)
        with self.db.engine.connect() as conn:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            # A session-level lock outlives the transaction: end it so the connection does not
            # sit idle in a transaction for the length of the job.
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()

    @contextlib.contextmanager
    def _lease(self, name: str, now: datetime.datetime) -> Iterator[bool]:
        with session_scope(self.db) as session:  # BEGIN IMMEDIATE: one taker at a time
            row = session.execute(
                select(JobLockRecord).where(JobLockRecord.name == name)
            ).scalar_one_or_none()
            held = row is None or row.expires_at <= now
            if row is None:
                session.add(JobLockRecord(name=name, owner=self.owner, expires_at=now + self.lease))
            elif held:  # the previous holder's lease ran out: it died or overran
                row.owner = self.owner
                row.expires_at = now + self.lease
        try:
            yield held
        finally:
            if held:
                with session_scope(self.db) as session:
                    session.execute(
                        delete(JobLockRecord).where(
                            JobLockRecord.name == name, JobLockRecord.owner == self.owner
                        )
                    )
