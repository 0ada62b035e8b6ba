"""Signed checkpoints: tampering with the audit tables is caught and the first bad event named."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select, update

from pki.errors import PKIError
from pki.store import AuditEvent, Database, audit, audit_checkpoint, session_scope
from pki.store.audit import Verification
from pki.store.models import AuditCheckpoint, AuditHead

T0 = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
HOUR = datetime.timedelta(hours=1)


def append(db: Database, first: int, count: int) -> None:
    for i in range(first, first + count):
        with session_scope(db) as s:
            audit.append(
                s,
                at=T0 + datetime.timedelta(seconds=i),
                actor="test",
                action="thing.done",
                target=f"t{i}",
                details={"i": i},
            )


def checkpoint(db: Database, at: datetime.datetime = T0) -> audit_checkpoint.Checkpoint:
    with session_scope(db) as s:
        return audit_checkpoint.write(s, KEY, at)


def check(
    db: Database,
    *,
    now: datetime.datetime = T0,
    known: list[audit_checkpoint.Checkpoint] | None = None,
) -> Verification:
    with session_scope(db) as s:
        return audit_checkpoint.verify_stored(
            s, KEY.public_key(), now=now, max_age=HOUR, known=known or []
        )


def export(db: Database) -> list[str]:
    with session_scope(db) as s:
        return list(audit_checkpoint.export_lines(s))


def offline(lines: list[str]) -> Verification:
    events, checkpoints = audit_checkpoint.parse_lines(lines)
    return audit_checkpoint.verify_export(events, checkpoints, KEY.public_key())


def rechain_from(db: Database, seq: int, target: str) -> None:
    """Rewrites event `seq` and recomputes every later hash and the head, as anyone could."""
    with session_scope(db) as s:
        rows = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        prev = audit.GENESIS
        for ev in rows:
            if ev.seq == seq:
                ev.target = target
            ev.prev_hash = prev
            ev.hash = audit.event_hash(
                seq=ev.seq,
                at=ev.at,
                actor=ev.actor,
                action=ev.action,
                target=ev.target,
                details=ev.details,
                prev_hash=prev,
            )
            prev = ev.hash
        s.execute(update(AuditHead).values(seq=rows[-1].seq, hash=prev))


class TestCheckpointedChain:
    def test_checkpointed_chain_verifies(self, db: Database) -> None:
        append(db, 1, 10)
        checkpoint(db)
        append(db, 11, 5)
        checkpoint(db)
        result = check(db)
        assert result.ok, result.problem
        assert (result.events, result.checkpoints) == (15, 2)

    def test_checkpoint_signs_the_head(self, db: Database) -> None:
        append(db, 1, 3)
        signed = checkpoint(db)
        with session_scope(db) as s:
            head = s.get(AuditHead, 1)
            assert head is not None
            assert (signed.seq, signed.event_hash) == (head.seq, head.hash)
        assert audit_checkpoint.signature_valid(KEY.public_key(), signed)

    def test_edited_row_is_named(self, db: Database) -> None:
        append(db, 1, 10)
        checkpoint(db)
        with session_scope(db) as s:
            s.execute(update(AuditEvent).where(AuditEvent.seq == 4).values(actor="forged"))
        result = check(db)
        assert result.broken_seq == 4 and "altered" in (result.problem or "")

    def test_deleted_last_row_is_named(self, db: Database) -> None:
        append(db, 1, 10)
        checkpoint(db)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq == 10))
        result = check(db)
        assert result.broken_seq == 10 and "missing" in (result.problem or "")

    def test_deleted_last_20_rows_and_head_are_named(self, db: Database) -> None:
        append(db, 1, 50)
        checkpoint(db)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq > 30))
            s.execute(delete(AuditHead))
        result = check(db)
        assert result.broken_seq == 31 and "missing" in (result.problem or "")

    def test_deleted_rows_after_checkpoint_and_head_are_named(self, db: Database) -> None:
        append(db, 1, 30)
        checkpoint(db)
        append(db, 31, 20)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq > 30))
            s.execute(delete(AuditHead))
        result = check(db)
        assert result.broken_seq == 31 and "head is missing" in (result.problem or "")

    def test_deleted_rows_with_forged_head_and_checkpoint_rows_are_stale(
        self, db: Database
    ) -> None:
        # Events and their checkpoint removed, head rewritten to match: only the age of
        # the newest surviving checkpoint is left to tell, and it does.
        append(db, 1, 10)
        checkpoint(db, T0)
        append(db, 11, 10)
        last = checkpoint(db, T0 + 2 * HOUR)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq > 10))
            s.execute(delete(AuditCheckpoint).where(AuditCheckpoint.seq == last.seq))
            ev10 = s.get(AuditEvent, 10)
            assert ev10 is not None
            s.execute(update(AuditHead).values(seq=10, hash=ev10.hash))
        result = check(db, now=T0 + 2 * HOUR)
        assert result.broken_seq == 11 and "older than 3600 s" in (result.problem or "")

    def test_rechained_rewrite_is_named(self, db: Database) -> None:
        append(db, 1, 10)
        checkpoint(db)
        append(db, 11, 10)
        checkpoint(db)
        rechain_from(db, 11, "forged")
        # The hash chain alone now says intact: that is what the signature is for.
        with session_scope(db) as s:
            assert audit.verify(s).ok
        result = check(db)
        assert result.broken_seq == 11 and "rewritten" in (result.problem or "")

    def test_wiped_tables_caught_with_exported_checkpoints(self, db: Database) -> None:
        append(db, 1, 10)
        checkpoint(db)
        _, known = audit_checkpoint.parse_lines(export(db))
        with session_scope(db) as s:
            s.execute(delete(AuditEvent))
            s.execute(delete(AuditCheckpoint))
            s.execute(delete(AuditHead))
        result = check(db, known=known)
        assert result.broken_seq == 1 and "missing" in (result.problem or "")

    def test_forged_checkpoint_is_named(self, db: Database) -> None:
        append(db, 1, 10)
        with session_scope(db) as s:
            head = s.get(AuditHead, 1)
            assert head is not None
            other = ec.generate_private_key(ec.SECP256R1())
            s.add(
                AuditCheckpoint(
                    seq=head.seq,
                    event_hash=head.hash,
                    at=T0,
                    signature=audit_checkpoint.sign(other, head.seq, head.hash, T0),
                )
            )
        result = check(db)
        assert result.broken_seq == 10 and "not signed" in (result.problem or "")

    def test_stale_checkpoint_refused(self, db: Database) -> None:
        append(db, 1, 3)
        checkpoint(db, T0)
        assert check(db, now=T0 + HOUR).ok
        result = check(db, now=T0 + HOUR + datetime.timedelta(seconds=1))
        assert result.broken_seq == 4 and "older" in (result.problem or "")

    def test_log_without_checkpoint_refused(self, db: Database) -> None:
        append(db, 1, 3)
        result = check(db)
        assert result.broken_seq == 1 and "no signed checkpoint" in (result.problem or "")


class TestDue:
    def test_due_without_checkpoint(self, sqlite_db: Database) -> None:
        with session_scope(sqlite_db) as s:
            assert audit_checkpoint.due(s, T0, every_events=5, every_seconds=60)

    def test_due_after_events_or_seconds(self, sqlite_db: Database) -> None:
        append(sqlite_db, 1, 2)
        checkpoint(sqlite_db, T0)
        with session_scope(sqlite_db) as s:
            assert not audit_checkpoint.due(s, T0, every_events=5, every_seconds=60)
            assert audit_checkpoint.due(
                s, T0 + datetime.timedelta(seconds=60), every_events=5, every_seconds=60
            )
        append(sqlite_db, 3, 5)
        with session_scope(sqlite_db) as s:
            assert audit_checkpoint.due(s, T0, every_events=5, every_seconds=60)


class TestExport:
    def test_export_verifies_offline(self, sqlite_db: Database) -> None:
        append(sqlite_db, 1, 5)
        checkpoint(sqlite_db)
        append(sqlite_db, 6, 2)  # after the newest checkpoint: not exported
        lines = export(sqlite_db)
        assert len(lines) == 6
        result = offline(lines)
        assert result.ok and result.events == 5

    def test_export_fails_after_any_one_byte_change(self, sqlite_db: Database) -> None:
        append(sqlite_db, 1, 3)
        checkpoint(sqlite_db)
        text = "".join(line + "\n" for line in export(sqlite_db)).encode()
        changed = 0
        for position in range(0, len(text), 3):
            forged = bytearray(text)
            forged[position] ^= 0x01
            try:
                lines = forged.decode("ascii").split("\n")
                result = offline(lines)
            except (PKIError, UnicodeDecodeError):
                changed += 1
                continue
            assert not result.ok, f"byte {position} changed and the export still verifies"
            changed += 1
        assert changed == len(range(0, len(text), 3))

    def test_export_line_removed_is_named(self, sqlite_db: Database) -> None:
        append(sqlite_db, 1, 5)
        checkpoint(sqlite_db)
        lines = export(sqlite_db)
        del lines[2]
        result = offline(lines)
        assert result.broken_seq == 3

    def test_export_without_checkpoint_lines_refused(self, sqlite_db: Database) -> None:
        append(sqlite_db, 1, 5)
        checkpoint(sqlite_db)
        result = offline(export(sqlite_db)[:-1])
        assert result.broken_seq == 1 and "not covered" in (result.problem or "")

    def test_export_garbage_line_names_its_number(self) -> None:
        with pytest.raises(PKIError, match="line 2"):
            audit_checkpoint.parse_lines(["", "not json"])
