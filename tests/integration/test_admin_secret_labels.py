"""The admin API draws one-time secrets for the labels it is told; bad labels change nothing."""

from __future__ import annotations

from sqlalchemy import select

from pki.device import DeviceService
from pki.store import session_scope
from pki.store.enrollment_models import EnrollmentSecret
from tests.integration.conftest import DevCA
from tests.integration.test_admin import AdminAPI
from tests.integration.test_va_support import admin_token


def _secrets(api: AdminAPI) -> list[tuple[int, str, str | None]]:
    with session_scope(api.runtime.db) as s:
        rows = s.execute(select(EnrollmentSecret).order_by(EnrollmentSecret.id)).scalars()
        return [(r.id, r.state.value, r.labels) for r in rows]


def test_secret_labels_over_the_admin_api(dev_ca: DevCA) -> None:
    api = AdminAPI(dev_ca)
    token = admin_token(dev_ca, "factory")
    DeviceService(api.runtime.db, api.runtime.clock).add("LBL-1", actor="test")
    path = "/devices/LBL-1/secret"

    r = api.call("POST", path, token)
    assert r.status_code == 200, r.json
    assert r.json["labels"] == ["devices"]
    r = api.call("POST", path, token, json={"labels": ["approval"]})
    assert r.status_code == 200, r.json
    assert r.json["labels"] == ["approval"]
    assert [(state, labels) for _, state, labels in _secrets(api)] == [
        ("replaced", "devices"),
        ("active", "approval"),
    ]

    before = _secrets(api)
    for body, status in (
        ({"labels": ["nope"]}, 404),
        ({"labels": "approval"}, 400),
        ({"label": 7}, 400),
    ):
        r = api.call("POST", path, token, json=body)
        assert r.status_code == status, (body, r.json)
    assert _secrets(api) == before
