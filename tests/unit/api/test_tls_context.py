"""Tests for api.tls: the server SSL context, the gunicorn hook and the peer environ."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api import tls
from pki.errors import ErrorKind, PKIError


def _write_self_signed(directory: Path, stem: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    server_cert, server_key = _write_self_signed(tmp_path, "server")
    ca_a, _ = _write_self_signed(tmp_path, "ca-a")
    ca_b, _ = _write_self_signed(tmp_path, "ca-b")
    return {"cert": server_cert, "key": server_key, "ca_a": ca_a, "ca_b": ca_b}


class TestServerSSLContext:
    def test_server_ssl_context_settings(self, files: dict[str, Path]) -> None:
        context = tls.server_ssl_context(
            str(files["cert"]), str(files["key"]), [str(files["ca_a"]), str(files["ca_b"])]
        )
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert context.verify_mode is ssl.CERT_OPTIONAL
        assert context.cert_store_stats()["x509_ca"] == 2
        assert context.options & ssl.OP_NO_COMPRESSION

    def test_server_ssl_context_tls13_only(self, files: dict[str, Path]) -> None:
        context = tls.server_ssl_context(
            str(files["cert"]),
            str(files["key"]),
            [str(files["ca_a"])],
            minimum_version=ssl.TLSVersion.TLSv1_3,
        )
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3

    def test_server_ssl_context_refuses_old_tls(self, files: dict[str, Path]) -> None:
        with pytest.raises(PKIError) as excinfo:
            tls.server_ssl_context(
                str(files["cert"]),
                str(files["key"]),
                [str(files["ca_a"])],
                minimum_version=ssl.TLSVersion.TLSv1_1,
            )
        assert excinfo.value.kind is ErrorKind.CONFIG

    def test_server_ssl_context_needs_ca(self, files: dict[str, Path]) -> None:
        with pytest.raises(PKIError) as excinfo:
            tls.server_ssl_context(str(files["cert"]), str(files["key"]), [])
        assert excinfo.value.kind is ErrorKind.CONFIG

    def test_server_ssl_context_missing_file(self, files: dict[str, Path], tmp_path: Path) -> None:
        with pytest.raises(OSError):
            tls.server_ssl_context(
                str(files["cert"]), str(files["key"]), [str(tmp_path / "nope.pem")]
            )


class TestSSLContextHook:
    def test_ssl_context_hook_builds_once(self, files: dict[str, Path]) -> None:
        hook = tls.ssl_context_hook([str(files["ca_a"])])
        config = SimpleNamespace(certfile=str(files["cert"]), keyfile=str(files["key"]))

        def default_factory() -> ssl.SSLContext:
            raise AssertionError("the default factory must not be used")

        first = hook(config, default_factory)
        assert hook(config, default_factory) is first
        assert first.verify_mode is ssl.CERT_OPTIONAL

    def test_ssl_context_hook_arity_is_what_gunicorn_checks(self, files: dict[str, Path]) -> None:
        from gunicorn.config import validate_callable

        hook = tls.ssl_context_hook([str(files["ca_a"])])
        assert validate_callable(2)(hook) is hook


class TestPeerEnviron:
    def test_peer_environ_plain_socket(self) -> None:
        with socket.socket() as plain:
            assert tls.peer_environ(plain) == {}
        assert tls.peer_environ(None) == {}

    def test_peer_environ_over_tls(self, files: dict[str, Path]) -> None:
        server_context = tls.server_ssl_context(
            str(files["cert"]), str(files["key"]), [str(files["cert"])]
        )
        client_context = ssl.create_default_context(cafile=str(files["cert"]))
        client_context.load_cert_chain(str(files["cert"]), str(files["key"]))
        left, right = socket.socketpair()
        seen: dict[str, Any] = {}

        def serve() -> None:
            with server_context.wrap_socket(left, server_side=True) as server_side:
                seen.update(tls.peer_environ(server_side))
                server_side.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        with client_context.wrap_socket(right, server_hostname="localhost") as client_side:
            client_side.sendall(b"x")
        thread.join(timeout=10)
        assert not thread.is_alive()
        expected_der = x509.load_pem_x509_certificate(files["cert"].read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        assert seen[tls.SSL_CLIENT_CERT] == expected_der
        assert seen[tls.SSL_CLIENT_CERT_CHAIN][0] == expected_der
        assert seen[tls.SSL_PROTOCOL] == "TLSv1.3"


class TestPeerCertMiddleware:
    def test_peer_cert_middleware_clears_spoofed_keys(self) -> None:
        captured: dict[str, Any] = {}

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            captured.update(environ)
            return [b""]

        environ: dict[str, Any] = {
            "SSL_CLIENT_CERT": b"forged",
            "SSL_PROTOCOL": "TLSv9",
            "gunicorn.socket": None,
        }
        tls.PeerCertMiddleware(app)(environ, lambda *a: None)
        assert "SSL_CLIENT_CERT" not in captured
        assert "SSL_PROTOCOL" not in captured
