"""CRL building: full and delta CRLs signed by an issuer key, as DER (RFC 5280 §5).

The list of revoked certificates is encoded here, the rest by cryptography. A full CRL can
list 10^6 entries, and building a RevokedCertificate object per entry for cryptography's
builder (and a dataclass before it) took over a third of the time of publishing one. So
cryptography builds the CRL without
entries (version, signature algorithm, issuer, thisUpdate, nextUpdate, crlExtensions), signed
with a throwaway key of the issuer key's type; the entries, whose encoding is simple, are
spliced into that TBSCertList, and the issuer key signs the result. The publisher parses what
was signed and checks the signature (pki/crl_publisher.py), and tests compare the encoding
with cryptography's, openssl's and pkilint's reading of it.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from pki.der import der_length, tlv
from pki.errors import bad_request, config_error, internal

# RFC 5280 §5.2.3: "CRL issuers MUST NOT use CRLNumber values longer than 20 octets."
# A positive INTEGER of 20 octets keeps its top bit clear, so the largest is 2**159 - 1.
MAX_CRL_NUMBER = 2**159 - 1
# RFC 5280 §4.1.2.2: "Conforming CAs MUST NOT use serialNumber values longer than 20 octets."
MAX_SERIAL = 2**159 - 1

# The digests cryptography's CRL builder accepts; None is for Ed25519 and Ed448 keys.
CRLHashAlgorithm = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

_SHA256 = hashes.SHA256()
_UTC = datetime.UTC


class RevokedEntry(NamedTuple):
    """RevokedEntry is one serial to list on a CRL, with when and why it was revoked.

    A tuple rather than a dataclass: a full CRL holds 10^6 of them."""

    serial: int
    revoked_at: datetime.datetime
    reason: x509.ReasonFlags | None = None
    # RFC 5280 §5.3.1: "removeFromCRL (8) ... may only appear in delta CRLs and indicates that a
    # certificate is to be removed from a CRL because either the certificate expired or was
    # removed from hold."
    remove_from_crl: bool = False


# RFC 5280 §5.3.1: CRLReason ::= ENUMERATED { unspecified (0), keyCompromise (1),
# cACompromise (2), affiliationChanged (3), superseded (4), cessationOfOperation (5),
# certificateHold (6), -- value 7 is not used, removeFromCRL (8), privilegeWithdrawn (9),
# aACompromise (10) }
_REASON_CODES = {
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}


def _reason_extensions(code: int) -> bytes:
    """Encodes the crlEntryExtensions of an entry that has only a reason code.

    crlEntryExtensions Extensions ::= SEQUENCE OF Extension; Extension ::= SEQUENCE { extnID
    id-ce-cRLReasons (2.5.29.21), critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING
    containing the DER ENUMERATED }. RFC 5280 §5.3.1: "The reasonCode is a non-critical CRL
    entry extension", and DER (X.690 §11.5) leaves out a field equal to its DEFAULT."""
    enumerated = bytes((0x0A, 0x01, code))
    extension = tlv(0x30, tlv(0x06, bytes.fromhex("551d15")) + tlv(0x04, enumerated))
    return tlv(0x30, extension)


def _children(der: bytes) -> list[bytes]:
    """Splits the content of the DER constructed value that starts `der` into its children."""
    _, start, end = _header(der, 0)
    children = []
    while start < end:
        _, _, child_end = _header(der, start)
        children.append(der[start:child_end])
        start = child_end
    return children


def _header(der: bytes, at: int) -> tuple[int, int, int]:
    """Reads the TLV at `at`: its tag, where its content starts and where it ends."""
    tag, first = der[at], der[at + 1]
    if first < 0x80:
        return tag, at + 2, at + 2 + first
    count = first & 0x7F
    length = int.from_bytes(der[at + 2 : at + 2 + count], "big")
    return tag, at + 2 + count, at + 2 + count + length


# The entry extensions of each reason; the unspecified reason and no reason have none.
# RFC 5280 §5.3.1: "the reason code CRL entry extension SHOULD be absent instead of using the
# unspecified (0) reasonCode value." removeFromCRL is not a reason an entry is given: it comes
# from RevokedEntry.remove_from_crl, and only in a delta CRL.
_ENTRY_EXTENSIONS: dict[x509.ReasonFlags | None, bytes] = {
    None: b"",
    x509.ReasonFlags.unspecified: b"",
    **{
        flag: _reason_extensions(code)
        for flag, code in _REASON_CODES.items()
        if flag is not x509.ReasonFlags.remove_from_crl
    },
}
_REMOVE_FROM_CRL = _reason_extensions(_REASON_CODES[x509.ReasonFlags.remove_from_crl])


def _revoked_certificates(entries: Iterable[RevokedEntry], *, is_delta: bool) -> bytearray:
    """Encodes the entries of revokedCertificates in DER, checking each one; RFC 5280 §5.1.

    revokedCertificates SEQUENCE OF SEQUENCE { userCertificate CertificateSerialNumber,
    revocationDate Time, crlEntryExtensions Extensions OPTIONAL }. Returns the concatenated
    entries, without the SEQUENCE OF header. One formatting operation per entry: this loop
    runs 10^6 times for a large CRL."""
    # One growing buffer rather than 10^6 bytes objects alive until a join.
    encoded = bytearray()
    seen: set[int] = set()
    add = seen.add
    extensions_of = _ENTRY_EXTENSIONS.get
    for serial, revoked_at, reason, remove_from_crl in entries:
        if serial < 0 or serial > MAX_SERIAL:
            raise bad_request(f"serial {serial:x} is not a positive integer of at most 20 octets")
        if serial in seen:
            raise bad_request(f"serial {serial:x} appears twice")
        add(serial)
        if revoked_at.tzinfo is not _UTC:
            if revoked_at.utcoffset() is None:
                raise bad_request(f"revocation time of serial {serial:x} has no time zone")
            revoked_at = revoked_at.astimezone(_UTC)
        if remove_from_crl:
            if not is_delta:
                raise bad_request("removeFromCRL entries may only appear in delta CRLs")
            extensions = _REMOVE_FROM_CRL
        else:
            found = extensions_of(reason)
            if found is None:
                if reason is x509.ReasonFlags.remove_from_crl:
                    raise bad_request("use remove_from_crl=True rather than reason removeFromCRL")
                raise bad_request(f"{reason!r} is not a reason code for a CRL entry")
            extensions = found
        # X.690 §8.3: an INTEGER is two's complement in the fewest octets (§8.3.2), so a
        # positive serial whose top bit is set gets a leading zero octet.
        size = serial.bit_length() // 8 + 1
        year = revoked_at.year
        # RFC 5280 §5.1.2.6: "The time for revocationDate MUST be expressed as described in
        # Section 5.1.2.4", which says "CRL issuers conforming to this profile MUST encode
        # thisUpdate as UTCTime for dates through the year 2049. CRL issuers conforming to
        # this profile MUST encode thisUpdate as GeneralizedTime for dates in the year 2050 or
        # later." UTCTime's two-digit years start in 1950 (§4.1.2.5.1). Both are in Zulu time
        # with seconds and, §4.1.2.5.2, "MUST NOT include fractional seconds".
        if 1950 <= year < 2050:
            time = b"\x17\x0d%02d%02d%02d%02d%02d%02dZ" % (
                year % 100,
                revoked_at.month,
                revoked_at.day,
                revoked_at.hour,
                revoked_at.minute,
                revoked_at.second,
            )
        else:
            if year < 1950:
                # As cryptography's builder: no certificate of this CA is that old.
                raise bad_request(f"revocation time of serial {serial:x} is before 1950")
            time = b"\x18\x0f%04d%02d%02d%02d%02d%02dZ" % (
                year,
                revoked_at.month,
                revoked_at.day,
                revoked_at.hour,
                revoked_at.minute,
                revoked_at.second,
            )
        # An entry's content is at most 22 (serial) + 17 (time) + 14 (extensions) octets, so
        # both lengths fit the one-octet short form.
        encoded += b"\x30%c\x02%c%b%b%b" % (
            2 + size + len(time) + len(extensions),
            size,
            serial.to_bytes(size),
            time,
            extensions,
        )
    return encoded


@functools.cache
def _template_key(kind: str) -> CertificateIssuerPrivateKeyTypes:
    """Returns a throwaway key, made once per process, to sign the CRL template with.

    The template's signature is thrown away; only its signature algorithm identifier is kept,
    which depends on the key's type and the hash but not on the key (or the curve or modulus,
    for ECDSA and PKCS#1 v1.5). The CA key never signs the template: it signs only the CRL."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ed448.Ed448PrivateKey.generate()


def _key_kind(key: CertificateIssuerPrivateKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ec"
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "ed448"
    raise config_error(f"unsupported issuer key type {type(key).__name__}")


def _sign(
    key: CertificateIssuerPrivateKeyTypes, data: bytes, hash_algorithm: CRLHashAlgorithm | None
) -> bytes:
    """Signs with the algorithm cryptography's CRL builder uses for this key and hash."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.sign(data)
    if hash_algorithm is None:
        raise bad_request("a hash algorithm is needed for ECDSA and RSA signatures")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hash_algorithm))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hash_algorithm)
    raise config_error(f"unsupported issuer key type {type(key).__name__}")


def _with_entries(tbs_der: bytes, revoked_der: bytes | bytearray) -> bytes:
    """Returns the TBSCertList with the revokedCertificates field before crlExtensions.

    TBSCertList ::= SEQUENCE { version, signature, issuer, thisUpdate, nextUpdate OPTIONAL,
    revokedCertificates SEQUENCE OF ... OPTIONAL, crlExtensions [0] EXPLICIT OPTIONAL }."""
    fields = _children(tbs_der)
    tags = [f[0] for f in fields]
    # cryptography writes version v2 and nextUpdate always; the template has no entries.
    if tags[:3] != [0x02, 0x30, 0x30] or len(fields) not in (5, 6) or tags[5:] not in ([], [0xA0]):
        raise internal("unexpected TBSCertList layout from the CRL template")
    # RFC 5280 §5.1.2.6: "When there are no revoked certificates, the revoked certificates list
    # MUST be absent."
    if not revoked_der:
        return tbs_der
    revoked = b"".join((b"\x30", der_length(len(revoked_der)), revoked_der))
    content = b"".join((*fields[:5], revoked, *fields[5:]))
    return b"".join((b"\x30", der_length(len(content)), content))


def _authority_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Returns the AKI that names the issuer certificate's subject key identifier."""
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # RFC 5280 §4.2.1.2: "this extension MUST appear in all conforming CA certificates".
        raise config_error("issuer certificate has no subject key identifier") from None
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _distribution_point(url: str) -> x509.DistributionPoint:
    return x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)],
        relative_name=None,
        reasons=None,
        crl_issuer=None,
    )


def build_crl(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    entries: Iterable[RevokedEntry],
    crl_number: int,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
    distribution_point_url: str | None,
    freshest_crl_url: str | None = None,
    delta_of: int | None = None,
    hash_algorithm: CRLHashAlgorithm | None = _SHA256,
) -> bytes:
    """Builds and signs a full CRL, or a delta CRL when delta_of is set, as DER; RFC 5280 §5."""
    if this_update.tzinfo is None or next_update.tzinfo is None:
        raise bad_request("thisUpdate and nextUpdate must be aware datetimes")
    # RFC 5280 §5.1.2.5: "nextUpdate ... indicates the date by which the next CRL will be
    # issued"; one that is not after thisUpdate says nothing.
    if next_update <= this_update:
        raise bad_request("nextUpdate must be after thisUpdate")
    # RFC 5280 §5.2.3: "The CRL number is a non-critical CRL extension that conveys a
    # monotonically increasing sequence number" and "MUST NOT use CRLNumber values longer
    # than 20 octets."
    if crl_number < 0 or crl_number > MAX_CRL_NUMBER:
        raise bad_request("CRL number must be between 0 and 2**159 - 1")
    if delta_of is not None:
        # RFC 5280 §5.2.4: the delta lists changes since the base, so the base comes first.
        if delta_of < 0 or delta_of >= crl_number:
            raise bad_request("a delta CRL's base CRL number must be below its own CRL number")
        if freshest_crl_url is not None:
            # RFC 5280 §5.2.6: the freshest CRL extension points from a complete CRL to its
            # deltas; a delta pointing at deltas is meaningless.
            raise bad_request("a delta CRL does not carry a Freshest CRL extension")
    if issuer_key.public_key() != issuer_cert.public_key():
        raise internal("issuer key does not match the issuer certificate")

    extensions: list[x509.Extension[x509.ExtensionType]] = [
        # RFC 5280 §5.2.1: "Conforming CRL issuers MUST use the key identifier method, and MUST
        # include this extension in all CRLs issued."
        x509.Extension(
            x509.AuthorityKeyIdentifier.oid, False, _authority_key_identifier(issuer_cert)
        ),
        x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(crl_number)),
    ]
    if delta_of is not None:
        # RFC 5280 §5.2.4: "When a conforming CRL issuer generates a delta CRL, the delta CRL
        # MUST include a critical delta CRL indicator extension."
        extensions.append(
            x509.Extension(x509.DeltaCRLIndicator.oid, True, x509.DeltaCRLIndicator(delta_of))
        )
    if distribution_point_url is not None:
        # RFC 5280 §5.2.5: "Conforming CRL issuers MUST mark this extension as critical." A delta
        # must carry the same IDP as its base (§5.2.4 (b)(2): "the values for each of the fields
        # in the extensions are the same in both CRLs"), so pass the full CRL's URL for both.
        idp = x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(distribution_point_url)],
            relative_name=None,
            only_contains_user_certs=False,
            only_contains_ca_certs=False,
            only_some_reasons=None,
            indirect_crl=False,
            only_contains_attribute_certs=False,
        )
        extensions.append(x509.Extension(idp.oid, True, idp))
    if freshest_crl_url is not None:
        # RFC 5280 §5.2.6: "The extension MUST be marked as non-critical by conforming CRL
        # issuers."
        freshest = x509.FreshestCRL([_distribution_point(freshest_crl_url)])
        extensions.append(x509.Extension(freshest.oid, False, freshest))

    revoked_der = _revoked_certificates(entries, is_delta=delta_of is not None)
    template = x509.CertificateRevocationListBuilder(
        issuer_name=issuer_cert.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=extensions,
    ).sign(_template_key(_key_kind(issuer_key)), hash_algorithm)
    tbs_der = _with_entries(template.tbs_certlist_bytes, revoked_der)
    del revoked_der  # 10^6 entries are ~45 MB; the TBS holds a copy now
    # RFC 5280 §5.1.1.2: signatureAlgorithm "MUST contain the same algorithm identifier as the
    # signature field in the sequence tbsCertList", which the template's has.
    signature_algorithm = _children(template.public_bytes(Encoding.DER))[1]
    signature = _sign(issuer_key, tbs_der, hash_algorithm)
    # CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue BIT STRING }
    # with no unused bits in the signature's BIT STRING.
    signature_value = b"".join((b"\x03", der_length(len(signature) + 1), b"\x00", signature))
    length = len(tbs_der) + len(signature_algorithm) + len(signature_value)
    return b"".join((b"\x30", der_length(length), tbs_der, signature_algorithm, signature_value))
