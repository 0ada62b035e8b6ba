"""Helpers for the crl-sync tests: a small CRL HTTP server, a SIGHUP recorder, CRLs (no tests)."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import hashlib
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pki.crl import RevokedEntry, build_crl
from tests.unit.pki.revocation_pki import RevocationPKI

HOST = "127.0.0.1"
WAIT = 10.0


@dataclass
class Served:
    """Served is what the server answers for one path."""

    body: bytes
    status: int = 200
    validators: bool = True
    last_modified: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    )

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'


@dataclass
class Request:
    path: str
    if_none_match: str | None
    if_modified_since: str | None
    status: int


class CRLServer:
    """CRLServer serves DER CRLs on 127.0.0.1 with ETag and Last-Modified, answering 304."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.requests: list[Request] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served = server.files.get(self.path)
                inm = self.headers.get("If-None-Match")
                ims = self.headers.get("If-Modified-Since")
                status = 404 if served is None else served.status
                if served is not None and served.status == 200 and served.validators:
                    if inm is not None:
                        if inm == served.etag:
                            status = 304
                    elif ims is not None:
                        since = email.utils.parsedate_to_datetime(ims)
                        if served.last_modified <= since:
                            status = 304
                server.requests.append(Request(self.path, inm, ims, status))
                self.send_response(status)
                if served is not None and served.validators:
                    self.send_header("ETag", served.etag)
                    self.send_header(
                        "Last-Modified",
                        email.utils.format_datetime(served.last_modified, usegmt=True),
                    )
                body = b"" if status == 304 else (served.body if served else b"not found")
                if status != 304:
                    self.send_header("Content-Type", "application/pkix-crl")
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                del format, args

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def serve(self, path: str, body: bytes, **kwargs: object) -> str:
        """Serves body at path from now on (a newer Last-Modified than before)."""
        previous = self.files.get(path)
        served = Served(body, **kwargs)  # type: ignore[arg-type]
        if previous is not None and served.last_modified <= previous.last_modified:
            served.last_modified = previous.last_modified + datetime.timedelta(seconds=1)
        self.files[path] = served
        return self.url(path)

    def statuses(self, path: str) -> list[int]:
        return [r.status for r in self.requests if r.path == path]


@contextlib.contextmanager
def crl_server() -> Iterator[CRLServer]:
    server = CRLServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=WAIT)


_RECORDER = """
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])
def on_hup(signum, frame):
    with log.open("a") as f:
        f.write("HUP\\n")
signal.signal(signal.SIGHUP, on_hup)
pathlib.Path(sys.argv[2]).write_text("ready")
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


class HupRecorder:
    """HupRecorder is a child process that appends a line to a file on each SIGHUP."""

    def __init__(self, directory: Path) -> None:
        self.log = directory / "hup.log"
        self.ready = directory / "hup.ready"
        self.pid_file = directory / "recorder.pid"
        self.process = subprocess.Popen(
            [sys.executable, "-c", _RECORDER, str(self.log), str(self.ready)]
        )
        deadline = time.monotonic() + WAIT
        while not self.ready.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError("the SIGHUP recorder did not start")
            time.sleep(0.02)
        self.pid_file.write_text(f"{self.process.pid}\n")

    @property
    def pid(self) -> int:
        return self.process.pid

    def count(self) -> int:
        try:
            return self.log.read_text().count("HUP")
        except FileNotFoundError:
            return 0

    def wait_for(self, expected: int) -> int:
        """Waits until expected SIGHUPs were recorded (or a short while when none are)."""
        deadline = time.monotonic() + (WAIT if expected else 0.5)
        while time.monotonic() < deadline:
            if expected and self.count() >= expected:
                break
            time.sleep(0.02)
        return self.count()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=WAIT)


@contextlib.contextmanager
def hup_recorder(directory: Path) -> Iterator[HupRecorder]:
    recorder = HupRecorder(directory)
    try:
        yield recorder
    finally:
        recorder.stop()


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def make_crl(
    pki: RevocationPKI,
    number: int,
    *,
    revoked: list[x509.Certificate] | None = None,
    this_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
    issuer: x509.Certificate | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    delta_of: int | None = None,
) -> bytes:
    """Builds a DER CRL of the intermediate (or of issuer/key) around now."""
    this = this_update or now() - datetime.timedelta(minutes=1)
    return build_crl(
        issuer_cert=issuer or pki.intermediate,
        issuer_key=key or pki.intermediate_key,
        entries=[
            RevokedEntry(c.serial_number, this, x509.ReasonFlags.key_compromise)
            for c in revoked or []
        ],
        crl_number=number,
        this_update=this,
        next_update=next_update or this + datetime.timedelta(days=7),
        distribution_point_url=None,
        delta_of=delta_of,
    )
