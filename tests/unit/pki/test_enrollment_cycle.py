"""Tests for pki.enrollment_cycle: retries after failures, one request per device, sweeps."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import func, select

from pki.clock import FixedClock, SystemClock
from pki.csr import check_request, load_csr
from pki.device import DeviceService
from pki.enrollment import Enrolled, EnrollmentService
from pki.errors import ErrorKind, PKIError
from pki.est_config import load_est_config
from pki.identity import BasicCredentials, ClientIdentity
from pki.issuer import IssuanceService, Issuer
from pki.ocsp_responder import certificate_status
from pki.revocation import RevocationService
from pki.store import (
    AuditEvent,
    CertificateRecord,
    CertificateStatus,
    Database,
    DeviceState,
    session_scope,
)
from pki.store.device_lock import device_lock
from pki.store.enrollment_models import AuthFailure, EnrollmentSecret, SecretState
from pki.store.repository import CertificateRepository
from pki.store.revocation_models import CertificateState
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy


class Crash(Exception):
    """Crash stands for a process dying between two steps of the cycle."""


class _Issuers:
    def __init__(self, h: Hierarchy) -> None:
        self.by_id = {"root": h.root, "devices": h.devices}

    def issuer(self, issuer_id: str) -> Issuer:
        return self.by_id[issuer_id]


class CrashOnce:
    """An issuance hook that raises Crash the first time the cycle reaches `step`."""

    def __init__(self, step: str | None) -> None:
        self.step = step

    def __call__(self, step: str, record_id: int) -> None:
        del record_id
        if step == self.step:
            self.step = None
            raise Crash(step)


def _service(
    h: Hierarchy,
    *,
    crash: str | None = None,
    clock: Any = None,
    hook: Any = None,
    **est_changes: Any,
) -> EnrollmentService:
    clock = clock or SystemClock()
    est = load_est_config(h.config).model_copy(update=est_changes)
    devices = DeviceService(h.db, clock, revocation=RevocationService(h.db, clock))
    return EnrollmentService(
        db=h.db,
        clock=clock,
        config=h.config,
        est=est,
        issuance=IssuanceService(h.db, clock, h.config.ca.urls, hook=hook or CrashOnce(crash)),
        issuers=_Issuers(h),
        devices=devices,
        revocation=RevocationService(h.db, clock),
    )


def _register(service: EnrollmentService, device_id: str) -> str:
    service.devices.add(device_id, model="m1", batch="b1", actor="t")
    return service.devices.new_secret(device_id, actor="t").secret


def _basic(device_id: str, secret: str) -> ClientIdentity:
    return ClientIdentity(basic=BasicCredentials(device_id, secret))


def _statuses(db: Database, device_id: str) -> list[tuple[str, CertificateStatus]]:
    with session_scope(db) as s:
        rows = s.execute(
            select(CertificateRecord.serial_hex, CertificateRecord.status)
            .where(CertificateRecord.device_id == device_id)
            .order_by(CertificateRecord.id)
        ).all()
        return [(r[0], r[1]) for r in rows]


def _secret_state(db: Database, device_id: str) -> SecretState:
    with session_scope(db) as s:
        return s.execute(
            select(EnrollmentSecret.state).where(EnrollmentSecret.device_id == device_id)
        ).scalar_one()


def _actions(db: Database, action: str) -> int:
    with session_scope(db) as s:
        query = select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
        return int(s.execute(query).scalar_one())


def _enroll(service: EnrollmentService, csr_der: bytes, device_id: str, secret: str) -> Enrolled:
    result = service.enroll(csr_der, None, _basic(device_id, secret))
    assert isinstance(result, Enrolled)
    return result


class TestRetry:
    @pytest.mark.parametrize("step", ["pending", "issued"])
    def test_failure_after_pending_leaves_secret_and_retry_completes_row(
        self, hierarchy: Hierarchy, step: str
    ) -> None:
        service = _service(hierarchy, crash=step)
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        with pytest.raises(Crash):
            service.enroll(der(csr), None, _basic("DEV-1", secret))
        ((serial, status),) = _statuses(hierarchy.db, "DEV-1")
        assert status is CertificateStatus.PENDING
        assert _secret_state(hierarchy.db, "DEV-1") is SecretState.ACTIVE
        assert service.devices.show("DEV-1").state is DeviceState.REGISTERED

        done = _enroll(service, der(csr), "DEV-1", secret)

        # The pending row was signed again, not replaced: same serial, now issued.
        assert done.serial_hex == serial
        assert _statuses(hierarchy.db, "DEV-1") == [(serial, CertificateStatus.ISSUED)]
        assert _secret_state(hierarchy.db, "DEV-1") is SecretState.USED
        assert service.devices.show("DEV-1").state is DeviceState.ENROLLED

    def test_retry_with_another_key_supersedes_pending_row(self, hierarchy: Hierarchy) -> None:
        service = _service(hierarchy, crash="pending")
        secret = _register(service, "DEV-1")
        first, _ = device_csr("DEV-1")
        with pytest.raises(Crash):
            service.enroll(der(first), None, _basic("DEV-1", secret))
        ((stranded, _),) = _statuses(hierarchy.db, "DEV-1")

        second, _ = device_csr("DEV-1")
        done = _enroll(service, der(second), "DEV-1", secret)

        assert done.serial_hex != stranded
        assert _statuses(hierarchy.db, "DEV-1") == [
            (stranded, CertificateStatus.ABANDONED),
            (done.serial_hex, CertificateStatus.ISSUED),
        ]
        assert _actions(hierarchy.db, "certificate.abandoned") == 1

    def test_lost_answer_gets_the_same_certificate_again(self, hierarchy: Hierarchy) -> None:
        service = _service(hierarchy)
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        first = _enroll(service, der(csr), "DEV-1", secret)

        again = _enroll(service, der(csr), "DEV-1", secret)

        assert again.cert_der == first.cert_der
        assert len(_statuses(hierarchy.db, "DEV-1")) == 1
        assert _actions(hierarchy.db, "enrollment.resent") == 1
        other, _ = device_csr("DEV-1")
        with pytest.raises(PKIError) as e:
            service.enroll(der(other), None, _basic("DEV-1", secret))
        assert e.value.kind is ErrorKind.UNAUTHORIZED

    def test_post_issuance_failure_still_returns_certificate(
        self, hierarchy: Hierarchy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service = _service(hierarchy)
        secret = _register(service, "DEV-1")

        def broken(*args: object, **kwargs: object) -> list[str]:
            raise PKIError(ErrorKind.UNAVAILABLE, "database unavailable")

        monkeypatch.setattr(service, "sweep_superseded", broken)
        monkeypatch.setattr(service, "cacerts", broken)
        csr, _ = device_csr("DEV-1")
        done = _enroll(service, der(csr), "DEV-1", secret)
        assert done.chain == ()
        assert _statuses(hierarchy.db, "DEV-1") == [(done.serial_hex, CertificateStatus.ISSUED)]


class TestConcurrency:
    def test_eight_reenrollments_with_one_certificate_one_wins(self, hierarchy: Hierarchy) -> None:
        service = _service(hierarchy)
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        current = _enroll(service, der(csr), "DEV-1", secret)
        identity = ClientIdentity(tls_chain_der=(current.cert_der,), source="tls")
        barrier = threading.Barrier(8)
        results: list[object] = []

        def attempt() -> None:
            request, _ = device_csr("DEV-1")
            barrier.wait()
            try:
                results.append(service.reenroll(der(request), None, identity))
            except PKIError as e:
                results.append(e.kind)

        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if isinstance(r, Enrolled)]
        assert len(winners) == 1
        assert results.count(ErrorKind.CONFLICT) == 7
        statuses = _statuses(hierarchy.db, "DEV-1")
        assert [s for _, s in statuses] == [CertificateStatus.REVOKED, CertificateStatus.ISSUED]
        assert statuses[1][0] == winners[0].serial_hex

    def test_device_lock_refuses_second_holder_and_frees_on_error(self, db: Database) -> None:
        with device_lock(db, "DEV-9"):
            with pytest.raises(PKIError) as e, device_lock(db, "DEV-9"):
                pass
            assert e.value.kind is ErrorKind.CONFLICT
            with device_lock(db, "DEV-8"):
                pass  # another device is not held
        with pytest.raises(Crash), device_lock(db, "DEV-9"):
            raise Crash("inside")
        with device_lock(db, "DEV-9"):
            pass


class TestSweep:
    def test_sweep_leaves_the_row_of_a_device_whose_lock_is_held(
        self, hierarchy: Hierarchy
    ) -> None:
        service = _service(hierarchy, crash="pending")
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        with pytest.raises(Crash):
            service.enroll(der(csr), None, _basic("DEV-1", secret))
        ((serial, _),) = _statuses(hierarchy.db, "DEV-1")
        later = FixedClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2))
        with device_lock(hierarchy.db, "DEV-1"):
            assert _service(hierarchy, clock=later).sweep_pending() == []
        assert _statuses(hierarchy.db, "DEV-1") == [(serial, CertificateStatus.PENDING)]
        assert _actions(hierarchy.db, "certificate.abandoned") == 0
        assert _service(hierarchy, clock=later).sweep_pending() == [serial]

    def test_sweep_during_a_live_request_past_the_pending_age_skips_it(
        self, hierarchy: Hierarchy
    ) -> None:
        later = FixedClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2))
        swept: list[list[str]] = []

        def sweep_while_signing(step: str, record_id: int) -> None:
            del record_id
            if step == "pending":  # the request is stuck here past pending_max_age
                swept.append(_service(hierarchy, clock=later).sweep_pending())

        service = _service(hierarchy, hook=sweep_while_signing)
        secret = _register(service, "DEV-1")
        done = _enroll(service, der(device_csr("DEV-1")[0]), "DEV-1", secret)
        assert swept == [[]]
        assert _statuses(hierarchy.db, "DEV-1") == [(done.serial_hex, CertificateStatus.ISSUED)]
        assert _actions(hierarchy.db, "certificate.abandoned") == 0

    def test_row_abandoned_while_signing_is_recorded_as_issued(self, hierarchy: Hierarchy) -> None:
        # A sweep that abandoned the row between pending and signed (one that took no device
        # lock: a row of no device): the signed certificate is still recorded.
        def abandon(step: str, record_id: int) -> None:
            if step == "pending":
                with session_scope(hierarchy.db) as s:
                    assert CertificateRepository(s).abandon(record_id)

        issuance = IssuanceService(
            hierarchy.db, SystemClock(), hierarchy.config.ca.urls, hook=abandon
        )
        profile = hierarchy.config.profile("device")
        request = check_request(load_csr(der(device_csr("DEV-9")[0])), profile)
        issued = issuance.issue(hierarchy.devices, profile, request, actor="t")
        with session_scope(hierarchy.db) as s:
            record = CertificateRepository(s).get(issued.record_id)
            assert record.status is CertificateStatus.ISSUED
            assert record.cert_der == issued.cert_der
        assert _actions(hierarchy.db, "certificate.issued") >= 1

    def test_stale_pending_rows_abandoned_and_audited(self, hierarchy: Hierarchy) -> None:
        service = _service(hierarchy, crash="pending")
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        with pytest.raises(Crash):
            service.enroll(der(csr), None, _basic("DEV-1", secret))
        ((serial, _),) = _statuses(hierarchy.db, "DEV-1")
        assert _service(hierarchy).sweep_pending() == []  # not old enough yet

        later = FixedClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2))
        assert _service(hierarchy, clock=later).sweep_pending() == [serial]

        assert _statuses(hierarchy.db, "DEV-1") == [(serial, CertificateStatus.ABANDONED)]
        assert _actions(hierarchy.db, "certificate.abandoned") == 1
        state = CertificateState(
            certificate_id=1,
            issuer_id="devices",
            serial_hex=serial,
            status=CertificateStatus.ABANDONED,
            not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
            revoked_at=None,
            revocation_reason=None,
        )
        assert certificate_status(state, datetime.datetime.now(datetime.UTC)) is None
        # The secret still works: the device enrolls afresh.
        done = _enroll(_service(hierarchy), der(csr), "DEV-1", secret)
        assert done.serial_hex != serial


class TestDecommission:
    def test_revokes_every_active_certificate_and_erases_registry_data(
        self, hierarchy: Hierarchy
    ) -> None:
        service = _service(hierarchy, supersede_grace_seconds=3600)
        first = _enroll(service, der(device_csr("DEV-1")[0]), "DEV-1", _register(service, "DEV-1"))
        again = service.devices.new_secret(
            "DEV-1", actor="t", may_redraw=True, reason="test"
        ).secret
        second = _enroll(service, der(device_csr("DEV-1")[0]), "DEV-1", again)
        # Two active certificates (the first within its supersede grace), one of them on hold.
        service.revocation.revoke(first.serial_hex, x509.ReasonFlags.certificate_hold, actor="t")
        with pytest.raises(PKIError):
            service.devices.authenticate("DEV-1", "wrong")
        events = _actions(hierarchy.db, "certificate.pending")

        done = service.devices.decommission("DEV-1", actor="t")

        assert set(done.revoked) == {first.serial_hex, second.serial_hex}
        assert done.erased == ("model", "batch", "2 enrollment secret(s)", "failed-login records")
        with session_scope(hierarchy.db) as s:
            rows = s.execute(
                select(CertificateRecord.status, CertificateRecord.revocation_reason).where(
                    CertificateRecord.device_id == "DEV-1"
                )
            ).all()
            assert {(r[0], r[1]) for r in rows} == {
                (CertificateStatus.REVOKED, "cessationOfOperation")
            }
            assert s.execute(select(func.count()).select_from(EnrollmentSecret)).scalar_one() == 0
            failures = select(func.count()).where(AuthFailure.device_id == "DEV-1")
            assert s.execute(failures).scalar_one() == 0
        info = service.devices.show("DEV-1")
        assert (info.state, info.model, info.batch) == (DeviceState.DECOMMISSIONED, None, None)
        # The audit trail keeps what happened before, and says what was revoked and erased.
        assert _actions(hierarchy.db, "certificate.pending") == events
        assert _actions(hierarchy.db, "device.decommissioned") == 1
        assert service.devices.decommission("DEV-1", actor="t").erased == ()

    def test_unknown_device_not_found(self, hierarchy: Hierarchy) -> None:
        with pytest.raises(PKIError) as e:
            _service(hierarchy).devices.decommission("NOPE", actor="t")
        assert e.value.kind is ErrorKind.NOT_FOUND
