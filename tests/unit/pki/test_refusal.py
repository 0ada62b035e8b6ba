"""Refused requests reach the audit log folded per key and minute, with the chain intact."""

from __future__ import annotations

import datetime
import threading

from sqlalchemy import func, select

from pki.clock import FixedClock
from pki.refusal import MAX_SUBJECTS_PER_SOURCE, OVERFLOW_SUBJECT, RefusalKind, RefusalRecorder
from pki.store import AuditEvent, Database, audit, session_scope
from pki.store.refusals import RefusalCount

T0 = datetime.datetime(2026, 11, 1, 12, 0, 5, tzinfo=datetime.UTC)


def events(db: Database, prefix: str = "refused.") -> list[AuditEvent]:
    with session_scope(db) as s:
        rows = s.execute(
            select(AuditEvent).where(AuditEvent.action.startswith(prefix)).order_by(AuditEvent.seq)
        )
        return list(rows.scalars().all())


def pending_rows(db: Database) -> int:
    with session_scope(db) as s:
        return int(s.execute(select(func.count()).select_from(RefusalCount)).scalar_one())


def verified(db: Database) -> audit.Verification:
    with session_scope(db) as s:
        return audit.verify(s)


class TestRefusalAudit:
    def test_refusal_flood_from_one_address_is_two_events_with_the_count(
        self, db: Database
    ) -> None:
        clock = FixedClock(T0)
        recorder = RefusalRecorder(db, clock)
        flood = 60
        for _ in range(flood):
            recorder.refused(RefusalKind.LOGIN, "wrong secret", source="192.0.2.7", subject="d-1")
        first = events(db)
        assert [(e.action, e.target, e.actor) for e in first] == [
            ("refused.login", "d-1", "client:192.0.2.7")
        ]
        assert '"reason":"wrong secret"' in first[0].details
        # The minute is over: the next flush writes its count as one event.
        clock.advance(datetime.timedelta(minutes=1))
        assert recorder.flush() == 1
        after = events(db)
        assert [e.action for e in after] == ["refused.login", "refused.login.repeated"]
        assert f'"count":{flood}' in after[1].details
        assert pending_rows(db) == 0
        assert recorder.flush() == 0
        result = verified(db)
        assert result.ok and result.events == 2

    def test_refusal_keys_differ_by_kind_subject_and_address(self, db: Database) -> None:
        clock = FixedClock(T0)
        recorder = RefusalRecorder(db, clock)
        recorder.refused(RefusalKind.LOGIN, "x", source="192.0.2.7", subject="d-1")
        recorder.refused(RefusalKind.LOGIN, "x", source="192.0.2.8", subject="d-1")
        recorder.refused(RefusalKind.LOGIN, "x", source="192.0.2.7", subject="d-2")
        recorder.refused(RefusalKind.IDENTITY, "x", source="192.0.2.7", subject="d-1")
        recorder.refused(RefusalKind.LOGIN, "x", source="192.0.2.7")
        assert len(events(db)) == 5
        clock.advance(datetime.timedelta(minutes=1))
        assert recorder.flush() == 0  # each key was refused once: nothing more to say
        assert pending_rows(db) == 0

    def test_refusal_of_a_new_minute_writes_the_finished_one(self, db: Database) -> None:
        clock = FixedClock(T0)
        recorder = RefusalRecorder(db, clock)
        for _ in range(3):
            recorder.refused(RefusalKind.THROTTLE, "too many", source="192.0.2.7", subject="d")
        clock.advance(datetime.timedelta(minutes=1))
        recorder.refused(RefusalKind.THROTTLE, "too many", source="192.0.2.7", subject="d")
        assert [e.action for e in events(db)] == [
            "refused.throttle",
            "refused.throttle",
            "refused.throttle.repeated",
        ]
        assert pending_rows(db) == 1

    def test_refusal_guessing_many_subjects_folds_into_one_key(self, db: Database) -> None:
        clock = FixedClock(T0)
        recorder = RefusalRecorder(db, clock)
        guesses = MAX_SUBJECTS_PER_SOURCE + 30
        for i in range(guesses):
            recorder.refused(RefusalKind.LOGIN, "unknown", source="192.0.2.9", subject=f"g{i}")
        targets = [e.target for e in events(db)]
        assert len(targets) == MAX_SUBJECTS_PER_SOURCE + 1
        assert targets[-1] == OVERFLOW_SUBJECT
        clock.advance(datetime.timedelta(minutes=1))
        assert recorder.flush() == 1
        assert '"count":30' in events(db)[-1].details
        assert verified(db).ok

    def test_refusal_text_from_the_client_is_escaped(self, db: Database) -> None:
        recorder = RefusalRecorder(db, FixedClock(T0))
        recorder.refused(RefusalKind.LOGIN, "bad\x1b[2J", source="192.0.2.7", subject="a\u202eb")
        (event,) = events(db)
        assert event.target == "a\\x202eb"
        assert "\x1b" not in event.details and "\\\\x1b" in event.details

    def test_refusal_concurrent_floods_count_every_refusal(self, db: Database) -> None:
        clock = FixedClock(T0)
        recorder = RefusalRecorder(db, clock)
        threads, per_thread = 4, 10
        errors: list[BaseException] = []

        def flood() -> None:
            try:
                for _ in range(per_thread):
                    recorder.refused(RefusalKind.LOGIN, "x", source="192.0.2.7", subject="d")
            except BaseException as e:  # reported below, not lost in the thread
                errors.append(e)

        workers = [threading.Thread(target=flood) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        clock.advance(datetime.timedelta(minutes=1))
        recorder.flush()
        found = events(db)
        assert [e.action for e in found] == ["refused.login", "refused.login.repeated"]
        assert f'"count":{threads * per_thread}' in found[1].details
        assert verified(db).ok
