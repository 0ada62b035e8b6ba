"""CRLPublisher over a real database: contents, deltas, lint, concurrency of numbers."""

from __future__ import annotations

import datetime
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import insert

from pki import lint
from pki.crl import RevokedEntry, build_crl
from pki.crl_publisher import (
    LINT_ALL_ENTRIES_UP_TO,
    CRLPublisher,
    CRLPublisherConfig,
    lint_sample,
)
from pki.errors import ErrorKind, PKIError
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.store import CertificateRecord, CertificateStatus, Database, session_scope
from pki.store.revocation_models import CRLRepository
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.revocation_pki import openssl
from tests.unit.pki.test_revocation_support import MovableClock, fast_issuance, issue_device

KC = x509.ReasonFlags.key_compromise


class Setup:
    def __init__(self, h: Hierarchy) -> None:
        self.h = h
        self.clock = MovableClock()
        self.publisher = CRLPublisher(h.db, self.clock, h.config.ca.urls)
        self.revocation = RevocationService(h.db, self.clock)

    def revoke(self, serial: int, reason: x509.ReasonFlags = KC) -> None:
        self.revocation.revoke(serial_hex(serial), reason, actor="t")


@pytest.fixture
def setup(hierarchy: Hierarchy) -> Setup:
    return Setup(hierarchy)


def insert_revoked(db: Database, now: datetime.datetime, count: int) -> set[int]:
    """Inserts revoked rows of the devices CA directly, as bench/crl.py does; their serials."""
    rows = [
        {
            "issuer_id": "devices",
            "serial_hex": serial_hex(0x10_0000 + i),
            "profile": "device",
            "status": CertificateStatus.REVOKED,
            "subject": "serialNumber=BULK",
            "sans": "[]",
            "not_before": now - datetime.timedelta(days=1),
            "not_after": now + datetime.timedelta(days=30),
            "tbs_der": b"\x30\x00",
            "created_at": now,
            "issued_at": now,
            "revoked_at": now - datetime.timedelta(seconds=i),
            "revocation_reason": ("keyCompromise", "superseded", None)[i % 3],
        }
        for i in range(count)
    ]
    with session_scope(db) as session:
        session.execute(insert(CertificateRecord.__table__), rows)  # type: ignore[arg-type]
    return {0x10_0000 + i for i in range(count)}


def serials(crl_der: bytes) -> set[int]:
    return {r.serial_number for r in x509.load_der_x509_crl(crl_der)}


class TestPublishFull:
    def test_publish_lists_revoked_with_required_extensions(self, setup: Setup) -> None:
        good = issue_device(setup.h, "G").certificate
        bad = issue_device(setup.h, "B").certificate
        setup.revoke(bad.serial_number)
        published = setup.publisher.publish(setup.h.devices)
        crl = x509.load_der_x509_crl(published.crl_der)
        assert serials(published.crl_der) == {bad.serial_number}
        assert good.serial_number not in serials(published.crl_der)
        entry = crl.get_revoked_certificate_by_serial_number(bad.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is KC
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = setup.h.devices.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        assert aki.key_identifier == ski.digest
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical
        assert idp.value.full_name == [
            x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/devices.crl")
        ]
        fresh = crl.extensions.get_extension_for_class(x509.FreshestCRL).value
        assert fresh[0].full_name == [
            x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/devices-delta.crl")
        ]
        assert crl.next_update_utc == crl.last_update_utc + CRLPublisherConfig().full_validity
        assert crl.is_signature_valid(setup.h.devices.certificate.public_key())  # type: ignore[arg-type]
        assert lint.blocking(lint.lint_crl(published.crl_der)) == []

    def test_publish_stores_latest_and_numbers_increase(self, setup: Setup) -> None:
        published = [setup.publisher.publish(setup.h.devices) for _ in range(3)]
        # Each full CRL comes with its delta, which takes the next number.
        assert [p.crl_number for p in published] == [1, 3, 5]
        assert [(p.delta.crl_number, p.delta.base_number) for p in published if p.delta] == [
            (2, 1),
            (4, 3),
            (6, 5),
        ]
        with session_scope(setup.h.db) as s:
            latest = CRLRepository(s).latest("devices", is_delta=False)
            assert latest is not None and latest.crl_number == 5
            current = CRLRepository(s).current_delta("devices")
            assert current is not None and current.crl_number == 6

    def test_publish_drops_expired(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.revoke(cert.serial_number)
        setup.clock.advance(datetime.timedelta(days=400))
        assert serials(setup.publisher.publish(setup.h.devices).crl_der) == set()

    def test_publish_root_crl_with_root_key(self, setup: Setup) -> None:
        published = setup.publisher.publish(setup.h.root)
        crl = x509.load_der_x509_crl(published.crl_der)
        assert crl.issuer == setup.h.root.certificate.subject
        assert crl.is_signature_valid(setup.h.root.certificate.public_key())  # type: ignore[arg-type]
        assert lint.blocking(lint.lint_crl(published.crl_der, authority=True)) == []

    def test_publish_verifies_with_openssl(self, setup: Setup, tmp_path: Path) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        good = issue_device(setup.h, "G").certificate
        bad = issue_device(setup.h, "B").certificate
        setup.revoke(bad.serial_number)
        crl = x509.load_der_x509_crl(setup.publisher.publish(setup.h.devices).crl_der)
        (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
        (tmp_path / "chain.pem").write_bytes(
            setup.h.devices.certificate.public_bytes(Encoding.PEM)
            + setup.h.root.certificate.public_bytes(Encoding.PEM)
        )
        for name, cert in (("good", good), ("bad", bad)):
            (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
        args: list[str | Path] = [
            "verify",
            "-crl_check",
            "-CRLfile",
            tmp_path / "crl.pem",
            "-CAfile",
            tmp_path / "chain.pem",
        ]
        ok = openssl(*args, tmp_path / "good.pem")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        refused = openssl(*args, tmp_path / "bad.pem")
        assert refused.returncode != 0
        assert "certificate revoked" in refused.stdout + refused.stderr

    def test_publish_refuses_a_crl_whose_signature_does_not_verify(
        self, setup: Setup, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # pki.crl encodes the CRL itself; the publisher reads it back and checks the signature
        # before storing it. The last octet of a DER ECDSA signature is the end of s.
        def corrupted(**kwargs: object) -> bytes:
            der = build_crl(**kwargs)  # type: ignore[arg-type]
            return der[:-1] + bytes((der[-1] ^ 1,))

        monkeypatch.setattr("pki.crl_publisher.build_crl", corrupted)
        setup.revoke(issue_device(setup.h).certificate.serial_number)
        with pytest.raises(PKIError) as exc:
            setup.publisher.publish(setup.h.devices)
        assert exc.value.kind is ErrorKind.INTERNAL
        with session_scope(setup.h.db) as s:
            assert CRLRepository(s).latest("devices", is_delta=False) is None

    def test_publish_full_crl_streams_every_revoked_row(self, setup: Setup) -> None:
        # More rows than one yield_per batch of CertificateStateReader.revoked_entries.
        inserted = insert_revoked(setup.h.db, setup.clock.now(), 25_000)
        published = setup.publisher.publish(setup.h.devices)
        assert published.entries == 25_000
        assert serials(published.crl_der) == inserted


class TestPublishDelta:
    def test_delta_lists_revocations_after_base(self, setup: Setup) -> None:
        early = issue_device(setup.h, "E").certificate
        late = issue_device(setup.h, "L").certificate
        setup.revoke(early.serial_number)
        # Changes up to delta_overlap before the base are listed again, harmlessly.
        setup.clock.advance(datetime.timedelta(hours=1))
        base = setup.publisher.publish(setup.h.devices)
        assert serials(base.crl_der) == {early.serial_number}
        setup.clock.advance(datetime.timedelta(hours=1))
        setup.revoke(late.serial_number)
        delta = setup.publisher.publish(setup.h.devices, delta=True)
        assert delta.base_number == base.crl_number and delta.crl_number > base.crl_number
        assert serials(delta.crl_der) == {late.serial_number}
        crl = x509.load_der_x509_crl(delta.crl_der)
        indicator = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        assert indicator.critical and indicator.value.crl_number == base.crl_number
        with pytest.raises(x509.ExtensionNotFound):
            crl.extensions.get_extension_for_class(x509.FreshestCRL)
        assert lint.blocking(lint.lint_crl(delta.crl_der)) == []

    def test_delta_release_from_hold_is_remove_from_crl(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.revoke(cert.serial_number, x509.ReasonFlags.certificate_hold)
        base = setup.publisher.publish(setup.h.devices)
        assert serials(base.crl_der) == {cert.serial_number}
        setup.clock.advance(datetime.timedelta(hours=1))
        setup.revocation.release(serial_hex(cert.serial_number), actor="t")
        delta = setup.publisher.publish(setup.h.devices, delta=True)
        entry = x509.load_der_x509_crl(delta.crl_der).get_revoked_certificate_by_serial_number(
            cert.serial_number
        )
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.remove_from_crl
        assert lint.blocking(lint.lint_crl(delta.crl_der)) == []
        assert serials(setup.publisher.publish(setup.h.devices).crl_der) == set()

    def test_delta_without_base_refused(self, setup: Setup) -> None:
        with pytest.raises(PKIError) as e:
            setup.publisher.publish(setup.h.devices, delta=True)
        assert e.value.kind is ErrorKind.CONFLICT
        with session_scope(setup.h.db) as s:
            assert CRLRepository(s).numbers("devices") == []


class TestConcurrency:
    def test_200_revocations_from_4_threads_all_on_next_crl(self, setup: Setup) -> None:
        issuance = fast_issuance(setup.h)
        certs = [issue_device(setup.h, f"D{i}", issuance).serial for i in range(210)]
        to_revoke = certs[:200]
        chunks = [to_revoke[i::4] for i in range(4)]

        def work(chunk: list[int]) -> None:
            service = RevocationService(setup.h.db, setup.clock)
            for serial in chunk:
                service.revoke(serial_hex(serial), KC, actor="thread")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, chunks))
        published = setup.publisher.publish(setup.h.devices)
        assert published.entries == 200
        assert serials(published.crl_der) == set(to_revoke)

    def test_two_publishers_at_once_strictly_increasing(self, hierarchy: Hierarchy) -> None:
        clock = MovableClock()
        barrier = threading.Barrier(2)
        results: list[list[int]] = [[], []]

        def run(index: int) -> None:
            # Each publisher has its own engine, as two processes would.
            db = Database(hierarchy.db.url)
            publisher = CRLPublisher(db, clock, hierarchy.config.ca.urls, lint_crls=False)
            barrier.wait()
            try:
                for _ in range(8):
                    results[index].append(publisher.publish(hierarchy.devices).crl_number)
            finally:
                db.dispose()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        every = results[0] + results[1]
        assert len(every) == 16 and len(set(every)) == 16
        # Each full CRL's delta took the number after it.
        every += [n + 1 for n in every]
        assert len(set(every)) == 32
        for own in results:
            assert own == sorted(own) and len(set(own)) == len(own)
        with session_scope(hierarchy.db) as s:
            stored = CRLRepository(s).numbers("devices")
        assert sorted(stored) == sorted(every)


class TestDue:
    PERIOD = datetime.timedelta(hours=6)
    DELAY = datetime.timedelta(minutes=1)

    def due(self, setup: Setup, delta: bool = False) -> str | None:
        return setup.publisher.due("devices", delta=delta, period=self.PERIOD, delay=self.DELAY)

    def test_due_without_crl(self, setup: Setup) -> None:
        assert self.due(setup) == "no CRL yet"
        assert self.due(setup, delta=True) is None  # a delta waits for its base

    def test_due_after_period(self, setup: Setup) -> None:
        setup.publisher.publish(setup.h.devices)
        assert self.due(setup) is None
        setup.clock.advance(self.PERIOD)
        assert self.due(setup) == "period elapsed"

    def test_due_after_revocation_debounced(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.publisher.publish(setup.h.devices)
        setup.clock.advance(datetime.timedelta(minutes=5))
        setup.revoke(cert.serial_number)
        assert self.due(setup) is None  # within the delay: wait for more
        assert self.due(setup, delta=True) is None
        setup.clock.advance(self.DELAY)
        assert self.due(setup) == "revocations since the last CRL"
        assert self.due(setup, delta=True) == "revocations since the last CRL"
        setup.publisher.publish(setup.h.devices, delta=True)
        assert self.due(setup, delta=True) is None
        assert self.due(setup) == "revocations since the last CRL"  # the full one is behind
        setup.publisher.publish(setup.h.devices)
        assert self.due(setup) is None


class TestLintSample:
    def _entries(self, n: int) -> list[RevokedEntry]:
        at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        reasons = [KC, x509.ReasonFlags.superseded, None]
        return [RevokedEntry(1000 + i, at, reasons[i % 3]) for i in range(n)]

    def test_lint_sample_small_crl_is_every_entry(self) -> None:
        entries = self._entries(LINT_ALL_ENTRIES_UP_TO)
        assert lint_sample(entries) == entries

    def test_lint_sample_large_crl_has_every_kind_and_both_ends(self) -> None:
        last = RevokedEntry(2**158, entries_at(), x509.ReasonFlags.cessation_of_operation)
        entries = [*self._entries(5000), last]
        sample = lint_sample(entries)
        assert len(sample) < 200
        assert {e.reason for e in sample} == {e.reason for e in entries}
        assert {1000, 2**158} <= {e.serial for e in sample}

    def test_publish_large_crl_lints_a_sample_signed_elsewhere(
        self, setup: Setup, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        linted: list[bytes] = []
        real = lint.lint_crl

        def spy(der: bytes, *, authority: bool = False) -> list[lint.Finding]:
            linted.append(der)
            return real(der, authority=authority)

        monkeypatch.setattr(lint, "lint_crl", spy)
        monkeypatch.setattr("pki.crl_publisher.LINT_ALL_ENTRIES_UP_TO", 1)
        monkeypatch.setattr("pki.crl_publisher.LINT_SAMPLE_HEAD", 1)
        for name in ("A", "B", "C", "D", "E"):
            setup.revoke(issue_device(setup.h, name).certificate.serial_number)
        published = setup.publisher.publish(setup.h.devices)
        assert len(serials(published.crl_der)) == 5
        # The sample of the full CRL, then its (empty) delta.
        sample_der, delta_der = linted
        assert serials(delta_der) == set()
        sample = x509.load_der_x509_crl(sample_der)
        # The first, the smallest and the largest serial (the first may be one of those).
        assert 2 <= len(serials(sample_der)) <= 3
        issuer = setup.h.devices.certificate
        # Same name and AKI as the real CRL, but not signed by the CA key.
        assert sample.issuer == issuer.subject
        assert not sample.is_signature_valid(issuer.public_key())


def entries_at() -> datetime.datetime:
    return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
