"""A real Mosquitto with the documented TLS listener: devices in, a revoked device refused.

The first test runs on the demo CA (`pki init --dev`, keys in SoftHSM) end to end through the
`pki` command: broker certificate, device certificates, revocation, CRL publication, the VA,
and `pki broker crl-sync` signalling the broker. The others use an in-memory hierarchy to pin
down how Mosquitto 2.0 checks CRLs.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.crl import RevokedEntry, build_crl
from tests.conftest import REPO
from tests.csrs import device_csr
from tests.integration.conftest import PKI, DevCA, free_port
from tests.integration.mosquitto import HOST, Mosquitto, listener_config, mosquitto_broker

VA_START_TIMEOUT = 30.0


@contextlib.contextmanager
def running_va(ca: DevCA, log_dir: Path) -> Iterator[str]:
    """Starts `pki serve va` on a free port, waits for /healthz, yields its base URL."""
    port = free_port()
    log_path = log_dir / "va.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PKI, "serve", "va", "--bind", f"{HOST}:{port}", "--workers", "1"],
            env=ca.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + VA_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"VA exited with {process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"VA did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: Path
    key: Path
    serial_hex: str


def issue_device(ca: DevCA, directory: Path, device_id: str) -> Device:
    """Makes a key and CSR (serialNumber and CN = device ID) and runs `pki issue`."""
    csr, key = device_csr(device_id, extra=[x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr_path = directory / f"{device_id}.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{device_id}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path = directory / f"{device_id}.pem"
    ca.pki("issue", "--profile", "device", "--csr", str(csr_path), "--out", str(cert_path))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return Device(device_id, cert_path, key_path, f"{cert.serial_number:x}")


def test_revoked_device_refused_after_crl_sync(dev_ca: DevCA, tmp_path: Path) -> None:
    """DevCA end to end: both devices publish; after revoke + publish + crl-sync, one is out."""
    broker_dir = tmp_path / "broker"
    wrong = dev_ca.pki(
        "broker", "server-cert", "127.0.0.1", "--out-dir", str(broker_dir), "--issuer", "nope",
        check=False,
    )  # fmt: skip
    assert wrong.returncode == 3 and "no issuer 'nope'" in wrong.stderr, wrong.stderr
    out = dev_ca.pki("broker", "server-cert", "127.0.0.1", "--out-dir", str(broker_dir))
    assert "issued server certificate serial" in out.stdout
    server_pem = broker_dir / "server.pem"
    assert len(x509.load_pem_x509_certificates(server_pem.read_bytes())) == 2
    assert (broker_dir / "server.key").stat().st_mode & 0o777 == 0o600

    devices = [issue_device(dev_ca, tmp_path, f"DEV-{i}") for i in (1, 2)]
    chain = dev_ca.cert("chain.pem")
    crlfile = broker_dir / "crl.pem"
    dev_ca.pki("crl", "publish")
    dev_ca.pki("crl", "publish", "--issuer", "root")

    with running_va(dev_ca, tmp_path) as va:
        sync_args = [
            "broker", "crl-sync",
            "--url", f"{va}/crl/devices.crl", "--url", f"{va}/crl/root.crl",
            "--chain", str(chain), "--out", str(crlfile),
        ]  # fmt: skip
        first = dev_ca.pki(*sync_args)
        assert f"installed 2 CRL(s) in {crlfile}" in first.stdout, first.stdout

        with mosquitto_broker(
            broker_dir,
            cafile=chain,
            certfile=server_pem,
            keyfile=broker_dir / "server.key",
            crlfile=crlfile,
        ) as broker:
            for device in devices:
                attempt = broker.attempt(device.cert, device.key)
                assert attempt.accepted, (device, attempt, broker.log())
            # use_identity_as_username: the certificate's CN is the MQTT username.
            assert "u'DEV-1'" in broker.log() and "u'DEV-2'" in broker.log()

            dev_ca.pki("revoke", devices[1].serial_hex, "--reason", "keyCompromise")
            # Mosquitto keeps the old CRL in its store and picks the one with the latest
            # thisUpdate: the new one must not share the old one's second.
            time.sleep(1.1)
            dev_ca.pki("crl", "publish")
            reloads = broker.reloads()
            second = dev_ca.pki(*sync_args, "--pid-file", str(broker.pid_file))
            assert f"sent SIGHUP to process {broker.pid}" in second.stdout, second.stdout
            broker.wait_for_reload(reloads)

            kept = broker.attempt(devices[0].cert, devices[0].key)
            assert kept.accepted, (kept, broker.log())
            refused = broker.attempt(devices[1].cert, devices[1].key)
            assert not refused.accepted
            assert refused.stage == "tls", refused
            assert "certificate revoked" in refused.detail.lower(), refused

            # Nothing new: 304s, no rewrite, no signal.
            reloads = broker.reloads()
            third = dev_ca.pki(*sync_args, "--pid-file", str(broker.pid_file))
            assert "nothing to install" in third.stdout
            assert "not modified (304)" in third.stdout
            time.sleep(0.5)
            assert broker.reloads() == reloads


# --- how Mosquitto 2.0 checks CRLs, on an in-memory hierarchy ------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    eku: x509.ObjectIdentifier | None = None,
    san: x509.GeneralName | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer_cert is not None:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False
        )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    builder = builder.add_extension(usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class MemoryPKI:
    """MemoryPKI is a root, an intermediate, a broker certificate and two devices, on disk."""

    directory: Path
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    devices: list[tuple[x509.Certificate, Path, Path]]

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"

    def crl(self, *, root: bool, number: int, revoked: list[x509.Certificate]) -> bytes:
        cert, key = (
            (self.root, self.root_key) if root else (self.intermediate, self.intermediate_key)
        )
        this = _now() - datetime.timedelta(minutes=1)
        der = build_crl(
            issuer_cert=cert,
            issuer_key=key,
            entries=[RevokedEntry(c.serial_number, this) for c in revoked],
            crl_number=number,
            this_update=this,
            next_update=this + datetime.timedelta(days=1),
            distribution_point_url=None,
        )
        return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_memory_pki(directory: Path) -> MemoryPKI:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Broker Test Root", root_key, None, ca=True)
    int_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _cert("Broker Test Devices", int_key, (root, root_key), ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        HOST,
        server_key,
        (intermediate, int_key),
        ca=False,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        san=x509.IPAddress(ipaddress.ip_address(HOST)),
    )
    pem = serialization.Encoding.PEM
    (directory / "chain.pem").write_bytes(root.public_bytes(pem) + intermediate.public_bytes(pem))
    (directory / "server.pem").write_bytes(
        server.public_bytes(pem) + intermediate.public_bytes(pem)
    )
    (directory / "server.key").write_bytes(_pem_key(server_key))
    devices = []
    for i in (1, 2):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(
            f"MEM-{i}", key, (intermediate, int_key), ca=False, eku=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        cert_path, key_path = directory / f"mem-{i}.pem", directory / f"mem-{i}.key"
        cert_path.write_bytes(cert.public_bytes(pem))
        key_path.write_bytes(_pem_key(key))
        devices.append((cert, cert_path, key_path))
    return MemoryPKI(directory, root, root_key, intermediate, int_key, devices)


@contextlib.contextmanager
def memory_broker(pki: MemoryPKI, crl_pem: bytes) -> Iterator[Mosquitto]:
    crlfile = pki.directory / "crl.pem"
    crlfile.write_bytes(crl_pem)
    with mosquitto_broker(
        pki.directory / "broker",
        cafile=pki.chain,
        certfile=pki.directory / "server.pem",
        keyfile=pki.directory / "server.key",
        crlfile=crlfile,
    ) as broker:
        yield broker


class TestMosquittoCRLCheck:
    def test_leaf_issuer_crl_alone_is_enough(self, tmp_path: Path) -> None:
        """mosquitto 2.0.11 sets X509_V_FLAG_CRL_CHECK (leaf only), not CRL_CHECK_ALL."""
        pki = make_memory_pki(tmp_path)
        with memory_broker(pki, pki.crl(root=False, number=1, revoked=[])) as broker:
            for _, cert, key in pki.devices:
                assert broker.connect(cert, key), broker.log()

    def test_without_leaf_issuer_crl_every_device_is_refused(self, tmp_path: Path) -> None:
        pki = make_memory_pki(tmp_path)
        with memory_broker(pki, pki.crl(root=True, number=1, revoked=[])) as broker:
            for _, cert, key in pki.devices:
                attempt = broker.attempt(cert, key)
                assert not attempt.accepted and attempt.stage == "tls", attempt
                # OpenSSL's "unable to get certificate CRL" reaches the client as this alert.
                assert "unknown ca" in attempt.detail.lower(), attempt

    def test_sighup_reloads_crlfile(self, tmp_path: Path) -> None:
        pki = make_memory_pki(tmp_path)
        (_, first_cert, first_key), (second, second_cert, second_key) = pki.devices
        with memory_broker(pki, pki.crl(root=False, number=1, revoked=[])) as broker:
            assert broker.connect(second_cert, second_key)
            time.sleep(1.1)  # a later thisUpdate than the CRL already in the broker's store
            (pki.directory / "crl.pem").write_bytes(pki.crl(root=False, number=2, revoked=[second]))
            # Without a reload the broker still uses the CRL it read at start.
            assert broker.connect(second_cert, second_key)
            broker.sighup()
            attempt = broker.attempt(second_cert, second_key)
            assert not attempt.accepted and attempt.stage == "tls", attempt
            assert "certificate revoked" in attempt.detail.lower(), attempt
            assert broker.connect(first_cert, first_key)
            # The store keeps every CRL it loaded; the latest thisUpdate wins, so a later CRL
            # without the entry (a released hold) lets the device in again.
            time.sleep(1.1)
            (pki.directory / "crl.pem").write_bytes(pki.crl(root=False, number=3, revoked=[]))
            broker.sighup()
            assert broker.connect(second_cert, second_key)

    def test_certificate_without_cn_is_refused_with_identity_as_username(
        self, tmp_path: Path
    ) -> None:
        """use_identity_as_username takes the CN: a device certificate needs one."""
        pki = make_memory_pki(tmp_path)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "NOCN-1")])
        ski = pki.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(pki.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value), False
            )
            .sign(pki.intermediate_key, hashes.SHA256())
        )
        cert_path, key_path = tmp_path / "nocn.pem", tmp_path / "nocn.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        with memory_broker(pki, pki.crl(root=False, number=1, revoked=[])) as broker:
            attempt = broker.attempt(cert_path, key_path)
            assert not attempt.accepted
            assert attempt.stage == "connack", attempt


def _directives(text: str) -> list[tuple[str, str]]:
    """Returns (directive, value) pairs of a Mosquitto config, file paths reduced to names."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name in {"cafile", "certfile", "keyfile", "crlfile"}:
            value = Path(value).name
        if name == "listener":
            value = "PORT"
        pairs.append((name, value))
    return pairs


def test_harness_listener_is_the_documented_one() -> None:
    """The listener the tests start is, directive for directive, the one the docs show."""
    doc = (REPO / "docs" / "brokers.md").read_text()
    block = doc.split("```\nlistener 8883\n", 1)[1].split("```", 1)[0]
    documented = _directives("listener 8883\n" + block)
    harness = _directives(
        listener_config(
            1234, Path("/x/chain.pem"), Path("/x/server.pem"), Path("/x/server.key"),
            Path("/x/crl.pem"),
        )
    )  # fmt: skip
    assert harness == documented
    example = _directives((REPO / "scripts" / "mosquitto.conf.example").read_text())
    start = example.index(("listener", "PORT"))
    assert example[start : start + len(documented)] == documented
