"""IDevID (IEEE 802.1AR) checks: the path from a device's manufacturer certificate to an anchor.

The TLS layer has already verified the client's chain against the union of every label's
manufacturer anchors and our own CAs; which anchors a label trusts, and whether the path
obeys RFC 5280 (CA flags, validity, key usage, path length), is checked again here with
`cryptography.x509.verification`, from the certificates the client sent (leaf first) plus
the intermediates the label's configuration lists.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from pki.errors import ErrorKind, PKIError

# Manufacturer root → intermediates → IDevID; deeper paths are not IDevID hierarchies.
MAX_CHAIN_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class IDevID:
    """IDevID is a manufacturer certificate whose path to a trusted anchor verified."""

    device_id: str
    sha256: str
    issuer: str
    serial: str
    anchor_sha256: str
    anchor_subject: str


def sha256_hex(cert: x509.Certificate) -> str:
    """Returns the SHA-256 fingerprint of a certificate's DER, in lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _forbidden(message: str) -> PKIError:
    return PKIError(ErrorKind.FORBIDDEN, message)


def _ee_policy() -> ExtensionPolicy:
    # An IDevID names its device in the subject (802.1AR 8.6: serialNumber); SAN and AKI are
    # optional there. Basic constraints, key usage and EKU keep the Web PKI checks: a CA
    # certificate or a serverAuth-only certificate is no device identity.
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
    )


def verify_path(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> list[x509.Certificate]:
    """Builds and checks the path leaf → anchor; returns it, leaf first, anchor last."""
    if not chain:
        raise _forbidden("no client certificate")
    if not anchors:
        raise _forbidden("the label trusts no manufacturer")
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy())
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(chain[0], [*chain[1:], *intermediates])
    except VerificationError as e:
        raise _forbidden(f"the manufacturer certificate does not verify: {_reason(e)}") from None
    return list(verified.chain)


def _reason(error: VerificationError) -> str:
    # "validation failed: candidates exhausted: cert is not valid at validation time (...)":
    # keep the last reason, without the certificate dump.
    text = str(error).split(" (encountered", 1)[0]
    return text.rsplit(": ", 1)[-1][:200]


def identify(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    now: datetime.datetime,
    device_id_attribute: str,
) -> IDevID:
    """Verifies an IDevID's path and reads the device ID from its subject."""
    path = verify_path(chain, anchors, intermediates, now)
    leaf, anchor = path[0], path[-1]
    oid = NameOID.SERIAL_NUMBER if device_id_attribute == "serialNumber" else NameOID.COMMON_NAME
    attrs = leaf.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        raise _forbidden(
            f"the manufacturer certificate must name exactly one subject {device_id_attribute}"
        )
    return IDevID(
        device_id=str(attrs[0].value),
        sha256=sha256_hex(leaf),
        issuer=leaf.issuer.rfc4514_string()[:512],
        serial=format(leaf.serial_number, "x"),
        anchor_sha256=sha256_hex(anchor),
        anchor_subject=anchor.subject.rfc4514_string(),
    )
