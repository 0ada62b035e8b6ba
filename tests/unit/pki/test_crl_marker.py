"""CRL completeness by the revocation marker, full CRLs with their deltas, renewal, root CRLs."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography import x509
from sqlalchemy import Connection, func, insert, select, text

from pki import lint
from pki.crl_publisher import CRLPublisher, CRLPublisherConfig, PublishedCRL
from pki.device import DeviceService
from pki.errors import ErrorKind, PKIError
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.store import (
    CertificateRecord,
    CertificateStatus,
    Database,
    Device,
    DeviceState,
    session_scope,
)
from pki.store.revocation_models import (
    CertificateStateReader,
    CRLRepository,
    OCSPResponseRecord,
    OCSPResponseRepository,
    RevocationEvent,
)
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import MovableClock, issue_device, register_device

KC = x509.ReasonFlags.key_compromise
PERIOD = datetime.timedelta(hours=6)
DELAY = datetime.timedelta(seconds=0)


class Setup:
    def __init__(self, h: Hierarchy, config: CRLPublisherConfig | None = None) -> None:
        self.h = h
        self.clock = MovableClock()
        self.publisher = CRLPublisher(h.db, self.clock, h.config.ca.urls, config)
        self.revocation = RevocationService(h.db, self.clock)

    def revoke(self, serial: int, reason: x509.ReasonFlags = KC) -> None:
        self.revocation.revoke(serial_hex(serial), reason, actor="t")

    def due(self, *, delta: bool = False, issuer_id: str = "devices") -> str | None:
        return self.publisher.due(issuer_id, delta=delta, period=PERIOD, delay=DELAY)

    def marker(self, issuer_id: str = "devices") -> int:
        with session_scope(self.h.db) as s:
            return CertificateStateReader(s).marker(issuer_id)


@pytest.fixture
def setup(hierarchy: Hierarchy) -> Setup:
    return Setup(hierarchy)


def serials(published: PublishedCRL | None) -> set[int]:
    assert published is not None
    return {r.serial_number for r in x509.load_der_x509_crl(published.crl_der)}


def extension(crl_der: bytes, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return x509.load_der_x509_crl(crl_der).extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def insert_batch(db: Database, now: datetime.datetime, batch: str, count: int) -> set[int]:
    """Registers `count` devices of a batch with one issued certificate each; their serials."""
    devices = [
        {
            "id": f"{batch}-{i:05d}",
            "model": "sensor",
            "batch": batch,
            "state": DeviceState.ENROLLED,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    certificates = [
        {
            "issuer_id": "devices",
            "serial_hex": serial_hex(0x20_0000 + i),
            "profile": "device",
            "status": CertificateStatus.ISSUED,
            "subject": f"serialNumber={batch}-{i:05d}",
            "sans": "[]",
            "device_id": f"{batch}-{i:05d}",
            "not_before": now - datetime.timedelta(days=1),
            "not_after": now + datetime.timedelta(days=30),
            "tbs_der": b"\x30\x00",
            "created_at": now,
            "issued_at": now,
        }
        for i in range(count)
    ]
    with session_scope(db) as session:
        session.execute(insert(Device.__table__), devices)  # type: ignore[arg-type]
        session.execute(insert(CertificateRecord.__table__), certificates)  # type: ignore[arg-type]
    return {0x20_0000 + i for i in range(count)}


@pytest.fixture
def lock_holder(hierarchy: Hierarchy) -> Iterator[Callable[[int], Connection]]:
    """Holds row locks on certificates from a connection of the test (PostgreSQL only)."""
    if hierarchy.db.is_sqlite:
        pytest.skip("row locks: SQLite locks the whole database")
    connections: list[Connection] = []

    def hold(serial: int) -> Connection:
        conn = hierarchy.db.engine.connect()
        connections.append(conn)
        conn.begin()
        conn.execute(
            select(CertificateRecord.id)
            .where(CertificateRecord.serial_hex == serial_hex(serial))
            .with_for_update()
        ).one()
        return conn

    yield hold
    for conn in connections:
        conn.rollback()
        conn.close()


def wait_for_lock_waiters(db: Database, count: int) -> None:
    """Polls PostgreSQL until `count` backends of this database wait for a lock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiting >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} backends waiting for a lock after 30 s")


class TestMarker:
    def test_every_revoking_transaction_advances_the_marker_once(self, setup: Setup) -> None:
        a = issue_device(setup.h, "A").certificate
        b = issue_device(setup.h, "B").certificate
        start = setup.marker()
        setup.revoke(a.serial_number, x509.ReasonFlags.certificate_hold)
        assert setup.marker() == start + 1
        setup.revoke(a.serial_number, x509.ReasonFlags.certificate_hold)  # no change
        assert setup.marker() == start + 1
        setup.revocation.release(serial_hex(a.serial_number), actor="t")
        assert setup.marker() == start + 2
        setup.revocation.revoke_devices(device_ids=["A", "B"], reason=KC, actor="t")
        assert setup.marker() == start + 3  # one step for the whole list
        setup.revoke(b.serial_number)  # already revoked for that reason
        assert setup.marker() == start + 3
        assert setup.marker("root") == 0

    def test_revocation_after_publication_is_due_whatever_the_timestamps(
        self, setup: Setup
    ) -> None:
        # A revocation stamped before the CRL's thisUpdate but committed after the CRL read
        # its entries: the marker, not the time, makes the next CRLs due.
        cert = issue_device(setup.h).certificate
        setup.publisher.publish(setup.h.devices)
        assert setup.due() is None and setup.due(delta=True) is None
        earlier = RevocationService(setup.h.db, FixedBefore(setup.clock))
        earlier.revoke(serial_hex(cert.serial_number), KC, actor="t")
        assert setup.due() == "revocations since the last CRL"
        assert setup.due(delta=True) == "revocations since the last CRL"
        assert serials(setup.publisher.publish(setup.h.devices, delta=True)) == {cert.serial_number}
        assert setup.due(delta=True) is None
        assert serials(setup.publisher.publish(setup.h.devices)) == {cert.serial_number}
        assert setup.due() is None

    def test_lock_hold_race_revocation_reaches_the_next_crl(
        self, setup: Setup, lock_holder: Callable[[int], Connection]
    ) -> None:
        r = issue_device(setup.h, "R").certificate
        r0 = issue_device(setup.h, "R0").certificate
        setup.publisher.publish(setup.h.devices)
        holder = lock_holder(r.serial_number)
        errors: list[BaseException] = []

        def revoke_r() -> None:
            try:
                setup.revoke(r.serial_number)
            except BaseException as e:  # reported by the assertion below
                errors.append(e)

        worker = threading.Thread(target=revoke_r)
        worker.start()
        try:
            wait_for_lock_waiters(setup.h.db, 1)
            # R was stamped before the CRL's thisUpdate and commits after it.
            setup.clock.advance(datetime.timedelta(minutes=1))
            setup.revoke(r0.serial_number)
            during = setup.publisher.publish(setup.h.devices)
            assert serials(during) == {r0.serial_number}
            assert serials(during.delta) == set()
            assert setup.due() is None and setup.due(delta=True) is None
        finally:
            holder.rollback()
            worker.join(timeout=60)
        assert not worker.is_alive() and errors == []
        assert setup.due() == "revocations since the last CRL"
        assert setup.due(delta=True) == "revocations since the last CRL"
        delta = setup.publisher.publish(setup.h.devices, delta=True)
        assert delta.base_number == during.crl_number
        assert serials(delta) == {r.serial_number}
        full = setup.publisher.publish(setup.h.devices)
        assert serials(full) == {r.serial_number, r0.serial_number}

    def test_bulk_revocation_blocked_behind_a_publisher_is_on_the_next_crls(
        self, setup: Setup, lock_holder: Callable[[int], Connection]
    ) -> None:
        batch = insert_batch(setup.h.db, setup.clock.now(), "LOT", 2000)
        setup.publisher.publish(setup.h.devices)
        # The bulk revocation locks its certificate rows in id order and waits on the last.
        holder = lock_holder(max(batch))
        results: list[int] = []
        worker = threading.Thread(
            target=lambda: results.append(
                len(setup.revocation.revoke_devices(batch="LOT", reason=KC, actor="t").revoked)
            )
        )
        worker.start()
        try:
            wait_for_lock_waiters(setup.h.db, 1)
            during = setup.publisher.publish(setup.h.devices)
            assert during.entries == 0 and during.delta is not None
        finally:
            holder.rollback()
            worker.join(timeout=120)
        assert results == [2000]
        assert setup.due() == "revocations since the last CRL"
        delta = setup.publisher.publish(setup.h.devices, delta=True)
        assert delta.entries == 2000 and serials(delta) == batch
        full = setup.publisher.publish(setup.h.devices)
        assert full.entries == 2000 and serials(full) == batch

    def test_bulk_revocation_concurrent_with_publishers_all_on_next_crls(
        self, setup: Setup
    ) -> None:
        batch = insert_batch(setup.h.db, setup.clock.now(), "LOT", 2000)
        setup.publisher.publish(setup.h.devices)
        barrier = threading.Barrier(2)
        published: list[PublishedCRL] = []
        revoked: list[int] = []

        def publish() -> None:
            db = Database(setup.h.db.url)  # its own engine, as another process
            try:
                publisher = CRLPublisher(db, setup.clock, setup.h.config.ca.urls, lint_crls=False)
                barrier.wait()
                for _ in range(3):
                    published.append(publisher.publish(setup.h.devices))
            finally:
                db.dispose()

        def revoke() -> None:
            barrier.wait()
            result = setup.revocation.revoke_devices(batch="LOT", reason=KC, actor="t")
            revoked.append(len(result.revoked))

        threads = [threading.Thread(target=publish), threading.Thread(target=revoke)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert revoked == [2000] and len(published) == 3
        # Each concurrent CRL holds the whole batch or none of it (one transaction).
        assert {p.entries for p in published} <= {0, 2000}
        if published[-1].entries == 0:
            assert setup.due() == "revocations since the last CRL"
        delta = setup.publisher.publish(setup.h.devices, delta=True)
        full = setup.publisher.publish(setup.h.devices)
        assert full.entries == 2000 and serials(full) == batch
        if published[-1].entries == 0:
            assert delta.entries == 2000 and serials(delta) == batch


class FixedBefore:
    """FixedBefore tells the time one minute before another clock's."""

    def __init__(self, clock: MovableClock) -> None:
        self.clock = clock

    def now(self) -> datetime.datetime:
        return self.clock.now() - datetime.timedelta(minutes=1)


class TestFullWithDelta:
    def test_full_crl_stored_with_its_delta_which_it_points_at(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.revoke(cert.serial_number)
        full = setup.publisher.publish(setup.h.devices)
        assert full.delta is not None
        assert full.delta.base_number == full.crl_number
        assert full.delta.crl_number == full.crl_number + 1
        assert serials(full) == {cert.serial_number} and serials(full.delta) == set()
        fresh = extension(full.crl_der, x509.FreshestCRL)
        assert isinstance(fresh, x509.FreshestCRL)
        assert fresh[0].full_name == [
            x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/devices-delta.crl")
        ]
        indicator = extension(full.delta.crl_der, x509.DeltaCRLIndicator)
        assert isinstance(indicator, x509.DeltaCRLIndicator)
        assert indicator.crl_number == full.crl_number
        assert extension(full.delta.crl_der, x509.FreshestCRL) is None
        # RFC 5280 §5.2.4: the delta's IDP is the base's.
        assert extension(full.crl_der, x509.IssuingDistributionPoint) == extension(
            full.delta.crl_der, x509.IssuingDistributionPoint
        )
        for der in (full.crl_der, full.delta.crl_der):
            assert lint.blocking(lint.lint_crl(der)) == []
        with session_scope(setup.h.db) as s:
            current = CRLRepository(s).current_delta("devices")
            assert current is not None and current.crl_number == full.delta.crl_number

    def test_deltas_off_no_freshest_crl_and_no_delta(self, hierarchy: Hierarchy) -> None:
        setup = Setup(hierarchy, CRLPublisherConfig(deltas=False))
        full = setup.publisher.publish(hierarchy.devices)
        assert full.delta is None
        assert extension(full.crl_der, x509.FreshestCRL) is None
        with pytest.raises(PKIError) as e:
            setup.publisher.publish(hierarchy.devices, delta=True)
        assert e.value.kind is ErrorKind.CONFLICT

    def test_delta_of_an_older_base_is_not_current(self, hierarchy: Hierarchy) -> None:
        with_deltas = Setup(hierarchy)
        with_deltas.publisher.publish(hierarchy.devices)
        with_deltas.publisher.publish(hierarchy.devices, delta=True)
        Setup(hierarchy, CRLPublisherConfig(deltas=False)).publisher.publish(hierarchy.devices)
        with session_scope(hierarchy.db) as s:
            assert CRLRepository(s).latest("devices", is_delta=True) is not None
            assert CRLRepository(s).current_delta("devices") is None
        assert with_deltas.due(delta=True) == "no delta CRL of the current base"

    def test_root_crl_has_no_idp_no_freshest_crl_and_no_delta(self, setup: Setup) -> None:
        published = setup.publisher.publish(setup.h.root)
        assert published.delta is None
        assert extension(published.crl_der, x509.IssuingDistributionPoint) is None
        assert extension(published.crl_der, x509.FreshestCRL) is None
        assert lint.blocking(lint.lint_crl(published.crl_der, authority=True)) == []
        with pytest.raises(PKIError) as e:
            setup.publisher.publish(setup.h.root, delta=True)
        assert e.value.kind is ErrorKind.CONFLICT


class TestRenewal:
    LONG = datetime.timedelta(days=30)

    def due(self, setup: Setup, issuer_id: str, delta: bool = False) -> str | None:
        return setup.publisher.due(issuer_id, delta=delta, period=self.LONG, delay=DELAY)

    def test_crls_renewed_before_next_update(self, setup: Setup) -> None:
        setup.publisher.publish(setup.h.root)
        setup.publisher.publish(setup.h.devices)
        config = CRLPublisherConfig()
        half = config.full_validity * config.renew_fraction
        setup.clock.advance(config.delta_validity * config.renew_fraction)
        assert self.due(setup, "root") is None and self.due(setup, "devices") is None
        assert self.due(setup, "devices", delta=True) == "renewal before nextUpdate"
        setup.clock.advance(half - config.delta_validity * config.renew_fraction)
        assert self.due(setup, "root") == "renewal before nextUpdate"
        assert self.due(setup, "devices") == "renewal before nextUpdate"
        setup.publisher.publish(setup.h.root)
        assert self.due(setup, "root") is None


def store_good_responses(db: Database, serials_: set[int], at: datetime.datetime) -> None:
    """Stores a pre-signed "good" response for each certificate, as the pre-signing job does."""
    with session_scope(db) as s:
        rows = s.execute(
            select(CertificateRecord).where(
                CertificateRecord.serial_hex.in_([serial_hex(n) for n in serials_])
            )
        ).scalars()
        OCSPResponseRepository(s).put_all(
            [
                OCSPResponseRecord(
                    certificate_id=r.id,
                    issuer_id=r.issuer_id,
                    serial_hex=r.serial_hex,
                    status="good",
                    this_update=at,
                    next_update=at + PERIOD,
                    signer_serial_hex="00",
                    response_der=b"stale",
                )
                for r in rows
            ]
        )


def events_of(db: Database, serials_: set[int]) -> dict[str, int]:
    with session_scope(db) as s:
        rows = s.execute(
            select(RevocationEvent.serial_hex, func.count())
            .where(RevocationEvent.serial_hex.in_([serial_hex(n) for n in serials_]))
            .group_by(RevocationEvent.serial_hex)
        ).all()
        return {r[0]: r[1] for r in rows}


class TestDeviceRevocations:
    def test_decommission_advances_marker_and_reaches_next_crls(self, setup: Setup) -> None:
        register_device(setup.h, "D")
        held = issue_device(setup.h, "D").certificate
        active = issue_device(setup.h, "D").certificate
        setup.revoke(held.serial_number, x509.ReasonFlags.certificate_hold)
        setup.publisher.publish(setup.h.devices)
        assert setup.due() is None and setup.due(delta=True) is None
        both = {held.serial_number, active.serial_number}
        store_good_responses(setup.h.db, both, setup.clock.now())
        before, events = setup.marker(), events_of(setup.h.db, both)
        devices = DeviceService(setup.h.db, setup.clock, revocation=setup.revocation)

        done = devices.decommission("D", actor="t")

        assert set(done.revoked) == {serial_hex(n) for n in both}
        after = events_of(setup.h.db, both)
        assert {s: after.get(s, 0) - events.get(s, 0) for s in map(serial_hex, both)} == {
            serial_hex(n): 1 for n in both
        }
        assert setup.marker() == before + 1 and setup.marker("root") == 0
        with session_scope(setup.h.db) as s:
            assert OCSPResponseRepository(s).count() == 0
        assert setup.due() == "revocations since the last CRL"
        assert setup.due(delta=True) == "revocations since the last CRL"
        assert serials(setup.publisher.publish(setup.h.devices, delta=True)) == both
        full = setup.publisher.publish(setup.h.devices)
        assert serials(full) == both
        assert {
            r.serial_number: r.extensions.get_extension_for_class(x509.CRLReason).value.reason
            for r in x509.load_der_x509_crl(full.crl_der)
        } == {n: x509.ReasonFlags.cessation_of_operation for n in both}

    def test_bulk_key_compromise_revokes_certificates_on_hold(self, setup: Setup) -> None:
        register_device(setup.h, "H", batch="LOT")
        held = issue_device(setup.h, "H").certificate
        setup.revoke(held.serial_number, x509.ReasonFlags.certificate_hold)
        before = setup.marker()

        result = setup.revocation.revoke_devices(batch="LOT", reason=KC, actor="t")

        assert [(r.serial_hex, r.changed) for r in result.revoked] == [
            (serial_hex(held.serial_number), True)
        ]
        assert setup.marker() == before + 1
        with session_scope(setup.h.db) as s:
            record = s.execute(
                select(CertificateRecord).where(
                    CertificateRecord.serial_hex == serial_hex(held.serial_number)
                )
            ).scalar_one()
            assert (record.status, record.revocation_reason) == (
                CertificateStatus.REVOKED,
                "keyCompromise",
            )
            assert s.get(Device, "H").state is DeviceState.REVOKED
