"""The factory line end to end: CA front, VA, Mosquitto and `pki factory run`, all real."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from pki.store import CertificateRecord, CertificateStatus, Database, Device, session_scope
from tests.integration.conftest import PKI, DevCA
from tests.integration.mosquitto import Attempt, mosquitto_broker
from tests.integration.test_va_support import admin_token, openssl_ocsp, serve_ca, serve_va


def write_manifest(path: Path, ids: list[str], batch: str) -> Path:
    lines = ["device_id,model,batch"] + [f"{i},sensor-v1,{batch}" for i in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def factory_args(
    ca: DevCA, url: str, manifest: Path, out: Path, batch: str, *extra: str
) -> list[str]:
    return [
        "factory",
        "run",
        str(manifest),
        "--batch",
        batch,
        "--ca-url",
        url,
        "--cacert",
        str(ca.cert("chain.pem")),
        "--out",
        str(out),
        *extra,
    ]


def issued_by_device(ca: DevCA) -> dict[str, list[CertificateRecord]]:
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            rows = (
                s.execute(
                    select(CertificateRecord).where(
                        CertificateRecord.profile == "device",
                        CertificateRecord.status == CertificateStatus.ISSUED,
                    )
                )
                .scalars()
                .all()
            )
    finally:
        db.dispose()
    out: dict[str, list[CertificateRecord]] = {}
    for r in rows:
        out.setdefault(r.device_id or "", []).append(r)
    return out


def read_batch_manifest(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["device_id"]: row for row in csv.DictReader(f)}


def test_factory_batch_to_mosquitto_and_revocation(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = dev_ca
    env = ca.env | {"PKI_ADMIN_TOKEN": admin_token(ca, "factory")}
    operator = admin_token(ca, "operator")
    ids = [f"FAC-{i:04d}" for i in range(1, 21)]
    manifest = write_manifest(tmp_path / "batch.csv", ids, "B1")
    out = tmp_path / "out"
    with serve_ca(ca, tmp_path) as url, serve_va(ca, tmp_path) as va:
        run = ca.pki(*factory_args(ca, url, manifest, out, "B1", "--workers", "4"), env=env)
        assert "20 provisioned, 0 already done, 0 failed" in run.stderr, run.stderr
        batch = read_batch_manifest(out / "B1" / "manifest.csv")
        assert sorted(batch) == ids
        for device_id in ids:
            key = out / "B1" / "devices" / device_id / "key.pem"
            assert key.stat().st_mode & 0o777 == 0o600

        broker_dir = tmp_path / "broker"
        ca.pki("broker", "server-cert", "127.0.0.1", "--out-dir", str(broker_dir))
        ca.pki("crl", "publish")
        crlfile = broker_dir / "crl.pem"
        sync = [
            "broker",
            "crl-sync",
            "--url",
            f"{va.url}/crl/devices.crl",
            "--chain",
            str(ca.cert("chain.pem")),
            "--out",
            str(crlfile),
        ]
        ca.pki(*sync)
        with mosquitto_broker(
            broker_dir,
            cafile=ca.cert("chain.pem"),
            certfile=broker_dir / "server.pem",
            keyfile=broker_dir / "server.key",
            crlfile=crlfile,
        ) as broker:

            def attempt(device_id: str) -> Attempt:
                d = out / "B1" / "devices" / device_id
                return broker.attempt(d / "chain.pem", d / "key.pem")

            for device_id in ids:
                result = attempt(device_id)
                assert result.accepted, (device_id, result, broker.log())

            revoked = ids[3], ids[11]
            for device_id in revoked:
                serial = batch[device_id]["serial"]
                r = requests.post(
                    f"{url}/api/v1/certificates/{serial}/revoke",
                    json={"reason": "keyCompromise"},
                    headers={"Authorization": f"Bearer {operator}"},
                    verify=str(ca.cert("chain.pem")),
                    timeout=30,
                )
                assert r.status_code == 200, r.text
            time.sleep(1.1)  # the new CRL's thisUpdate must be later than the installed one's
            ca.pki("crl", "publish")
            reloads = broker.reloads()
            ca.pki(*sync, "--pid-file", str(broker.pid_file))
            broker.wait_for_reload(reloads)

            for device_id in ids:
                result = attempt(device_id)
                if device_id in revoked:
                    assert not result.accepted and result.stage == "tls", (device_id, result)
                else:
                    assert result.accepted, (device_id, result, broker.log())

        for device_id in revoked:
            cert = out / "B1" / "devices" / device_id / "cert.pem"
            check = openssl_ocsp(ca, va, "-cert", cert)
            assert f"{cert}: revoked" in check.stdout, check.stdout + check.stderr
            assert "Reason: keyCompromise" in check.stdout


def test_factory_resumes_after_kill_9(dev_ca_any: DevCA, tmp_path: Path) -> None:
    ca = dev_ca_any
    env = ca.env | {"PKI_ADMIN_TOKEN": admin_token(ca, "factory")}
    ids = [f"KIL-{i:04d}" for i in range(1, 31)]
    manifest = write_manifest(tmp_path / "batch.csv", ids, "B2")
    out = tmp_path / "out"
    devices_dir = out / "B2" / "devices"
    with serve_ca(ca, tmp_path) as url:
        proc = subprocess.Popen(
            [PKI, *factory_args(ca, url, manifest, out, "B2", "--workers", "2")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while len(list(devices_dir.glob("*/cert.pem"))) < 5:
                assert proc.poll() is None, "the run ended before it could be interrupted"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        done_before = len(list(devices_dir.glob("*/cert.pem")))
        assert 5 <= done_before < len(ids), done_before

        again = ca.pki(*factory_args(ca, url, manifest, out, "B2"), env=env)
        assert f"{done_before} already done, 0 failed" in again.stderr, again.stderr

    issued = issued_by_device(ca)
    batch = read_batch_manifest(out / "B2" / "manifest.csv")
    assert sorted(batch) == ids
    for device_id in ids:
        active = issued.get(device_id, [])
        assert len(active) == 1, (device_id, [r.serial_hex for r in active])
        assert batch[device_id]["serial"] == active[0].serial_hex
        assert batch[device_id]["fingerprint_sha256"] == active[0].fingerprint_sha256


FIRST_BOOT = r"""
import base64, json, ssl, sys, urllib.request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

bundle = json.load(open(sys.argv[1]))
ctx = ssl.create_default_context(cadata=bundle["ca_chain"])
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, bundle["device_id"]),
                  x509.NameAttribute(NameOID.SERIAL_NUMBER, bundle["device_id"])])
csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
auth = base64.b64encode(f"{bundle['device_id']}:{bundle['secret']}".encode()).decode()
req = urllib.request.Request(bundle["est_url"] + "/simpleenroll", method="POST",
    data=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
    headers={"Content-Type": "application/pkcs10", "Authorization": "Basic " + auth})
body = urllib.request.urlopen(req, context=ctx, timeout=30).read()
certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
sys.stdout.write(certs[0].public_bytes(serialization.Encoding.PEM).decode())
"""


def test_bundle_lets_a_device_enroll_on_first_boot(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = dev_ca
    env = ca.env | {"PKI_ADMIN_TOKEN": admin_token(ca, "factory")}
    manifest = write_manifest(tmp_path / "b.csv", ["BOOT-1", "BOOT-2"], "B3")
    out = tmp_path / "out"
    with serve_ca(ca, tmp_path) as url:
        ca.pki(*factory_args(ca, url, manifest, out, "B3", "--mode", "bundle"), env=env)
        bundle = out / "B3" / "devices" / "BOOT-1" / "bundle.json"
        assert bundle.stat().st_mode & 0o777 == 0o600
        data = json.loads(bundle.read_text())
        assert data["est_url"] == f"{url}/.well-known/est" and len(data["secret"]) >= 22
        device = subprocess.run(
            [sys.executable, "-c", FIRST_BOOT, str(bundle)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert device.returncode == 0, device.stderr
        cert = x509.load_pem_x509_certificate(device.stdout.encode())
        serial_attr = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0]
        assert serial_attr.value == "BOOT-1"
        # The bundle's secret works once.
        again = subprocess.run(
            [sys.executable, "-c", FIRST_BOOT, str(bundle)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode != 0 and "401" in again.stderr


def test_bad_manifest_registers_nothing(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = dev_ca
    env = ca.env | {"PKI_ADMIN_TOKEN": "unused"}
    manifest = tmp_path / "bad.csv"
    manifest.write_text("device_id,model,batch\nOK-1,m,B4\nOK-1,m,B4\nbad id,m,B4\nOK-2,m,B9\n")
    result = ca.pki(
        *factory_args(ca, "https://127.0.0.1:1", manifest, tmp_path / "o", "B4"),
        env=env,
        check=False,
    )
    assert result.returncode != 0
    for expected in (
        "line 3: device OK-1 is already on line 2",
        "line 4: device ID 'bad id'",
        "line 5: unknown batch 'B9'",
    ):
        assert expected in result.stderr, result.stderr
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            assert s.execute(select(Device)).scalars().all() == []
    finally:
        db.dispose()
