"""Refusal counts: refused requests folded per (kind, subject, source, minute) before the audit log.

A refused request is audited as one event on the first refusal of its key in a minute; the
others of that minute only raise the key's count here. When the minute is over, a key that
was refused more than once is written as one more event carrying the minute's count, and its
row is deleted. So a flood adds at most two events per key and minute to the hash chain,
and the chain itself is written only by pki.store.audit.append.
"""

from __future__ import annotations

import dataclasses
import datetime

from sqlalchemy import Index, Integer, String, Text, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from pki.store import audit
from pki.store.models import Base, UTCDateTime


class RefusalCount(Base):
    """RefusalCount is how often one key was refused in one minute, not yet in the audit log."""

    __tablename__ = "refusal_counts"
    __table_args__ = (
        Index("uq_refusal_counts_key", "minute", "kind", "source", "subject", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    minute: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(64))
    # "" when the request named nobody; never NULL, so the unique index folds such rows too.
    subject: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer)


@dataclasses.dataclass(frozen=True)
class ClosedCount:
    """ClosedCount is a finished minute of one key, ready to be written to the audit log."""

    minute: datetime.datetime
    kind: str
    source: str
    subject: str
    reason: str
    count: int


class RefusalRepository:
    """RefusalRepository counts refusals per key and minute and hands out finished minutes."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def bump(self, minute: datetime.datetime, kind: str, source: str, subject: str) -> bool:
        """Adds one to an existing key of the minute; False when the key has no row yet."""
        result = self.session.execute(
            update(RefusalCount)
            .where(
                RefusalCount.minute == minute,
                RefusalCount.kind == kind,
                RefusalCount.source == source,
                RefusalCount.subject == subject,
            )
            .values(count=RefusalCount.count + 1)
        )
        return bool(getattr(result, "rowcount", 0))

    def subjects(self, minute: datetime.datetime, kind: str, source: str) -> int:
        """Counts the distinct subjects one source was refused for in a minute."""
        query = select(func.count()).where(
            RefusalCount.minute == minute, RefusalCount.kind == kind, RefusalCount.source == source
        )
        return int(self.session.execute(query).scalar_one())

    def first(
        self, minute: datetime.datetime, kind: str, source: str, subject: str, reason: str
    ) -> bool:
        """Creates a key's row at count 1; False when a concurrent request created it first."""
        try:
            with self.session.begin_nested():
                self.session.add(
                    RefusalCount(
                        minute=minute,
                        kind=kind,
                        source=source,
                        subject=subject,
                        reason=reason,
                        count=1,
                    )
                )
        except IntegrityError:
            return False
        return True

    def close(self, before: datetime.datetime, limit: int = 500) -> list[ClosedCount]:
        """Deletes the rows of minutes before `before`; returns those this call deleted."""
        rows = (
            self.session.execute(
                select(RefusalCount)
                .where(RefusalCount.minute < before)
                .order_by(RefusalCount.id)
                .limit(limit)
            )
            .scalars()
            .all()
        )
        closed = []
        for row in rows:
            # Two processes may close the same minute: only the one whose DELETE removed
            # the row writes its event (PostgreSQL's DELETE waits for the other's commit).
            gone = self.session.execute(delete(RefusalCount).where(RefusalCount.id == row.id))
            if getattr(gone, "rowcount", 0) == 1:
                closed.append(
                    ClosedCount(
                        row.minute, row.kind, row.source, row.subject, row.reason, row.count
                    )
                )
        return closed

    def write_closed(self, before: datetime.datetime, now: datetime.datetime) -> int:
        """Writes each finished key refused more than once as one audit event with its count."""
        written = 0
        for item in self.close(before):
            if item.count < 2:
                continue  # its one event is already in the log
            audit.append(
                self.session,
                at=now,
                actor=f"client:{item.source}",
                action=f"refused.{item.kind}.repeated",
                target=item.subject or "-",
                details={
                    "reason": item.reason,
                    "source": item.source,
                    "minute": item.minute.isoformat(),
                    "count": item.count,
                },
            )
            written += 1
        return written
