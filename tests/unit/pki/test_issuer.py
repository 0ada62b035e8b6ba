"""The issuance cycle over a real database with in-memory keys."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select

from pki import lint
from pki.csr import check_request, load_csr, subject_text
from pki.errors import ErrorKind, PKIError
from pki.issuer import Issuer
from pki.serial import SERIAL_BITS, serial_hex
from pki.store import CertificateRecord, CertificateStatus, session_scope
from pki.store.repository import CertificateRepository, DuplicateSerial
from tests.csrs import der, device_csr, rsa_key
from tests.unit.pki.conftest import Hierarchy


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_device(h: Hierarchy, device_id: str = "DEV-0001") -> x509.Certificate:
    csr, _ = device_csr(device_id)
    request = check_request(load_csr(der(csr)), h.config.profile("device"))
    return h.issuance.issue(
        h.devices, h.config.profile("device"), request, actor="test"
    ).certificate


def count_certificates(h: Hierarchy) -> int:
    with session_scope(h.db) as s:
        return int(s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one())


class TestIssuance:
    def test_issue_device_verifies_with_openssl(self, hierarchy: Hierarchy, tmp_path: Path) -> None:
        cert = issue_device(hierarchy)
        (tmp_path / "root.pem").write_bytes(pem(hierarchy.root.certificate))
        (tmp_path / "int.pem").write_bytes(pem(hierarchy.devices.certificate))
        (tmp_path / "dev.pem").write_bytes(pem(cert))
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "int.pem", "dev.pem"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "DEV-0001"
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    def test_issue_records_issued_row_with_fingerprint(self, hierarchy: Hierarchy) -> None:
        cert = issue_device(hierarchy)
        with session_scope(hierarchy.db) as s:
            row = CertificateRepository(s).by_serial(serial_hex(cert.serial_number), "devices")
            assert row.status is CertificateStatus.ISSUED
            assert row.device_id == "DEV-0001"
            assert row.cert_der == cert.public_bytes(serialization.Encoding.DER)
            assert row.tbs_der == cert.tbs_certificate_bytes
            assert row.fingerprint_sha256 is not None and len(row.fingerprint_sha256) == 64

    def test_every_profile_lints_clean(self, sqlite_hierarchy: Hierarchy) -> None:
        h = sqlite_hierarchy
        certs = [h.root.certificate, h.devices.certificate, issue_device(h)]
        for c in certs:
            findings = lint.blocking(
                lint.lint_certificate(c.public_bytes(serialization.Encoding.DER))
            )
            assert findings == [], (c.subject, findings)

    def test_issuer_refuses_mismatched_key(self, sqlite_hierarchy: Hierarchy) -> None:
        other = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(PKIError) as e:
            Issuer("devices", sqlite_hierarchy.devices.certificate, other)
        assert e.value.kind is ErrorKind.CONFIG
        assert "does not match" in e.value.message

    def test_issuer_refuses_profile_it_does_not_issue(self, sqlite_hierarchy: Hierarchy) -> None:
        h = sqlite_hierarchy
        csr, _ = device_csr("DEV-9")
        request = check_request(load_csr(der(csr)), h.config.profile("device"))
        with pytest.raises(PKIError) as e:
            h.issuance.issue(h.root, h.config.profile("device"), request, actor="test")
        assert e.value.kind is ErrorKind.POLICY


class TestSerials:
    def test_thousand_issuances_distinct_serials(self, hierarchy: Hierarchy) -> None:
        h = hierarchy
        key = ec.generate_private_key(ec.SECP256R1())
        profile = h.config.profile("device")
        serials = []
        for i in range(1000):
            csr, _ = device_csr(f"DEV-{i:05d}", key)
            request = check_request(csr, profile)
            serials.append(h.issuance.issue(h.devices, profile, request, actor="test").serial)
        assert len(set(serials)) == 1000
        assert all(0 < s < 2**SERIAL_BITS for s in serials)
        # Each of the low 64 bit positions must be set in about half of the serials: a
        # counter or a timestamp would leave most positions fixed. 1000 fair coin flips
        # land outside 400..600 with a probability below 1e-9 per position.
        for bit in range(64):
            ones = sum((s >> bit) & 1 for s in serials)
            assert 400 < ones < 600, (bit, ones)
        # And the serials are long: fewer than 1 in 2**20 would be shorter than 100 bits.
        assert min(s.bit_length() for s in serials) > 100

    def test_database_rejects_duplicate_serial(self, hierarchy: Hierarchy) -> None:
        cert = issue_device(hierarchy)
        with pytest.raises(DuplicateSerial), session_scope(hierarchy.db) as s:
            CertificateRepository(s).add_pending(
                issuer_id="devices",
                serial_hex=serial_hex(cert.serial_number),
                profile="device",
                subject="serialNumber=X",
                sans=[],
                device_id="X",
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                tbs_der=b"\x30\x00",
                at=cert.not_valid_before_utc,
            )
        with session_scope(hierarchy.db) as s:
            rows = CertificateRepository(s).list(device_id="X")
            assert rows == []


class TestBadInput:
    @pytest.fixture
    def h(self, sqlite_hierarchy: Hierarchy) -> Hierarchy:
        return sqlite_hierarchy

    def _refused(self, h: Hierarchy, data: bytes, profile: str = "device") -> PKIError:
        before = count_certificates(h)
        with pytest.raises(PKIError) as e:
            request = check_request(load_csr(data), h.config.profile(profile))
            h.issuance.issue(h.devices, h.config.profile(profile), request, actor="test")
        assert count_certificates(h) == before
        return e.value

    def test_malformed_csr(self, h: Hierarchy) -> None:
        err = self._refused(h, b"\x30\x82\x01\x00garbage")
        assert err.kind is ErrorKind.BAD_REQUEST
        assert "PKCS#10" in err.message

    def test_broken_signature(self, h: Hierarchy) -> None:
        data = bytearray(der(device_csr("DEV-1")[0]))
        data[-5] ^= 0x55  # inside the signature value
        err = self._refused(h, bytes(data))
        assert err.kind is ErrorKind.BAD_REQUEST

    def test_rsa_1024(self, h: Hierarchy) -> None:
        err = self._refused(h, der(device_csr("DEV-1", rsa_key(1024))[0]))
        assert err.kind is ErrorKind.POLICY
        assert "1024" in err.message

    def test_unknown_curve(self, h: Hierarchy) -> None:
        key = ec.generate_private_key(ec.SECP256K1())
        err = self._refused(h, der(device_csr("DEV-1", key)[0]))
        assert err.kind is ErrorKind.POLICY
        assert "secp256k1" in err.message

    def test_disallowed_subject_attribute(self, h: Hierarchy) -> None:
        extra = [x509.NameAttribute(NameOID.LOCALITY_NAME, "Berlin")]
        err = self._refused(h, der(device_csr("DEV-1", extra=extra)[0]))
        assert err.kind is ErrorKind.POLICY
        assert "L is not allowed" in err.message

    def test_disallowed_san_type(self, h: Hierarchy) -> None:
        csr, _ = device_csr("DEV-1", sans=[x509.RFC822Name("a@example.com")])
        err = self._refused(h, der(csr))
        assert "email" in err.message

    def test_bad_device_id(self, h: Hierarchy) -> None:
        err = self._refused(h, der(device_csr("DEV 1/..")[0]))
        assert err.kind is ErrorKind.BAD_REQUEST

    def test_unknown_profile(self, h: Hierarchy) -> None:
        with pytest.raises(PKIError) as e:
            h.config.profile("nope")
        assert e.value.kind is ErrorKind.NOT_FOUND

    def test_subject_is_normalised(self, h: Hierarchy) -> None:
        csr, _ = device_csr("DEV-7", extra=[x509.NameAttribute(NameOID.COMMON_NAME, "  my   dev ")])
        request = check_request(csr, h.config.profile("device"))
        # DER order: CN before serialNumber; RFC 4514 text lists RDNs in reverse.
        assert subject_text(request.subject) == "serialNumber=DEV-7,CN=my dev"
