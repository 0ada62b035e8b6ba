"""RevocationService over a real database: reasons, holds, bulk, events, stored OCSP."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from sqlalchemy import func, select

from pki.errors import ErrorKind, PKIError
from pki.revocation import RevocationService, Revoked, parse_reason
from pki.serial import serial_hex
from pki.store import CertificateStatus, Device, DeviceState, session_scope
from pki.store.models import AuditEvent
from pki.store.repository import CertificateRepository
from pki.store.revocation_models import RevocationEvent
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import MovableClock, issue_device, register_device

KC = x509.ReasonFlags.key_compromise


@pytest.fixture
def service(hierarchy: Hierarchy) -> RevocationService:
    return RevocationService(hierarchy.db, MovableClock())


def status(h: Hierarchy, serial: str) -> tuple[CertificateStatus, str | None]:
    with session_scope(h.db) as s:
        r = CertificateRepository(s).by_serial(serial)
        return r.status, r.revocation_reason


def count(h: Hierarchy, model: type) -> int:
    with session_scope(h.db) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def device_state(h: Hierarchy, device_id: str) -> DeviceState:
    with session_scope(h.db) as s:
        device = s.get(Device, device_id)
        assert device is not None
        return device.state


class TestParseReason:
    def test_parse_reason_rfc_names(self) -> None:
        assert parse_reason("keyCompromise") is KC
        assert parse_reason("certificateHold") is x509.ReasonFlags.certificate_hold

    @pytest.mark.parametrize("text", ["removeFromCRL", "key_compromise", "", "x" * 500])
    def test_parse_reason_refuses(self, text: str) -> None:
        with pytest.raises(PKIError) as e:
            parse_reason(text)
        assert e.value.kind is ErrorKind.BAD_REQUEST


class TestRevoke:
    def test_revoke_marks_revoked_audits_and_tells_listeners(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        register_device(hierarchy, "DEV-1")
        serial = serial_hex(issue_device(hierarchy, "DEV-1").serial)
        told: list[Revoked] = []
        service.listeners.append(told.append)
        audits = count(hierarchy, AuditEvent)
        result = service.revoke(serial, KC, actor="t")
        assert result.changed and told == [result]
        assert status(hierarchy, serial) == (CertificateStatus.REVOKED, "keyCompromise")
        assert count(hierarchy, AuditEvent) == audits + 1
        assert count(hierarchy, RevocationEvent) == 1
        assert device_state(hierarchy, "DEV-1") is DeviceState.REVOKED

    def test_revoke_twice_is_idempotent(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        service.revoke(serial, x509.ReasonFlags.superseded, actor="t")
        again = service.revoke(serial, x509.ReasonFlags.superseded, actor="t")
        assert not again.changed
        assert count(hierarchy, RevocationEvent) == 1

    def test_revoke_raise_to_key_compromise_keeps_date(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        service.revoke(serial, x509.ReasonFlags.superseded, actor="t")
        with session_scope(hierarchy.db) as s:
            first = CertificateRepository(s).by_serial(serial).revoked_at
        assert isinstance(service.clock, MovableClock)
        service.clock.advance(datetime.timedelta(hours=1))
        service.revoke(serial, KC, actor="t")
        with session_scope(hierarchy.db) as s:
            r = CertificateRepository(s).by_serial(serial)
            assert (r.revocation_reason, r.revoked_at) == ("keyCompromise", first)

    def test_revoke_other_change_refused(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        service.revoke(serial, KC, actor="t")
        with pytest.raises(PKIError) as e:
            service.revoke(serial, x509.ReasonFlags.superseded, actor="t")
        assert e.value.kind is ErrorKind.CONFLICT
        assert status(hierarchy, serial) == (CertificateStatus.REVOKED, "keyCompromise")

    def test_revoke_unknown_serial_not_found(self, service: RevocationService) -> None:
        with pytest.raises(PKIError) as e:
            service.revoke("abcdef", KC, actor="t")
        assert e.value.kind is ErrorKind.NOT_FOUND

    def test_revoke_remove_from_crl_refused(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        with pytest.raises(PKIError) as e:
            service.revoke(serial, x509.ReasonFlags.remove_from_crl, actor="t")
        assert e.value.kind is ErrorKind.BAD_REQUEST
        assert status(hierarchy, serial) == (CertificateStatus.ISSUED, None)


class TestHold:
    def test_hold_then_release(self, hierarchy: Hierarchy, service: RevocationService) -> None:
        register_device(hierarchy, "DEV-H")
        serial = serial_hex(issue_device(hierarchy, "DEV-H").serial)
        service.revoke(serial, x509.ReasonFlags.certificate_hold, actor="t")
        assert device_state(hierarchy, "DEV-H") is DeviceState.SUSPENDED
        service.release(serial, actor="t")
        assert status(hierarchy, serial) == (CertificateStatus.ISSUED, None)
        assert device_state(hierarchy, "DEV-H") is DeviceState.ENROLLED
        with session_scope(hierarchy.db) as s:
            actions = [e.action for e in s.query(RevocationEvent).order_by(RevocationEvent.id)]
        assert actions == ["revoked", "released"]

    def test_hold_made_permanent(self, hierarchy: Hierarchy, service: RevocationService) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        service.revoke(serial, x509.ReasonFlags.certificate_hold, actor="t")
        service.revoke(serial, x509.ReasonFlags.cessation_of_operation, actor="t")
        assert status(hierarchy, serial) == (CertificateStatus.REVOKED, "cessationOfOperation")

    def test_release_without_hold_refused(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        serial = serial_hex(issue_device(hierarchy).serial)
        service.revoke(serial, KC, actor="t")
        with pytest.raises(PKIError) as e:
            service.release(serial, actor="t")
        assert e.value.kind is ErrorKind.CONFLICT
        assert status(hierarchy, serial) == (CertificateStatus.REVOKED, "keyCompromise")


class TestBulk:
    def test_revoke_devices_by_list(self, hierarchy: Hierarchy, service: RevocationService) -> None:
        serials = []
        for d in ("D1", "D2", "D3"):
            register_device(hierarchy, d)
            serials.append(serial_hex(issue_device(hierarchy, d).serial))
        audits = count(hierarchy, AuditEvent)
        result = service.revoke_devices(device_ids=["D1", "D2"], reason=KC, actor="t")
        assert sorted(r.serial_hex for r in result.revoked) == sorted(serials[:2])
        assert status(hierarchy, serials[2]) == (CertificateStatus.ISSUED, None)
        assert count(hierarchy, AuditEvent) == audits + 1  # one audited action
        assert device_state(hierarchy, "D1") is DeviceState.REVOKED

    def test_revoke_devices_by_batch(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        for d, batch in (("B1", "lot-7"), ("B2", "lot-7"), ("B3", "lot-8")):
            register_device(hierarchy, d, batch)
            issue_device(hierarchy, d)
        result = service.revoke_devices(batch="lot-7", reason=KC, actor="t")
        assert result.devices == ("B1", "B2") and len(result.revoked) == 2
        assert device_state(hierarchy, "B3") is DeviceState.ENROLLED

    def test_revoke_devices_empty_batch_changes_nothing(
        self, hierarchy: Hierarchy, service: RevocationService
    ) -> None:
        audits = count(hierarchy, AuditEvent)
        with pytest.raises(PKIError) as e:
            service.revoke_devices(batch="nope", reason=KC, actor="t")
        assert e.value.kind is ErrorKind.NOT_FOUND
        assert count(hierarchy, AuditEvent) == audits

    def test_revoke_devices_needs_one_selector(self, service: RevocationService) -> None:
        with pytest.raises(PKIError) as e:
            service.revoke_devices(device_ids=["x"], batch="y", reason=KC, actor="t")
        assert e.value.kind is ErrorKind.BAD_REQUEST
