"""Tests for pki.serverkeygen: device keys made in software, PKCS#8, CMS EnvelopedData."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from pki import serverkeygen
from pki.errors import ErrorKind, PKIError

DECRYPT_KEY_ID = x509.ObjectIdentifier(serverkeygen.OID_DECRYPT_KEY_ID)
ASYMMETRIC_DECRYPT_KEY_ID = x509.ObjectIdentifier(serverkeygen.OID_ASYMMETRIC_DECRYPT_KEY_ID)
OCTET_STRING_TAG = 4


def _self_signed(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recipient")])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )


def _csr(*attributes: tuple[x509.ObjectIdentifier, bytes]) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])
    )
    for oid, value in attributes:
        builder = builder.add_attribute(oid, value, _tag=x509.name._ASN1Type.OctetString)
    return builder.sign(key, hashes.SHA256())


class TestGenerateKey:
    @pytest.mark.parametrize(
        ("key_type", "kind", "size"),
        [
            ("ec-p256", ec.EllipticCurvePrivateKey, 256),
            ("ec-p384", ec.EllipticCurvePrivateKey, 384),
            ("rsa-2048", rsa.RSAPrivateKey, 2048),
            ("rsa-3072", rsa.RSAPrivateKey, 3072),
        ],
    )
    def test_generate_key_types(self, key_type: str, kind: type, size: int) -> None:
        key = serverkeygen.generate_key(key_type)
        assert isinstance(key, kind)
        assert key.key_size == size

    @pytest.mark.parametrize("key_type", ["", "rsa-1024", "ed25519", "EC-P256"])
    def test_generate_key_unknown_type(self, key_type: str) -> None:
        with pytest.raises(PKIError) as excinfo:
            serverkeygen.generate_key(key_type)
        assert excinfo.value.kind is ErrorKind.POLICY

    def test_generate_key_is_fresh(self) -> None:
        first = serverkeygen.pkcs8_der(serverkeygen.generate_key("ec-p256"))
        second = serverkeygen.pkcs8_der(serverkeygen.generate_key("ec-p256"))
        assert first != second


class TestPKCS8:
    def test_pkcs8_der_round_trip(self) -> None:
        key = serverkeygen.generate_key("ec-p256")
        loaded = serialization.load_der_private_key(serverkeygen.pkcs8_der(key), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.private_numbers() == key.private_numbers()


def _openssl_decrypt(
    tmp_path: Path,
    enveloped: bytes,
    recipient_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cert: x509.Certificate,
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "env.der").write_bytes(enveloped)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        recipient_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(tmp_path / "env.der"),
            "-recip",
            str(tmp_path / "cert.pem"),
            "-inkey",
            str(tmp_path / "key.pem"),
        ],
        capture_output=True,
        timeout=30,
    )


class TestEncryptKeyForRecipient:
    @pytest.mark.parametrize("recipient_type", ["rsa-2048", "ec-p256", "ec-p384"])
    def test_encrypt_key_for_recipient_openssl_decrypts(
        self, tmp_path: Path, recipient_type: str
    ) -> None:
        recipient_key = serverkeygen.generate_key(recipient_type)
        cert = _self_signed(recipient_key)
        device_key = serverkeygen.generate_key("ec-p256")
        enveloped = serverkeygen.encrypt_key_for_recipient(device_key, cert)
        result = _openssl_decrypt(tmp_path, enveloped, recipient_key, cert)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == serverkeygen.pkcs8_der(device_key)

    def test_encrypt_key_for_recipient_wrong_key_fails(self, tmp_path: Path) -> None:
        recipient_key = serverkeygen.generate_key("rsa-2048")
        cert = _self_signed(recipient_key)
        enveloped = serverkeygen.encrypt_key_for_recipient(
            serverkeygen.generate_key("ec-p256"), cert
        )
        other_key = serverkeygen.generate_key("rsa-2048")
        result = _openssl_decrypt(tmp_path, enveloped, other_key, _self_signed(other_key))
        assert result.returncode != 0
        assert result.stdout == b""

    def test_encrypt_key_for_recipient_structure_rsa(self) -> None:
        cert = _self_signed(serverkeygen.generate_key("rsa-2048"))
        info = cms.ContentInfo.load(
            serverkeygen.encrypt_key_for_recipient(serverkeygen.generate_key("ec-p256"), cert)
        )
        assert info["content_type"].native == "enveloped_data"
        enveloped = info["content"]
        assert enveloped["version"].native == "v0"
        (recipient,) = enveloped["recipient_infos"]
        assert recipient.name == "ktri"
        algorithm = recipient.chosen["key_encryption_algorithm"]
        assert algorithm["algorithm"].native == "rsaes_oaep"
        assert algorithm["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
        content = enveloped["encrypted_content_info"]
        assert content["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
        assert recipient.chosen["rid"].chosen["serial_number"].native == cert.serial_number

    def test_encrypt_key_for_recipient_structure_ec(self) -> None:
        cert = _self_signed(serverkeygen.generate_key("ec-p256"))
        info = cms.ContentInfo.load(
            serverkeygen.encrypt_key_for_recipient(serverkeygen.generate_key("ec-p256"), cert)
        )
        enveloped = info["content"]
        assert enveloped["version"].native == "v2"
        (recipient,) = enveloped["recipient_infos"]
        assert recipient.name == "kari"
        assert recipient.chosen["key_encryption_algorithm"]["algorithm"].dotted == "1.3.132.1.11.1"

    def test_encrypt_key_for_recipient_unsupported_key(self) -> None:
        cert = _self_signed(ed25519.Ed25519PrivateKey.generate())
        with pytest.raises(PKIError) as excinfo:
            serverkeygen.encrypt_key_for_recipient(serverkeygen.generate_key("ec-p256"), cert)
        assert excinfo.value.kind is ErrorKind.POLICY


class TestRequestedDecryptKeyId:
    def test_requested_decrypt_key_id_none(self) -> None:
        assert serverkeygen.requested_decrypt_key_id(_csr()) is None

    def test_requested_decrypt_key_id_symmetric(self) -> None:
        request = serverkeygen.requested_decrypt_key_id(_csr((DECRYPT_KEY_ID, b"kek-1")))
        assert request == serverkeygen.DecryptKeyRequest(kind="symmetric", key_id=b"kek-1")

    def test_requested_decrypt_key_id_asymmetric(self) -> None:
        request = serverkeygen.requested_decrypt_key_id(
            _csr((ASYMMETRIC_DECRYPT_KEY_ID, b"\x01\x02"))
        )
        assert request == serverkeygen.DecryptKeyRequest(kind="asymmetric", key_id=b"\x01\x02")

    def test_requested_decrypt_key_id_ignores_other_attributes(self) -> None:
        csr = _csr((x509.ObjectIdentifier("1.2.840.113549.1.9.7"), b"secret"))
        assert serverkeygen.requested_decrypt_key_id(csr) is None

    def test_requested_decrypt_key_id_both(self) -> None:
        csr = _csr((DECRYPT_KEY_ID, b"a"), (ASYMMETRIC_DECRYPT_KEY_ID, b"b"))
        with pytest.raises(PKIError) as excinfo:
            serverkeygen.requested_decrypt_key_id(csr)
        assert excinfo.value.kind is ErrorKind.BAD_REQUEST

    def test_requested_decrypt_key_id_empty(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            serverkeygen.requested_decrypt_key_id(_csr((DECRYPT_KEY_ID, b"")))
        assert excinfo.value.kind is ErrorKind.BAD_REQUEST

    def test_requested_decrypt_key_id_wrong_type(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
            .add_attribute(DECRYPT_KEY_ID, b"text", _tag=x509.name._ASN1Type.UTF8String)
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(PKIError) as excinfo:
            serverkeygen.requested_decrypt_key_id(csr)
        assert excinfo.value.kind is ErrorKind.BAD_REQUEST
