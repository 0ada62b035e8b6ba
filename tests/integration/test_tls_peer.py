"""The verified TLS client certificate reaches the WSGI app under real gunicorn."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.integration.tls_pki import Issued, issue, make_ca, with_chain

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class TLSServer:
    """TLSServer is a running gunicorn and the test PKI it trusts."""

    url: str
    port: int
    server_ca: Issued
    client: Issued
    rogue: Issued
    chained: Issued
    log_path: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"gunicorn did not listen on {HOST}:{port}:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    directory = tmp_path_factory.mktemp("tls")
    server_ca = make_ca(directory, "server-ca", "Test Server CA")
    client_ca = make_ca(directory, "client-ca", "Test Device CA")
    other_ca = make_ca(directory, "other-ca", "Unrelated CA")
    server = issue(directory, "server", server_ca, "localhost", server=True)
    client = issue(directory, "client", client_ca, "device-0001", server=False)
    rogue = issue(directory, "rogue", other_ca, "device-rogue", server=False)
    sub_ca = make_ca(directory, "client-sub-ca", "Test Device Sub-CA", client_ca)
    chained = with_chain(issue(directory, "chained", sub_ca, "device-0002", server=False), sub_ca)

    port = _free_port()
    config = directory / "gunicorn.conf.py"
    config.write_text(
        "from api.tls import ssl_context_hook\n"
        f"bind = [{f'{HOST}:{port}'!r}]\n"
        "workers = 1\n"
        "threads = 2\n"
        'worker_class = "api.tls.PeerCertThreadWorker"\n'
        f"certfile = {str(server.cert_path)!r}\n"
        f"keyfile = {str(server.key_path)!r}\n"
        f"ssl_context = ssl_context_hook([{str(client_ca.cert_path)!r}])\n"
        f"pythonpath = {str(HERE)!r}\n"
        "timeout = 30\n"
        "graceful_timeout = 2\n"
        # gunicorn 27 opens a control socket under $HOME by default; tests must not share one.
        "control_socket_disable = True\n"
        'loglevel = "debug"\n'
    )
    log_path = directory / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(config), "tls_app:app"],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, process, log_path)
        yield TLSServer(
            f"https://{HOST}:{port}/", port, server_ca, client, rogue, chained, log_path
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def _get(server: TLSServer, cert: Issued | None = None) -> list[str]:
    with requests.Session() as session:
        response = session.get(
            server.url,
            verify=str(server.server_ca.cert_path),
            cert=None if cert is None else (str(cert.cert_path), str(cert.key_path)),
            timeout=10,
        )
    response.raise_for_status()
    return response.text.splitlines()


def _client_context(server: TLSServer, cert: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server.server_ca.cert_path))
    if cert is not None:
        context.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    return context


def _raw_request(server: TLSServer, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection((HOST, server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := tls.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


class TestPeerCertificate:
    def test_peer_without_client_cert_is_none(self, tls_server: TLSServer) -> None:
        subject, protocol, chain_length = _get(tls_server)
        assert subject == "none"
        assert protocol == "TLSv1.3"
        assert chain_length == "0"

    def test_peer_with_good_client_cert_reaches_app(self, tls_server: TLSServer) -> None:
        subject, protocol, chain_length = _get(tls_server, tls_server.client)
        assert subject == "CN=device-0001,O=iot-pki tests"
        assert protocol == "TLSv1.3"
        assert chain_length == "1"

    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
    def test_peer_chain_reaches_app_as_sent(
        self, tls_server: TLSServer, version: ssl.TLSVersion
    ) -> None:
        # Leaf and intermediate, on this interpreter (3.11 has no public get_unverified_chain).
        context = _client_context(tls_server, tls_server.chained)
        context.maximum_version = version
        response = _raw_request(tls_server, context)
        assert response.startswith(b"HTTP/1.1 200")
        body = response.split(b"\r\n\r\n", 1)[1].decode()
        subject, _protocol, chain_length = body.splitlines()
        assert (subject, chain_length) == ("CN=device-0002,O=iot-pki tests", "2")

    def test_peer_with_unrelated_ca_cert_is_refused(self, tls_server: TLSServer) -> None:
        # TLS 1.3: the client's handshake completes before the server checks the certificate,
        # so the refusal shows on the first read; either way no answer comes back.
        with pytest.raises(requests.exceptions.ConnectionError):
            _get(tls_server, tls_server.rogue)

    def test_peer_with_unrelated_ca_cert_fails_tls12_handshake(self, tls_server: TLSServer) -> None:
        context = _client_context(tls_server, tls_server.rogue)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError, match=r"(?i)unknown ca|certificate"):
            _raw_request(tls_server, context)

    def test_peer_tls12_is_served(self, tls_server: TLSServer) -> None:
        context = _client_context(tls_server, tls_server.client)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        response = _raw_request(tls_server, context)
        assert response.startswith(b"HTTP/1.1 200")
        assert b"CN=device-0001,O=iot-pki tests\nTLSv1.2\n" in response

    def test_peer_tls11_is_refused_by_server(self, tls_server: TLSServer) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # Let this client offer TLS 1.1 at all, so the refusal seen is the server's alert.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.warns(DeprecationWarning):
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError, match=r"(?i)protocol.version"):
            _raw_request(tls_server, context)

    def test_peer_openssl_tls11_is_refused(self, tls_server: TLSServer) -> None:
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"{HOST}:{tls_server.port}",
                "-tls1_1",
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ],
            input=b"",
            capture_output=True,
            timeout=20,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode != 0
        assert "alert protocol version" in output

    @pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
    def test_peer_curl_with_client_cert(self, tls_server: TLSServer) -> None:
        result = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                "--cacert",
                str(tls_server.server_ca.cert_path),
                "--cert",
                str(tls_server.client.cert_path),
                "--key",
                str(tls_server.client.key_path),
                tls_server.url,
            ],
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout.decode().splitlines()[0] == "CN=device-0001,O=iot-pki tests"
