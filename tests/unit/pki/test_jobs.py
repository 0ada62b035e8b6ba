"""Job locks and scheduled jobs: any number of schedulers give one publication per due job."""

from __future__ import annotations

import datetime
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography import x509
from sqlalchemy import func, select

from pki.crl_publisher import CRLPublisher
from pki.errors import ErrorKind, PKIError
from pki.issuer import Issuer
from pki.jobs import BUSY, CRLJob, Jobs
from pki.ocsp_responder import OCSPPresigner, SignerSet
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.store import Database, session_scope
from pki.store.job_lock import JobLocks
from pki.store.revocation_models import CRLRecord, CRLRepository, OCSPResponseRepository
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import (
    MovableClock,
    add_ocsp_signer,
    fast_issuance,
    issue_device,
)

T = TypeVar("T")
SCHEDULERS = 4
WAIT = 120.0
PERIOD = datetime.timedelta(hours=6)
DELAY = datetime.timedelta(0)


def at_once(url: str, count: int, work: Callable[[Database], T]) -> list[T]:
    """Runs work in `count` threads, each with its own engine (as separate schedulers would),
    released together by a barrier; returns every result, re-raising the first error."""
    barrier = threading.Barrier(count)
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        db = Database(url)
        try:
            barrier.wait(timeout=WAIT)
            result = work(db)
            with lock:
                results.append(result)
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            db.dispose()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
        assert not t.is_alive()
    if errors:
        raise errors[0]
    return results


class TestJobLocks:
    def test_one_holder_at_a_time_then_the_next(self, hierarchy: Hierarchy) -> None:
        db = hierarchy.db
        now = datetime.datetime.now(datetime.UTC)
        first, second = JobLocks(db), JobLocks(Database(db.url))
        try:
            with first.hold("crl:devices", now) as held:
                assert held
                with second.hold("crl:devices", now) as other:
                    assert not other
                with second.hold("crl:root", now) as different_job:
                    assert different_job
            with second.hold("crl:devices", now) as after:
                assert after
        finally:
            second.db.dispose()

    def test_sqlite_lease_of_a_dead_holder_expires(self, sqlite_hierarchy: Hierarchy) -> None:
        db = sqlite_hierarchy.db
        now = datetime.datetime.now(datetime.UTC)
        dead = JobLocks(db, lease=datetime.timedelta(minutes=5))
        taken = dead.hold("presign:devices", now)
        assert taken.__enter__()  # never left: the holder died
        other = JobLocks(db)
        with other.hold("presign:devices", now + datetime.timedelta(minutes=4)) as held:
            assert not held
        with other.hold("presign:devices", now + datetime.timedelta(minutes=5)) as held:
            assert held


class TestCRLJob:
    def test_n_schedulers_publish_one_crl_per_due_job(self, hierarchy: Hierarchy) -> None:
        h = hierarchy
        clock = MovableClock()
        revocation = RevocationService(h.db, clock)
        issuance = fast_issuance(h)
        outcomes: Counter[str] = Counter()
        rounds = 3
        for round_ in range(rounds):
            # Due for a reason each round: none yet, then a revocation, then the period.
            if round_ == 1:
                serial = serial_hex(issue_device(h, "JOB-1", issuance).serial)
                revocation.revoke(serial, x509.ReasonFlags.key_compromise, actor="t")
                clock.advance(datetime.timedelta(seconds=1))
            if round_ == 2:
                clock.advance(PERIOD)

            def job(db: Database) -> str:
                publisher = CRLPublisher(db, clock, h.config.ca.urls, lint_crls=False)
                done = Jobs(db, clock).crl(
                    publisher, "devices", lambda: h.devices, delta=False, when_due=(PERIOD, DELAY)
                )
                return "published" if done.published is not None else str(done.why)

            outcomes.update(at_once(h.db.url, SCHEDULERS, job))
        assert outcomes["published"] == rounds, outcomes
        assert outcomes["published"] + outcomes["not due"] + outcomes[BUSY] == SCHEDULERS * rounds
        with session_scope(h.db) as s:
            numbers = CRLRepository(s).numbers("devices")
            full = s.execute(
                select(func.count()).select_from(CRLRecord).where(CRLRecord.is_delta.is_(False))
            ).scalar_one()
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        assert full == rounds  # each with its delta CRL when deltas are on

    def test_delta_asked_while_full_crl_is_signed_is_refused(self, hierarchy: Hierarchy) -> None:
        h = hierarchy
        clock = MovableClock()
        CRLPublisher(h.db, clock, h.config.ca.urls, lint_crls=False).publish(h.devices)
        signing, release = threading.Event(), threading.Event()
        full: list[CRLJob] = []
        errors: list[BaseException] = []

        class PausedFull(CRLPublisher):
            """Stops in the signing of a full CRL until the test lets it go on."""

            def _sign(self, issuer: Issuer, r: Any, now: datetime.datetime, **kw: Any) -> bytes:
                if not r.is_delta:
                    signing.set()
                    assert release.wait(WAIT)
                return super()._sign(issuer, r, now, **kw)

        def publish_full() -> None:
            db = Database(h.db.url)  # its own engine, as another process
            try:
                publisher = PausedFull(db, clock, h.config.ca.urls, lint_crls=False)
                full.append(
                    Jobs(db, clock).crl(publisher, "devices", lambda: h.devices, delta=False)
                )
            except BaseException as e:  # reported by the assertion below
                errors.append(e)
            finally:
                db.dispose()

        worker = threading.Thread(target=publish_full)
        worker.start()
        outcomes: Counter[str] = Counter()
        other = Database(h.db.url)
        try:
            assert signing.wait(WAIT)
            publisher = CRLPublisher(other, clock, h.config.ca.urls, lint_crls=False)
            jobs = Jobs(other, clock)
            try:
                jobs.crl(publisher, "devices", lambda: h.devices, delta=True)
                outcomes["published"] += 1
            except PKIError as e:
                assert e.kind is ErrorKind.UNAVAILABLE and "try again" in e.message
                outcomes["refused"] += 1
            done = jobs.crl(
                publisher, "devices", lambda: h.devices, delta=True, when_due=(PERIOD, DELAY)
            )
            outcomes["published" if done.published is not None else str(done.why)] += 1
        finally:
            release.set()
            worker.join(timeout=WAIT)
            other.dispose()
        assert not worker.is_alive() and errors == []
        assert outcomes == Counter({"refused": 1, BUSY: 1}), outcomes
        published = full[0].published
        assert published is not None and published.delta is not None
        with session_scope(h.db) as s:
            served = CRLRepository(s).current_delta("devices")
            assert served is not None and served.base_number == published.crl_number

    def test_concurrent_full_and_delta_publishers_serve_a_delta_of_the_newest_full(
        self, hierarchy: Hierarchy
    ) -> None:
        h = hierarchy
        clock = MovableClock()
        rounds = 4

        def publish(db: Database, delta: bool) -> Counter[str]:
            publisher = CRLPublisher(db, clock, h.config.ca.urls, lint_crls=False)
            jobs = Jobs(db, clock)
            counts: Counter[str] = Counter()
            for _ in range(rounds):
                try:
                    jobs.crl(publisher, "devices", lambda: h.devices, delta=delta)
                    counts["delta" if delta else "full"] += 1
                except PKIError as e:
                    assert e.kind is ErrorKind.UNAVAILABLE, e
                    counts["refused"] += 1
            return counts

        CRLPublisher(h.db, clock, h.config.ca.urls, lint_crls=False).publish(h.devices)
        kinds = iter([False, True])
        lock = threading.Lock()

        def work(db: Database) -> Counter[str]:
            with lock:
                delta = next(kinds)
            return publish(db, delta)

        outcomes = sum(at_once(h.db.url, 2, work), Counter())
        assert sum(outcomes.values()) == 2 * rounds, outcomes
        with session_scope(h.db) as s:
            repo = CRLRepository(s)
            newest = repo.latest("devices", is_delta=False)
            served = repo.current_delta("devices")
            fulls = s.execute(
                select(func.count()).select_from(CRLRecord).where(CRLRecord.is_delta.is_(False))
            ).scalar_one()
        assert fulls == 1 + outcomes["full"]
        assert newest is not None and served is not None
        assert served.base_number == newest.crl_number


class TestPresignJob:
    def test_concurrent_presigners_upsert_without_clashes(self, hierarchy: Hierarchy) -> None:
        """Two pre-signing runs write the same certificates' responses at once (as a
        revocation's re-sign and a scheduler may): both succeed, one row per certificate."""
        h = hierarchy
        clock = MovableClock()
        keys: dict[str, object] = {}
        add_ocsp_signer(h, keys)  # type: ignore[arg-type]
        issuance = fast_issuance(h)
        for i in range(40):
            issue_device(h, f"UPS-{i}", issuance)

        def presign(db: Database) -> int:
            signers = SignerSet(db, clock, keys.__getitem__)  # type: ignore[arg-type]
            return OCSPPresigner(db, clock, signers, batch=10).run("devices").signed["devices"]

        signed = at_once(h.db.url, 2, presign)
        assert all(n > 0 for n in signed)
        with session_scope(h.db) as s:
            assert OCSPResponseRepository(s).count("devices") == 41  # 40 devices, the signer

    def test_n_schedulers_presign_each_response_once(self, hierarchy: Hierarchy) -> None:
        h = hierarchy
        clock = MovableClock()
        keys: dict[str, object] = {}
        add_ocsp_signer(h, keys)  # type: ignore[arg-type]
        issuance = fast_issuance(h)
        for i in range(20):
            issue_device(h, f"PRE-{i}", issuance)

        def presign(db: Database) -> tuple[int, str | None]:
            signers = SignerSet(db, clock, keys.__getitem__)  # type: ignore[arg-type]
            result = Jobs(db, clock).presign(OCSPPresigner(db, clock, signers), "devices")
            return result.signed.get("devices", 0), result.skipped.get("devices")

        results = at_once(h.db.url, SCHEDULERS, presign)
        assert sum(n for n, _ in results) == 21, results
        assert all(why in (None, BUSY) for _, why in results)
