"""One device, one MQTT identity: a real Mosquitto trusts exactly what the CA wrote.

The broker runs as docs/brokers.md says (`use_identity_as_username true`, which takes the
CN) with the ACL `pattern readwrite devices/%u/#`. Device A enrolls over EST (Flask test
client, in-memory CA keys) with every CSR an attacker would try; each accepted certificate
publishes under devices/A/ and under devices/B/. A monitor subscribed to devices/# counts what
the broker delivered: everything A sent under its own ID, nothing under B's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.csr import CertificateRequest, check_request, key_type_of, load_csr
from pki.store import Database
from tests.csrs import der, device_csr
from tests.est_front import ESTFront, issued
from tests.integration.mosquitto import HOST, Mosquitto, mosquitto_broker
from tests.unit.pki.conftest import build_hierarchy

TIMEOUT = 10.0
ACL = """# Every device reads and writes only under its own ID (its CN: use_identity_as_username)
pattern readwrite devices/%u/#

user monitor
topic read devices/#
"""


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    return cert_path, key_path


class Client:
    """Client is one MQTT 3.1.1 connection over TLS with a certificate, run by paho's thread."""

    def __init__(self, broker: Mosquitto, cert: Path, key: Path) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"t-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
        )
        context = mqtt.ssl.SSLContext(mqtt.ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(broker.cafile))
        context.load_cert_chain(str(cert), str(key))
        context.maximum_version = mqtt.ssl.TLSVersion.TLSv1_2
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(HOST, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK in time"
        assert self.refused is None, self.refused

    refused: str | None = None

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: mqtt.ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            self.refused = str(rc)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.received.append((message.topic, message.payload))
            self.arrived.notify_all()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(TIMEOUT), "no SUBACK in time"

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, payload: bytes) -> None:
        with self.arrived:
            done = self.arrived.wait_for(
                lambda: any(p == payload for _, p in self.received), timeout=TIMEOUT
            )
        assert done, f"{payload!r} never arrived; got {self.received}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def connected(broker: Mosquitto, cert: Path, key: Path) -> Iterator[Client]:
    client = Client(broker, cert, key)
    try:
        yield client
    finally:
        client.close()


# CSRs device A might send; the comment says what the CA does with each.
ATTEMPTS: list[tuple[str, dict[str, Any]]] = [
    ("CN of B", {"extra": [x509.NameAttribute(NameOID.COMMON_NAME, "DEV-B")]}),  # 400
    ("O of B", {"extra": [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DEV-B")]}),  # 400
    ("DNS SAN of B", {"sans": [x509.DNSName("dev-b.example.com")]}),  # 400
    ("CN with NUL", {"extra": [x509.NameAttribute(NameOID.COMMON_NAME, "DEV-A\x00DEV-B")]}),
    ("CN with RLO", {"extra": [x509.NameAttribute(NameOID.COMMON_NAME, "DEV-\u202eB")]}),
    ("serialNumber only", {}),  # 200: the CA adds CN=DEV-A
    ("CN of A", {"extra": [x509.NameAttribute(NameOID.COMMON_NAME, "DEV-A")]}),  # 200
]


def test_device_publishes_only_under_its_own_id(sqlite_db: Database, tmp_path: Path) -> None:
    h = build_hierarchy(sqlite_db)
    front = ESTFront(h)
    pem = serialization.Encoding.PEM
    chain = tmp_path / "chain.pem"
    chain.write_bytes(
        h.root.certificate.public_bytes(pem) + h.devices.certificate.public_bytes(pem)
    )

    # The broker's TLS certificate and a monitor's client certificate, issued by an operator.
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = h.issuance.issue(
        h.devices,
        h.config.profile("server"),
        CertificateRequest(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]),
            sans=(x509.IPAddress(ipaddress.ip_address(HOST)),),
            public_key=server_key.public_key(),
            key_type=key_type_of(server_key.public_key()),
            device_id=None,
            challenge_password=None,
        ),
        actor="test",
    ).certificate
    server_pem, server_keyfile = _write(tmp_path, "server", server, server_key)
    server_pem.write_bytes(server_pem.read_bytes() + h.devices.certificate.public_bytes(pem))
    monitor_csr, monitor_key = device_csr(
        "monitor", extra=[x509.NameAttribute(NameOID.COMMON_NAME, "monitor")]
    )
    monitor = h.issuance.issue(
        h.devices,
        h.config.profile("device"),
        check_request(load_csr(der(monitor_csr)), h.config.profile("device")),
        actor="test",
    ).certificate
    monitor_files = _write(tmp_path, "monitor", monitor, monitor_key)

    # B enrolls as itself; A tries every CSR and keeps what the CA gave it.
    b_csr, b_key = device_csr("DEV-B")
    b_response = front.enroll("DEV-B", front.register("DEV-B"), der(b_csr))
    assert b_response.status_code == 200, b_response.data
    b_files = _write(tmp_path, "dev-b", issued(b_response), b_key)
    front.register("DEV-A")
    a_certs: list[tuple[str, tuple[Path, Path]]] = []
    outcomes = {}
    for i, (case, csr_args) in enumerate(ATTEMPTS):
        # Once DEV-A holds a certificate, each further try needs the admin's redraw (a reason).
        secret = front.devices.new_secret(
            "DEV-A", actor="test", may_redraw=True, reason="next identity attempt"
        ).secret
        csr, key = device_csr("DEV-A", **csr_args)
        response = front.enroll("DEV-A", secret, der(csr))
        outcomes[case] = response.status_code
        if response.status_code == 200:
            a_certs.append((case, _write(tmp_path, f"dev-a-{i}", issued(response), key)))
    assert outcomes == {
        "CN of B": 400,
        "O of B": 400,
        "DNS SAN of B": 400,
        "CN with NUL": 400,
        "CN with RLO": 400,
        "serialNumber only": 200,
        "CN of A": 200,
    }

    acl = tmp_path / "acl"
    acl.write_text(ACL)
    with mosquitto_broker(
        tmp_path / "broker",
        cafile=chain,
        certfile=server_pem,
        keyfile=server_keyfile,
        crlfile=None,
        acl_file=acl,
    ) as broker:
        assert broker.port != 1883
        with connected(broker, *monitor_files) as watcher:
            watcher.subscribe("devices/#")
            # B may write under its own ID: the monitor does see devices/B/ traffic.
            with connected(broker, *b_files) as b:
                b.publish("devices/DEV-B/x", b"from-B")
                watcher.wait_for(b"from-B")
            for case, files in a_certs:
                with connected(broker, *files) as a:
                    for n in range(3):
                        a.publish("devices/DEV-A/x", f"{case}:own:{n}".encode())
                        a.publish("devices/DEV-B/x", f"{case}:foreign:{n}".encode())
                    # One client's messages reach a subscriber in order: once the marker
                    # is there, every message A sent before it was delivered or dropped.
                    a.publish("devices/DEV-A/done", f"{case}:end".encode())
                    watcher.wait_for(f"{case}:end".encode())
            got = list(watcher.received)
        log = broker.log()

    own = [p for t, p in got if t == "devices/DEV-A/x"]
    under_b = [p for t, p in got if t == "devices/DEV-B/x"]
    assert len(own) == 3 * len(a_certs) == 6, got
    assert under_b == [b"from-B"], got
    # use_identity_as_username: the broker knew A's connections only as DEV-A.
    assert log.count("u'DEV-A'") == len(a_certs), log
    assert "u'DEV-B'" in log


@pytest.fixture(autouse=True)
def _needs_mosquitto() -> None:
    from tests.integration.mosquitto import MOSQUITTO

    if not Path(MOSQUITTO).exists():
        pytest.fail(f"{MOSQUITTO} is not installed")
