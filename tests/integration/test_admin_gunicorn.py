"""The admin API on the real CA front (`pki serve ca`, HTTPS) revoking, and the real VA
(`pki serve va`) saying `revoked` at once, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import DevCA
from tests.integration.test_va_support import (
    admin_token,
    issue_device,
    openssl_ocsp,
    serve_ca,
    serve_va,
)

START_TIMEOUT = 45.0


@pytest.fixture
def ca_front(dev_ca_any: DevCA, tmp_path: Path) -> Iterator[str]:
    """Starts `pki serve ca` on 127.0.0.1 and yields its https URL."""
    with serve_ca(dev_ca_any, tmp_path) as url:
        yield url


def test_revoke_over_https_then_va_says_revoked(
    dev_ca_any: DevCA, ca_front: str, tmp_path: Path
) -> None:
    ca = dev_ca_any
    device = issue_device(ca, tmp_path / "dev", "gw-dev-1")
    ca.pki("ocsp", "presign")
    verify = str(ca.cert("chain.pem"))
    path = f"{ca_front}/api/v1/certificates/{device.serial_hex}/revoke"
    body = {"reason": "keyCompromise"}
    with serve_va(ca, tmp_path) as va:
        before = openssl_ocsp(ca, va, "-cert", device.path, nonce=False)
        assert f"{device.path}: good" in before.stdout, before.stdout + before.stderr

        assert requests.post(path, json=body, verify=verify, timeout=30).status_code == 401
        auditor = admin_token(ca, "auditor")
        refused = requests.post(
            path,
            json=body,
            headers={"Authorization": f"Bearer {auditor}"},
            verify=verify,
            timeout=30,
        )
        assert refused.status_code == 403
        still = openssl_ocsp(ca, va, "-cert", device.path, nonce=False)
        assert f"{device.path}: good" in still.stdout

        operator = admin_token(ca, "operator")
        done = requests.post(
            path,
            json=body,
            headers={"Authorization": f"Bearer {operator}"},
            verify=verify,
            timeout=30,
        )
        assert done.status_code == 200, done.text
        after = openssl_ocsp(ca, va, "-cert", device.path, nonce=False)
        assert "Response verify OK" in after.stderr, after.stderr
        assert f"{device.path}: revoked" in after.stdout
        assert "Reason: keyCompromise" in after.stdout
