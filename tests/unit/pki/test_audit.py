"""The hash-chained audit log catches edited and deleted events."""

from __future__ import annotations

import datetime

from sqlalchemy import delete, update

from pki.store import AuditEvent, Database, audit, session_scope

T0 = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)


def fill(db: Database, n: int = 5) -> None:
    for i in range(n):
        with session_scope(db) as s:
            audit.append(
                s,
                at=T0 + datetime.timedelta(seconds=i),
                actor="test",
                action="thing.done",
                target=f"t{i}",
                details={"i": i},
            )


def check(db: Database) -> audit.Verification:
    with session_scope(db) as s:
        return audit.verify(s)


class TestAuditChain:
    def test_audit_intact_chain_verifies(self, db: Database) -> None:
        fill(db)
        result = check(db)
        assert result.ok and result.events == 5

    def test_audit_edited_row_is_named(self, db: Database) -> None:
        fill(db)
        with session_scope(db) as s:
            s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(target="forged"))
        result = check(db)
        assert not result.ok
        assert result.broken_seq == 3
        assert "altered" in (result.problem or "")

    def test_audit_rehashed_edit_breaks_the_link(self, db: Database) -> None:
        fill(db)
        with session_scope(db) as s:
            ev = s.get(AuditEvent, 2)
            assert ev is not None
            ev.target = "forged"
            ev.hash = audit.event_hash(
                seq=ev.seq,
                at=ev.at,
                actor=ev.actor,
                action=ev.action,
                target=ev.target,
                details=ev.details,
                prev_hash=ev.prev_hash,
            )
        result = check(db)
        assert result.broken_seq == 3  # event 3 still points at the old hash of event 2

    def test_audit_deleted_row_is_named(self, db: Database) -> None:
        fill(db)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq == 2))
        result = check(db)
        assert result.broken_seq == 2
        assert "deleted" in (result.problem or "")

    def test_audit_deleted_last_row_is_named(self, db: Database) -> None:
        fill(db)
        with session_scope(db) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.seq == 5))
        result = check(db)
        assert result.broken_seq == 5

    def test_audit_append_continues_after_rollback(self, db: Database) -> None:
        fill(db, 2)
        try:
            with session_scope(db) as s:
                audit.append(s, at=T0, actor="t", action="a", target="x")
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        fill(db, 1)
        result = check(db)
        assert result.ok and result.events == 3

    def test_audit_several_events_in_one_transaction_chain(self, db: Database) -> None:
        fill(db, 1)
        with session_scope(db) as s:
            for i in range(3):
                audit.append(s, at=T0, actor="t", action="a", target=f"x{i}")
        fill(db, 1)
        result = check(db)
        assert result.ok and result.events == 5

    def test_audit_event_in_rolled_back_savepoint_is_gone(self, db: Database) -> None:
        fill(db, 1)
        with session_scope(db) as s:
            audit.append(s, at=T0, actor="t", action="kept", target="x")
            try:
                with s.begin_nested():
                    audit.append(s, at=T0, actor="t", action="dropped", target="y")
                    raise RuntimeError("abort")
            except RuntimeError:
                pass
            audit.append(s, at=T0, actor="t", action="kept", target="z")
        result = check(db)
        assert result.ok and result.events == 3
        with session_scope(db) as s:
            actions = [e.action for e in audit.recent(s, 3)]
        assert actions == ["thing.done", "kept", "kept"]
