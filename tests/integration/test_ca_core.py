"""The CA core end to end: real SoftHSM token, the pki command, openssl and pkilint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, select

from pki import lint
from pki.serial import serial_hex
from pki.store import (
    AuditEvent,
    CertificateRecord,
    CertificateStatus,
    Database,
    IssuerRecord,
    session_scope,
)
from pki.store.models import AuditCheckpoint, AuditHead
from tests.csrs import device_csr
from tests.integration.conftest import PKI, DevCA


def write_csr(path: Path, device_id: str) -> Path:
    csr, _ = device_csr(device_id)
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_csr(tmp_path: Path, subject: str) -> Path:
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(tmp_path / "dev.key"),
            "-subj",
            subject,
            "-out",
            str(tmp_path / "dev.csr"),
        ],
        check=True,
        capture_output=True,
    )
    return tmp_path / "dev.csr"


def records(ca: DevCA) -> list[CertificateRecord]:
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            return list(
                s.execute(select(CertificateRecord).order_by(CertificateRecord.id)).scalars().all()
            )
    finally:
        db.dispose()


class TestDevHierarchy:
    def test_issue_verifies_to_root(self, dev_ca_any: DevCA, tmp_path: Path) -> None:
        ca = dev_ca_any
        csr = openssl_csr(tmp_path, "/serialNumber=DEV-42/CN=sensor 42")
        ca.pki(
            "issue", "--profile", "device", "--csr", str(csr), "--out", str(tmp_path / "dev.pem")
        )
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(ca.cert("root.pem")),
                "-untrusted",
                str(ca.cert("devices.pem")),
                str(tmp_path / "dev.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert ": OK" in out.stdout
        cert = x509.load_pem_x509_certificate((tmp_path / "dev.pem").read_bytes())
        listed = ca.pki("cert", "list", "--device", "DEV-42", "--json").stdout.splitlines()
        assert [json.loads(line)["serial"] for line in listed] == [serial_hex(cert.serial_number)]
        shown = json.loads(ca.pki("cert", "show", serial_hex(cert.serial_number)).stdout)
        assert shown["status"] == "issued" and shown["device_id"] == "DEV-42"

    def test_every_ca_certificate_lints_clean(self, dev_ca: DevCA, tmp_path: Path) -> None:
        csr = openssl_csr(tmp_path, "/serialNumber=DEV-43")
        ca = dev_ca
        ca.pki(
            "issue", "--profile", "device", "--csr", str(csr), "--out", str(tmp_path / "dev.pem")
        )
        pems = [
            ca.cert("root.pem"),
            ca.cert("devices.pem"),
            ca.cert("root-ocsp.pem"),
            ca.cert("devices-ocsp.pem"),
            ca.cert("audit.pem"),
            ca.data_dir / "tls" / "server.pem",
            tmp_path / "dev.pem",
        ]
        for path in pems:
            cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
            findings = lint.blocking(
                lint.lint_certificate(cert.public_bytes(serialization.Encoding.DER))
            )
            assert findings == [], (path.name, findings)
        # The OCSP signers are delegated responders: OCSPSigning and no-check.
        ocsp = x509.load_pem_x509_certificate(ca.cert("devices-ocsp.pem").read_bytes())
        eku = ocsp.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in eku
        ocsp.extensions.get_extension_for_class(x509.OCSPNoCheck)

    def test_audit_verify_passes_then_catches_edit(self, dev_ca: DevCA) -> None:
        assert "intact" in dev_ca.pki("audit", "verify").stdout
        events = dev_ca.pki("audit", "list", "--last", "200").stdout
        for action in (
            "key.generated",
            "issuer.created",
            "issuer.certified",
            "certificate.pending",
            "certificate.issued",
        ):
            assert action in events, action
        assert "object=root-ca" in events  # the key generation names the key's URI
        db = Database(dev_ca.db_url())
        with session_scope(db) as s:
            # An operator "fixing" history directly in the database.
            ev = s.get(AuditEvent, 2)
            assert ev is not None
            ev.actor = "someone-else"
        db.dispose()
        result = dev_ca.pki("audit", "verify", check=False)
        assert result.returncode == 1
        assert "event 2" in result.stderr

    def test_audit_export_verifies_offline_and_catches_wipe(
        self, dev_ca: DevCA, tmp_path: Path
    ) -> None:
        dev_ca.pki("audit", "checkpoint")
        exported = tmp_path / "audit.jsonl"
        dev_ca.pki("audit", "export", "--out", str(exported))
        cert = tmp_path / "audit.pem"
        cert.write_bytes(dev_ca.cert("audit.pem").read_bytes())
        # A third party: no configuration, no data directory, no token, no database.
        offline_env = {k: v for k, v in os.environ.items() if not k.startswith(("PKI_", "SOFT"))}
        offline_env["PKI_CONFIG_DIR"] = str(tmp_path / "absent-config")
        offline_env["PKI_DATA_DIR"] = str(tmp_path / "absent-data")
        verify = ("audit", "verify", "--file", str(exported), "--cert", str(cert))
        assert "intact" in dev_ca.pki(*verify, env=offline_env).stdout
        data = bytearray(exported.read_bytes())
        data[len(data) // 2] ^= 0x01
        exported.write_bytes(bytes(data))
        assert dev_ca.pki(*verify, env=offline_env, check=False).returncode != 0
        assert not (tmp_path / "absent-data").exists()

        dev_ca.pki("audit", "export", "--out", str(exported))
        db = Database(dev_ca.db_url())
        with session_scope(db) as s:
            s.execute(delete(AuditEvent))
            s.execute(delete(AuditCheckpoint))
            s.execute(delete(AuditHead))
        db.dispose()
        result = dev_ca.pki("audit", "verify", "--checkpoints", str(exported), check=False)
        assert result.returncode == 1
        assert "broken at event 1:" in result.stderr

    def test_audit_checkpoint_if_due(self, dev_ca: DevCA) -> None:
        # pki init ends with a checkpoint; nothing is due right after it.
        assert dev_ca.pki("audit", "checkpoint", "--if-due").stdout == ""
        assert "audit checkpoint at event" in dev_ca.pki("audit", "checkpoint").stdout


class TestKeysStayInToken:
    @pytest.mark.parametrize("label", ["root-ca", "devices-ca"])
    def test_ca_key_attributes(self, dev_ca: DevCA, label: str) -> None:
        info = json.loads(dev_ca.pki("key", "show", label).stdout)
        assert info["sensitive"] is True
        assert info["extractable"] is False
        assert info["always_sensitive"] is True and info["never_extractable"] is True
        assert info["token"] is True
        assert info["modifiable"] is False and info["destroyable"] is False
        assert info["private_value_readable"] is False
        assert "Sensitive" in info["token_says"]

    @pytest.mark.parametrize("object_type", ["privkey", "pubkey"])
    def test_ca_key_cannot_be_destroyed_or_changed_with_user_pin(
        self, dev_ca: DevCA, object_type: str
    ) -> None:
        token, pin_file = "pki-root", "secrets/root-user.pin"
        destroyed = dev_ca.pkcs11_tool(
            token, pin_file, "--delete-object", "--type", object_type, "--label", "root-ca"
        )
        assert destroyed.returncode != 0, destroyed.stdout
        changed = dev_ca.pkcs11_tool(
            token, pin_file, "--set-id", "0102", "--type", object_type, "--label", "root-ca"
        )
        assert changed.returncode != 0, changed.stdout
        listed = dev_ca.pkcs11_tool(token, pin_file, "--list-objects", "--type", object_type)
        assert listed.stdout.count("label:      root-ca\n") == 1
        # The key is still whole: the root still signs with it.
        assert dev_ca.pki("ceremony", "ocsp-signer", "--issuer", "root").returncode == 0

    def test_no_key_material_outside_token_store(self, dev_ca: DevCA) -> None:
        token_store = dev_ca.data_dir / "tokens"
        ca_public = []
        for name in ("root.pem", "devices.pem", "root-ocsp.pem", "devices-ocsp.pem"):
            cert = x509.load_pem_x509_certificate(dev_ca.cert(name).read_bytes())
            ca_public.append(
                cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        private_files = []
        for path in dev_ca.data_dir.rglob("*"):
            if not path.is_file() or token_store in path.parents:
                continue
            data = path.read_bytes()
            if b"PRIVATE KEY" in data:
                private_files.append(path.relative_to(dev_ca.data_dir))
                key = serialization.load_pem_private_key(data, password=None)
                spki = key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                assert spki not in ca_public, f"{path} holds a CA key"
        # The only private key on disk is the TLS server's, a software key by design.
        assert private_files == [Path("tls/server.key")]


class TestCrashBetweenRecordAndSign:
    def test_kill_9_leaves_pending_row_and_next_issuance_works(
        self, dev_ca_any: DevCA, tmp_path: Path
    ) -> None:
        ca = dev_ca_any
        before = len(records(ca))
        marker = tmp_path / "paused"
        env = ca.env | {"PKI_TEST_PAUSE_AT": "pending", "PKI_TEST_PAUSE_MARKER": str(marker)}
        csr = write_csr(tmp_path / "a.csr", "DEV-CRASH-1")
        proc = subprocess.Popen(
            [
                PKI,
                "issue",
                "--profile",
                "device",
                "--csr",
                str(csr),
                "--out",
                str(tmp_path / "a.pem"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "issuance never reached the pending step"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "a.pem").exists()
        rows = records(ca)
        assert len(rows) == before + 1
        pending = rows[-1]
        assert pending.id == int(marker.read_text())
        assert pending.status is CertificateStatus.PENDING
        assert pending.cert_der is None and pending.fingerprint_sha256 is None
        assert pending.tbs_der  # what would have been signed is known

        csr2 = write_csr(tmp_path / "b.csr", "DEV-CRASH-2")
        ca.pki("issue", "--profile", "device", "--csr", str(csr2), "--out", str(tmp_path / "b.pem"))
        rows = records(ca)
        assert rows[-1].status is CertificateStatus.ISSUED
        assert [r.status for r in rows if r.id == pending.id] == [CertificateStatus.PENDING]


class TestStartupChecks:
    def test_key_certificate_mismatch_is_refused(self, dev_ca: DevCA, tmp_path: Path) -> None:
        # Point the device CA's certificate at another key, as a botched restore would.
        db = Database(dev_ca.db_url())
        with session_scope(db) as s:
            devices = s.get(IssuerRecord, "devices")
            root = s.get(IssuerRecord, "root")
            assert devices is not None and root is not None
            devices.cert_der = root.cert_der
        db.dispose()
        result = dev_ca.pki(
            "issue",
            "--profile",
            "device",
            "--csr",
            str(write_csr(tmp_path / "c.csr", "DEV-M")),
            check=False,
        )
        assert result.returncode == 4
        assert "does not match the issuer certificate" in result.stderr
        assert "refusing to start" in result.stderr

    def test_bad_inputs_store_nothing(self, dev_ca: DevCA, tmp_path: Path) -> None:
        before = len(records(dev_ca))
        (tmp_path / "junk.csr").write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
        rsa_small = tmp_path / "rsa.csr"
        subprocess.run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "rsa:1024",
                "-nodes",
                "-keyout",
                str(tmp_path / "rsa.key"),
                "-subj",
                "/serialNumber=DEV-R",
                "-out",
                str(rsa_small),
            ],
            check=True,
            capture_output=True,
        )
        bad_attr = openssl_csr(tmp_path, "/serialNumber=DEV-L/L=Berlin")
        cases = [
            (["--profile", "device", "--csr", str(tmp_path / "junk.csr")], "PKCS#10"),
            (["--profile", "device", "--csr", str(rsa_small)], "1024"),
            (["--profile", "device", "--csr", str(bad_attr)], "L is not allowed"),
            (["--profile", "nope", "--csr", str(bad_attr)], "no such profile"),
        ]
        for args, message in cases:
            result = dev_ca.pki("issue", *args, check=False)
            assert result.returncode != 0, args
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
        assert len(records(dev_ca)) == before
