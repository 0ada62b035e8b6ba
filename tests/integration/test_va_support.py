"""Helpers for the VA and admin integration tests: a gunicorn VA, devices, openssl (no tests)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from tests.integration.conftest import PKI, DevCA, free_port

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
OPENSSL_TIMEOUT = 30


@dataclass(frozen=True)
class VAServer:
    """VAServer is a `pki serve va` under gunicorn on 127.0.0.1."""

    url: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def ocsp_url(self) -> str:
        return f"{self.url}/ocsp"


@contextlib.contextmanager
def serve_va(
    ca: DevCA, log_dir: Path, workers: int = 2, *, healthy: bool = True
) -> Iterator[VAServer]:
    """Starts `pki serve va` for a DevCA, waits for /healthz (200 unless not healthy)."""
    port = free_port()
    log_path = log_dir / f"va-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PKI, "serve", "va", "--bind", f"{HOST}:{port}", "--workers", str(workers)],
            env=ca.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = VAServer(f"http://{HOST}:{port}", port, log_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"VA exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                r = requests.get(f"{server.url}/healthz", timeout=2)
                if r.status_code == 200 or not healthy:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"VA did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
        cwd=cwd,
    )


@dataclass(frozen=True)
class DeviceCert:
    path: Path
    certificate: x509.Certificate

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")


def issue_device(ca: DevCA, directory: Path, device_id: str) -> DeviceCert:
    """Makes a key and CSR with openssl and has `pki issue --profile device` sign it."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, pem = (directory / f"{device_id}.{ext}" for ext in ("key", "csr", "pem"))
    made = run(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-subj", f"/serialNumber={device_id}/CN={device_id}",
        "-out", csr,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    ca.pki("issue", "--profile", "device", "--csr", str(csr), "--out", str(pem))
    return DeviceCert(pem, x509.load_pem_x509_certificate(pem.read_bytes()))


def openssl_ocsp(
    ca: DevCA, va: VAServer, *target: str | Path, nonce: bool = True, respout: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `openssl ocsp` against the VA for the devices issuer; target is -cert F or -serial N."""
    args: list[str | Path] = [
        "openssl", "ocsp", "-issuer", ca.cert("devices.pem"), *target,
        "-url", va.ocsp_url, "-CAfile", ca.cert("root.pem"), "-resp_text",
        "-timeout", "20",
    ]  # fmt: skip
    if not nonce:
        args.append("-no_nonce")
    if respout is not None:
        args += ["-respout", respout]
    return run(*args)


def admin_token(ca: DevCA, role: str) -> str:
    result = ca.pki("admin", "token", "create", "--role", role)
    return result.stdout.strip()


@contextlib.contextmanager
def serve_ca(ca: DevCA, log_dir: Path) -> Iterator[str]:
    """Starts `pki serve ca` on 127.0.0.1 and yields its https URL."""
    port = free_port()
    log_path = log_dir / f"ca-front-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PKI, "serve", "ca", "--bind", f"{HOST}:{port}", "--workers", "2", "--threads", "4"],
            env=ca.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"https://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"pki serve ca exited {process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{url}/healthz", verify=str(ca.cert("chain.pem")), timeout=2)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"pki serve ca did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def ocsp_ask(
    va: VAServer, cert: x509.Certificate, issuer: x509.Certificate, *, nonce: bool
) -> ocsp.OCSPResponse:
    """Asks the VA about one certificate over HTTP POST, with or without a nonce."""
    # RFC 5019 §2.1.1: clients name the certificate with a SHA-1 CertID.
    sha1 = hashes.SHA1()  # noqa: S303
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, sha1)
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    r = requests.post(
        va.ocsp_url,
        data=builder.build().public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=30,
    )
    assert r.status_code == 200
    return ocsp.load_der_ocsp_response(r.content)


def responder_serial(response: ocsp.OCSPResponse) -> int:
    """Checks a response's signature with the responder certificate it carries; its serial."""
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    responder = response.certificates[0]
    responder.public_key().verify(  # type: ignore[call-arg, union-attr]
        response.signature,
        response.tbs_response_bytes,
        ec.ECDSA(response.signature_hash_algorithm),  # type: ignore[arg-type]
    )
    return responder.serial_number
