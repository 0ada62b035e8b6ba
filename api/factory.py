"""The factory provisioning line: register a batch, then enroll each device over EST.

Station mode makes each device's key and CSR at the station and enrolls exactly as the
device would; bundle mode writes what a device needs to enroll itself on first boot.
Every step is safe to repeat, so a run stopped at any point (Ctrl-C, kill -9, network
error) is resumed by running it again: a device whose certificate is on disk is done; any
other device enrolls again, and EST enrollment supersedes an earlier certificate of the
same device and profile, so no device is left with two active identities.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from pki.errors import ErrorKind, PKIError
from pki.manifest import ManifestRow

Mode = Literal["station", "bundle"]
HTTP_TIMEOUT = 30.0


class ProvisioningError(Exception):
    """ProvisioningError is one device's failure, with a message fit for the summary."""


@dataclasses.dataclass(frozen=True)
class FactoryConfig:
    """FactoryConfig says where the CA is, how to authenticate, and where output goes."""

    ca_url: str  # https://host:port of the CA front (EST and admin API)
    admin_token: str
    cacert: Path  # trust anchor(s) for the CA front's TLS certificate
    out_dir: Path
    batch: str
    mode: Mode = "station"
    label: str | None = None  # EST label; None for the default /.well-known/est/
    workers: int = 4

    @property
    def est_base(self) -> str:
        label = f"/{self.label}" if self.label else ""
        return f"{self.ca_url.rstrip('/')}/.well-known/est{label}"

    @property
    def batch_dir(self) -> Path:
        return self.out_dir / self.batch


class CAClient:
    """CAClient speaks the admin API and EST to the CA front, over verified TLS."""

    def __init__(self, config: FactoryConfig) -> None:
        if not config.ca_url.startswith("https://"):
            raise PKIError(ErrorKind.BAD_REQUEST, "the CA URL must start with https://")
        self.config = config
        self.context = ssl.create_default_context(cafile=str(config.cacert))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        # CAClient accepts only https:// CA URLs (checked in __init__).
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(  # noqa: S310
                req, timeout=HTTP_TIMEOUT, context=self.context
            ) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            text = e.read()[:500].decode("utf-8", "replace").strip()
            raise ProvisioningError(f"{method} {url} answered {e.code}: {text}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ProvisioningError(f"{method} {url} failed: {reason}") from None

    def _admin(self, method: str, path: str, payload: object | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Authorization": f"Bearer {self.config.admin_token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        _, data = self._request(
            method, f"{self.config.ca_url.rstrip('/')}{path}", body=body, headers=headers
        )
        return json.loads(data) if data else None

    def register(self, rows: Sequence[ManifestRow]) -> dict[str, Any]:
        """Registers the devices of a batch (idempotent)."""
        devices = [{"id": r.device_id, "model": r.model, "batch": r.batch} for r in rows]
        result: dict[str, Any] = self._admin("POST", "/api/v1/devices", {"devices": devices})
        return result

    def new_secret(self, device_id: str) -> dict[str, Any]:
        """Asks the CA for a fresh one-time secret of a device, valid on the factory's label."""
        # A secret is valid only on the labels it was drawn for (none named: the default).
        payload = {"labels": [self.config.label]} if self.config.label else None
        result: dict[str, Any] = self._admin("POST", f"/api/v1/devices/{device_id}/secret", payload)
        return result

    def certificates(self, device_id: str) -> list[x509.Certificate]:
        """Fetches a device's issued certificates from the admin API."""
        result = self._admin("GET", f"/api/v1/devices/{device_id}/certificates")
        return [x509.load_pem_x509_certificate(p.encode()) for p in result["certificates"]]

    def cacerts(self) -> list[x509.Certificate]:
        """Fetches the CA chain the devices must trust. See RFC 7030 4.1."""
        _, body = self._request("GET", f"{self.config.est_base}/cacerts")
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))

    def enroll(self, device_id: str, secret: str, csr_der: bytes) -> list[x509.Certificate]:
        """Enrolls one CSR with HTTP Basic one-time credentials. See RFC 7030 4.2."""
        basic = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
        _, body = self._request(
            "POST",
            f"{self.config.est_base}/simpleenroll",
            body=base64.encodebytes(csr_der),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {basic}"},
        )
        try:
            return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
        except ValueError:
            raise ProvisioningError("the CA answered with something that is not PKCS#7") from None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_or_make_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisioningError(f"{path} is not an EC key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    # The key is on disk (0600) before the CA sees its CSR, so a resumed run reuses it.
    _write_atomic(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    return key


def device_csr_der(device_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Builds the device's CSR: device ID in serialNumber and CN (brokers read the CN)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


@dataclasses.dataclass(frozen=True)
class DeviceResult:
    device_id: str
    serial: str | None = None
    fingerprint_sha256: str | None = None
    skipped: bool = False


def provision_station(client: CAClient, config: FactoryConfig, row: ManifestRow) -> DeviceResult:
    """Makes the key and CSR at the station and enrolls them over EST."""
    ddir = config.batch_dir / "devices" / row.device_id
    ddir.mkdir(parents=True, exist_ok=True)
    resumed = (ddir / "key.pem").exists()
    key = _load_or_make_key(ddir / "key.pem")
    cert_path = ddir / "cert.pem"
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _same_key(cert, key):
            return _result(row.device_id, cert, skipped=True)
    # A run killed after the CA issued but before cert.pem was written: the device has
    # enrolled, so no new secret is drawn for it (only an admin may); its certificate for
    # the key on disk is fetched instead.
    certs = [c for c in client.certificates(row.device_id) if _same_key(c, key)] if resumed else []
    if not certs:
        secret = client.new_secret(row.device_id)["secret"]
        certs = client.enroll(row.device_id, secret, device_csr_der(row.device_id, key))
    leaf = next((c for c in certs if _same_key(c, key)), None)
    if leaf is None:
        raise ProvisioningError("the CA returned no certificate for the device's key")
    chain = [leaf] + [c for c in certs if c is not leaf]
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    _write_atomic(ddir / "chain.pem", pem)
    _write_atomic(cert_path, leaf.public_bytes(serialization.Encoding.PEM))
    return _result(row.device_id, leaf)


def provision_bundle(
    client: CAClient, config: FactoryConfig, row: ManifestRow, ca_pem: bytes
) -> DeviceResult:
    """Writes a first-boot bundle: device ID, one-time secret, EST URL and label, CA chain."""
    ddir = config.batch_dir / "devices" / row.device_id
    ddir.mkdir(parents=True, exist_ok=True)
    bundle_path = ddir / "bundle.json"
    if bundle_path.exists():
        return DeviceResult(row.device_id, skipped=True)
    secret = client.new_secret(row.device_id)
    bundle = {
        "device_id": row.device_id,
        "secret": secret["secret"],
        "expires_at": secret.get("expires_at"),
        "est_url": config.est_base,
        "label": config.label,
        "ca_chain": ca_pem.decode(),
    }
    _write_atomic(ddir / "ca.pem", ca_pem)
    _write_atomic(bundle_path, json.dumps(bundle, indent=2).encode(), 0o600)
    return DeviceResult(row.device_id)


def _result(device_id: str, cert: x509.Certificate, *, skipped: bool = False) -> DeviceResult:
    der = cert.public_bytes(serialization.Encoding.DER)
    return DeviceResult(
        device_id, format(cert.serial_number, "x"), hashlib.sha256(der).hexdigest(), skipped
    )


class Progress:
    """Progress draws a bar with rate and ETA on a terminal, or a line now and then."""

    def __init__(self, total: int, stream: IO[str] = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.tty = stream.isatty()
        self.last = 0.0

    def advance(self, ok: bool) -> None:
        with self.lock:
            self.done += 1
            self.failed += 0 if ok else 1
            now = time.monotonic()
            if self.tty or now - self.last >= 2 or self.done == self.total:
                self.last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else 0
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        text = (
            f"[{bar}] {self.done}/{self.total} {100 * self.done / self.total:5.1f}% "
            f"{rate:6.1f} dev/s ETA {int(eta) // 60}:{int(eta) % 60:02d} "
            f"failed {self.failed}"
        )
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclasses.dataclass
class Summary:
    """Summary is what a run did: per device, and the failures with their reasons."""

    results: list[DeviceResult]
    failures: dict[str, str]
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted


def write_batch_manifest(config: FactoryConfig, rows: Sequence[ManifestRow]) -> Path:
    """Writes the batch manifest from what is on disk: serial and fingerprint per device."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["device_id", "model", "batch", "serial", "fingerprint_sha256", "not_after"])
    for row in rows:
        cert_path = config.batch_dir / "devices" / row.device_id / "cert.pem"
        if not cert_path.exists():
            continue
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        der = cert.public_bytes(serialization.Encoding.DER)
        writer.writerow(
            [
                row.device_id,
                row.model or "",
                row.batch,
                format(cert.serial_number, "x"),
                hashlib.sha256(der).hexdigest(),
                cert.not_valid_after_utc.isoformat(),
            ]
        )
    path = config.batch_dir / "manifest.csv"
    _write_atomic(path, out.getvalue().encode())
    return path


def run(
    rows: Sequence[ManifestRow],
    config: FactoryConfig,
    *,
    progress: Progress | None = None,
    client_factory: Callable[[FactoryConfig], CAClient] = CAClient,
) -> Summary:
    """Registers the batch, then provisions every device with parallel workers."""
    config.batch_dir.mkdir(parents=True, exist_ok=True)
    client = client_factory(config)
    client.register(rows)
    ca_pem = b""
    if config.mode == "bundle":
        ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in client.cacerts())
    progress = progress or Progress(len(rows))
    results: list[DeviceResult] = []
    failures: dict[str, str] = {}

    def one(row: ManifestRow) -> DeviceResult:
        if config.mode == "bundle":
            return provision_bundle(client, config, row, ca_pem)
        return provision_station(client, config, row)

    interrupted = False
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, config.workers))
    try:
        futures = {pool.submit(one, row): row for row in rows}
        for fut in concurrent.futures.as_completed(futures):
            row = futures[fut]
            try:
                results.append(fut.result())
                progress.advance(True)
            except (ProvisioningError, PKIError, OSError, ValueError) as e:
                failures[row.device_id] = str(e)
                progress.advance(False)
    except KeyboardInterrupt:
        interrupted = True
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if not interrupted:
            pool.shutdown(wait=True)
        if config.mode == "station":
            write_batch_manifest(config, rows)
    return Summary(results, failures, interrupted)


def read_token(path: Path | None, environ: dict[str, str] | os._Environ[str]) -> str:
    """Reads the factory's admin token from a file or PKI_ADMIN_TOKEN, never the command line."""
    if path is not None:
        token = path.read_text().strip()
    else:
        token = environ.get("PKI_ADMIN_TOKEN", "").strip()
    if not token:
        raise PKIError(
            ErrorKind.UNAUTHORIZED, "no admin token: give --token-file or set PKI_ADMIN_TOKEN"
        )
    return token
