"""The CA front behind a TLS-terminating proxy, with a closed token, and auth extraction."""

from __future__ import annotations

import base64
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from api.auth import basic_credentials, client_identity
from api.tls import SSL_CLIENT_CERT, SSL_CLIENT_CERT_CHAIN
from pki.errors import PKIError
from tests.conftest import CONFIG_DIR
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_est import EST, _start, _stop

PROXY_SETTINGS = 'trusted_proxies = ["127.0.0.1/32"]\n'


def _copy_ca(template: DevCA, work: Path, est_prefix: str) -> DevCA:
    config_dir = work / "ca-config"
    shutil.copytree(CONFIG_DIR, config_dir)
    est = config_dir / "est.toml"
    est.write_text(est_prefix + est.read_text().replace("trusted_proxies = []\n", ""))
    target = work / "ca"
    shutil.copytree(template.data_dir, target)
    conf = target / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(template.data_dir), str(target)))
    return DevCA(target, config_dir, None)


@pytest.fixture(scope="module")
def proxied(
    tmp_path_factory: pytest.TempPathFactory, _dev_ca_template: DevCA
) -> Iterator[tuple[DevCA, str]]:
    """A CA front that trusts 127.0.0.1 as a reverse proxy (as nginx on the same host)."""
    work = tmp_path_factory.mktemp("est-proxy")
    ca = _copy_ca(_dev_ca_template, work, PROXY_SETTINGS)
    process, port, _log = _start(ca, work)
    try:
        yield ca, f"https://127.0.0.1:{port}"
    finally:
        _stop(process)


def _enroll(ca: DevCA, url: str, device_id: str) -> tuple[bytes, str]:
    ca.pki("device", "add", device_id)
    secret = ca.pki("device", "secret", device_id, "--stdout").stdout.strip()
    csr, _ = device_csr(device_id)
    r = requests.post(
        f"{url}{EST}/simpleenroll",
        data=base64.encodebytes(der(csr)),
        auth=(device_id, secret),
        headers={"Content-Type": "application/pkcs10"},
        verify=str(ca.cert("chain.pem")),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
    return base64.encodebytes(der(csr)), cert.public_bytes(serialization.Encoding.PEM).decode()


class TestBehindProxy:
    def test_reenroll_with_forwarded_certificate(self, proxied: tuple[DevCA, str]) -> None:
        ca, url = proxied
        csr_b64, pem = _enroll(ca, url, "PROXY-0001")
        r = requests.post(
            f"{url}{EST}/simplereenroll",
            data=csr_b64,
            # nginx: proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
            headers={
                "Content-Type": "application/pkcs10",
                "X-SSL-Client-Cert": urllib.parse.quote(pem),
            },
            verify=str(ca.cert("chain.pem")),
            timeout=30,
        )
        assert r.status_code == 200, r.text

    def test_forwarded_garbage_is_400(self, proxied: tuple[DevCA, str]) -> None:
        ca, url = proxied
        r = requests.post(
            f"{url}{EST}/simplereenroll",
            data=b"AAAA",
            headers={"Content-Type": "application/pkcs10", "X-SSL-Client-Cert": "junk"},
            verify=str(ca.cert("chain.pem")),
            timeout=30,
        )
        assert r.status_code == 400


@pytest.fixture(scope="module")
def closed_token(
    tmp_path_factory: pytest.TempPathFactory, _dev_ca_template: DevCA
) -> Iterator[tuple[DevCA, str]]:
    """A CA front whose token PIN is wrong: up, but degraded."""
    work = tmp_path_factory.mktemp("est-closed")
    ca = _copy_ca(_dev_ca_template, work, "")
    (ca.data_dir / "secrets" / "ca-user.pin").write_text("wrong-pin\n")
    process, port, _log = _start(ca, work, healthy=False)
    try:
        yield ca, f"https://127.0.0.1:{port}"
    finally:
        _stop(process)


class TestTokenClosed:
    def test_healthz_503_without_secrets(self, closed_token: tuple[DevCA, str]) -> None:
        ca, url = closed_token
        r = requests.get(f"{url}/healthz", verify=str(ca.cert("chain.pem")), timeout=10)
        assert r.status_code == 503
        assert r.json() == {"status": "degraded", "database": "ok", "token": "unavailable"}
        assert "wrong-pin" not in r.text

    def test_enroll_503_when_token_closed(self, closed_token: tuple[DevCA, str]) -> None:
        ca, url = closed_token
        ca.pki("device", "add", "CLOSED-1")
        secret = ca.pki("device", "secret", "CLOSED-1", "--stdout").stdout.strip()
        csr, _ = device_csr("CLOSED-1")
        r = requests.post(
            f"{url}{EST}/simpleenroll",
            data=base64.encodebytes(der(csr)),
            auth=("CLOSED-1", secret),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(ca.cert("chain.pem")),
            timeout=30,
        )
        assert r.status_code == 503
        assert "Retry-After" in r.headers
        # The secret was not spent: nothing was issued.
        assert '"state": "registered"' in ca.pki("device", "show", "CLOSED-1").stdout


class TestAuthExtraction:
    def test_basic_credentials_parse(self) -> None:
        header = "Basic " + base64.b64encode(b"DEV-1:pa:ss").decode()
        creds = basic_credentials(header)
        assert creds is not None
        assert (creds.username, creds.password) == ("DEV-1", "pa:ss")
        assert "pa:ss" not in repr(creds)

    @pytest.mark.parametrize("header", ["Basic !!!", "Basic " + base64.b64encode(b"x").decode()])
    def test_basic_credentials_malformed(self, header: str) -> None:
        with pytest.raises(PKIError):
            basic_credentials(header)

    def test_other_schemes_ignored(self) -> None:
        assert basic_credentials("Bearer abc") is None
        assert basic_credentials(None) is None

    def test_forwarded_header_ignored_from_untrusted_address(self) -> None:
        environ = {"REMOTE_ADDR": "10.0.0.9", "HTTP_X_SSL_CLIENT_CERT": "anything"}
        identity = client_identity(environ, proxies=())
        assert not identity.has_certificate

    def test_tls_chain_used_when_direct(self) -> None:
        environ = {
            "REMOTE_ADDR": "10.0.0.9",
            SSL_CLIENT_CERT: b"leaf",
            SSL_CLIENT_CERT_CHAIN: (b"leaf", b"ca"),
        }
        identity = client_identity(environ)
        assert identity.tls_chain_der == (b"leaf", b"ca")
        assert identity.source == "tls"

    def test_tls_chain_ignored_from_proxy(self) -> None:
        import ipaddress

        environ = {"REMOTE_ADDR": "127.0.0.1", SSL_CLIENT_CERT: b"proxy-own-cert"}
        identity = client_identity(environ, proxies=[ipaddress.ip_network("127.0.0.1/32")])
        assert not identity.has_certificate
