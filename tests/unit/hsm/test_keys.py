"""Tests for the token-backed key objects: signatures, cryptography builders, openssl."""

from __future__ import annotations

import copy
import datetime
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hsm import HSMECPrivateKey, HSMError, HSMPrivateKey, HSMRSAPrivateKey, Token
from hsm.errors import HSMErrorKind

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
DATA = b"to be signed by a key that never leaves the token"


@pytest.fixture(scope="module")
def keys(module_token: Token) -> Iterator[dict[str, HSMPrivateKey]]:
    """Yields one key of each fast-to-generate type, generated once for this module."""
    yield {
        key_type: module_token.generate_key(key_type, key_type)
        for key_type in ("ec-p256", "ec-p384", "rsa-2048")
    }


def _ec(keys: dict[str, HSMPrivateKey], key_type: str) -> HSMECPrivateKey:
    key = keys[key_type]
    assert isinstance(key, HSMECPrivateKey)
    return key


def _rsa(keys: dict[str, HSMPrivateKey]) -> HSMRSAPrivateKey:
    key = keys["rsa-2048"]
    assert isinstance(key, HSMRSAPrivateKey)
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def _self_signed(
    key: HSMPrivateKey,
    algorithm: SignatureHash,
    rsa_padding: padding.PSS | padding.PKCS1v15 | None = None,
) -> x509.Certificate:
    name = _name(f"HSM test {key.label}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if rsa_padding is not None:
        return builder.sign(key, algorithm, rsa_padding=rsa_padding)
    return builder.sign(key, algorithm)


def _openssl_verify(
    cert: x509.Certificate, directory: Path, leaf: x509.Certificate | None = None
) -> subprocess.CompletedProcess[str]:
    root_path = directory / "root.pem"
    root_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    leaf_path = root_path
    if leaf is not None:
        leaf_path = directory / "leaf.pem"
        leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    # openssl trusts a trust anchor without looking at its signature; -check_ss_sig makes
    # it verify the self-signature too, which is the HSM signature under test.
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-check_ss_sig",
            "-attime",
            str(int(NOW.timestamp()) + 60),
            "-CAfile",
            root_path,
            leaf_path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _leaf(issuer_key: HSMPrivateKey, issuer: x509.Certificate) -> x509.Certificate:
    device_key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(_name("device-0001"))
        .issuer_name(issuer.subject)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


class TestKeyTypes:
    def test_keys_are_cryptography_private_keys(self, keys: dict[str, HSMPrivateKey]) -> None:
        assert isinstance(keys["ec-p256"], ec.EllipticCurvePrivateKey)
        assert isinstance(keys["ec-p384"], ec.EllipticCurvePrivateKey)
        assert isinstance(keys["rsa-2048"], rsa.RSAPrivateKey)

    def test_ec_curve_and_public_key(self, keys: dict[str, HSMPrivateKey]) -> None:
        p256, p384 = _ec(keys, "ec-p256"), _ec(keys, "ec-p384")
        assert isinstance(p256.curve, ec.SECP256R1)
        assert isinstance(p384.curve, ec.SECP384R1)
        assert isinstance(p256.public_key(), ec.EllipticCurvePublicKey)
        assert p256.public_key() is p256.public_key()

    def test_rsa_public_key(self, keys: dict[str, HSMPrivateKey]) -> None:
        public = _rsa(keys).public_key()
        assert public.key_size == 2048
        assert public.public_numbers().e == 65537

    def test_label_and_uri(self, keys: dict[str, HSMPrivateKey], module_token: Token) -> None:
        key = keys["ec-p256"]
        assert key.label == "ec-p256"
        assert key.uri.startswith(f"pkcs11:token={module_token.label};object=ec-p256;")
        assert key.uri in repr(key)


class TestECDSA:
    @pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384"])
    @pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
    def test_sign_verifies(
        self, keys: dict[str, HSMPrivateKey], key_type: str, algorithm: hashes.HashAlgorithm
    ) -> None:
        key = _ec(keys, key_type)
        signature = key.sign(DATA, ec.ECDSA(algorithm))
        key.public_key().verify(signature, DATA, ec.ECDSA(algorithm))

    def test_sign_is_bound_to_data(self, keys: dict[str, HSMPrivateKey]) -> None:
        key = _ec(keys, "ec-p256")
        signature = key.sign(DATA, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(signature, DATA + b"!", ec.ECDSA(hashes.SHA256()))

    def test_sign_prehashed(self, keys: dict[str, HSMPrivateKey]) -> None:
        key = _ec(keys, "ec-p256")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(DATA)
        signature = key.sign(digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
        key.public_key().verify(signature, DATA, ec.ECDSA(hashes.SHA256()))

    def test_sign_prehashed_wrong_length_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        with pytest.raises(ValueError, match="prehashed"):
            _ec(keys, "ec-p256").sign(b"short", ec.ECDSA(Prehashed(hashes.SHA256())))

    def test_sign_accepts_bytearray_and_memoryview(self, keys: dict[str, HSMPrivateKey]) -> None:
        key = _ec(keys, "ec-p256")
        for data in (bytearray(DATA), memoryview(DATA)):
            signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
            key.public_key().verify(signature, DATA, ec.ECDSA(hashes.SHA256()))

    def test_sign_sha1_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        with pytest.raises(HSMError, match="sha1") as caught:
            _ec(keys, "ec-p256").sign(DATA, ec.ECDSA(hashes.SHA1()))  # noqa: S303
        assert caught.value.kind is HSMErrorKind.UNSUPPORTED

    def test_sign_deterministic_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        with pytest.raises(HSMError, match="RFC 6979"):
            _ec(keys, "ec-p256").sign(DATA, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


class TestRSA:
    @pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
    def test_pkcs1v15_verifies(
        self, keys: dict[str, HSMPrivateKey], algorithm: hashes.HashAlgorithm
    ) -> None:
        key = _rsa(keys)
        signature = key.sign(DATA, padding.PKCS1v15(), algorithm)
        key.public_key().verify(signature, DATA, padding.PKCS1v15(), algorithm)

    def test_pkcs1v15_prehashed_verifies(self, keys: dict[str, HSMPrivateKey]) -> None:
        key = _rsa(keys)
        digest = hashes.Hash(hashes.SHA384())
        digest.update(DATA)
        signature = key.sign(digest.finalize(), padding.PKCS1v15(), Prehashed(hashes.SHA384()))
        key.public_key().verify(signature, DATA, padding.PKCS1v15(), hashes.SHA384())

    @pytest.mark.parametrize(
        ("salt", "expected"),
        [(padding.PSS.DIGEST_LENGTH, 32), (padding.PSS.MAX_LENGTH, 256 - 32 - 2), (0, 0), (20, 20)],
    )
    def test_pss_verifies_with_expected_salt_length(
        self, keys: dict[str, HSMPrivateKey], salt: object, expected: int
    ) -> None:
        key = _rsa(keys)
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), salt)  # type: ignore[arg-type]
        signature = key.sign(DATA, pss, hashes.SHA256())
        exact = padding.PSS(padding.MGF1(hashes.SHA256()), expected)
        key.public_key().verify(signature, DATA, exact, hashes.SHA256())

    def test_pss_prehashed_verifies(self, keys: dict[str, HSMPrivateKey]) -> None:
        key = _rsa(keys)
        digest = hashes.Hash(hashes.SHA512())
        digest.update(DATA)
        pss = padding.PSS(padding.MGF1(hashes.SHA512()), padding.PSS.DIGEST_LENGTH)
        signature = key.sign(digest.finalize(), pss, Prehashed(hashes.SHA512()))
        key.public_key().verify(signature, DATA, pss, hashes.SHA512())

    def test_pss_auto_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
        with pytest.raises(HSMError, match="AUTO"):
            _rsa(keys).sign(DATA, pss, hashes.SHA256())

    def test_pss_salt_too_long_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 223)
        with pytest.raises(ValueError, match="too long"):
            _rsa(keys).sign(DATA, pss, hashes.SHA256())

    def test_pss_mgf_hash_mismatch_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH)
        with pytest.raises(HSMError, match="MGF1") as caught:
            _rsa(keys).sign(DATA, pss, hashes.SHA256())
        assert caught.value.kind is HSMErrorKind.UNSUPPORTED

    def test_oaep_padding_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        with pytest.raises(HSMError, match="OAEP"):
            _rsa(keys).sign(DATA, oaep, hashes.SHA256())

    def test_sha1_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        with pytest.raises(HSMError, match="sha1"):
            _rsa(keys).sign(DATA, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303


class TestKeyStaysInToken:
    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_private_bytes_refused(self, keys: dict[str, HSMPrivateKey], key_type: str) -> None:
        with pytest.raises(HSMError, match="lives in token") as caught:
            keys[key_type].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        assert caught.value.kind is HSMErrorKind.UNSUPPORTED

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_private_numbers_refused(self, keys: dict[str, HSMPrivateKey], key_type: str) -> None:
        with pytest.raises(HSMError, match="lives in token"):
            keys[key_type].private_numbers()

    def test_exchange_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        with pytest.raises(HSMError, match="lives in token"):
            _ec(keys, "ec-p256").exchange(ec.ECDH(), peer)

    def test_decrypt_refused(self, keys: dict[str, HSMPrivateKey]) -> None:
        with pytest.raises(HSMError, match="lives in token"):
            _rsa(keys).decrypt(b"x" * 256, padding.PKCS1v15())

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_copy_and_pickle_refused(self, keys: dict[str, HSMPrivateKey], key_type: str) -> None:
        key = keys[key_type]
        with pytest.raises(TypeError, match="lives in token"):
            copy.copy(key)
        with pytest.raises(TypeError, match="lives in token"):
            copy.deepcopy(key)
        with pytest.raises(TypeError, match="lives in token"):
            pickle.dumps(key)


class TestBuilders:
    @pytest.mark.parametrize(
        ("key_type", "algorithm"),
        [("ec-p256", hashes.SHA256()), ("ec-p384", hashes.SHA384()), ("rsa-2048", hashes.SHA256())],
    )
    def test_self_signed_certificate_passes_openssl_verify(
        self,
        keys: dict[str, HSMPrivateKey],
        tmp_path: Path,
        key_type: str,
        algorithm: SignatureHash,
    ) -> None:
        key = keys[key_type]
        cert = _self_signed(key, algorithm)
        assert cert.public_key() == key.public_key()
        cert.verify_directly_issued_by(cert)
        result = _openssl_verify(cert, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")

    @pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
    def test_issued_leaf_passes_openssl_verify(
        self, keys: dict[str, HSMPrivateKey], tmp_path: Path, key_type: str
    ) -> None:
        key = keys[key_type]
        root = _self_signed(key, hashes.SHA256())
        leaf = _leaf(key, root)
        leaf.verify_directly_issued_by(root)
        result = _openssl_verify(root, tmp_path, leaf)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rsa_pss_certificate_passes_openssl_verify(
        self, keys: dict[str, HSMPrivateKey], tmp_path: Path
    ) -> None:
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
        cert = _self_signed(keys["rsa-2048"], hashes.SHA256(), rsa_padding=pss)
        assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
        result = _openssl_verify(cert, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_tampered_certificate_fails_openssl_verify(
        self, keys: dict[str, HSMPrivateKey], tmp_path: Path
    ) -> None:
        # Proves the openssl check above can fail: a signature from another key is rejected.
        cert = _self_signed(keys["ec-p256"], hashes.SHA256())
        other = _self_signed(keys["ec-p384"], hashes.SHA256())
        forged = x509.load_der_x509_certificate(_swap_signature(cert, other.signature))
        assert forged.tbs_certificate_bytes == cert.tbs_certificate_bytes
        result = _openssl_verify(forged, tmp_path)
        assert result.returncode != 0
        assert "signature failure" in result.stdout + result.stderr

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_crl_signature_valid(self, keys: dict[str, HSMPrivateKey], key_type: str) -> None:
        key = keys[key_type]
        revoked = x509.RevokedCertificateBuilder().serial_number(1234).revocation_date(NOW).build()
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(_name("CRL issuer"))
            .last_update(NOW)
            .next_update(NOW + datetime.timedelta(days=1))
            .add_revoked_certificate(revoked)
            .add_extension(x509.CRLNumber(1), critical=False)
            .sign(key, hashes.SHA256())
        )
        assert crl.is_signature_valid(key.public_key())
        assert crl.get_revoked_certificate_by_serial_number(1234) is not None

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_csr_signature_valid(self, keys: dict[str, HSMPrivateKey], key_type: str) -> None:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_name("intermediate"))
            .sign(keys[key_type], hashes.SHA256())
        )
        assert csr.is_signature_valid
        assert csr.public_key() == keys[key_type].public_key()

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_ocsp_response_signature_verifies(
        self, keys: dict[str, HSMPrivateKey], key_type: str
    ) -> None:
        key = keys[key_type]
        cert = _self_signed(key, hashes.SHA256())
        response = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=cert,
                issuer=cert,
                algorithm=hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID hash, not a signature
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=NOW,
                next_update=NOW + datetime.timedelta(hours=1),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
            .sign(key, hashes.SHA256())
        )
        public = key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(
                response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256())
            )
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            public.verify(
                response.signature,
                response.tbs_response_bytes,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )


def _swap_signature(cert: x509.Certificate, signature: bytes) -> bytes:
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    from asn1crypto import x509 as asn1_x509

    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    parsed["signature_value"] = signature
    return bytes(parsed.dump(force=True))


@pytest.mark.slow
class TestLargeRSA:
    @pytest.mark.parametrize("key_type", ["rsa-3072", "rsa-4096"])
    def test_generate_sign_and_openssl_verify(
        self, module_token: Token, tmp_path: Path, key_type: str
    ) -> None:
        key = module_token.generate_key(key_type, key_type)
        assert key.key_size == int(key_type.split("-")[1])
        assert module_token.key_attributes(key_type)["extractable"] is False
        cert = _self_signed(key, hashes.SHA384())
        result = _openssl_verify(cert, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
