"""The validation authority over real HTTP: gunicorn `pki serve va`, openssl ocsp, curl.

Covers the acceptance list of issue 4 for OCSP: good, revoked at once after an admin API
revocation, never-issued serial not good, another CA's certificate unauthorized, -no_nonce
from the pre-signed store and a nonce echoed, the GET form with RFC 5019 headers.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from flask import Flask

from api import admin
from api.runtime import Runtime
from pki import lint
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import (
    DeviceCert,
    VAServer,
    admin_token,
    issue_device,
    openssl_ocsp,
    run,
    serve_va,
)
from tests.unit.pki.revocation_pki import make_pki


@pytest.fixture
def va(dev_ca: DevCA, tmp_path: Path) -> Iterator[VAServer]:
    with serve_va(dev_ca, tmp_path) as server:
        yield server


@pytest.fixture
def device(dev_ca: DevCA, tmp_path: Path) -> DeviceCert:
    return issue_device(dev_ca, tmp_path / "devices", "dev-0001")


def status_line(output: str, path: Path) -> str:
    match = re.search(rf"^{re.escape(str(path))}: (\w+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def admin_client(dev_ca: DevCA) -> Flask:
    app = Flask("admin-test")
    runtime = Runtime.open(dev_ca.config_dir, dev_ca.data_dir, environ=dev_ca.env)
    admin.register(app, runtime)
    return app


def produced_at(der: bytes) -> datetime.datetime:
    return ocsp.load_der_ocsp_response(der).produced_at_utc


class TestOCSPOverHTTP:
    def test_good_then_revoked_at_once_via_admin_api(
        self, dev_ca: DevCA, va: VAServer, device: DeviceCert, tmp_path: Path
    ) -> None:
        dev_ca.pki("ocsp", "presign")
        first = openssl_ocsp(dev_ca, va, "-cert", device.path, nonce=False)
        assert "Response verify OK" in first.stderr, first.stdout + first.stderr
        assert status_line(first.stdout, device.path) == "good"

        token = admin_token(dev_ca, "operator")
        client = admin_client(dev_ca).test_client()
        revoked = client.post(
            f"/api/v1/certificates/{device.serial_hex}/revoke",
            json={"reason": "keyCompromise"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert revoked.status_code == 200, revoked.get_data(as_text=True)

        # No pre-signing ran since: the stored "good" must not be served.
        for nonce in (False, True):
            after = openssl_ocsp(dev_ca, va, "-cert", device.path, nonce=nonce)
            assert "Response verify OK" in after.stderr, after.stdout + after.stderr
            assert status_line(after.stdout, device.path) == "revoked"
            assert "Reason: keyCompromise" in after.stdout

    def test_never_issued_serial_is_not_good(self, dev_ca: DevCA, va: VAServer) -> None:
        result = openssl_ocsp(dev_ca, va, "-serial", "0x1234567890abcdef")
        assert "Response verify OK" in result.stderr, result.stdout + result.stderr
        assert "0x1234567890abcdef: unknown" in result.stdout

    def test_other_ca_certificate_unauthorized(
        self, dev_ca: DevCA, va: VAServer, tmp_path: Path
    ) -> None:
        paths = make_pki(leaf_count=1).write(tmp_path)
        result = run(
            "openssl", "ocsp", "-issuer", paths["int"], "-cert", paths["leaf0"],
            "-url", va.ocsp_url, "-CAfile", paths["root"], "-timeout", "20",
        )  # fmt: skip
        assert "unauthorized" in (result.stdout + result.stderr).lower(), result.stdout

    def test_no_nonce_from_presigned_store_nonce_echoed(
        self, dev_ca: DevCA, va: VAServer, device: DeviceCert, tmp_path: Path
    ) -> None:
        dev_ca.pki("ocsp", "presign")
        outs = [tmp_path / "a.der", tmp_path / "b.der"]
        for out in outs:
            result = openssl_ocsp(dev_ca, va, "-cert", device.path, nonce=False, respout=out)
            assert status_line(result.stdout, device.path) == "good"
            assert "OCSP Nonce" not in result.stdout
        # The same stored bytes twice: the pre-signed store answered, nothing was signed.
        assert outs[0].read_bytes() == outs[1].read_bytes()
        assert lint.blocking(lint.lint_ocsp_response(outs[0].read_bytes())) == []

        nonce_out = tmp_path / "n.der"
        live = openssl_ocsp(dev_ca, va, "-cert", device.path, respout=nonce_out)
        assert "Response verify OK" in live.stderr, live.stderr
        assert "OCSP Nonce" in live.stdout
        assert "WARNING" not in live.stderr  # openssl warns when the nonce is missing
        assert status_line(live.stdout, device.path) == "good"
        assert nonce_out.read_bytes() != outs[0].read_bytes()
        assert produced_at(nonce_out.read_bytes()) >= produced_at(outs[0].read_bytes())
        assert lint.blocking(lint.lint_ocsp_response(nonce_out.read_bytes())) == []

    def test_get_form_with_curl_has_rfc5019_headers(
        self, dev_ca: DevCA, va: VAServer, device: DeviceCert, tmp_path: Path
    ) -> None:
        dev_ca.pki("ocsp", "presign")
        req = tmp_path / "req.der"
        made = run(
            "openssl", "ocsp", "-issuer", dev_ca.cert("devices.pem"), "-cert", device.path,
            "-no_nonce", "-reqout", req,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        encoded = urllib.parse.quote(base64.b64encode(req.read_bytes()).decode(), safe="")
        body, headers = tmp_path / "resp.der", tmp_path / "headers.txt"
        fetched = run(
            "curl", "-sS", "--max-time", "20", "-D", headers, "-o", body,
            f"{va.ocsp_url}/{encoded}",
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        lines = headers.read_text().splitlines()
        assert lines[0].split()[1] == "200"
        h = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        assert h["content-type"] == "application/ocsp-response"
        assert h["etag"].startswith('"')
        response = ocsp.load_der_ocsp_response(body.read_bytes())
        assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
        next_update = response.next_update_utc
        assert next_update is not None
        max_age = int(re.search(r"max-age=(\d+)", h["cache-control"]).group(1))  # type: ignore[union-attr]
        now = datetime.datetime.now(datetime.UTC)
        assert 0 < max_age <= (next_update - now).total_seconds() + 1
        assert email.utils.parsedate_to_datetime(h["expires"]) == next_update
        assert email.utils.parsedate_to_datetime(h["last-modified"]) == response.this_update_utc
        # The same status as the POST form, verified by openssl.
        checked = run(
            "openssl", "ocsp", "-respin", body, "-issuer", dev_ca.cert("devices.pem"),
            "-cert", device.path, "-CAfile", dev_ca.cert("root.pem"),
        )  # fmt: skip
        assert "Response verify OK" in checked.stderr, checked.stderr
        assert status_line(checked.stdout, device.path) == "good"
        # A conditional GET with the ETag is answered 304.
        again = requests.get(
            f"{va.ocsp_url}/{encoded}", headers={"If-None-Match": h["etag"]}, timeout=10
        )
        assert again.status_code == 304

    def test_nonce_response_has_no_caching_headers(
        self, dev_ca: DevCA, va: VAServer, device: DeviceCert, tmp_path: Path
    ) -> None:
        req = tmp_path / "req.der"
        made = run(
            "openssl", "ocsp", "-issuer", dev_ca.cert("devices.pem"), "-cert", device.path,
            "-reqout", req,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        r = requests.post(
            va.ocsp_url,
            data=req.read_bytes(),
            headers={"Content-Type": "application/ocsp-request"},
            timeout=10,
        )
        assert r.status_code == 200
        assert r.headers["Cache-Control"] == "no-store"
        for header in ("ETag", "Expires", "Last-Modified"):
            assert header not in r.headers

    def test_malformed_request_is_malformed_response(self, va: VAServer) -> None:
        for send in (
            lambda: requests.post(
                va.ocsp_url,
                data=b"\x30\x03garbage",
                headers={"Content-Type": "application/ocsp-request"},
                timeout=10,
            ),
            lambda: requests.get(f"{va.ocsp_url}/not%20base64!!", timeout=10),
        ):
            r = send()
            assert r.status_code == 200
            parsed = ocsp.load_der_ocsp_response(r.content)
            assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST

    def test_oversize_request_refused(self, va: VAServer) -> None:
        r = requests.post(
            va.ocsp_url,
            data=b"\x30" * 100_000,
            headers={"Content-Type": "application/ocsp-request"},
            timeout=10,
        )
        assert r.status_code == 413

    def test_ca_issuers_and_healthz(self, dev_ca: DevCA, va: VAServer) -> None:
        r = requests.get(f"{va.url}/ca/devices.der", timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/pkix-cert"
        expected = x509.load_pem_x509_certificate(dev_ca.cert("devices.pem").read_bytes())
        assert r.content == expected.public_bytes(Encoding.DER)
        assert requests.get(f"{va.url}/ca/nope.der", timeout=10).status_code == 404
        health = requests.get(f"{va.url}/healthz", timeout=10).json()
        assert health["status"] == "ok"
        assert health["ocsp_signers"] == {"root": "ok", "devices": "ok"}


class TestSignerRenewal:
    def test_renew_signers_only_when_due_and_va_uses_the_new_one(
        self, dev_ca: DevCA, device: DeviceCert, tmp_path: Path
    ) -> None:
        fresh = dev_ca.pki("ocsp", "renew-signers")
        assert fresh.stdout.count("not due") == 2, fresh.stdout
        old = x509.load_pem_x509_certificate(dev_ca.cert("devices-ocsp.pem").read_bytes())
        # A margin longer than the signer's validity makes it due.
        renewed = dev_ca.pki("ocsp", "renew-signers", "--issuer", "devices", "--before-days", "60")
        assert "new OCSP signer" in renewed.stdout, renewed.stdout
        new = x509.load_pem_x509_certificate(dev_ca.cert("devices-ocsp.pem").read_bytes())
        assert new.serial_number != old.serial_number
        with serve_va(dev_ca, tmp_path) as va:
            out = tmp_path / "resp.der"
            result = openssl_ocsp(dev_ca, va, "-cert", device.path, respout=out)
            assert "Response verify OK" in result.stderr, result.stderr
            assert status_line(result.stdout, device.path) == "good"
            response = ocsp.load_der_ocsp_response(out.read_bytes())
            assert response.certificates[0].serial_number == new.serial_number


def test_get_form_with_unescaped_slashes_and_plus(
    dev_ca: DevCA, va: VAServer, device: DeviceCert
) -> None:
    """Clients that do not URL-encode the base64 still get an answer (RFC 6960 A.1)."""
    import secrets

    from pki.ocsp import IssuerMatcher
    from tests.unit.pki.test_revocation_support import ocsp_request

    issuer = x509.load_pem_x509_certificate(dev_ca.cert("devices.pem").read_bytes())
    cert_id = IssuerMatcher(issuer).cert_id(device.certificate.serial_number)
    for _ in range(5000):
        nonce = secrets.token_bytes(16)
        encoded = base64.b64encode(ocsp_request([cert_id], nonce)).decode()
        if "//" in encoded and "+" in encoded:
            break
    else:
        pytest.skip("no request with '//' and '+' in its base64 found")
    r = requests.get(f"{va.ocsp_url}/{encoded}", timeout=10)
    assert r.status_code == 200
    response = ocsp.load_der_ocsp_response(r.content)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
