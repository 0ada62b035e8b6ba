"""The admin API on a real demo CA: bearer tokens, roles, revocation, audit; nothing changes
on refused calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from api import admin
from api.runtime import Runtime
from pki.store import CertificateStatus, Device, DeviceState, session_scope
from pki.store.models import AuditEvent
from pki.store.repository import CertificateRepository
from pki.store.revocation_models import AdminToken, RevocationEvent
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import DeviceCert, admin_token, issue_device


class AdminAPI:
    def __init__(self, ca: DevCA) -> None:
        self.ca = ca
        self.runtime = Runtime.open(ca.config_dir, ca.data_dir, environ=ca.env)
        app = Flask("admin-test")
        admin.register(app, self.runtime)
        self.client: FlaskClient = app.test_client()

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.open(f"/api/v1{path}", method=method, headers=headers, **kw)

    def snapshot(self) -> tuple[list[tuple[str, str, str | None]], int]:
        """Certificate statuses and revocation events: what a refused call must not change."""
        with session_scope(self.runtime.db) as s:
            certs = [
                (r.serial_hex, r.status.value, r.revocation_reason)
                for r in CertificateRepository(s).list(limit=10_000)
            ]
            events = s.execute(select(func.count()).select_from(RevocationEvent)).scalar_one()
        return certs, int(events)

    def last_audit(self) -> AuditEvent:
        with session_scope(self.runtime.db) as s:
            return s.execute(
                select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)
            ).scalar_one()

    def audit_count(self) -> int:
        with session_scope(self.runtime.db) as s:
            return int(s.execute(select(func.count()).select_from(AuditEvent)).scalar_one())


@pytest.fixture
def api(dev_ca: DevCA) -> AdminAPI:
    return AdminAPI(dev_ca)


@pytest.fixture
def device(dev_ca: DevCA, tmp_path: Path) -> DeviceCert:
    return issue_device(dev_ca, tmp_path, "adm-dev-1")


class TestAuthentication:
    def test_no_token_401_and_nothing_changes(self, api: AdminAPI, device: DeviceCert) -> None:
        before, audits = api.snapshot(), api.audit_count()
        for _ in range(3):
            r = api.call(
                "POST",
                f"/certificates/{device.serial_hex}/revoke",
                json={"reason": "keyCompromise"},
            )
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert api.snapshot() == before
        # The failed logins are audited once per address and minute (pki.refusal).
        assert api.audit_count() == audits + 1
        assert api.last_audit().action == "refused.login"

    def test_invalid_token_401(self, api: AdminAPI, device: DeviceCert) -> None:
        before = api.snapshot()
        for token in ("pkiadm_nope", "x" * 300, "Basic abc"):
            r = api.call(
                "POST",
                f"/certificates/{device.serial_hex}/revoke",
                token,
                json={"reason": "keyCompromise"},
            )
            assert r.status_code == 401
        r = api.client.get(
            f"/api/v1/certificates/{device.serial_hex}",
            headers={"Authorization": "Basic Zm9vOmJhcg=="},
        )
        assert r.status_code == 401
        assert api.snapshot() == before

    @pytest.mark.parametrize("role", ["auditor", "factory"])
    def test_wrong_role_403_and_nothing_changes(
        self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert, role: str
    ) -> None:
        token = admin_token(dev_ca, role)
        before, audits = api.snapshot(), api.audit_count()
        r = api.call(
            "POST",
            f"/certificates/{device.serial_hex}/revoke",
            token,
            json={"reason": "keyCompromise"},
        )
        assert r.status_code == 403
        assert api.snapshot() == before
        assert api.audit_count() == audits + 1  # the refused call itself is audited
        refusal = api.last_audit()
        assert refusal.action == "refused.role" and refusal.target.startswith("admin-token:")

    def test_tokens_are_stored_only_as_hashes(self, api: AdminAPI, dev_ca: DevCA) -> None:
        token = admin_token(dev_ca, "admin")
        with session_scope(api.runtime.db) as s:
            rows = s.execute(select(AdminToken)).scalars().all()
            assert all(token not in (r.token_sha256, r.label) for r in rows)
            assert any(len(r.token_sha256) == 64 for r in rows)
        assert token.encode() not in (dev_ca.data_dir / "pki.db").read_bytes()


class TestRevoke:
    def test_revoke_200_audited_and_idempotent(
        self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert
    ) -> None:
        token = admin_token(dev_ca, "operator")
        audits = api.audit_count()
        r = api.call(
            "POST",
            f"/certificates/{device.serial_hex}/revoke",
            token,
            json={"reason": "keyCompromise"},
        )
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_json() == {
            "issuer": "devices",
            "serial": device.serial_hex,
            "reason": "keyCompromise",
            "changed": True,
        }
        assert api.audit_count() == audits + 2  # certificate.revoked and admin.call
        again = api.call(
            "POST",
            f"/certificates/{device.serial_hex}/revoke",
            token,
            json={"reason": "keyCompromise"},
        )
        assert again.status_code == 200 and again.get_json()["changed"] is False
        shown = api.call("GET", f"/certificates/{device.serial_hex}", token)
        assert shown.status_code == 200
        assert shown.get_json()["status"] == "revoked"
        assert shown.get_json()["revocation_reason"] == "keyCompromise"
        audit = dev_ca.pki("audit", "verify")
        assert "intact" in audit.stdout

    def test_bad_serial_404_and_nothing_changes(
        self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert
    ) -> None:
        token = admin_token(dev_ca, "operator")
        before = api.snapshot()
        for serial in ("abcdef0123", "not-hex", "0"):
            r = api.call(
                "POST", f"/certificates/{serial}/revoke", token, json={"reason": "keyCompromise"}
            )
            assert r.status_code == 404, (serial, r.get_data(as_text=True))
            assert api.call("GET", f"/certificates/{serial}", token).status_code == 404
        assert api.snapshot() == before

    def test_bad_reason_400_and_nothing_changes(
        self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert
    ) -> None:
        token = admin_token(dev_ca, "operator")
        before = api.snapshot()
        path = f"/certificates/{device.serial_hex}/revoke"
        for body in ({"reason": "stolen"}, {"reason": "removeFromCRL"}, {"reason": 5}, [1]):
            r = api.call("POST", path, token, json=body)
            assert r.status_code == 400, (body, r.get_data(as_text=True))
            assert r.get_json()["error"] == "bad_request"
        r = api.call("POST", path, token, data="reason=keyCompromise")
        assert r.status_code == 415
        assert api.snapshot() == before

    def test_reason_change_other_than_key_compromise_409(
        self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert
    ) -> None:
        token = admin_token(dev_ca, "admin")
        path = f"/certificates/{device.serial_hex}/revoke"
        assert api.call("POST", path, token, json={"reason": "superseded"}).status_code == 200
        assert (
            api.call("POST", path, token, json={"reason": "affiliationChanged"}).status_code == 409
        )
        assert api.call("POST", path, token, json={"reason": "keyCompromise"}).status_code == 200

    def test_hold_and_release(self, api: AdminAPI, dev_ca: DevCA, device: DeviceCert) -> None:
        token = admin_token(dev_ca, "operator")
        path = f"/certificates/{device.serial_hex}"
        assert (
            api.call(
                "POST", f"{path}/revoke", token, json={"reason": "certificateHold"}
            ).status_code
            == 200
        )
        assert api.call("POST", f"{path}/release", token).status_code == 200
        assert api.call("GET", path, token).get_json()["status"] == "issued"
        assert api.call("POST", f"{path}/release", token).status_code == 409


class TestBulk:
    def _register(self, api: AdminAPI, device_id: str, batch: str) -> None:
        with session_scope(api.runtime.db) as s:
            now = api.runtime.clock.now()
            device = s.get(Device, device_id)
            if device is None:
                s.add(Device(id=device_id, batch=batch, state=DeviceState.ENROLLED,
                             created_at=now, updated_at=now))  # fmt: skip
            else:
                device.batch = batch

    def test_bulk_revoke_by_batch_and_devices(
        self, api: AdminAPI, dev_ca: DevCA, tmp_path: Path
    ) -> None:
        certs = {}
        for device_id, batch in (("b-1", "lot-1"), ("b-2", "lot-1"), ("b-3", "lot-2")):
            certs[device_id] = issue_device(dev_ca, tmp_path, device_id)
            self._register(api, device_id, batch)
        token = admin_token(dev_ca, "operator")
        audits = api.audit_count()
        r = api.call(
            "POST", "/revocations", token, json={"batch": "lot-1", "reason": "cessationOfOperation"}
        )
        assert r.status_code == 200, r.get_data(as_text=True)
        assert sorted(x["serial"] for x in r.get_json()["revoked"]) == sorted(
            certs[d].serial_hex for d in ("b-1", "b-2")
        )
        assert api.audit_count() == audits + 2  # one bulk action, one admin.call
        with session_scope(api.runtime.db) as s:
            third = CertificateRepository(s).by_serial(certs["b-3"].serial_hex)
            assert third.status is CertificateStatus.ISSUED
            assert s.get(Device, "b-1").state is DeviceState.REVOKED  # type: ignore[union-attr]
        r = api.call(
            "POST", "/revocations", token, json={"devices": ["b-3"], "reason": "keyCompromise"}
        )
        assert r.status_code == 200 and len(r.get_json()["revoked"]) == 1

    def test_bulk_bad_input_changes_nothing(self, api: AdminAPI, dev_ca: DevCA) -> None:
        token = admin_token(dev_ca, "operator")
        before = api.snapshot()
        assert (
            api.call(
                "POST", "/revocations", token, json={"devices": "x", "reason": "keyCompromise"}
            ).status_code
            == 400
        )
        assert (
            api.call(
                "POST", "/revocations", token, json={"batch": "none", "reason": "keyCompromise"}
            ).status_code
            == 404
        )
        assert (
            api.call(
                "POST", "/revocations", token, json={"batch": "x", "reason": "nope"}
            ).status_code
            == 400
        )
        assert (
            api.call(
                "POST", "/revocations", admin_token(dev_ca, "auditor"), json={"batch": "x"}
            ).status_code
            == 403
        )
        assert api.snapshot() == before


def test_openapi_served(api: AdminAPI) -> None:
    r = api.client.get("/api/v1/openapi.yaml")
    assert r.status_code == 200
    text = r.get_data(as_text=True)
    assert text.startswith("openapi: 3")
    for path in ("/certificates/{serial}/revoke", "/certificates/{serial}", "/revocations"):
        assert path in text


def test_pki_revoke_cli_bulk(dev_ca: DevCA, tmp_path: Path) -> None:
    cert = issue_device(dev_ca, tmp_path, "cli-dev-1")
    out = dev_ca.pki("revoke", cert.serial_hex, "--reason", "keyCompromise")
    assert "revoked: devices/" in out.stdout
    again = dev_ca.pki("revoke", cert.serial_hex, "--reason", "keyCompromise")
    assert "already revoked" in again.stdout
    bad = dev_ca.pki("revoke", cert.serial_hex, "--reason", "stolen", check=False)
    assert bad.returncode != 0 and "unknown revocation reason" in bad.stderr
