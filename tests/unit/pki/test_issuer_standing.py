"""A CA certificate is revoked only when confirmed; a revoked or expired issuer signs nothing."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from sqlalchemy import func, select

from pki import issuer_standing
from pki.clock import FixedClock
from pki.csr import check_request, load_csr
from pki.errors import ErrorKind, PKIError
from pki.issuer import IssuanceService
from pki.revocation import RevocationService, guarded_kind
from pki.serial import serial_hex
from pki.store import AuditEvent, CertificateRecord, CertificateStatus, session_scope
from pki.store.repository import CertificateRepository
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import MovableClock

KC = x509.ReasonFlags.key_compromise


def certificates(h: Hierarchy) -> int:
    with session_scope(h.db) as s:
        return int(s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one())


def issue(h: Hierarchy, issuance: IssuanceService, device_id: str) -> None:
    request = check_request(load_csr(der(device_csr(device_id)[0])), h.config.profile("device"))
    issuance.issue(h.devices, h.config.profile("device"), request, actor="test")


def intermediate_serial(h: Hierarchy) -> str:
    return serial_hex(h.devices.certificate.serial_number)


class TestGuardedRevocation:
    def test_guarded_ca_certificate_needs_confirmation(self, hierarchy: Hierarchy) -> None:
        service = RevocationService(hierarchy.db, MovableClock())
        serial = intermediate_serial(hierarchy)
        with pytest.raises(PKIError) as refused:
            service.revoke(serial, KC, actor="test", issuer_id="root")
        assert refused.value.kind is ErrorKind.FORBIDDEN
        assert "CA certificate" in refused.value.message and "--ca" in refused.value.message
        with session_scope(hierarchy.db) as s:
            assert CertificateRepository(s).by_serial(serial).status is CertificateStatus.ISSUED
        result = service.revoke(serial, KC, actor="test", issuer_id="root", allow_guarded=True)
        assert result.changed

    def test_guarded_kinds_by_what_the_certificate_is(self, hierarchy: Hierarchy) -> None:
        issue(hierarchy, hierarchy.issuance, "GUARD-1")
        with session_scope(hierarchy.db) as s:
            rows = {r.profile: r for r in CertificateRepository(s).list(limit=100)}
            assert guarded_kind(rows["intermediate"]) == "a CA"
            assert guarded_kind(rows["device"]) is None


class TestIssuerStanding:
    def test_issuer_revoked_issues_nothing(self, hierarchy: Hierarchy) -> None:
        issue(hierarchy, hierarchy.issuance, "BEFORE-1")
        RevocationService(hierarchy.db, MovableClock()).revoke(
            intermediate_serial(hierarchy), KC, actor="test", allow_guarded=True
        )
        before = certificates(hierarchy)
        with pytest.raises(PKIError) as refused:
            issue(hierarchy, hierarchy.issuance, "AFTER-1")
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert refused.value.message == (
            "issuer devices's certificate is revoked (keyCompromise): it issues nothing"
        )
        assert certificates(hierarchy) == before
        with session_scope(hierarchy.db) as s:
            pending = s.execute(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == "certificate.pending")
            ).scalar_one()
        assert pending == before  # nothing was recorded for the refused request
        problems = issuer_standing.problems(
            hierarchy.db, datetime.datetime.now(datetime.UTC), ["devices", "root"]
        )
        assert list(problems) == ["devices"]

    def test_issuer_expired_issues_nothing(self, hierarchy: Hierarchy) -> None:
        later = hierarchy.devices.certificate.not_valid_after_utc + datetime.timedelta(seconds=1)
        issuance = IssuanceService(hierarchy.db, FixedClock(later), hierarchy.config.ca.urls)
        before = certificates(hierarchy)
        with pytest.raises(PKIError) as refused:
            issue(hierarchy, issuance, "LATE-1")
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert "certificate expired at" in refused.value.message
        assert certificates(hierarchy) == before
        assert "devices" in issuer_standing.problems(hierarchy.db, later, ["devices"])

    def test_issuer_standing_good_issuer_has_no_problem(self, hierarchy: Hierarchy) -> None:
        now = datetime.datetime.now(datetime.UTC)
        assert issuer_standing.problems(hierarchy.db, now, ["devices", "root"]) == {}


class _Interrupted(Exception):
    """The request stops after its row is recorded pending, before the signature."""


def pending_row(h: Hierarchy, device_id: str) -> tuple[object, CertificateRecord]:
    """Leaves a pending row for device_id as a failed request does; its request and the row."""

    def stop(step: str, record_id: int) -> None:
        if step == "pending":
            raise _Interrupted

    failing = IssuanceService(h.db, MovableClock(), h.config.ca.urls, hook=stop)
    request = check_request(load_csr(der(device_csr(device_id)[0])), h.config.profile("device"))
    with pytest.raises(_Interrupted):
        failing.issue(h.devices, h.config.profile("device"), request, actor="test")
    with session_scope(h.db) as s:
        (row,) = [r for r in CertificateRepository(s).list(limit=100) if r.device_id == device_id]
        s.expunge(row)
    assert row.status is CertificateStatus.PENDING
    return request, row


def still_pending(h: Hierarchy, row: CertificateRecord) -> bool:
    with session_scope(h.db) as s:
        return CertificateRepository(s).by_serial(row.serial_hex).status is (
            CertificateStatus.PENDING
        )


class TestCompleteChecksStanding:
    def test_retry_after_issuer_revoked_signs_nothing(self, hierarchy: Hierarchy) -> None:
        request, row = pending_row(hierarchy, "RETRY-1")
        RevocationService(hierarchy.db, MovableClock()).revoke(
            intermediate_serial(hierarchy), KC, actor="test", allow_guarded=True
        )
        with pytest.raises(PKIError) as refused:
            hierarchy.issuance.complete(
                hierarchy.devices, hierarchy.config.profile("device"), request, row, actor="test"
            )
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert "is revoked (keyCompromise)" in refused.value.message
        assert still_pending(hierarchy, row)

    def test_retry_after_issuer_expired_signs_nothing(self, hierarchy: Hierarchy) -> None:
        request, row = pending_row(hierarchy, "RETRY-2")
        later = hierarchy.devices.certificate.not_valid_after_utc + datetime.timedelta(seconds=1)
        issuance = IssuanceService(hierarchy.db, FixedClock(later), hierarchy.config.ca.urls)
        with pytest.raises(PKIError) as refused:
            issuance.complete(
                hierarchy.devices, hierarchy.config.profile("device"), request, row, actor="test"
            )
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert "certificate expired at" in refused.value.message
        assert still_pending(hierarchy, row)

    def test_retry_with_issuer_in_standing_completes(self, hierarchy: Hierarchy) -> None:
        request, row = pending_row(hierarchy, "RETRY-3")
        issued = hierarchy.issuance.complete(
            hierarchy.devices, hierarchy.config.profile("device"), request, row, actor="test"
        )
        assert issued is not None and issued.serial == int(row.serial_hex, 16)
        assert not still_pending(hierarchy, row)


class TestRetirement:
    def test_retired_issuer_issues_nothing_and_refusal_is_audited(
        self, hierarchy: Hierarchy
    ) -> None:
        issue(hierarchy, hierarchy.issuance, "KEEP-1")
        now = datetime.datetime.now(datetime.UTC)
        issuer_standing.retire(hierarchy.db, now, "devices", actor="admin")
        before = certificates(hierarchy)
        with pytest.raises(PKIError) as refused:
            issue(hierarchy, hierarchy.issuance, "AFTER-2")
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert refused.value.message.startswith("issuer devices is retired since ")
        assert refused.value.message.endswith(": it issues nothing")
        assert certificates(hierarchy) == before
        with session_scope(hierarchy.db) as s:
            actions = list(
                s.execute(
                    select(AuditEvent.action, AuditEvent.target).where(
                        AuditEvent.action.in_(["issuer.retired", "refused.issuance"])
                    )
                )
            )
        assert [tuple(a) for a in actions] == [
            ("issuer.retired", "devices"),
            ("refused.issuance", "devices"),
        ]
        assert list(issuer_standing.problems(hierarchy.db, now, ["devices", "root"])) == ["devices"]

    def test_retire_twice_or_unknown_is_refused(self, hierarchy: Hierarchy) -> None:
        now = datetime.datetime.now(datetime.UTC)
        issuer_standing.retire(hierarchy.db, now, "devices", actor="admin")
        with pytest.raises(PKIError) as twice:
            issuer_standing.retire(hierarchy.db, now, "devices", actor="admin")
        assert twice.value.kind is ErrorKind.CONFLICT
        with pytest.raises(PKIError) as unknown:
            issuer_standing.retire(hierarchy.db, now, "nope", actor="admin")
        assert unknown.value.kind is ErrorKind.NOT_FOUND
