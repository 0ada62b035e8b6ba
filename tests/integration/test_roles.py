"""Roles over the CA front (Flask test client): each role x each touched admin endpoint, the
refusals audited; a revoked intermediate issues nothing; the CLI's confirmations."""

from __future__ import annotations

import base64
import dataclasses
import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from flask.testing import FlaskClient
from sqlalchemy import func, select

from api.app_ca import create_ca_app
from api.runtime import Runtime
from pki.clock import FixedClock
from pki.refusal import RefusalRecorder
from pki.serial import serial_hex
from pki.store import AuditEvent, CertificateRecord, session_scope
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import admin_token, issue_device, serve_ca

EST = "/.well-known/est"
ROLES = ["admin", "operator", "factory", "auditor"]


@dataclasses.dataclass
class Front:
    ca: DevCA
    runtime: Runtime
    clock: FixedClock
    client: FlaskClient
    device_serial: str  # the certificate of device ENR-1
    intermediate: str
    signer: str  # the devices issuer's OCSP signer

    def call(self, method: str, path: str, token: str | None, body: Any = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.client.open(f"/api/v1{path}", method=method, headers=headers, json=body)
        return r.status_code

    def certificates(self) -> int:
        with session_scope(self.runtime.db) as s:
            query = select(func.count()).select_from(CertificateRecord)
            return int(s.execute(query).scalar_one())

    def events(self, action: str) -> list[AuditEvent]:
        with session_scope(self.runtime.db) as s:
            query = select(AuditEvent).where(AuditEvent.action == action)
            return list(s.execute(query.order_by(AuditEvent.seq)).scalars())


def _secret(ca: DevCA, device_id: str) -> str:
    return ca.pki("device", "secret", device_id, "--stdout").stdout.strip()


@pytest.fixture
def front(dev_ca: DevCA, tmp_path: Path) -> Front:
    for device_id in ("ENR-1", "NEW-1", "BULK-1"):
        dev_ca.pki("device", "add", device_id)
    # ENR-1 holds a certificate: it has enrolled (signed by a `pki issue` process, so that
    # this process never opens the token).
    device = issue_device(dev_ca, tmp_path, "ENR-1")
    runtime = Runtime.open(dev_ca.config_dir, dev_ca.data_dir, environ=dev_ca.env)
    # In the past and mid-minute: every refusal of a test falls in one minute.
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=2)
    runtime.clock = clock = FixedClock(now.replace(second=5, microsecond=0))
    client = create_ca_app(runtime).test_client()
    intermediate = x509.load_pem_x509_certificate(dev_ca.cert("devices.pem").read_bytes())
    with session_scope(runtime.db) as s:
        signer = s.execute(
            select(CertificateRecord.serial_hex).where(
                CertificateRecord.profile == "ocsp-signer", CertificateRecord.issuer_id == "devices"
            )
        ).scalar_one()
    return Front(
        dev_ca,
        runtime,
        clock,
        client,
        device.serial_hex,
        serial_hex(intermediate.serial_number),
        signer,
    )


def matrix(f: Front) -> list[tuple[str, str, Any, dict[str, int]]]:
    """(method, path, body, expected status per role); "admin" rows that change state last."""
    a, o, fa, au = ROLES
    ok_all = {a: 200, o: 200, fa: 200, au: 200}
    return [
        ("GET", f"/certificates/{f.device_serial}", None, {a: 200, o: 200, fa: 403, au: 200}),
        ("GET", "/devices/NEW-1", None, ok_all),
        ("GET", "/devices/ENR-1/certificates", None, ok_all),
        ("POST", "/devices", {"devices": [{"id": "NEW-2"}]}, {a: 200, o: 200, fa: 200, au: 403}),
        ("POST", "/devices/NEW-1/secret", None, {a: 200, o: 200, fa: 200, au: 403}),
        # Taking over an enrolled device: admin only, and with a reason.
        ("POST", "/devices/ENR-1/secret", None, {a: 400, o: 403, fa: 403, au: 403}),
        ("POST", "/devices/ENR-1/secret", {"reason": "RMA"}, {a: 200, o: 403, fa: 403, au: 403}),
        ("POST", "/revocations", {"devices": ["BULK-1"]}, {a: 200, o: 200, fa: 403, au: 403}),
        ("POST", f"/certificates/{f.intermediate}/release", {}, {a: 409, o: 403, fa: 403, au: 403}),
        (
            "POST",
            f"/certificates/{f.device_serial}/revoke",
            {"reason": "superseded"},
            {a: 200, o: 200, fa: 403, au: 403},
        ),
        (
            "POST",
            f"/certificates/{f.signer}/revoke",
            {"reason": "superseded"},
            {a: 200, o: 403, fa: 403, au: 403},
        ),
        (
            "POST",
            f"/certificates/{f.intermediate}/revoke",
            {"reason": "keyCompromise", "issuer": "root"},
            {a: 200, o: 403, fa: 403, au: 403},
        ),
    ]


class TestRoleMatrix:
    @pytest.mark.parametrize("role", ROLES)
    def test_role_matrix_statuses_and_audited_refusals(self, front: Front, role: str) -> None:
        token = admin_token(front.ca, role)
        got, want = [], []
        for method, path, body, expected in matrix(front):
            got.append((method, path, front.call(method, path, token, body)))
            want.append((method, path, expected[role]))
        assert got == want
        # Every refusal is audited: one event, then one with the count when the minute ends.
        refused = sum(1 for _, _, status in got if status == 403)
        front.clock.advance(datetime.timedelta(minutes=1))
        RefusalRecorder(front.runtime.db, front.clock).flush()
        firsts, repeats = front.events("refused.role"), front.events("refused.role.repeated")
        assert len(firsts) == (1 if refused else 0)
        assert len(repeats) == (1 if refused > 1 else 0)
        if refused > 1:
            assert f'"count":{refused}' in repeats[0].details
            assert '"source":"127.0.0.1"' in repeats[0].details
        if role == "admin":
            (redrawn,) = front.events("device.secret_redrawn")
            assert redrawn.target == "ENR-1" and '"reason":"RMA"' in redrawn.details

    def test_role_matrix_without_token_is_401_everywhere(self, front: Front) -> None:
        before = front.certificates()
        for method, path, body, _ in matrix(front):
            assert front.call(method, path, None, body) == 401, path
        assert front.certificates() == before
        (event,) = front.events("refused.login")
        assert event.actor == "client:127.0.0.1"


class TestRevokedIntermediate:
    def test_revoked_intermediate_issues_nothing(self, front: Front, tmp_path: Path) -> None:
        ca = front.ca
        secret = _secret(ca, "NEW-1")
        token = admin_token(ca, "admin")
        verify = str(ca.cert("chain.pem"))
        csr = base64.encodebytes(der(device_csr("NEW-1")[0]))
        with serve_ca(ca, tmp_path) as url:
            r = requests.post(
                f"{url}/api/v1/certificates/{front.intermediate}/revoke",
                json={"reason": "keyCompromise", "issuer": "root"},
                headers={"Authorization": f"Bearer {token}"},
                verify=verify,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            before = front.certificates()
            r = requests.post(
                f"{url}{EST}/simpleenroll",
                data=csr,
                auth=("NEW-1", secret),
                headers={"Content-Type": "application/pkcs10"},
                verify=verify,
                timeout=30,
            )
            assert r.status_code == 503
            assert "issuer devices's certificate is revoked (keyCompromise)" in r.text
            health = requests.get(f"{url}/healthz", verify=verify, timeout=30)
            assert health.status_code == 503
            assert "revoked" in health.json()["issuers"]["devices"]
        assert front.certificates() == before
        # The pki command refuses too: no certificate, no OCSP signer.
        request = tmp_path / "late.csr"
        request.write_bytes(der(device_csr("LATE-1")[0]))
        out = str(tmp_path / "late.pem")
        issued = ca.pki(
            "issue", "--profile", "device", "--csr", str(request), "--out", out, check=False
        )
        assert issued.returncode == 5 and "issues nothing" in issued.stderr
        renewed = ca.pki("ocsp", "renew-signers", "--issuer", "devices", "--force", check=False)
        assert renewed.returncode != 0 and "issues nothing" in renewed.stderr
        assert front.certificates() == before


class TestCLIConfirmations:
    def test_cli_revoke_ca_needs_confirmation(self, front: Front) -> None:
        args = ("revoke", front.intermediate, "--issuer", "root", "--reason", "keyCompromise")
        refused = front.ca.pki(*args, check=False)
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and "--ca" in refused.stderr
        assert len(front.events("refused.confirmation")) == 1
        assert len(front.events("certificate.revoked")) == 0
        done = front.ca.pki(*args, "--ca")
        assert "revoked: root/" in done.stdout

    def test_cli_secret_redraw_needs_a_reason(self, front: Front, tmp_path: Path) -> None:
        refused = front.ca.pki("device", "secret", "ENR-1", "--stdout", check=False)
        assert refused.returncode == 2 and "reason" in refused.stderr
        assert front.events("device.secret_redrawn") == []
        front.ca.pki("device", "secret", "ENR-1", "--stdout", "--reason", "replaced board")
        (event,) = front.events("device.secret_redrawn")
        assert '"reason":"replaced board"' in event.details
        assert event.actor.startswith("cli:")
