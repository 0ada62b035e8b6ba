"""The audit log: append-only, each event chained to its predecessor by SHA-256."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pki.store.models import AuditEvent, AuditHead

GENESIS = "0" * 64


def canonical(details: dict[str, Any]) -> str:
    """Serialises event details the one way the chain hashes them."""
    return json.dumps(details, sort_keys=True, separators=(",", ":"), default=str)


def event_hash(
    *,
    seq: int,
    at: datetime.datetime,
    actor: str,
    action: str,
    target: str,
    details: str,
    prev_hash: str,
) -> str:
    """Computes the hash that links an event to everything before it."""
    material = "\x1f".join(
        [
            str(seq),
            at.astimezone(datetime.UTC).isoformat(),
            actor,
            action,
            target,
            details,
            prev_hash,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()


_HEAD = "pki_audit_head"


def _locked_head(session: Session) -> AuditHead:
    # The head row is locked (FOR UPDATE) by the first event of a transaction and stays
    # locked until it ends; later events of the same transaction reuse it instead of
    # asking again. Every round-trip made while holding this lock serialises all writers.
    # A savepoint has its own key: a lock taken inside one is released by its rollback.
    transaction = session.get_nested_transaction() or session.get_transaction()
    cached = session.info.get(_HEAD)
    if cached is not None and cached[0] is transaction:
        head: AuditHead = cached[1]
        return head
    found = session.execute(
        select(AuditHead).where(AuditHead.id == 1).with_for_update()
    ).scalar_one_or_none()
    if found is None:
        found = AuditHead(id=1, seq=0, hash=GENESIS)
        session.add(found)
    session.info[_HEAD] = (transaction, found)
    return found


def append(
    session: Session,
    *,
    at: datetime.datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Appends an event in the caller's transaction, so it commits with what it records.

    The event is written by the session's next flush (at the latest, its commit), together
    with the other events of the transaction: one lock of the chain's head per transaction.
    """
    head = _locked_head(session)
    body = canonical(details or {})
    at = at.replace(microsecond=0)
    seq = head.seq + 1
    digest = event_hash(
        seq=seq, at=at, actor=actor, action=action, target=target, details=body, prev_hash=head.hash
    )
    event = AuditEvent(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        target=target,
        details=body,
        prev_hash=head.hash,
        hash=digest,
    )
    session.add(event)
    head.seq = seq
    head.hash = digest
    return event


def recent(session: Session, count: int) -> list[AuditEvent]:
    """Returns the newest `count` events, oldest first."""
    rows = session.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(count))
    return list(reversed(rows.scalars().all()))


@dataclasses.dataclass(frozen=True)
class Verification:
    """Verification is the outcome of walking the chain: how far it held and what broke."""

    events: int
    broken_seq: int | None = None
    problem: str | None = None
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return self.broken_seq is None


def verify(session: Session, *, batch: int = 5000) -> Verification:
    """Walks the whole chain, without checkpoints, and names the first edited or removed event."""
    # The walk lives with the checkpoints, which build on this module's hash.
    from pki.store.audit_checkpoint import verify_stored

    return verify_stored(session, None, batch=batch)
