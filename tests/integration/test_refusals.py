"""Refused EST logins reach the audit log folded per device, address and minute (Flask client)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import NameAttribute
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient
from sqlalchemy import select

from api.app_ca import create_ca_app
from api.runtime import Runtime
from api.tls import SSL_CLIENT_CERT, SSL_CLIENT_CERT_CHAIN
from pki.clock import FixedClock
from pki.refusal import RefusalRecorder
from pki.store import AuditEvent, session_scope
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.tls_pki import make_ca

EST = "/.well-known/est"


@dataclasses.dataclass
class Front:
    runtime: Runtime
    clock: FixedClock
    client: FlaskClient

    def enroll(self, device_id: str, secret: str | None, address: str, *, csr_id: str = "") -> int:
        body = base64.encodebytes(der(device_csr(csr_id or device_id)[0]))
        headers = {"Content-Type": "application/pkcs10"}
        if secret is not None:
            token = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        r = self.client.post(
            f"{EST}/simpleenroll",
            data=body,
            headers=headers,
            environ_base={"REMOTE_ADDR": address},
        )
        return r.status_code

    def refusals(self) -> list[AuditEvent]:
        with session_scope(self.runtime.db) as s:
            query = select(AuditEvent).where(AuditEvent.action.like("refused.%"))
            return list(s.execute(query.order_by(AuditEvent.seq)).scalars())


@pytest.fixture
def front(dev_ca: DevCA) -> Front:
    runtime = Runtime.open(dev_ca.config_dir, dev_ca.data_dir, environ=dev_ca.env)
    # Mid-minute, so the whole flood falls in one minute of the recorder's clock, and in
    # the past, so that even the minute after it is not later than a checkpoint signed now.
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=2)
    now = now.replace(second=10, microsecond=0)
    runtime.clock = clock = FixedClock(now)
    return Front(runtime, clock, create_ca_app(runtime).test_client())


class TestRefusalAudit:
    def test_refusal_flood_of_failed_logins_is_bounded_and_verifies(
        self, front: Front, dev_ca: DevCA
    ) -> None:
        dev_ca.pki("device", "add", "FLOOD-1")
        flood = 40
        codes = [front.enroll("FLOOD-1", f"wrong-{i}", "127.0.0.7") for i in range(flood)]
        assert codes == [401] * flood
        # The first 5 failures are failed logins, the rest throttled (est.toml max_failures):
        # one event per kind while the minute lasts ...
        first = front.refusals()
        assert [(e.action, e.target, e.actor) for e in first] == [
            ("refused.login", "FLOOD-1", "client:127.0.0.7"),
            ("refused.throttle", "FLOOD-1", "client:127.0.0.7"),
        ]
        # ... and when it ends, one more per kind with its count.
        front.clock.advance(datetime.timedelta(minutes=1))
        assert RefusalRecorder(front.runtime.db, front.clock).flush() == 2
        repeated = front.refusals()[2:]
        assert sorted(e.action for e in repeated) == [
            "refused.login.repeated",
            "refused.throttle.repeated",
        ]
        counts = [json.loads(e.details)["count"] for e in repeated]
        assert sum(counts) == flood and all(c > 1 for c in counts)
        assert all(json.loads(e.details)["source"] == "127.0.0.7" for e in repeated)
        dev_ca.pki("audit", "checkpoint")
        verified = dev_ca.pki("audit", "verify")
        assert "audit log intact" in verified.stdout

    def test_refusal_keys_by_address_and_no_audit_for_the_challenge(
        self, front: Front, dev_ca: DevCA
    ) -> None:
        dev_ca.pki("device", "add", "FLOOD-2")
        assert front.enroll("FLOOD-2", None, "127.0.0.7") == 401  # RFC 7030 3.2.3 challenge
        assert front.refusals() == []
        for address in ("127.0.0.7", "127.0.0.8", "127.0.0.7"):
            assert front.enroll("FLOOD-2", "wrong", address) == 401
        assert [e.actor for e in front.refusals()] == ["client:127.0.0.7", "client:127.0.0.8"]

    def test_refusal_identity_mismatch_is_audited(self, front: Front, dev_ca: DevCA) -> None:
        dev_ca.pki("device", "add", "MINE-1")
        secret = dev_ca.pki("device", "secret", "MINE-1", "--stdout").stdout.strip()
        assert front.enroll("MINE-1", secret, "127.0.0.9", csr_id="THEIRS-1") == 403
        (event,) = front.refusals()
        assert (event.action, event.target) == ("refused.identity", "MINE-1")
        assert secret not in event.details

    def test_refusal_csr_naming_another_device_is_audited(
        self, front: Front, dev_ca: DevCA
    ) -> None:
        dev_ca.pki("device", "add", "MINE-2")
        secret = dev_ca.pki("device", "secret", "MINE-2", "--stdout").stdout.strip()
        # Its own device ID, but the CN of another device: the CA writes CN=MINE-2 (400).
        csr, _ = device_csr("MINE-2", extra=[NameAttribute(NameOID.COMMON_NAME, "THEIRS-2")])
        token = base64.b64encode(f"MINE-2:{secret}".encode()).decode()
        for _ in range(3):
            r = front.client.post(
                f"{EST}/simpleenroll",
                data=base64.encodebytes(der(csr)),
                headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"},
                environ_base={"REMOTE_ADDR": "127.0.0.13"},
            )
            assert r.status_code == 400, r.data
        (event,) = front.refusals()  # three refusals in one minute: one event
        assert (event.action, event.target) == ("refused.identity", "MINE-2")
        assert event.actor == "client:127.0.0.13"
        details = json.loads(event.details)
        assert details["source"] == "127.0.0.13"
        assert "subject attribute CN" in details["reason"]
        assert secret not in event.details
        front.clock.advance(datetime.timedelta(minutes=1))
        assert RefusalRecorder(front.runtime.db, front.clock).flush() == 1
        dev_ca.pki("audit", "checkpoint")
        assert "audit log intact" in dev_ca.pki("audit", "verify").stdout

    def test_refusal_reenroll_with_a_foreign_certificate_is_audited(
        self, front: Front, tmp_path: Path
    ) -> None:
        # A certificate this CA never issued, named STRANGER-1.
        made = make_ca(tmp_path, "stranger", "STRANGER-1", ca=False)
        stranger = made.cert.public_bytes(serialization.Encoding.DER)
        r = front.client.post(
            f"{EST}/simplereenroll",
            data=base64.encodebytes(der(device_csr("STRANGER-1")[0])),
            headers={"Content-Type": "application/pkcs10"},
            environ_base={
                "REMOTE_ADDR": "127.0.0.11",
                SSL_CLIENT_CERT: stranger,
                SSL_CLIENT_CERT_CHAIN: [stranger],
            },
        )
        assert r.status_code in (401, 403)
        (event,) = front.refusals()
        assert (event.action, event.target) == ("refused.reenroll", "STRANGER-1")
        assert event.actor == "client:127.0.0.11"

    def test_refusal_throttled_login_is_its_own_kind(self, front: Front, dev_ca: DevCA) -> None:
        dev_ca.pki("device", "add", "THROTTLE-1")
        codes = [front.enroll("THROTTLE-1", "wrong", "127.0.0.12") for _ in range(12)]
        assert codes == [401] * 12
        kinds = {e.action for e in front.refusals()}
        assert kinds == {"refused.login", "refused.throttle"}
