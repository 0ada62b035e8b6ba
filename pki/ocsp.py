"""OCSP: parse requests, match CertIDs to an issuer, build signed responses (RFC 6960, RFC 5019).

cryptography refuses requests that ask about more than one certificate and its
OCSPResponseBuilder writes one SingleResponse only, so this module reads and writes the DER
itself. Requests go through a strict DER reader (definite, shortest lengths; no trailing data at
any level), about five times faster than asn1crypto's generic parser, which was measured at
~180 µs for a two-certificate request. Responses are a handful of byte strings precomputed per
signer (ResponderID, signature algorithm, certs) around the CertID bytes echoed from the
request, so a live response costs little more in Python than the signature itself. asn1crypto
only reads the issuer and responder certificates, once per signer.

Unknown issuers and unknown CertID hash algorithms: parse_request accepts any hash algorithm
OID; IssuerMatcher.matches() says False for an algorithm it does not precompute (SHA-1,
SHA-224, SHA-256, SHA-384, SHA-512), exactly as for a foreign issuer. The responder then answers
`unauthorized` when no CertID of the request matches an issuer it serves, and `unknown` for the
CertIDs it cannot attribute inside an otherwise answerable request (RFC 6960 §2.2: "The
"unknown" state indicates that the responder doesn't know about the certificate being
requested, usually because the request indicates an unrecognized issuer that is not served by
this responder.").
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.der import tlv
from pki.errors import bad_request, config_error, internal

# RFC 8954 §2.1: "If the Nonce extension is present, then the length of the nonce MUST be at
# least 1 octet and can be up to 32 octets."
MAX_NONCE_OCTETS = 32

# RFC 6960 §2.2: a non-issued certificate answered as revoked "MUST specify the revocationTime
# January 1, 1970".
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


# --- a minimal DER writer --------------------------------------------------------------------


def _der_integer(value: int) -> bytes:
    # Minimal two's complement: one sign bit more than the magnitude needs.
    size = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray((40 * arcs[0] + arcs[1],))
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def _der_generalized_time(at: datetime.datetime) -> bytes:
    # RFC 5280 §4.1.2.5.2: "GeneralizedTime values MUST be expressed in Greenwich Mean Time
    # (Zulu) and MUST include seconds ... MUST NOT include fractional seconds."
    t = at.astimezone(datetime.UTC)
    text = (
        f"{t.year:04d}{t.month:02d}{t.day:02d}{t.hour:02d}{t.minute:02d}{t.second:02d}Z"
    ).encode("ascii")
    return b"\x18\x0f" + text


_DER_NULL = b"\x05\x00"
_OID_NONCE = "1.3.6.1.5.5.7.48.1.2"
_OID_EXTENDED_REVOKE = "1.3.6.1.5.5.7.48.1.9"
_OID_BASIC_RESPONSE = "1.3.6.1.5.5.7.48.1.1"

_HASH_OIDS = {
    "sha1": "1.3.14.3.2.26",
    "sha224": "2.16.840.1.101.3.4.2.4",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
# AlgorithmIdentifier with NULL parameters, as OpenSSL writes it in CertIDs.
_HASH_ALGORITHM_DER = {
    name: tlv(0x30, _der_oid(oid) + _DER_NULL) for name, oid in _HASH_OIDS.items()
}

_NONCE_EXTENSION_PREFIX = _der_oid(_OID_NONCE)
# RFC 6960 §4.4.8: "The value of the extension SHALL be NULL. This extension MUST NOT be marked
# critical."
_EXTENDED_REVOKE_EXTENSION = tlv(0x30, _der_oid(_OID_EXTENDED_REVOKE) + tlv(0x04, _DER_NULL))
_BASIC_RESPONSE_TYPE = _der_oid(_OID_BASIC_RESPONSE)


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertID:
    """CertID names one certificate by issuer hashes and serial; der is the request's encoding."""

    hash_algorithm: str  # "sha1", "sha256", ... or the dotted OID when not a known digest
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int
    # RFC 6960 §4.2.1 and §3.2 (response acceptance): the client matches the response's CertID
    # against the one it sent, so the response echoes these bytes; equality is by value.
    der: bytes = field(compare=False, repr=False)


@dataclass(frozen=True)
class OCSPRequestInfo:
    """OCSPRequestInfo is what a responder needs from a request: CertIDs, nonce, extension OIDs."""

    cert_ids: tuple[CertID, ...]
    # The extnValue octets of id-pkix-ocsp-nonce exactly as sent, to echo byte for byte.
    nonce: bytes | None
    extension_oids: tuple[str, ...]  # the other request extensions, in request order


class _Malformed(Exception):
    """_Malformed marks DER that does not follow the OCSPRequest syntax."""


def _read(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Reads one DER TLV at pos, returning its tag and the start and end of its contents."""
    if end - pos < 2:
        raise _Malformed("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _Malformed("multi-octet tags are not used in OCSP")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        # X.690 §10.1: DER uses the definite form with the fewest length octets.
        if count == 0 or count > 4 or end - pos < count:
            raise _Malformed("indefinite, oversized or truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise _Malformed("length not in its shortest form")
        pos += count
    if end - pos < length:
        raise _Malformed("truncated")
    return tag, pos, pos + length


def _expect(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """Reads one TLV that must carry tag, returning the start and end of its contents."""
    got, start, stop = _read(data, pos, end)
    if got != tag:
        raise _Malformed(f"expected tag {tag:#04x}, found {got:#04x}")
    return start, stop


def _oid_text(data: bytes) -> str:
    """Decodes OBJECT IDENTIFIER contents to dotted text."""
    if not data or data[-1] & 0x80:
        raise _Malformed("bad object identifier")
    arcs: list[int] = []
    value = 0
    for octet in data:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


_HASH_NAMES = {oid: name for name, oid in _HASH_OIDS.items()}


def _cert_id(data: bytes, at: int, outer_end: int) -> tuple[CertID, int]:
    """Decodes the CertID TLV at `at`, keeping its DER, and returns where it ends; §4.1.1."""
    pos, end = _expect(data, at, outer_end, 0x30)
    alg_start, alg_end = _expect(data, pos, end, 0x30)
    oid_start, oid_end = _expect(data, alg_start, alg_end, 0x06)
    if oid_end != alg_end:  # parameters: absent or NULL for the digests in use
        _, _, params_end = _read(data, oid_end, alg_end)
        if params_end != alg_end:
            raise _Malformed("trailing data in hashAlgorithm")
    oid = _oid_text(data[oid_start:oid_end])
    name_start, name_end = _expect(data, alg_end, end, 0x04)
    key_start, key_end = _expect(data, name_end, end, 0x04)
    serial_start, serial_end = _expect(data, key_end, end, 0x02)
    if serial_end != end or serial_start == serial_end:
        raise _Malformed("bad CertID")
    cert_id = CertID(
        hash_algorithm=_HASH_NAMES.get(oid, oid),
        issuer_name_hash=data[name_start:name_end],
        issuer_key_hash=data[key_start:key_end],
        serial=int.from_bytes(data[serial_start:serial_end], "big", signed=True),
        der=data[at:end],
    )
    return cert_id, end


def _nonce_length(extn_value: bytes) -> int:
    """Returns the nonce length: the inner OCTET STRING's (RFC 8954), else the raw octets'."""
    try:
        tag, start, stop = _read(extn_value, 0, len(extn_value))
    except _Malformed:
        tag, start, stop = -1, 0, 0
    if tag == 0x04 and stop == len(extn_value):
        return stop - start
    # Clients written before RFC 8954 may put the raw nonce in extnValue.
    return len(extn_value)


def _request_extensions(data: bytes, pos: int, end: int) -> tuple[bytes | None, tuple[str, ...]]:
    """Decodes requestExtensions into the nonce extnValue and the other extensions' OIDs."""
    nonce: bytes | None = None
    oids: list[str] = []
    start, stop = _expect(data, pos, end, 0x30)
    while start < stop:
        ext_start, ext_end = _expect(data, start, stop, 0x30)
        oid_start, at = _expect(data, ext_start, ext_end, 0x06)
        oid = _oid_text(data[oid_start:at])
        tag, value_start, value_end = _read(data, at, ext_end)
        if tag == 0x01:  # critical BOOLEAN
            if value_end - value_start != 1:
                raise _Malformed("bad BOOLEAN")
            tag, value_start, value_end = _read(data, value_end, ext_end)
        if tag != 0x04 or value_end != ext_end:
            raise _Malformed("bad extension")
        # RFC 5280 §4.2, whose extension model RFC 6960 §4.4 adopts: "A certificate MUST NOT
        # include more than one instance of a particular extension."
        if oid in oids or (oid == _OID_NONCE and nonce is not None):
            raise _Malformed(f"extension {oid} repeated")
        if oid == _OID_NONCE:
            nonce = data[value_start:value_end]
        else:
            oids.append(oid)
        start = ext_end
    return nonce, tuple(oids)


def _parse(der: bytes) -> OCSPRequestInfo:
    """Decodes an OCSPRequest; raises _Malformed on anything but its DER syntax."""
    top_start, top_end = _expect(der, 0, len(der), 0x30)
    if top_end != len(der):
        raise _Malformed("trailing data after the request")
    tbs_start, tbs_end = _expect(der, top_start, top_end, 0x30)
    if tbs_end != top_end:
        # RFC 5019 §2.1.2: "Responders MAY ignore the signature on OCSPRequests." Its TLV must
        # still be well formed and last.
        _, sig_end = _expect(der, tbs_end, top_end, 0xA0)
        if sig_end != top_end:
            raise _Malformed("trailing data after optionalSignature")
    tag, start, stop = _read(der, tbs_start, tbs_end)
    if tag == 0xA0:  # version [0] EXPLICIT Version DEFAULT v1
        v_start, v_end = _expect(der, start, stop, 0x02)
        if v_end != stop or der[v_start:v_end] != b"\x00":
            raise _Malformed("version is not v1")
        tag, start, stop = _read(der, stop, tbs_end)
    if tag == 0xA1:  # requestorName [1] EXPLICIT GeneralName, not used
        tag, start, stop = _read(der, stop, tbs_end)
    if tag != 0x30:
        raise _Malformed("missing requestList")
    cert_ids: list[CertID] = []
    at = start
    while at < stop:
        req_start, req_end = _expect(der, at, stop, 0x30)
        cert_id, cid_end = _cert_id(der, req_start, req_end)
        if cid_end != req_end:  # singleRequestExtensions [0] EXPLICIT, not used
            _, ext_end = _expect(der, cid_end, req_end, 0xA0)
            if ext_end != req_end:
                raise _Malformed("trailing data in Request")
        cert_ids.append(cert_id)
        at = req_end
    nonce: bytes | None = None
    others: tuple[str, ...] = ()
    if stop != tbs_end:
        ext_start, ext_end = _expect(der, stop, tbs_end, 0xA2)
        if ext_end != tbs_end:
            raise _Malformed("trailing data in tbsRequest")
        nonce, others = _request_extensions(der, ext_start, ext_end)
    return OCSPRequestInfo(tuple(cert_ids), nonce, others)


def parse_request(der: bytes) -> OCSPRequestInfo:
    """Parses a DER OCSPRequest into CertIDs, nonce and extension OIDs; RFC 6960 §4.1."""
    try:
        info = _parse(der)
    except _Malformed as exc:
        raise bad_request(f"malformed OCSP request: {exc}") from None
    if not info.cert_ids:
        # RFC 6960 §4.1.1: "requestList SEQUENCE OF Request" names what to answer; an empty one
        # asks nothing.
        raise bad_request("OCSP request lists no certificates")
    if info.nonce is not None:
        length = _nonce_length(info.nonce)
        # RFC 8954 §2.1: "A server MUST reject any OCSP request that has a nonce in the Nonce
        # extension with a length of either 0 octets or more than 32 octets with the
        # malformedRequest OCSPResponseStatus".
        if length < 1 or length > MAX_NONCE_OCTETS:
            raise bad_request(f"OCSP nonce of {length} octets is outside 1..32")
    return info


# --- issuers ---------------------------------------------------------------------------------


def _subject_and_key_bits(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """Returns the DER of the certificate's subject Name and its subjectPublicKey bits."""
    tbs = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["tbs_certificate"]
    bit_string = tbs["subject_public_key_info"]["public_key"].contents
    # The first content octet of a BIT STRING counts the unused bits; a key has none.
    if not bit_string or bit_string[0] != 0:
        raise config_error("certificate public key is not a whole number of octets")
    return tbs["subject"].dump(), bit_string[1:]


class IssuerMatcher:
    """IssuerMatcher knows an issuer's CertID hashes and tells whether a CertID names it."""

    def __init__(self, issuer_cert: x509.Certificate) -> None:
        name_der, key_bits = _subject_and_key_bits(issuer_cert)
        # RFC 6960 §4.1.1: "issuerNameHash is the hash of the issuer's distinguished name (DN).
        # The hash shall be calculated over the DER encoding of the issuer's name field in the
        # certificate being checked. issuerKeyHash is the hash of the issuer's public key. The
        # hash shall be calculated over the value (excluding tag and length) of the subject
        # public key field in the issuer's certificate."
        self.issuer_cert = issuer_cert
        self._hashes: dict[str, tuple[bytes, bytes]] = {
            name: (hashlib.new(name, name_der).digest(), hashlib.new(name, key_bits).digest())
            for name in _HASH_OIDS
        }

    def matches(self, cert_id: CertID) -> bool:
        """Tells whether cert_id names this issuer; unknown hash algorithms never match."""
        expected = self._hashes.get(cert_id.hash_algorithm)
        return expected is not None and expected == (
            cert_id.issuer_name_hash,
            cert_id.issuer_key_hash,
        )

    def cert_id(self, serial: int, hash_algorithm: str = "sha1") -> CertID:
        """Builds the CertID a client would send for serial, for pre-signing; RFC 6960 §4.1.1."""
        hashes_ = self._hashes.get(hash_algorithm)
        if hashes_ is None:
            raise bad_request(f"unsupported CertID hash algorithm {hash_algorithm}")
        name_hash, key_hash = hashes_
        der = tlv(
            0x30,
            _HASH_ALGORITHM_DER[hash_algorithm]
            + tlv(0x04, name_hash)
            + tlv(0x04, key_hash)
            + _der_integer(serial),
        )
        return CertID(hash_algorithm, name_hash, key_hash, serial, der)


# --- statuses and answers --------------------------------------------------------------------


class CertStatusKind(enum.Enum):
    """CertStatusKind is the CertStatus CHOICE of RFC 6960 §4.2.1."""

    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


_REASON_CODES = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}


@dataclass(frozen=True)
class CertStatus:
    """CertStatus is good, unknown, or revoked with a time and an optional reason."""

    kind: CertStatusKind
    revoked_at: datetime.datetime | None = None
    reason: x509.ReasonFlags | None = None

    def __post_init__(self) -> None:
        if self.kind is CertStatusKind.REVOKED:
            if self.revoked_at is None or self.revoked_at.tzinfo is None:
                raise bad_request("a revoked status needs an aware revocation time")
            if self.reason is not None and self.reason not in _REASON_CODES:
                raise bad_request(f"{self.reason.value} is not a revocation reason")
        elif self.revoked_at is not None or self.reason is not None:
            raise bad_request("only a revoked status has a revocation time and reason")

    @classmethod
    def good(cls) -> CertStatus:
        return cls(CertStatusKind.GOOD)

    @classmethod
    def unknown(cls) -> CertStatus:
        return cls(CertStatusKind.UNKNOWN)

    @classmethod
    def revoked(
        cls, revoked_at: datetime.datetime, reason: x509.ReasonFlags | None = None
    ) -> CertStatus:
        return cls(CertStatusKind.REVOKED, revoked_at, reason)

    def der(self) -> bytes:
        """Encodes the CertStatus CHOICE; RFC 6960 §4.2.1."""
        if self.kind is CertStatusKind.GOOD:
            return b"\x80\x00"  # good [0] IMPLICIT NULL
        if self.kind is CertStatusKind.UNKNOWN:
            return b"\x82\x00"  # unknown [2] IMPLICIT UnknownInfo (NULL)
        assert self.revoked_at is not None
        info = _der_generalized_time(self.revoked_at)
        # Like a CRL entry (RFC 5280 §5.3.1), an unspecified reason is left out rather than
        # written as unspecified (0).
        if self.reason is not None and self.reason is not x509.ReasonFlags.unspecified:
            info += tlv(0xA0, b"\x0a\x01" + bytes((_REASON_CODES[self.reason],)))
        return tlv(0xA1, info)  # revoked [1] IMPLICIT RevokedInfo


@dataclass(frozen=True)
class SingleAnswer:
    """SingleAnswer is the status of one CertID and the window it is valid for."""

    cert_id: CertID
    status: CertStatus
    this_update: datetime.datetime
    # RFC 5019 §2.2.4, nextUpdate: "Responders MUST always include this value to aid in response
    # caching."
    next_update: datetime.datetime


def never_issued_answer(
    cert_id: CertID,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
    extended_revoke: bool,
) -> SingleAnswer:
    """Answers for a serial this issuer never issued: unknown, or §2.2 revoked; RFC 6960 §2.2.

    OCSP never says good for what was not issued. By default the answer is `unknown`. With
    extended_revoke the answer follows RFC 6960 §2.2: the "revoked" state "MAY also be returned
    if the associated CA has no record of ever having issued a certificate with the certificate
    serial number in the request"; then "the responder MUST include the extended revoked
    definition response extension (Section 4.4.8) in the response" (pass extended_revoke=True to
    build_response), and the SingleResponse "MUST specify the revocation reason certificateHold
    (6), MUST specify the revocationTime January 1, 1970, and MUST NOT include a CRL references
    extension (Section 4.4.2) or any CRL entry extensions (Section 4.4.5)."
    """
    if extended_revoke:
        status = CertStatus.revoked(EPOCH, x509.ReasonFlags.certificate_hold)
    else:
        status = CertStatus.unknown()
    return SingleAnswer(cert_id, status, this_update, next_update)


# --- signing ---------------------------------------------------------------------------------

_ECDSA_BY_CURVE: dict[str, tuple[str, hashes.HashAlgorithm]] = {
    # ecdsa-with-SHA256/384/512 (RFC 5758 §3.2), the digest sized to the curve.
    "secp256r1": ("1.2.840.10045.4.3.2", hashes.SHA256()),
    "secp384r1": ("1.2.840.10045.4.3.3", hashes.SHA384()),
    "secp521r1": ("1.2.840.10045.4.3.4", hashes.SHA512()),
}


def _signature_scheme(
    key: CertificateIssuerPrivateKeyTypes,
) -> tuple[bytes, Callable[[bytes], bytes]]:
    """Returns the signature AlgorithmIdentifier DER and a function that signs with key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        oid, digest = _ECDSA_BY_CURVE.get(key.curve.name, _ECDSA_BY_CURVE["secp256r1"])
        ecdsa = ec.ECDSA(digest)
        # RFC 5758 §3.2: "the encoding MUST omit the parameters field".
        return tlv(0x30, _der_oid(oid)), lambda data: key.sign(data, ecdsa)
    if isinstance(key, rsa.RSAPrivateKey):
        pkcs1 = padding.PKCS1v15()
        sha256 = hashes.SHA256()
        # sha256WithRSAEncryption with NULL parameters (RFC 4055 §5).
        alg = tlv(0x30, _der_oid("1.2.840.113549.1.1.11") + _DER_NULL)
        return alg, lambda data: key.sign(data, pkcs1, sha256)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        # RFC 8410 §3: "the parameters MUST be absent".
        return tlv(0x30, _der_oid("1.3.101.112")), key.sign
    raise config_error(f"OCSP signing with {type(key).__name__} keys is not supported")


@dataclass(frozen=True)
class OCSPSigner:
    """OCSPSigner is a delegated responder: the issuer, its OCSP-signing certificate, and key."""

    issuer_cert: x509.Certificate
    responder_cert: x509.Certificate
    responder_key: CertificateIssuerPrivateKeyTypes
    matcher: IssuerMatcher = field(init=False, repr=False, compare=False)
    _responder_id: bytes = field(init=False, repr=False, compare=False)
    _signature_algorithm: bytes = field(init=False, repr=False, compare=False)
    _sign: Callable[[bytes], bytes] = field(init=False, repr=False, compare=False)
    _certs: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # RFC 6960 §4.2.2.2: "This certificate MUST be issued directly to the responder by the
        # cognizant CA" and the delegation is marked "by the inclusion of id-kp-OCSPSigning in
        # an extended key usage certificate extension".
        try:
            self.responder_cert.verify_directly_issued_by(self.issuer_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise config_error(
                f"responder certificate is not issued by the issuer: {exc}"
            ) from None
        try:
            eku = self.responder_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            raise config_error("responder certificate has no extended key usage") from None
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku.value:
            raise config_error("responder certificate lacks id-kp-OCSPSigning")
        if self.responder_key.public_key() != self.responder_cert.public_key():
            raise config_error("responder key does not match the responder certificate")
        _, key_bits = _subject_and_key_bits(self.responder_cert)
        signature_algorithm, sign = _signature_scheme(self.responder_key)
        set_ = object.__setattr__
        set_(self, "matcher", IssuerMatcher(self.issuer_cert))
        # RFC 6960 §4.2.1: "KeyHash ::= OCTET STRING -- SHA-1 hash of responder's public key
        # (i.e., the SHA-1 hash of the value of the BIT STRING subjectPublicKey [excluding the
        # tag, length, and number of unused bits] in the responder's certificate)". byKey is 24
        # octets where byName repeats the whole subject; RFC 9919 (RFC 5019bis) §2.2.2: "Newer
        # responders that conform to this profile MUST use the byKey field to represent the
        # ResponderID to reduce the size of the response."
        key_hash = hashlib.sha1(key_bits, usedforsecurity=False).digest()
        set_(self, "_responder_id", tlv(0xA2, tlv(0x04, key_hash)))
        set_(self, "_signature_algorithm", signature_algorithm)
        set_(self, "_sign", sign)
        # RFC 5019 §2.2.2: "If the response is signed by a delegate of the issuing CA, a valid
        # responder certificate MUST be referenced in the BasicOCSPResponse.certs structure."
        responder_der = self.responder_cert.public_bytes(Encoding.DER)
        set_(self, "_certs", tlv(0xA0, tlv(0x30, responder_der)))


def _single_response(answer: SingleAnswer) -> bytes:
    """Encodes one SingleResponse around the CertID bytes as the request sent them."""
    return tlv(
        0x30,
        answer.cert_id.der
        + answer.status.der()
        + _der_generalized_time(answer.this_update)
        + tlv(0xA0, _der_generalized_time(answer.next_update)),
    )


def build_response(
    signer: OCSPSigner,
    answers: Sequence[SingleAnswer],
    produced_at: datetime.datetime,
    nonce: bytes | None = None,
    extended_revoke: bool = False,
) -> bytes:
    """Builds and signs a successful BasicOCSPResponse for answers, as DER; RFC 6960 §4.2."""
    if not answers:
        raise bad_request("an OCSP response needs at least one answer")
    if produced_at.tzinfo is None:
        raise bad_request("producedAt must be an aware datetime")
    singles = []
    for answer in answers:
        if answer.this_update.tzinfo is None or answer.next_update.tzinfo is None:
            raise bad_request("thisUpdate and nextUpdate must be aware datetimes")
        # RFC 5019 §2.2.4 and RFC 6960 §4.2.2.1: a response past nextUpdate is stale, so one
        # whose nextUpdate is not after thisUpdate is useless.
        if answer.next_update <= answer.this_update:
            raise bad_request("nextUpdate must be after thisUpdate")
        # A delegated responder speaks only for its own issuer (RFC 6960 §4.2.2.2); a CertID
        # of another issuer may only be answered unknown.
        if answer.status.kind is not CertStatusKind.UNKNOWN and not signer.matcher.matches(
            answer.cert_id
        ):
            raise internal("answer names a certificate of another issuer")
        singles.append(_single_response(answer))

    extensions = b""
    if nonce is not None:
        if not nonce:
            raise bad_request("an empty nonce cannot be echoed")
        # RFC 8954 §2.1: "in responses, it would be included as one of the
        # responseExtensions"; the request's extnValue octets go back unchanged.
        extensions += tlv(0x30, _NONCE_EXTENSION_PREFIX + tlv(0x04, nonce))
    if extended_revoke:
        extensions += _EXTENDED_REVOKE_EXTENSION
    response_data = tlv(
        0x30,
        signer._responder_id
        + _der_generalized_time(produced_at)
        + tlv(0x30, b"".join(singles))
        + (tlv(0xA1, tlv(0x30, extensions)) if extensions else b""),
    )
    # RFC 6960 §4.2.1: "The value for signature SHALL be computed on the hash of the DER
    # encoding of ResponseData."
    signature = signer._sign(response_data)
    basic = tlv(
        0x30,
        response_data
        + signer._signature_algorithm
        + tlv(0x03, b"\x00" + signature)
        + signer._certs,
    )
    response_bytes = tlv(0x30, _BASIC_RESPONSE_TYPE + tlv(0x04, basic))
    # responseStatus successful (0), then responseBytes [0] EXPLICIT.
    return tlv(0x30, b"\x0a\x01\x00" + tlv(0xA0, response_bytes))


_ERROR_STATUSES = frozenset(
    {
        x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR,
        x509_ocsp.OCSPResponseStatus.TRY_LATER,
        x509_ocsp.OCSPResponseStatus.SIG_REQUIRED,
        x509_ocsp.OCSPResponseStatus.UNAUTHORIZED,
    }
)


def build_error_response(status: x509_ocsp.OCSPResponseStatus) -> bytes:
    """Builds an unsigned error OCSPResponse with no responseBytes; RFC 6960 §4.2.1."""
    # RFC 6960 §2.3: "These messages are not signed."
    if status not in _ERROR_STATUSES:
        raise internal(f"{status.name} is not an OCSP error status")
    return tlv(0x30, b"\x0a\x01" + bytes((status.value,)))
