"""Concurrent revocations of one certificate: the locked row decides, keyCompromise wins."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

from cryptography import x509
from sqlalchemy import create_engine, func, select, text

from pki.errors import ErrorKind, PKIError
from pki.revocation import RevocationService, Revoked
from pki.serial import serial_hex
from pki.store import Database, session_scope
from pki.store.repository import CertificateRepository
from pki.store.revocation_models import RevocationEvent
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import MovableClock, fast_issuance, issue_device

KC = x509.ReasonFlags.key_compromise
AC = x509.ReasonFlags.affiliation_changed
RUNS = 20
WAIT = 30.0


@contextlib.contextmanager
def row_locked(url: str, certificate_id: int) -> Iterator[None]:
    """Holds the certificate's row lock (PostgreSQL) until both revocations wait for it."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            lock = text("SELECT id FROM certificates WHERE id = :id FOR UPDATE")
            conn.execute(lock, {"id": certificate_id})
            yield
    finally:
        engine.dispose()


def wait_for_lock_waiters(url: str, count: int) -> None:
    """Polls pg_stat_activity until `count` backends of this database wait on a lock."""
    engine = create_engine(url)
    try:
        deadline = time.monotonic() + WAIT
        with engine.connect() as conn:
            while True:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
                conn.commit()
                if waiting >= count:
                    return
                assert time.monotonic() < deadline, f"only {waiting} revocations wait"
                time.sleep(0.01)
    finally:
        engine.dispose()


def revoke(
    front: Database,
    reason: x509.ReasonFlags,
    serial: str,
    barrier: threading.Barrier,
    results: dict[str, Revoked | PKIError],
) -> None:
    """Revokes through its own engine once both threads are ready; keeps result or error."""
    service = RevocationService(front, MovableClock())
    barrier.wait(timeout=WAIT)
    try:
        results[reason.value] = service.revoke(serial, reason, actor="race")
    except PKIError as e:
        results[reason.value] = e


def test_key_compromise_always_wins_over_a_concurrent_lesser_reason(hierarchy: Hierarchy) -> None:
    """keyCompromise and affiliationChanged at once from two connections, 20 times.

    On PostgreSQL a third connection holds the row lock until both revocations are queued
    behind it, so they run at the same instant when it lets go; on SQLite both start
    together and queue for the write lock."""
    db = hierarchy.db
    url = db.url
    issuance = fast_issuance(hierarchy)
    fronts = [Database(url), Database(url)]  # two independent engines, as two CA fronts
    outcomes: Counter[str] = Counter()
    try:
        for run in range(RUNS):
            issued = issue_device(hierarchy, f"RACE-{run:02d}", issuance)
            serial = serial_hex(issued.serial)
            with session_scope(db) as s:
                certificate_id = CertificateRepository(s).by_serial(serial).id
            results: dict[str, Revoked | PKIError] = {}
            barrier = threading.Barrier(2)
            threads = [
                threading.Thread(target=revoke, args=(f, r, serial, barrier, results))
                for f, r in ((fronts[0], KC), (fronts[1], AC))
            ]
            if db.is_sqlite:
                for t in threads:
                    t.start()
            else:
                with row_locked(url, certificate_id):
                    for t in threads:
                        t.start()
                    wait_for_lock_waiters(url, 2)
            for t in threads:
                t.join(timeout=WAIT)
                assert not t.is_alive()
            kc, ac = results[KC.value], results[AC.value]
            assert not isinstance(kc, PKIError), kc
            assert kc.changed
            if isinstance(ac, PKIError):
                assert ac.kind is ErrorKind.CONFLICT, ac
                outcomes["affiliationChanged refused"] += 1
            else:
                assert ac.changed
                outcomes["affiliationChanged first"] += 1
            with session_scope(db) as s:
                record = CertificateRepository(s).by_serial(serial)
                outcomes[f"final {record.revocation_reason}"] += 1
                events = [
                    (e.action, e.reason)
                    for e in s.execute(
                        select(RevocationEvent)
                        .where(RevocationEvent.certificate_id == certificate_id)
                        .order_by(RevocationEvent.id)
                    ).scalars()
                ]
            if isinstance(ac, PKIError):
                assert events == [("revoked", "keyCompromise")]
            else:
                assert events == [
                    ("revoked", "affiliationChanged"),
                    ("reason_changed", "keyCompromise"),
                ]
    finally:
        for front in fronts:
            front.dispose()
    assert outcomes["final keyCompromise"] == RUNS, outcomes
    assert outcomes["affiliationChanged first"] + outcomes["affiliationChanged refused"] == RUNS
    with session_scope(db) as s:
        total = s.execute(select(func.count()).select_from(RevocationEvent)).scalar_one()
    assert total == RUNS + outcomes["affiliationChanged first"]
