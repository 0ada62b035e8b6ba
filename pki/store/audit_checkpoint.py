"""Signed checkpoints of the audit chain, and the one verifier for the database and exports.

The hash chain alone is public: whoever can write the database can rewrite an event and
recompute every later hash. A checkpoint signs the head (sequence number, event hash, time)
with the audit key, which lives in the token, so a rewrite needs that key as well.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pki.errors import bad_request
from pki.store.audit import GENESIS, Verification, event_hash
from pki.store.models import AuditCheckpoint, AuditEvent, AuditHead

AuditSigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
AuditPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# Domain separation: a checkpoint signature can never be mistaken for a signature over a
# certificate, CRL or OCSP response made with another key of the CA, nor the reverse.
_CONTEXT = b"pki-audit-checkpoint-v1"


@dataclasses.dataclass(frozen=True)
class Event:
    """Event is one audit event as the chain hashes it."""

    seq: int
    at: datetime.datetime
    actor: str
    action: str
    target: str
    details: str
    prev_hash: str
    hash: str


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Checkpoint is a signed statement: event `seq` of the chain had hash `event_hash`."""

    seq: int
    event_hash: str
    at: datetime.datetime
    signature: bytes


def payload(seq: int, digest: str, at: datetime.datetime) -> bytes:
    """Returns the bytes a checkpoint signs: context, sequence number, event hash, time."""
    when = at.astimezone(datetime.UTC).replace(microsecond=0).isoformat()
    return b"\x1f".join([_CONTEXT, str(seq).encode(), digest.encode(), when.encode()])


def sign(key: AuditSigningKey, seq: int, digest: str, at: datetime.datetime) -> bytes:
    """Signs a checkpoint with the audit key (ECDSA or PKCS#1 v1.5, SHA-256)."""
    data = payload(seq, digest, at)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def signature_valid(public_key: AuditPublicKey, checkpoint: Checkpoint) -> bool:
    """Tells whether a checkpoint's signature was made by the audit key."""
    data = payload(checkpoint.seq, checkpoint.event_hash, checkpoint.at)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(checkpoint.signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(checkpoint.signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def audit_public_key(cert_pem: bytes) -> AuditPublicKey:
    """Returns the public key of the audit certificate (PEM)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise bad_request(f"audit certificate is not PEM: {e}") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise bad_request("audit certificate holds neither an EC nor an RSA key")
    return key


class ChainCheck:
    """Walks events in order and checks links, hashes and signed checkpoints as it goes."""

    def __init__(
        self, public_key: AuditPublicKey | None, checkpoints: Iterable[Checkpoint]
    ) -> None:
        self._checkpoints: dict[int, Checkpoint] = {}
        self.failure: Verification | None = None
        self.count = 0
        self._prev = GENESIS
        self._matched = 0  # sequence number of the newest checkpoint the chain agrees with
        bad: list[int] = []
        for cp in checkpoints:
            if public_key is None:
                raise ValueError("checkpoints are verified with the audit public key")
            if not signature_valid(public_key, cp):
                bad.append(cp.seq)
            known = self._checkpoints.get(cp.seq)
            if known is None or cp.at > known.at:
                self._checkpoints[cp.seq] = cp
        self.signed = len(self._checkpoints)
        if bad:
            first = min(bad)
            self._fail(first, f"checkpoint at event {first} is not signed by the audit key")
        elif 0 in self._checkpoints and self._checkpoints[0].event_hash != GENESIS:
            self._fail(1, "checkpoint at event 0 does not sign the empty chain")

    @property
    def head(self) -> tuple[int, str]:
        """Returns the sequence number and hash of the last event that checked out."""
        return self.count, self._prev

    def _fail(self, seq: int, problem: str) -> None:
        if self.failure is None:
            self.failure = Verification(self.count, seq, problem, self.signed)

    def feed(self, ev: Event) -> bool:
        """Checks the next event; returns False once the chain is broken."""
        if self.failure is not None:
            return False
        expected = self.count + 1
        if ev.seq != expected:
            self._fail(expected, f"event {expected} is missing (deleted)")
            return False
        if ev.prev_hash != self._prev:
            self._fail(ev.seq, f"event {ev.seq} does not link to event {ev.seq - 1}")
            return False
        digest = event_hash(
            seq=ev.seq,
            at=ev.at,
            actor=ev.actor,
            action=ev.action,
            target=ev.target,
            details=ev.details,
            prev_hash=ev.prev_hash,
        )
        if digest != ev.hash:
            self._fail(ev.seq, f"event {ev.seq} was altered")
            return False
        cp = self._checkpoints.get(ev.seq)
        if cp is not None:
            if cp.event_hash != ev.hash:
                # The chain is consistent but not the one that was signed: it was recomputed
                # from some event after the last checkpoint it still agrees with.
                first = self._matched + 1
                self._fail(
                    first,
                    f"events {first}..{ev.seq} were rewritten and re-chained "
                    f"(the checkpoint at event {ev.seq} signs another hash)",
                )
                return False
            self._matched = ev.seq
        self._prev, self.count = ev.hash, ev.seq
        return True

    def finish(
        self,
        *,
        head: tuple[int, str] | None,
        now: datetime.datetime | None = None,
        max_age: datetime.timedelta | None = None,
    ) -> Verification:
        """Returns the verdict once every event was fed; `head` is the stored head row."""
        if self.failure is not None:
            return self.failure
        count = self.count
        beyond = [seq for seq in self._checkpoints if seq > count]
        if beyond:
            self._fail(
                count + 1,
                f"events {count + 1}..{max(beyond)} are missing (deleted): "
                f"a signed checkpoint covers event {max(beyond)}",
            )
        elif head is None and count > 0:
            self._fail(count + 1, f"the audit head is missing: events after {count} were removed")
        elif head is not None and head != (count, self._prev):
            # The head records the last event written; events removed from the end leave
            # the chain itself intact, but not its agreement with the head.
            self._fail(count + 1, f"events after {count} are missing (deleted)")
        elif max_age is not None and now is not None:
            newest = max(self._checkpoints.values(), key=lambda c: c.seq, default=None)
            if newest is None:
                if count > 0:
                    self._fail(1, "the log has no signed checkpoint")
            elif newest.at < now - max_age:
                self._fail(
                    newest.seq + 1,
                    f"the newest signed checkpoint (event {newest.seq}, "
                    f"{newest.at:%Y-%m-%dT%H:%M:%SZ}) is older than "
                    f"{int(max_age.total_seconds())} s",
                )
        if self.failure is not None:
            return self.failure
        return Verification(count, checkpoints=self.signed)


def _event(row: AuditEvent) -> Event:
    return Event(
        row.seq, row.at, row.actor, row.action, row.target, row.details, row.prev_hash, row.hash
    )


def _checkpoint(row: AuditCheckpoint) -> Checkpoint:
    return Checkpoint(row.seq, row.event_hash, row.at, bytes(row.signature))


def stored_checkpoints(session: Session) -> list[Checkpoint]:
    """Returns every stored checkpoint, oldest first."""
    rows = session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).scalars()
    return [_checkpoint(r) for r in rows]


def stored_events(session: Session, *, batch: int = 5000) -> Iterator[Event]:
    """Yields every stored event in sequence order, in batches."""
    last = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > last)
                .order_by(AuditEvent.seq)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return
        for row in rows:
            yield _event(row)
        last = rows[-1].seq


def verify_stored(
    session: Session,
    public_key: AuditPublicKey | None,
    *,
    now: datetime.datetime | None = None,
    max_age: datetime.timedelta | None = None,
    known: Sequence[Checkpoint] = (),
    batch: int = 5000,
) -> Verification:
    """Verifies the stored chain against its stored checkpoints and any exported ones.

    Without a public key only the hash chain and the head are checked.
    """
    checkpoints = [*stored_checkpoints(session), *known] if public_key is not None else []
    check = ChainCheck(public_key, checkpoints)
    for ev in stored_events(session, batch=batch):
        if not check.feed(ev):
            break
    row = session.get(AuditHead, 1)
    head = (row.seq, row.hash) if row is not None else None
    return check.finish(head=head, now=now, max_age=max_age)


def write(session: Session, key: AuditSigningKey, now: datetime.datetime) -> Checkpoint:
    """Signs the chain's head as it stands and stores the checkpoint."""
    # The head row is locked so the signed head is the committed one; appenders wait for
    # one signature at most.
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).with_for_update()
    ).scalar_one_or_none()
    seq, digest = (head.seq, head.hash) if head is not None else (0, GENESIS)
    at = now.astimezone(datetime.UTC).replace(microsecond=0)
    signature = sign(key, seq, digest, at)
    session.add(AuditCheckpoint(seq=seq, event_hash=digest, at=at, signature=signature))
    return Checkpoint(seq, digest, at, signature)


def due(session: Session, now: datetime.datetime, *, every_events: int, every_seconds: int) -> bool:
    """Tells whether N events or T seconds have passed since the newest checkpoint."""
    newest = session.execute(
        select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
    ).scalar_one_or_none()
    if newest is None:
        return True
    head_seq = session.execute(select(func.max(AuditHead.seq))).scalar_one_or_none() or 0
    if head_seq - newest.seq >= every_events:
        return True
    return newest.at <= now - datetime.timedelta(seconds=every_seconds)


# -- JSON lines ---------------------------------------------------------------------------


def _line(item: dict[str, Any]) -> str:
    # One serialisation only (sorted keys, no blanks, ASCII): a reader re-serialises each
    # line and compares, so no byte of an export can change without the check noticing.
    return json.dumps(item, sort_keys=True, separators=(",", ":"))


def export_lines(session: Session) -> Iterator[str]:
    """Yields the log up to its newest checkpoint as JSON lines: events, then checkpoints."""
    checkpoints = stored_checkpoints(session)
    until = max((c.seq for c in checkpoints), default=0)
    for ev in stored_events(session):
        if ev.seq > until:
            break
        yield _line(
            {
                "type": "event",
                "seq": ev.seq,
                "at": ev.at.astimezone(datetime.UTC).isoformat(),
                "actor": ev.actor,
                "action": ev.action,
                "target": ev.target,
                "details": ev.details,
                "prev_hash": ev.prev_hash,
                "hash": ev.hash,
            }
        )
    for cp in checkpoints:
        yield _line(
            {
                "type": "checkpoint",
                "seq": cp.seq,
                "event_hash": cp.event_hash,
                "at": cp.at.astimezone(datetime.UTC).isoformat(),
                "signature": base64.b64encode(cp.signature).decode(),
            }
        )


def parse_lines(lines: Iterable[str]) -> tuple[list[Event], list[Checkpoint]]:
    """Reads an export back; a malformed line is an error that names its line number."""
    events: list[Event] = []
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item: dict[str, Any] = json.loads(line)
            if not isinstance(item, dict) or _line(item) != line.rstrip("\n"):
                raise ValueError("not in the export's canonical form")
            kind = item["type"]
            at = datetime.datetime.fromisoformat(item["at"])
            if at.tzinfo is None or at.isoformat() != item["at"]:
                # fromisoformat takes any separator between date and time; the export has one.
                raise ValueError("time not in the export's form")
            if kind == "event":
                events.append(
                    Event(
                        int(item["seq"]),
                        at,
                        str(item["actor"]),
                        str(item["action"]),
                        str(item["target"]),
                        str(item["details"]),
                        str(item["prev_hash"]),
                        str(item["hash"]),
                    )
                )
            elif kind == "checkpoint":
                checkpoints.append(
                    Checkpoint(
                        int(item["seq"]),
                        str(item["event_hash"]),
                        at,
                        base64.b64decode(item["signature"], validate=True),
                    )
                )
            else:
                raise ValueError(f"unknown type {kind!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise bad_request(f"line {number} is not an audit export line: {e}") from None
    return events, checkpoints


def verify_export(
    events: Sequence[Event],
    checkpoints: Sequence[Checkpoint],
    public_key: AuditPublicKey,
    *,
    now: datetime.datetime | None = None,
    max_age: datetime.timedelta | None = None,
) -> Verification:
    """Verifies an exported log with the audit public key alone: no database, no token."""
    check = ChainCheck(public_key, checkpoints)
    for ev in sorted(events, key=lambda e: e.seq):
        if not check.feed(ev):
            break
    # An export has no head row: its newest checkpoint stands for it, so events after the
    # newest checkpoint are unsigned and the export must end at a checkpoint.
    newest = max((c.seq for c in checkpoints), default=0)
    if check.failure is None and check.count > newest:
        return Verification(
            check.count,
            newest + 1,
            f"events {newest + 1}..{check.count} are not covered by a signed checkpoint",
            check.signed,
        )
    return check.finish(head=check.head, now=now, max_age=max_age)
