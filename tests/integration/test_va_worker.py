"""The VA's OCSP worker at the HTTP level, over real sockets: keep-alive, pipelining, limits,
the WSGI hand-over for everything that is not OCSP, and a clean stop on SIGTERM."""

from __future__ import annotations

import base64
import email.utils
import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.integration.conftest import DevCA
from tests.integration.test_va_support import VAServer, issue_device, serve_va

HOST = "127.0.0.1"


@pytest.fixture
def va(dev_ca: DevCA, tmp_path: Path) -> Iterator[VAServer]:
    with serve_va(dev_ca, tmp_path, workers=1) as server:
        yield server


def ocsp_request(dev_ca: DevCA, tmp_path: Path, device_id: str) -> tuple[bytes, int]:
    device = issue_device(dev_ca, tmp_path / "devices", device_id)
    issuer = x509.load_pem_x509_certificate(dev_ca.cert("devices.pem").read_bytes())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(device.certificate, issuer, hashes.SHA1())  # noqa: S303 (RFC 5019 CertID)
        .build()
    )
    return request.public_bytes(serialization.Encoding.DER), device.certificate.serial_number


def post(body: bytes, *, content_type: str = "application/ocsp-request") -> bytes:
    return (
        f"POST /ocsp HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def read_response(stream: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Reads one HTTP/1.1 response with a Content-Length from a socket."""
    response = http.client.HTTPResponse(stream)
    response.begin()
    body = response.read()
    response.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def good_serial(der: bytes) -> int:
    answer = ocsp.load_der_ocsp_response(der)
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    return answer.serial_number


def test_keep_alive_and_pipelining(dev_ca: DevCA, va: VAServer, tmp_path: Path) -> None:
    der, serial = ocsp_request(dev_ca, tmp_path, "KEEP-0001")
    # Three requests, one after the other, on one connection.
    conn = http.client.HTTPConnection(HOST, va.port, timeout=10)
    for _ in range(3):
        conn.request("POST", "/ocsp", der, {"Content-Type": "application/ocsp-request"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "application/ocsp-response"
        assert good_serial(r.read()) == serial
        assert conn.sock is not None  # kept alive, not closed by the server
    conn.close()
    # Pipelined: POST, GET and a WSGI request in one write, answered in order.
    encoded = base64.b64encode(der).decode()
    with socket.create_connection((HOST, va.port), timeout=10) as s:
        s.sendall(
            post(der)
            + f"GET /ocsp/{encoded} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
            + f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        )
        status, _, body = read_response(s)
        assert status == 200 and good_serial(body) == serial
        status, headers, body = read_response(s)
        assert status == 200 and good_serial(body) == serial
        assert "max-age=" in headers["cache-control"] and headers["etag"].startswith('"')
        assert email.utils.parsedate_to_datetime(headers["date"]).tzinfo is not None
        status, headers, body = read_response(s)
        assert status == 200 and headers["content-type"] == "application/json"
        assert b'"status":"ok"' in body


def test_get_encodings_and_errors(dev_ca: DevCA, va: VAServer, tmp_path: Path) -> None:
    der, serial = ocsp_request(dev_ca, tmp_path, "GET-0001")
    encoded = base64.b64encode(der).decode()
    for path in (encoded, encoded.replace("+", "%2B").replace("/", "%2F"), encoded.rstrip("=")):
        r = requests.get(f"{va.ocsp_url}/{path}", timeout=10)
        assert r.status_code == 200, path
        assert good_serial(r.content) == serial
    # Not base64, not DER: an OCSP malformedRequest, still HTTP 200 (RFC 6960 §2.3).
    for bad in ("!!!", base64.b64encode(b"\x30\x03\x02\x01\x01").decode()):
        r = requests.get(f"{va.ocsp_url}/{bad}", timeout=10)
        assert r.status_code == 200
        assert (
            ocsp.load_der_ocsp_response(r.content).response_status
            is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        )
        assert r.headers["Cache-Control"] == "no-store"
    r = requests.post(va.ocsp_url, data=der, headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and "application/ocsp-request" in r.text
    r = requests.post(
        va.ocsp_url,
        data=b"\x30" * (16 * 1024 + 1),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert r.status_code == 413
    # Everything else is the Flask app's: unknown paths, other methods, CRL downloads.
    assert requests.get(f"{va.url}/nothing-here", timeout=10).status_code == 404
    assert requests.put(va.ocsp_url, data=der, timeout=10).status_code == 405
    assert requests.get(f"{va.url}/crl/nobody.crl", timeout=10).status_code == 404


def test_raw_http_edges(va: VAServer) -> None:
    with socket.create_connection((HOST, va.port), timeout=10) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert s.recv(4096) == b""  # closed
    with socket.create_connection((HOST, va.port), timeout=10) as s:
        s.sendall(f"GET /{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 414 ")
    # Expect: 100-continue is answered before the body is sent.
    with socket.create_connection((HOST, va.port), timeout=10) as s:
        s.sendall(
            f"POST /ocsp HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"\x30\x03\x02\x01\x01")
        status, _, body = read_response(s)
        assert status == 200
        assert (
            ocsp.load_der_ocsp_response(body).response_status
            is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        )
    # HTTP/1.0 without keep-alive: answered, then closed.
    with socket.create_connection((HOST, va.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    assert requests.get(f"{va.url}/healthz", timeout=10).status_code == 200


def test_sigterm_stops_workers_with_idle_connections_open(dev_ca: DevCA, tmp_path: Path) -> None:
    with serve_va(dev_ca, tmp_path, workers=2) as server:
        idle = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(4)]
        server.process.terminate()
        assert server.process.wait(timeout=20) == 0, server.log_path.read_text()
        for s in idle:
            assert s.recv(1) == b""  # closed by the worker, not left hanging
            s.close()
        log = server.log_path.read_text()
        assert "Worker exiting" in log or "Shutting down" in log
