"""EST (RFC 7030) against `pki serve ca`: real gunicorn and TLS sockets, curl, openssl, requests."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import email.parser
import email.policy
import http.client
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select, update

from pki.clock import SystemClock
from pki.device import DeviceService
from pki.store import AuditEvent, CertificateRecord, Database, session_scope
from pki.store.enrollment_models import EnrollmentSecret
from tests.conftest import CONFIG_DIR, drop_postgres_database, fresh_postgres_database
from tests.csrs import der, device_csr
from tests.integration.conftest import PKI, DevCA, free_port, make_dev_ca
from tests.integration.tls_pki import Issued, make_ca, with_chain

HOST = "127.0.0.1"
EST = "/.well-known/est"
START_TIMEOUT = 60.0

FACTORY_LABEL = """
[labels.factory]
issuer = "devices"
profile = "device"
auth = ["idevid", "reenroll"]
manufacturer_anchors = ["manufacturers/acme.pem"]
idevid_auto_register = true
"""


@dataclasses.dataclass
class CAFront:
    """CAFront is a running `pki serve ca` on a demo CA, and what a test needs to talk to it."""

    ca: DevCA
    url: str
    port: int
    work: Path
    manufacturer: Issued
    rogue: Issued
    log_path: Path

    @property
    def cacert(self) -> str:
        return str(self.ca.cert("chain.pem"))

    def db(self) -> Database:
        return Database(self.ca.db_url())

    def devices(self) -> DeviceService:
        return DeviceService(self.db(), SystemClock())

    def register(self, device_id: str, *labels: str) -> str:
        """Registers a device with the CLI and returns a fresh one-time secret."""
        self.ca.pki("device", "add", device_id, "--model", "test")
        options = [arg for label in labels for arg in ("--label", label)]
        return self.ca.pki("device", "secret", device_id, "--stdout", *options).stdout.strip()

    def snapshot(self) -> tuple[int, int, list[str]]:
        """Counts what an error must not change: certificates, audit events, secret states."""
        db = self.db()
        try:
            with session_scope(db) as s:
                certs = s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one()
                # Refusals are audited (pki.refusal); nothing else may be.
                events = s.execute(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(AuditEvent.action.not_like("refused.%"))
                ).scalar_one()
                states = [
                    st.value
                    for st in s.execute(
                        select(EnrollmentSecret.state).order_by(EnrollmentSecret.id)
                    ).scalars()
                ]
            return int(certs), int(events), states
        finally:
            db.dispose()

    def refusals(self, target: str) -> list[str]:
        """The refusal events audited against a device, oldest first."""
        db = self.db()
        try:
            with session_scope(db) as s:
                query = (
                    select(AuditEvent.action)
                    .where(AuditEvent.action.like("refused.%"), AuditEvent.target == target)
                    .order_by(AuditEvent.seq)
                )
                return list(s.execute(query).scalars())
        finally:
            db.dispose()

    def post(
        self,
        path: str,
        body: bytes,
        *,
        auth: tuple[str, str] | None = None,
        content_type: str = "application/pkcs10",
        cert: tuple[str, str] | None = None,
    ) -> requests.Response:
        return requests.post(
            self.url + path,
            data=body,
            auth=auth,
            headers={"Content-Type": content_type},
            verify=self.cacert,
            cert=cert,
            timeout=60,
        )


def _start(
    ca: DevCA, work: Path, *, healthy: bool = True, workers: int = 2
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Starts `pki serve ca` and waits until /healthz answers (200 unless not healthy)."""
    port = free_port()
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PKI,
                "serve",
                "ca",
                "--bind",
                f"{HOST}:{port}",
                "--workers",
                str(workers),
                "--threads",
                "8",
            ],
            env=ca.env | {"PKI_CA_LOGLEVEL": "warning"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthz(ca, process, port, log_path, healthy=healthy)
    except BaseException:
        _stop(process)  # never leave a server behind a failed start
        raise
    return process, port, log_path


def _wait_healthz(
    ca: DevCA, process: subprocess.Popen[bytes], port: int, log_path: Path, *, healthy: bool
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pki serve ca exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            r = requests.get(
                f"https://{HOST}:{port}/healthz", verify=str(ca.cert("chain.pem")), timeout=2
            )
            if r.status_code == 200 or not healthy:
                return
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            pass  # not listening yet, or a worker still booting
        time.sleep(0.2)
    pytest.fail(f"pki serve ca did not come up:\n{log_path.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stops a server started by _start and waits for it."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _idevid(directory: Path, ca: Issued, serial_number: str, stem: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Devices"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, key, cert_path, key_path)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def front(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _dev_ca_template: DevCA,
) -> Iterator[CAFront]:
    """A CA front under gunicorn over HTTPS on a fresh demo CA, per database backend."""
    work = tmp_path_factory.mktemp(f"est-{request.param}")
    config_dir = work / "ca-config"
    shutil.copytree(CONFIG_DIR, config_dir)
    with (config_dir / "est.toml").open("a") as f:
        f.write(FACTORY_LABEL)
    pg: tuple[str, str] | None = None
    if request.param == "sqlite":
        target = work / "ca"
        shutil.copytree(_dev_ca_template.data_dir, target)
        conf = target / "softhsm2.conf"
        conf.write_text(conf.read_text().replace(str(_dev_ca_template.data_dir), str(target)))
        ca = DevCA(target, config_dir, None)
    else:
        base = request.getfixturevalue("postgres_server")
        if base is None:
            pytest.skip("PostgreSQL not configured (set PKI_TEST_POSTGRES_URL)")
        pg = fresh_postgres_database(base)
        made = make_dev_ca(work / "ca", pg[0])
        ca = DevCA(made.data_dir, config_dir, made.database_url)
    manufacturer = make_ca(work, "acme", "Acme Manufacturing CA")
    rogue_ca = make_ca(work, "rogue-ca", "Rogue Manufacturing CA")
    (ca.data_dir / "manufacturers").mkdir()
    shutil.copy(manufacturer.cert_path, ca.data_dir / "manufacturers" / "acme.pem")
    rogue = _idevid(work, rogue_ca, "ACME-666", "rogue")
    process, port, log_path = _start(ca, work)
    try:
        yield CAFront(ca, f"https://{HOST}:{port}", port, work, manufacturer, rogue, log_path)
    finally:
        _stop(process)
        if pg is not None:
            drop_postgres_database(request.getfixturevalue("postgres_server"), pg[1])


def _openssl_csr(work: Path, device_id: str, stem: str) -> tuple[Path, Path]:
    """Makes a key and a base64 DER CSR with openssl, as a device's shell script would."""
    key, csr_der, csr_b64 = work / f"{stem}.key", work / f"{stem}.der", work / f"{stem}.b64"
    subprocess.run(
        [
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-subj", f"/serialNumber={device_id}/CN={device_id}",
            "-outform", "DER", "-out", str(csr_der),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    csr_b64.write_bytes(base64.encodebytes(csr_der.read_bytes()))
    return key, csr_b64


def _b64_csr(device_id: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    csr, key = device_csr(device_id)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return base64.encodebytes(der(csr)), key


def _certs_of(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))


def _curl(front: CAFront, *args: str) -> tuple[int, bytes]:
    result = subprocess.run(
        ["curl", "-sS", "--cacert", front.cacert, "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body


def _raw_enroll(
    front: CAFront, source: str, user: str, password: str, body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    """POSTs simpleenroll from a given loopback source address; status, headers, body."""
    context = ssl.create_default_context(cafile=front.cacert)
    context.check_hostname = False
    connection = http.client.HTTPSConnection(
        HOST, front.port, context=context, source_address=(source, 0), timeout=60
    )
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        connection.request(
            "POST",
            f"{EST}/simpleenroll",
            body=body,
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"},
        )
        response = connection.getresponse()
        content = response.read()
        headers = sorted((k.lower(), v) for k, v in response.getheaders() if k.lower() != "date")
        return response.status, headers, content
    finally:
        connection.close()


def _write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class TestCACerts:
    def test_cacerts_parses_with_openssl_and_holds_chain(self, front: CAFront) -> None:
        code, body = _curl(front, f"{front.url}{EST}/cacerts")
        assert code == 200
        der_bytes = subprocess.run(
            ["base64", "-d"], input=body, capture_output=True, check=True
        ).stdout
        printed = subprocess.run(
            ["openssl", "pkcs7", "-inform", "DER", "-print_certs"],
            input=der_bytes,
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert "Example IoT Root CA" in printed and "Example IoT Device CA" in printed
        certs = x509.load_pem_x509_certificates(printed.encode())
        expected = x509.load_pem_x509_certificates(front.ca.cert("chain.pem").read_bytes())
        assert sorted(c.fingerprint(hashes.SHA256()) for c in certs) == sorted(
            c.fingerprint(hashes.SHA256()) for c in expected
        )

    def test_cacerts_content_type(self, front: CAFront) -> None:
        r = requests.get(f"{front.url}{EST}/devices/cacerts", verify=front.cacert, timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/pkcs7-mime")
        assert "certs-only" in r.headers["Content-Type"]

    def test_csrattrs(self, front: CAFront) -> None:
        r = requests.get(f"{front.url}{EST}/csrattrs", verify=front.cacert, timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/csrattrs")
        parsed = subprocess.run(
            ["openssl", "asn1parse", "-inform", "DER"],
            input=base64.b64decode(r.content),
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert "prime256v1" in parsed and "serialNumber" in parsed

    def test_healthz(self, front: CAFront) -> None:
        r = requests.get(f"{front.url}/healthz", verify=front.cacert, timeout=10)
        assert r.status_code == 200
        assert r.json() == {"status": "ok", "database": "ok", "token": "ok"}


class TestEnroll:
    def test_enroll_with_curl_verifies_to_root(self, front: CAFront) -> None:
        secret = front.register("CURL-0001")
        _key, csr_b64 = _openssl_csr(front.work, "CURL-0001", "curl-0001")
        code, body = _curl(
            front,
            "--user",
            f"CURL-0001:{secret}",
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            f"@{csr_b64}",
            f"{front.url}{EST}/simpleenroll",
        )
        assert code == 200, body
        (cert,) = _certs_of(body)
        pem = _write_pem(front.work / "curl-0001.pem", cert)
        verify = subprocess.run(
            [
                "openssl", "verify", "-CAfile", str(front.ca.cert("root.pem")),
                "-untrusted", str(front.ca.cert("devices.pem")), str(pem),
            ],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "CURL-0001"

    def test_enroll_with_requests(self, front: CAFront) -> None:
        secret = front.register("PY-0001")
        body, key = _b64_csr("PY-0001")
        r = front.post(f"{EST}/simpleenroll", body, auth=("PY-0001", secret))
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/pkcs7-mime")
        (cert,) = _certs_of(r.content)
        assert cert.public_key() == key.public_key()
        devices = x509.load_pem_x509_certificates(front.ca.cert("devices.pem").read_bytes())
        cert.verify_directly_issued_by(devices[0])
        shown = front.ca.pki("device", "show", "PY-0001").stdout
        assert '"state": "enrolled"' in shown

    def test_fifty_concurrent_enrollments(self, front: CAFront) -> None:
        service = front.devices()
        secrets: dict[str, str] = {}
        front.ca.pki("device", "import", str(self._csv(front)))
        for i in range(50):
            device_id = f"BULK-{i:04d}"
            secrets[device_id] = service.new_secret(device_id, actor="test").secret
        service.db.dispose()

        def enroll(device_id: str) -> tuple[int, str]:
            body, _ = _b64_csr(device_id)
            r = front.post(f"{EST}/simpleenroll", body, auth=(device_id, secrets[device_id]))
            if r.status_code != 200:
                return r.status_code, r.text
            (cert,) = _certs_of(r.content)
            return 200, format(cert.serial_number, "x")

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(enroll, secrets))
        assert [code for code, _ in results] == [200] * 50, results
        assert len({serial for _, serial in results}) == 50

    def test_one_secret_raced_by_eight_clients_issues_once(self, front: CAFront) -> None:
        secret = front.register("RACE-0001")
        before = front.snapshot()[0]

        def enroll(_: int) -> int:
            body, _key = _b64_csr("RACE-0001")
            return front.post(f"{EST}/simpleenroll", body, auth=("RACE-0001", secret)).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(enroll, range(8)))
        # Each client has its own key: the one in flight holds the device (409 for the
        # others meanwhile); after it, the secret is spent on another key (401).
        assert codes.count(200) == 1, codes
        assert codes.count(409) + codes.count(401) == 7, codes
        assert front.snapshot()[0] == before + 1

    def test_failures_from_one_address_never_lock_out_another(self, front: CAFront) -> None:
        secret = front.register("LOCK-0001")
        body, _ = _b64_csr("LOCK-0001")
        # Another address is throttled only by its own failures.
        before = _raw_enroll(front, "127.0.0.2", "NO-SUCH-DEVICE", "guess", body)
        for _ in range(5):
            known = _raw_enroll(front, "127.0.0.1", "LOCK-0001", "guess", body)
        locked = _raw_enroll(front, "127.0.0.1", "LOCK-0001", secret, body)
        unknown = _raw_enroll(front, "127.0.0.1", "NO-SUCH-DEVICE", "guess", body)
        assert '"locked_until": "' in front.ca.pki("device", "show", "LOCK-0001").stdout
        # Unknown, known with a wrong secret, locked out: the same bytes on the wire.
        assert before[0] == 401 and before[2] == b"" and ("content-length", "0") in before[1]
        assert known == locked == unknown == before
        status, _, _ = _raw_enroll(front, "127.0.0.2", "LOCK-0001", secret, body)
        assert status == 200

    @staticmethod
    def _csv(front: CAFront) -> Path:
        path = front.work / "bulk.csv"
        path.write_text("id,model,batch\n" + "".join(f"BULK-{i:04d},m,b1\n" for i in range(50)))
        return path


class TestErrors:
    """Every refusal leaves certificates, audit log and secrets as they were."""

    def _refused(
        self,
        front: CAFront,
        status: int,
        body: bytes,
        *,
        path: str = f"{EST}/simpleenroll",
        auth: tuple[str, str] | None = None,
        content_type: str = "application/pkcs10",
    ) -> requests.Response:
        before = front.snapshot()
        r = front.post(path, body, auth=auth, content_type=content_type)
        assert r.status_code == status, r.text
        assert front.snapshot() == before
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Basic")
        return r

    def test_missing_auth_401(self, front: CAFront) -> None:
        front.register("ERR-AUTH")
        self._refused(front, 401, _b64_csr("ERR-AUTH")[0])
        assert front.refusals("-") == []  # RFC 7030 3.2.3's challenge is not a failed login

    def test_wrong_secret_401(self, front: CAFront) -> None:
        front.register("ERR-WRONG")
        self._refused(front, 401, _b64_csr("ERR-WRONG")[0], auth=("ERR-WRONG", "not-it"))
        assert '"failed_logins": 1' in front.ca.pki("device", "show", "ERR-WRONG").stdout
        assert front.refusals("ERR-WRONG") == ["refused.login"]

    def test_reused_secret_401(self, front: CAFront) -> None:
        secret = front.register("ERR-REUSE")
        first = front.post(
            f"{EST}/simpleenroll", _b64_csr("ERR-REUSE")[0], auth=("ERR-REUSE", secret)
        )
        assert first.status_code == 200
        self._refused(front, 401, _b64_csr("ERR-REUSE")[0], auth=("ERR-REUSE", secret))

    def test_expired_secret_401(self, front: CAFront) -> None:
        secret = front.register("ERR-EXPIRED")
        db = front.db()
        try:
            with session_scope(db) as s:
                s.execute(
                    update(EnrollmentSecret)
                    .where(EnrollmentSecret.device_id == "ERR-EXPIRED")
                    .values(expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(1))
                )
        finally:
            db.dispose()
        self._refused(front, 401, _b64_csr("ERR-EXPIRED")[0], auth=("ERR-EXPIRED", secret))

    def test_subject_mismatch_403(self, front: CAFront) -> None:
        secret = front.register("ERR-MINE")
        self._refused(front, 403, _b64_csr("ERR-OTHER")[0], auth=("ERR-MINE", secret))
        assert front.refusals("ERR-MINE") == ["refused.identity"]

    def test_malformed_base64_400(self, front: CAFront) -> None:
        secret = front.register("ERR-B64")
        self._refused(front, 400, b"this is *not* base64!", auth=("ERR-B64", secret))

    def test_non_csr_body_400(self, front: CAFront) -> None:
        secret = front.register("ERR-NOTCSR")
        body = base64.encodebytes(b"\x30\x03\x02\x01\x01")
        self._refused(front, 400, body, auth=("ERR-NOTCSR", secret))

    def test_body_over_limit_413(self, front: CAFront) -> None:
        secret = front.register("ERR-BIG")
        self._refused(front, 413, b"A" * 20000, auth=("ERR-BIG", secret))

    def test_wrong_content_type_415(self, front: CAFront) -> None:
        secret = front.register("ERR-TYPE")
        body = _b64_csr("ERR-TYPE")[0]
        self._refused(front, 415, body, auth=("ERR-TYPE", secret), content_type="text/plain")

    def test_unknown_label_404(self, front: CAFront) -> None:
        secret = front.register("ERR-LABEL")
        body = _b64_csr("ERR-LABEL")[0]
        self._refused(front, 404, body, path=f"{EST}/nope/simpleenroll", auth=("ERR-LABEL", secret))

    def test_tls11_client_refused(self, front: CAFront) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.warns(DeprecationWarning):
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            pytest.raises(ssl.SSLError, match=r"(?i)protocol.version"),
            socket.create_connection((HOST, front.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=HOST),
        ):
            pass


class TestReenroll:
    def test_reenroll_with_curl_supersedes_old(self, front: CAFront) -> None:
        secret = front.register("RE-0001")
        key, csr_b64 = _openssl_csr(front.work, "RE-0001", "re-0001")
        code, body = _curl(
            front, "--user", f"RE-0001:{secret}", "-H", "Content-Type: application/pkcs10",
            "--data-binary", f"@{csr_b64}", f"{front.url}{EST}/simpleenroll",
        )  # fmt: skip
        assert code == 200
        (old,) = _certs_of(body)
        old_pem = _write_pem(front.work / "re-0001.pem", old)
        curl_args = [
            "--cert", str(old_pem), "--key", str(key), "-H", "Content-Type: application/pkcs10",
            "--data-binary", f"@{csr_b64}", f"{front.url}{EST}/simplereenroll",
        ]  # fmt: skip
        code, body = _curl(front, *curl_args)
        assert code == 200, body
        (new,) = _certs_of(body)
        assert new.subject == old.subject
        assert new.serial_number != old.serial_number
        shown = front.ca.pki("cert", "show", format(old.serial_number, "x")).stdout
        assert '"status": "revoked"' in shown and '"revocation_reason": "superseded"' in shown
        # The same request again (its answer lost) gets the same successor; nothing new.
        before = front.snapshot()
        code, body = _curl(front, *curl_args)
        assert code == 200, body
        assert _certs_of(body) == [new]
        assert front.snapshot()[0] == before[0]
        # The superseded certificate renews nothing else: a CSR with another key is 409.
        _, other_b64 = _openssl_csr(front.work, "RE-0001", "re-0001-other")
        code, body = _curl(
            front, "--cert", str(old_pem), "--key", str(key), "-H",
            "Content-Type: application/pkcs10", "--data-binary", f"@{other_b64}",
            f"{front.url}{EST}/simplereenroll",
        )  # fmt: skip
        assert code == 409, body
        assert front.snapshot()[0] == before[0]

    def test_reenroll_without_certificate_401(self, front: CAFront) -> None:
        r = front.post(f"{EST}/simplereenroll", _b64_csr("RE-NONE")[0])
        assert r.status_code == 401


class TestIDevID:
    def test_idevid_enrollment(self, front: CAFront) -> None:
        idevid = _idevid(front.work, front.manufacturer, "ACME-0001", "acme-0001")
        body, _ = _b64_csr("ACME-0001")
        r = front.post(
            f"{EST}/factory/simpleenroll",
            body,
            cert=(str(idevid.cert_path), str(idevid.key_path)),
        )
        assert r.status_code == 200, r.text
        (ldevid,) = _certs_of(r.content)
        assert ldevid.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "ACME-0001"
        assert ldevid.issuer != front.manufacturer.cert.subject

    def test_unknown_manufacturer_refused(self, front: CAFront) -> None:
        before = front.snapshot()
        with pytest.raises(requests.exceptions.ConnectionError):
            front.post(
                f"{EST}/factory/simpleenroll",
                _b64_csr("ACME-666")[0],
                cert=(str(front.rogue.cert_path), str(front.rogue.key_path)),
            )
        assert front.snapshot() == before

    def test_idevid_through_a_manufacturer_intermediate(self, front: CAFront) -> None:
        # The client sends leaf + intermediate; the app sees both (Python 3.11 included) and
        # builds the path to the label's anchor itself.
        sub = make_ca(front.work, "acme-sub", "Acme Device Sub-CA", front.manufacturer)
        idevid = with_chain(_idevid(front.work, sub, "ACME-0100", "acme-0100"), sub)
        r = front.post(
            f"{EST}/factory/simpleenroll",
            _b64_csr("ACME-0100")[0],
            cert=(str(idevid.cert_path), str(idevid.key_path)),
        )
        assert r.status_code == 200, r.text
        shown = front.ca.pki("device", "show", "ACME-0100").stdout
        assert '"enroll_method": "idevid"' in shown

    @pytest.mark.parametrize("flaw", ["expired", "not-ca"])
    def test_bad_manufacturer_intermediate_refused(self, front: CAFront, flaw: str) -> None:
        expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        sub = make_ca(
            front.work,
            f"acme-{flaw}",
            f"Acme {flaw} Sub-CA",
            front.manufacturer,
            ca=flaw != "not-ca",
            not_after=expired if flaw == "expired" else None,
        )
        idevid = with_chain(_idevid(front.work, sub, "ACME-0101", f"acme-{flaw}-0101"), sub)
        before = front.snapshot()
        try:
            r = front.post(
                f"{EST}/factory/simpleenroll",
                _b64_csr("ACME-0101")[0],
                cert=(str(idevid.cert_path), str(idevid.key_path)),
            )
        except requests.exceptions.ConnectionError:
            pass  # the TLS layer refused the chain before the app saw it
        else:
            assert r.status_code == 403, r.text
        assert front.snapshot() == before

    def test_idevid_serial_mismatch_403(self, front: CAFront) -> None:
        idevid = _idevid(front.work, front.manufacturer, "ACME-0002", "acme-0002")
        before = front.snapshot()
        r = front.post(
            f"{EST}/factory/simpleenroll",
            _b64_csr("ACME-9999")[0],
            cert=(str(idevid.cert_path), str(idevid.key_path)),
        )
        assert r.status_code == 403
        assert front.snapshot() == before


class TestServerKeyGen:
    def test_serverkeygen_key_matches_certificate(self, front: CAFront) -> None:
        secret = front.register("SKG-0001")
        r = front.post(f"{EST}/serverkeygen", _b64_csr("SKG-0001")[0], auth=("SKG-0001", secret))
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("multipart/mixed")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + r.headers["Content-Type"].encode() + b"\r\n\r\n" + r.content
        )
        parts = {p.get_content_type(): p.get_payload(decode=True) for p in message.iter_parts()}
        key = serialization.load_der_private_key(parts["application/pkcs8"], None)
        (cert,) = pkcs7.load_der_pkcs7_certificates(parts["application/pkcs7-mime"])
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
            cert.public_key().public_bytes(serialization.Encoding.DER, spki)
        )


class TestApproval:
    def test_manual_approval_202_then_issued(self, front: CAFront) -> None:
        secret = front.register("APP-0001", "approval")
        body, _ = _b64_csr("APP-0001")
        # The secret is valid on the approval label only: no way around the approval.
        r = front.post(f"{EST}/simpleenroll", body, auth=("APP-0001", secret))
        assert r.status_code == 401, r.text
        path = f"{EST}/approval/simpleenroll"
        for _ in range(2):
            r = front.post(path, body, auth=("APP-0001", secret))
            assert r.status_code == 202, r.text
            assert int(r.headers["Retry-After"]) > 0
        pending = front.ca.pki("enrollment", "pending").stdout.splitlines()
        assert len(pending) == 1 and "APP-0001" in pending[0], pending
        request_id = pending[0].split()[0]
        assert "serialNumber=APP-0001" in pending[0] and "key-sha256:" in pending[0]
        wrong = front.ca.pki("enrollment", "approve", "APP-0001", check=False)
        assert wrong.returncode == 2, wrong.stderr
        unknown = front.ca.pki(
            "device", "secret", "APP-0001", "--stdout", "--label", "nope", check=False
        )
        assert unknown.returncode == 3 and "nope" in unknown.stderr, unknown.stderr
        front.ca.pki("enrollment", "approve", request_id)
        r = front.post(path, body, auth=("APP-0001", secret))
        assert r.status_code == 200, r.text
        assert len(_certs_of(r.content)) == 1


class TestCLI:
    def test_secret_file_is_private_and_works_once(self, front: CAFront) -> None:
        front.ca.pki("device", "add", "CLI-0001", "--batch", "b7")
        out = front.work / "cli-0001.secret"
        result = front.ca.pki("device", "secret", "CLI-0001", "--out", str(out))
        secret = out.read_text().strip()
        assert out.stat().st_mode & 0o777 == 0o600
        assert secret not in result.stdout + result.stderr
        assert len(secret) >= 32
        r = front.post(f"{EST}/simpleenroll", _b64_csr("CLI-0001")[0], auth=("CLI-0001", secret))
        assert r.status_code == 200
        listed = front.ca.pki("device", "list", "--batch", "b7").stdout
        assert "CLI-0001" in listed and "enrolled" in listed

    def test_secret_needs_a_destination(self, front: CAFront) -> None:
        front.ca.pki("device", "add", "CLI-0002")
        result = front.ca.pki("device", "secret", "CLI-0002", check=False)
        assert result.returncode != 0
        assert "--out" in result.stderr

    def test_bind_refuses_a_bound_or_unknown_device(self, front: CAFront) -> None:
        front.ca.pki("device", "add", "CLI-0003")  # bound to secrets
        fingerprint = "ab" * 32
        bound = front.ca.pki(
            "device", "bind", "CLI-0003", "--manufacturer", fingerprint, check=False
        )
        assert bound.returncode != 0 and "already bound" in bound.stderr
        assert "Traceback" not in bound.stderr
        unknown = front.ca.pki(
            "device", "bind", "NOPE-0003", "--manufacturer", fingerprint, check=False
        )
        assert unknown.returncode == 3 and "NOPE-0003" in unknown.stderr
        assert '"enroll_method": "secret"' in front.ca.pki("device", "show", "CLI-0003").stdout

    def test_import_names_offending_lines(self, front: CAFront) -> None:
        path = front.work / "bad.csv"
        path.write_text("id,model\nIMP-1,m\nnot valid!,m\n")
        result = front.ca.pki("device", "import", str(path), check=False)
        assert result.returncode != 0
        assert "line 3" in result.stderr
        assert "IMP-1" not in front.ca.pki("device", "list").stdout
