"""Refused EST logins reach the audit log folded per device, address and minute (Flask client)."""

from __future__ import annotations

import base64
import dataclasses
import datetime

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from api.app_ca import create_ca_app
from api.runtime import Runtime
from pki.clock import FixedClock
from pki.refusal import RefusalRecorder
from pki.store import AuditEvent, session_scope
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA

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
        first = front.refusals()
        assert [(e.action, e.target, e.actor) for e in first] == [
            ("refused.login", "FLOOD-1", "client:127.0.0.7")
        ]
        # The minute ends; its count is written as one more event.
        front.clock.advance(datetime.timedelta(minutes=1))
        assert RefusalRecorder(front.runtime.db, front.clock).flush() == 1
        events = front.refusals()
        assert [e.action for e in events] == ["refused.login", "refused.login.repeated"]
        assert f'"count":{flood}' in events[1].details
        assert '"source":"127.0.0.7"' in events[1].details
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
