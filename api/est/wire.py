"""EST wire formats: base64 bodies, content types, certs-only, CSR attributes, multipart.

Pure functions over bytes and strings; nothing here sees a Flask request. Bad input raises
`PKIError` with the kind the HTTP edge maps to a status (RFC 7030, RFC 8951, RFC 9908).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from pki.errors import ErrorKind, PKIError, bad_request, config_error, internal

CERTS_ONLY_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"
SERVER_GENERATED_KEY_CONTENT_TYPE = "application/pkcs7-mime; smime-type=server-generated-key"
PKCS8_CONTENT_TYPE = "application/pkcs8"
PKCS10_CONTENT_TYPE = "application/pkcs10"
CSRATTRS_CONTENT_TYPE = "application/csrattrs"

OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 (an OID, not a secret)
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SERIAL_NUMBER = "2.5.4.5"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_SECP256R1 = "1.2.840.10045.3.1.7"
OID_SECP384R1 = "1.3.132.0.34"
OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
OID_ECDSA_WITH_SHA384 = "1.2.840.10045.4.3.3"

_BASE64_LINE = 64
_WHITESPACE = b" \t\r\n\v\f"
_MAX_FORWARDED_CERT = 16 * 1024
_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----(?P<body>[A-Za-z0-9+/=\s]*)-----END CERTIFICATE-----"
)


def decode_base64_body(body: bytes, *, limit: int) -> bytes:
    """Decodes a base64 EST request body into DER, tolerating line breaks. See RFC 8951 3."""
    if len(body) > limit:
        raise PKIError(ErrorKind.TOO_LARGE, f"body is over the limit of {limit} bytes")
    # RFC 8951 drops the Content-Transfer-Encoding header, so the body is base64 whether or
    # not the header is present; line breaks and other white space carry no meaning.
    compact = body.translate(None, _WHITESPACE)
    if not compact:
        raise bad_request("body is empty")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("body is not valid base64") from None
    if not der:
        raise bad_request("body is empty")
    return der


def encode_base64_body(der: bytes) -> bytes:
    """Encodes DER as base64 in 64-column lines ending in CRLF. See RFC 7030 4.1.3."""
    # CRLF is MIME's canonical line break (RFC 2045 6.8, RFC 2046 5.1.1) and the multipart
    # serverkeygen response needs it anyway; every decoder EST clients use skips both CR and LF.
    return _base64_lines(der) + b"\r\n"


def _base64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"\r\n".join(text[i : i + _BASE64_LINE] for i in range(0, len(text), _BASE64_LINE))


def check_content_type(header: str | None, expected: str) -> None:
    """Refuses a Content-Type whose media type is not `expected`; parameters are ignored."""
    wanted = _media_type(expected)
    if header is None or _media_type(header) != wanted:
        raise PKIError(
            ErrorKind.UNSUPPORTED_MEDIA, f"Content-Type must be {wanted}, got {header or 'none'}"
        )


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def certs_only(certs_der: Sequence[bytes]) -> bytes:
    """Builds a degenerate PKCS#7 SignedData holding only certificates, DER. See RFC 7030 4.1.3."""
    # certificates is a SET OF, so DER sorts it: the order given is not kept.
    if not certs_der:
        raise internal("certs-only needs at least one certificate")
    try:
        certs = [x509.load_der_x509_certificate(der) for der in certs_der]
    except ValueError:
        raise internal("certs-only was given bytes that are not a DER certificate") from None
    return pkcs7.serialize_certificates(certs, Encoding.DER)


# CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID (RFC 7030 4.5.2, unchanged by RFC 9908 3.2).
class _AttributeValues(core.SetOf):  # type: ignore[misc]
    _child_spec = core.Any


class _Attribute(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("values", _AttributeValues),
    ]


class _AttrOrOID(core.Choice):  # type: ignore[misc]
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("oid", core.ObjectIdentifier),
        ("attribute", _Attribute),
    ]


class _CsrAttrs(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _AttrOrOID


@dataclass(frozen=True)
class CsrAttribute:
    """CsrAttribute is one Attribute of a CsrAttrs: a type and the DER of each value."""

    type_oid: str
    values_der: tuple[bytes, ...]


def csr_attrs(items: Sequence[str | CsrAttribute]) -> bytes:
    """Encodes CsrAttrs from OIDs and attributes, keeping their order. See RFC 7030 4.5.2."""
    choices = []
    extension_requests = 0
    for item in items:
        if isinstance(item, str):
            choices.append(_AttrOrOID(name="oid", value=_oid(item)))
            continue
        if not item.values_der:
            raise config_error(f"CSR attribute {item.type_oid} has no value")
        if item.type_oid == OID_EXTENSION_REQUEST:
            extension_requests += 1
            # RFC 9908 3.2: "There MUST be only one such attribute." and its values "MUST
            # contain a set with exactly one element".
            if extension_requests > 1 or len(item.values_der) != 1:
                raise config_error("CSR attributes take one extensionRequest with one value")
        values = _AttributeValues([_any(der, item.type_oid) for der in item.values_der])
        attribute = _Attribute({"type": _oid(item.type_oid), "values": values})
        choices.append(_AttrOrOID(name="attribute", value=attribute))
    der: bytes = _CsrAttrs(choices).dump(force=True)
    return der


def parse_csr_attrs(der: bytes) -> list[str | CsrAttribute]:
    """Decodes a CSR attributes response into OIDs and attributes. See RFC 7030 4.5.2."""
    try:
        parsed = _CsrAttrs.load(der, strict=True)
        items: list[str | CsrAttribute] = []
        for choice in parsed:
            if choice.name == "oid":
                items.append(choice.chosen.dotted)
            else:
                attribute = choice.chosen
                values = tuple(value.dump() for value in attribute["values"])
                items.append(CsrAttribute(attribute["type"].dotted, values))
    except (ValueError, TypeError):
        raise bad_request("not a DER CsrAttrs structure") from None
    return items


def ec_public_key_attribute(curve_oid: str) -> CsrAttribute:
    """Asks for an EC key on the named curve (id-ecPublicKey, value the curve). See RFC 9908 5."""
    return CsrAttribute(OID_EC_PUBLIC_KEY, (_oid(curve_oid).dump(),))


def rsa_key_size_attribute(bits: int) -> CsrAttribute:
    """Asks for an RSA key of the given modulus size (rsaEncryption, INTEGER). See RFC 9908 5."""
    if bits < 2048:
        raise config_error("RSA keys below 2048 bits are not offered")
    return CsrAttribute(OID_RSA_ENCRYPTION, (core.Integer(bits).dump(),))


def extension_request_attribute(
    extensions: Sequence[x509.Extension[x509.ExtensionType]],
) -> CsrAttribute:
    """Asks for extensions with the given values (extensionRequest). See RFC 9908 3.2."""
    if not extensions:
        raise config_error("an extensionRequest needs at least one extension")
    seen: set[str] = set()
    encoded = []
    for extension in extensions:
        oid = extension.oid.dotted_string
        # RFC 9908 3.2: Extensions "MUST NOT include more than one element with a particular
        # extnID".
        if oid in seen:
            raise config_error(f"extension {oid} is requested twice")
        seen.add(oid)
        encoded.append(
            _Extension(
                {
                    "extn_id": oid,
                    "critical": extension.critical,
                    "extn_value": extension.value.public_bytes(),
                }
            )
        )
    return CsrAttribute(OID_EXTENSION_REQUEST, (_Extensions(encoded).dump(),))


class _Extension(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("extn_id", core.ObjectIdentifier),
        ("critical", core.Boolean, {"default": False}),
        ("extn_value", core.OctetString),
    ]


class _Extensions(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _Extension


def _oid(dotted: str) -> core.ObjectIdentifier:
    try:
        return core.ObjectIdentifier(dotted)
    except (ValueError, TypeError):
        raise config_error(f"{dotted!r} is not an object identifier") from None


def _any(der: bytes, type_oid: str) -> core.Asn1Value:
    try:
        # strict: exactly one TLV, no trailing bytes.
        return core.load(der, strict=True)
    except (ValueError, TypeError):
        raise config_error(f"a value of CSR attribute {type_oid} is not one DER element") from None


def multipart_mixed(parts: Sequence[tuple[str, bytes]]) -> tuple[str, bytes]:
    """Builds multipart/mixed of base64 parts as (Content-Type, body). See RFC 7030 4.4.2."""
    if not parts:
        raise internal("multipart/mixed needs at least one part")
    encoded: list[tuple[str, bytes]] = []
    for content_type, der in parts:
        if any(c in content_type for c in "\r\n") or not content_type.isascii():
            raise internal("a part's content type must be one ASCII header line")
        encoded.append((content_type, _base64_lines(der)))
    while True:
        # RFC 2046 5.1.1: "The boundary delimiter MUST NOT appear inside any of the
        # encapsulated parts". Base64 has no '-', so it cannot; the check keeps it that way.
        boundary = "est-" + secrets.token_hex(16)
        marker = boundary.encode("ascii")
        if not any(marker in body for _, body in encoded):
            break
    out = bytearray()
    for content_type, body in encoded:
        out += b"--" + marker + b"\r\n"
        out += b"Content-Type: " + content_type.encode("ascii") + b"\r\n"
        out += b"Content-Transfer-Encoding: base64\r\n\r\n"
        out += body + b"\r\n"
    out += b"--" + marker + b"--\r\n"
    return f"multipart/mixed; boundary={boundary}", bytes(out)


def parse_forwarded_cert(value: str) -> bytes:
    """Reads a client certificate a TLS-terminating proxy put in a header; returns its DER."""
    if not value or len(value) > _MAX_FORWARDED_CERT:
        raise bad_request("forwarded client certificate is missing or too long")
    text = value.strip()
    if "%" in text:
        # nginx $ssl_client_escaped_cert: URL-encoded PEM. unquote (not unquote_plus): '+' is
        # a base64 character and nginx leaves it as is.
        try:
            text = urllib.parse.unquote(text, errors="strict")
        except UnicodeDecodeError:
            raise bad_request("forwarded client certificate is not URL-encoded text") from None
    matches = list(_PEM_CERT.finditer(text))
    if len(matches) != 1:
        raise bad_request("forwarded client certificate is not exactly one PEM certificate")
    compact = re.sub(r"\s+", "", matches[0].group("body"))
    try:
        der = base64.b64decode(compact, validate=True)
        x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError):
        raise bad_request("forwarded client certificate does not parse") from None
    return der
