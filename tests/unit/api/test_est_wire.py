"""Tests for api.est.wire: EST bodies, content types, certs-only, CSR attributes, multipart."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from api.est import wire
from pki.errors import ErrorKind, PKIError


def _cert(common_name: str = "device-1") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _kind(excinfo: pytest.ExceptionInfo[PKIError]) -> ErrorKind:
    return excinfo.value.kind


class TestDecodeBase64Body:
    def test_decode_base64_body_plain(self) -> None:
        assert wire.decode_base64_body(base64.b64encode(b"\x30\x00"), limit=100) == b"\x30\x00"

    def test_decode_base64_body_with_line_breaks_and_spaces(self) -> None:
        der = bytes(range(200))
        lines = wire.encode_base64_body(der).replace(b"\r\n", b"\n  \t")
        assert wire.decode_base64_body(b"\r\n" + lines + b"\r\n", limit=10_000) == der

    def test_decode_base64_body_over_limit(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.decode_base64_body(b"A" * 101, limit=100)
        assert _kind(excinfo) is ErrorKind.TOO_LARGE

    @pytest.mark.parametrize("body", [b"", b" \r\n\t "])
    def test_decode_base64_body_empty(self, body: bytes) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.decode_base64_body(body, limit=100)
        assert _kind(excinfo) is ErrorKind.BAD_REQUEST

    @pytest.mark.parametrize(
        "body",
        [
            b"not base64!",
            b"MIIB*AAA",
            b"QUJDRA",  # missing padding
            b"QUJD$",
            b"QUJD\x00",
            b"-----BEGIN CERTIFICATE REQUEST-----\nQUJD\n-----END CERTIFICATE REQUEST-----",
            b"\xff\xfe",
            b"====",
        ],
    )
    def test_decode_base64_body_garbage(self, body: bytes) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.decode_base64_body(body, limit=1000)
        assert _kind(excinfo) is ErrorKind.BAD_REQUEST


class TestEncodeBase64Body:
    def test_encode_base64_body_lines(self) -> None:
        der = bytes(range(256)) * 2
        encoded = wire.encode_base64_body(der)
        lines = encoded.split(b"\r\n")
        assert lines[-1] == b""
        assert all(len(line) == 64 for line in lines[:-2])
        assert 0 < len(lines[-2]) <= 64
        assert base64.b64decode(b"".join(lines)) == der

    def test_encode_base64_body_round_trip(self) -> None:
        der = _der(_cert())
        assert wire.decode_base64_body(wire.encode_base64_body(der), limit=10_000) == der


class TestCheckContentType:
    @pytest.mark.parametrize(
        "header",
        [
            "application/pkcs10",
            "Application/PKCS10",
            "application/pkcs10; charset=utf-8",
            " application/pkcs10 ;x=y",
        ],
    )
    def test_check_content_type_accepts(self, header: str) -> None:
        wire.check_content_type(header, wire.PKCS10_CONTENT_TYPE)

    @pytest.mark.parametrize(
        "header", [None, "", "text/plain", "application/pkcs10x", "application/pkcs7-mime"]
    )
    def test_check_content_type_refuses(self, header: str | None) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.check_content_type(header, wire.PKCS10_CONTENT_TYPE)
        assert _kind(excinfo) is ErrorKind.UNSUPPORTED_MEDIA

    def test_check_content_type_ignores_expected_parameters(self) -> None:
        wire.check_content_type("application/pkcs7-mime", wire.CERTS_ONLY_CONTENT_TYPE)


class TestCertsOnly:
    def test_certs_only_round_trip(self) -> None:
        certs = [_cert("ca-1"), _cert("ca-2")]
        der = wire.certs_only([_der(c) for c in certs])
        # certificates is a SET OF: DER sorts it, so compare without order.
        loaded = pkcs7.load_der_pkcs7_certificates(der)
        assert sorted(_der(c) for c in loaded) == sorted(_der(c) for c in certs)
        info = cms.ContentInfo.load(der)
        assert info["content_type"].native == "signed_data"
        signed = info["content"]
        assert len(signed["signer_infos"]) == 0
        assert len(signed["digest_algorithms"]) == 0
        assert signed["encap_content_info"]["content_type"].native == "data"

    def test_certs_only_openssl_reads_it(self, tmp_path: Path) -> None:
        path = tmp_path / "cacerts.p7"
        path.write_bytes(wire.certs_only([_der(_cert("ca-openssl"))]))
        result = subprocess.run(
            ["openssl", "pkcs7", "-inform", "DER", "-in", str(path), "-print_certs", "-noout"],
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert b"CN = ca-openssl" in result.stdout

    def test_certs_only_empty(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.certs_only([])
        assert _kind(excinfo) is ErrorKind.INTERNAL

    def test_certs_only_not_a_certificate(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.certs_only([b"\x30\x00"])
        assert _kind(excinfo) is ErrorKind.INTERNAL

    def test_certs_only_content_type(self) -> None:
        assert wire.CERTS_ONLY_CONTENT_TYPE == "application/pkcs7-mime; smime-type=certs-only"


# RFC 9908 example "Require a public key of a specific curve" (harkins02), as published.
HARKINS02 = base64.b64decode(
    "MD0GCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBIGCSqGSIb3DQEJDjEFBgNVBAUGCCqGSM49BAMD"
)


class TestCsrAttrs:
    def test_csr_attrs_matches_rfc9908_example_bytes(self) -> None:
        # That example puts an OID inside extensionRequest; the bytes still test the encoder.
        items: list[str | wire.CsrAttribute] = [
            wire.OID_CHALLENGE_PASSWORD,
            wire.ec_public_key_attribute(wire.OID_SECP384R1),
            wire.CsrAttribute(
                wire.OID_EXTENSION_REQUEST, (core.ObjectIdentifier(wire.OID_SERIAL_NUMBER).dump(),)
            ),
            wire.OID_ECDSA_WITH_SHA384,
        ]
        assert wire.csr_attrs(items) == HARKINS02
        assert wire.parse_csr_attrs(HARKINS02) == items

    def test_csr_attrs_device_profile_round_trip(self, tmp_path: Path) -> None:
        eku = x509.Extension(
            x509.ExtendedKeyUsage.oid,
            False,
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        )
        items: list[str | wire.CsrAttribute] = [
            wire.OID_CHALLENGE_PASSWORD,
            wire.OID_SERIAL_NUMBER,
            wire.OID_ECDSA_WITH_SHA256,
            wire.ec_public_key_attribute(wire.OID_SECP256R1),
            wire.extension_request_attribute([eku]),
        ]
        der = wire.csr_attrs(items)
        assert wire.parse_csr_attrs(der) == items

        path = tmp_path / "csrattrs.der"
        path.write_bytes(der)
        result = subprocess.run(
            ["openssl", "asn1parse", "-inform", "DER", "-in", str(path)],
            capture_output=True,
            timeout=20,
            check=True,
        )
        lines = [line.split(":", 3)[-1].strip() for line in result.stdout.decode().splitlines()]
        assert lines[:4] == ["SEQUENCE", "challengePassword", "serialNumber", "ecdsa-with-SHA256"]
        assert lines[4:8] == ["SEQUENCE", "id-ecPublicKey", "SET", "prime256v1"]
        assert lines[8:11] == ["SEQUENCE", "Extension Request", "SET"]
        assert "X509v3 Extended Key Usage" in lines[11:]

    def test_csr_attrs_extension_request_value(self) -> None:
        san = x509.Extension(
            x509.SubjectAlternativeName.oid,
            True,
            x509.SubjectAlternativeName([x509.DNSName("device-1.example")]),
        )
        attribute = wire.extension_request_attribute([san])
        (value,) = attribute.values_der
        parsed = core.load(value)
        extension = parsed[0]
        assert extension[0].dotted == "2.5.29.17"
        assert extension[1].native is True
        assert extension[2].native == san.value.public_bytes()

    def test_csr_attrs_empty(self) -> None:
        assert wire.csr_attrs([]) == b"\x30\x00"
        assert wire.parse_csr_attrs(b"\x30\x00") == []

    def test_csr_attrs_rsa_key_size(self) -> None:
        attribute = wire.rsa_key_size_attribute(3072)
        assert attribute.type_oid == wire.OID_RSA_ENCRYPTION
        assert core.Integer.load(attribute.values_der[0]).native == 3072

    def test_csr_attrs_rsa_key_size_too_small(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.rsa_key_size_attribute(1024)
        assert _kind(excinfo) is ErrorKind.CONFIG

    def test_csr_attrs_two_extension_requests(self) -> None:
        eku = x509.Extension(
            x509.ExtendedKeyUsage.oid,
            False,
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        )
        attribute = wire.extension_request_attribute([eku])
        with pytest.raises(PKIError) as excinfo:
            wire.csr_attrs([attribute, attribute])
        assert _kind(excinfo) is ErrorKind.CONFIG

    def test_csr_attrs_duplicate_extension(self) -> None:
        eku = x509.Extension(
            x509.ExtendedKeyUsage.oid,
            False,
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        )
        with pytest.raises(PKIError) as excinfo:
            wire.extension_request_attribute([eku, eku])
        assert _kind(excinfo) is ErrorKind.CONFIG

    @pytest.mark.parametrize(
        "item",
        [
            "not-an-oid",
            wire.CsrAttribute(wire.OID_EC_PUBLIC_KEY, ()),
            wire.CsrAttribute(wire.OID_EC_PUBLIC_KEY, (b"\x06",)),
            wire.CsrAttribute(wire.OID_EC_PUBLIC_KEY, (b"\x05\x00\x05\x00",)),
        ],
    )
    def test_csr_attrs_bad_item(self, item: str | wire.CsrAttribute) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.csr_attrs([item])
        assert _kind(excinfo) is ErrorKind.CONFIG

    @pytest.mark.parametrize(
        "der", [b"", b"\x04\x00", b"\x30\x02\x02\x00", b"\x30\x03\x02\x01\x01"]
    )
    def test_parse_csr_attrs_garbage(self, der: bytes) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.parse_csr_attrs(der)
        assert _kind(excinfo) is ErrorKind.BAD_REQUEST


class TestMultipartMixed:
    def test_multipart_mixed_parses_with_email(self) -> None:
        key_der = bytes(range(150))
        certs_der = wire.certs_only([_der(_cert())])
        content_type, body = wire.multipart_mixed(
            [(wire.PKCS8_CONTENT_TYPE, key_der), (wire.CERTS_ONLY_CONTENT_TYPE, certs_der)]
        )
        assert content_type.startswith("multipart/mixed; boundary=")
        message = email.message_from_bytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
            policy=email.policy.HTTP,
        )
        assert message.is_multipart()
        assert not message.defects
        parts = list(message.iter_parts())
        assert [p.get_content_type() for p in parts] == [
            "application/pkcs8",
            "application/pkcs7-mime",
        ]
        assert parts[1].get_param("smime-type") == "certs-only"
        assert [p["Content-Transfer-Encoding"] for p in parts] == ["base64", "base64"]
        assert parts[0].get_payload(decode=True) == key_der
        assert parts[1].get_payload(decode=True) == certs_der

    def test_multipart_mixed_boundary_is_random(self) -> None:
        first, _ = wire.multipart_mixed([(wire.PKCS8_CONTENT_TYPE, b"a")])
        second, _ = wire.multipart_mixed([(wire.PKCS8_CONTENT_TYPE, b"a")])
        assert first != second

    def test_multipart_mixed_boundary_not_in_parts(self) -> None:
        content_type, body = wire.multipart_mixed([(wire.PKCS8_CONTENT_TYPE, b"x" * 3000)])
        boundary = content_type.split("boundary=", 1)[1].encode()
        assert body.count(boundary) == 2

    def test_multipart_mixed_header_injection(self) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.multipart_mixed([("application/pkcs8\r\nX-Evil: 1", b"a")])
        assert _kind(excinfo) is ErrorKind.INTERNAL

    def test_multipart_mixed_empty(self) -> None:
        with pytest.raises(PKIError):
            wire.multipart_mixed([])


class TestParseForwardedCert:
    def test_parse_forwarded_cert_nginx_escaped(self) -> None:
        cert = _cert()
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        escaped = urllib.parse.quote(pem, safe="")
        assert "+" not in escaped or "%2B" in escaped
        assert wire.parse_forwarded_cert(escaped) == _der(cert)

    def test_parse_forwarded_cert_nginx_escaped_keeps_plus(self) -> None:
        # nginx escapes only what a header cannot carry; '+' and '/' stay as they are.
        cert = _cert()
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        escaped = urllib.parse.quote(pem, safe="+/=")
        assert wire.parse_forwarded_cert(escaped) == _der(cert)

    @pytest.mark.parametrize("separator", [" ", "\t", "\n\t", "\r\n"])
    def test_parse_forwarded_cert_plain_pem(self, separator: str) -> None:
        cert = _cert()
        pem = cert.public_bytes(serialization.Encoding.PEM).decode().strip()
        header, *body, footer = pem.splitlines()
        value = separator.join([header, *body, footer])
        assert wire.parse_forwarded_cert(value) == _der(cert)

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE----- QUJD -----END CERTIFICATE-----",
            "-----BEGIN CERTIFICATE----- !!!! -----END CERTIFICATE-----",
            "%ZZ%C3%28",
            "x" * 20_000,
        ],
    )
    def test_parse_forwarded_cert_garbage(self, value: str) -> None:
        with pytest.raises(PKIError) as excinfo:
            wire.parse_forwarded_cert(value)
        assert _kind(excinfo) is ErrorKind.BAD_REQUEST

    def test_parse_forwarded_cert_two_certs(self) -> None:
        pems = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (_cert(), _cert()))
        with pytest.raises(PKIError) as excinfo:
            wire.parse_forwarded_cert(pems.decode())
        assert _kind(excinfo) is ErrorKind.BAD_REQUEST
