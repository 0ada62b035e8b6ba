"""CRL building: full and delta CRLs signed by an issuer key, as DER (RFC 5280 §5)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from pki.errors import bad_request, config_error, internal

# RFC 5280 §5.2.3: "CRL issuers MUST NOT use CRLNumber values longer than 20 octets."
# A positive INTEGER of 20 octets keeps its top bit clear, so the largest is 2**159 - 1.
MAX_CRL_NUMBER = 2**159 - 1

# The digests cryptography's CRL builder accepts; None is for Ed25519 and Ed448 keys.
CRLHashAlgorithm = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class RevokedEntry:
    """RevokedEntry is one serial to list on a CRL, with when and why it was revoked."""

    serial: int
    revoked_at: datetime.datetime
    reason: x509.ReasonFlags | None = None
    # RFC 5280 §5.3.1: "removeFromCRL (8) ... may only appear in delta CRLs and indicates that a
    # certificate is to be removed from a CRL because either the certificate expired or was
    # removed from hold."
    remove_from_crl: bool = False


def _reason_extensions() -> dict[x509.ReasonFlags | None, list[x509.Extension[x509.ExtensionType]]]:
    """Returns one shared entry-extension list per reason, so 10^6 entries do not build 10^6."""
    table: dict[x509.ReasonFlags | None, list[x509.Extension[x509.ExtensionType]]] = {None: []}
    for flag in x509.ReasonFlags:
        # RFC 5280 §5.3.1: "the reason code CRL entry extension SHOULD be absent instead of
        # using the unspecified (0) reasonCode value."
        if flag is x509.ReasonFlags.unspecified:
            table[flag] = []
            continue
        ext: x509.Extension[x509.ExtensionType] = x509.Extension(
            x509.CRLReason.oid, False, x509.CRLReason(flag)
        )
        table[flag] = [ext]
    return table


_REASON_EXTENSIONS = _reason_extensions()
# ReasonFlags that are not reason codes on an entry: the DistributionPoint "reasons" bit names.
_NOT_ENTRY_REASONS = frozenset({x509.ReasonFlags.remove_from_crl})


def _revoked_certificates(
    entries: Iterable[RevokedEntry], *, is_delta: bool
) -> list[x509.RevokedCertificate]:
    """Turns entries into cryptography's RevokedCertificate objects, checking each one."""
    revoked: list[x509.RevokedCertificate] = []
    seen: set[int] = set()
    remove_ext = _REASON_EXTENSIONS[x509.ReasonFlags.remove_from_crl]
    for entry in entries:
        serial = entry.serial
        if serial < 0 or serial.bit_length() > 159:
            raise bad_request(f"serial {serial:x} is not a positive integer of at most 20 octets")
        if serial in seen:
            raise bad_request(f"serial {serial:x} appears twice")
        seen.add(serial)
        if entry.revoked_at.tzinfo is None:
            raise bad_request(f"revocation time of serial {serial:x} has no time zone")
        if entry.remove_from_crl:
            if not is_delta:
                raise bad_request("removeFromCRL entries may only appear in delta CRLs")
            extensions = remove_ext
        else:
            if entry.reason in _NOT_ENTRY_REASONS:
                raise bad_request("use remove_from_crl=True rather than reason removeFromCRL")
            extensions = _REASON_EXTENSIONS[entry.reason]
        revoked.append(x509.RevokedCertificateBuilder(serial, entry.revoked_at, extensions).build())
    return revoked


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

    # cryptography's add_revoked_certificate() copies its list on each call (quadratic), so
    # the whole list goes to the constructor at once.
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer_cert.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=extensions,
        revoked_certificates=_revoked_certificates(entries, is_delta=delta_of is not None),
    )
    return builder.sign(issuer_key, hash_algorithm).public_bytes(Encoding.DER)
