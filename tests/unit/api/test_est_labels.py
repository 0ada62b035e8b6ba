"""A one-time secret is valid on the labels it was drawn for: approval cannot be side-stepped."""

from __future__ import annotations

from typing import Any

import pytest

from tests.csrs import der, device_csr
from tests.est_front import ESTFront, issued
from tests.unit.pki.conftest import build_hierarchy


@pytest.fixture
def front(sqlite_db: Any) -> ESTFront:
    return ESTFront(build_hierarchy(sqlite_db))


def test_approval_secret_gets_202_there_and_401_on_the_default_label(front: ESTFront) -> None:
    secret = front.register("DEV-A", labels=["approval"])
    request, _ = device_csr("DEV-A")
    csr = der(request)
    before = front.snapshot()
    for label in ("", "devices"):
        r = front.enroll("DEV-A", secret, csr, label)
        assert r.status_code == 401, (label, r.data)
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert front.snapshot() == before
    r = front.enroll("DEV-A", secret, csr, "approval")
    assert r.status_code == 202, r.data
    assert int(r.headers["Retry-After"]) > 0
    (pending,) = front.service.pending_approvals()
    assert pending.device_id == "DEV-A"
    # Approved, the retry of the same request on its label gets the certificate.
    front.service.approve(pending.approval_id, actor="test")
    r = front.enroll("DEV-A", secret, csr, "approval")
    assert r.status_code == 200, r.data
    assert issued(r).public_key() == request.public_key()


def test_secret_for_the_default_label_refused_on_the_approval_label(front: ESTFront) -> None:
    secret = front.register("DEV-A")
    csr = der(device_csr("DEV-A")[0])
    before = front.snapshot()
    r = front.enroll("DEV-A", secret, csr, "approval")
    assert r.status_code == 401, r.data
    assert front.snapshot() == before
    assert front.enroll("DEV-A", secret, csr).status_code == 200
