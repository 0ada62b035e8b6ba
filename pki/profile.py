"""Profiles turn a checked request into a CertificateBuilder with the profile's extensions."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from pki.config import ProfileConfig, URLConfig
from pki.errors import policy

_EKU = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING,
}


@dataclasses.dataclass(frozen=True)
class IssuerView:
    """IssuerView is what a profile needs to know of the CA that signs: name, key, URLs."""

    issuer_id: str
    name: x509.Name
    public_key: CertificatePublicKeyTypes
    not_after: datetime.datetime | None  # None for a self-signed certificate


def crl_url(urls: URLConfig, issuer_id: str) -> str:
    """Returns where the CRL of an issuer is published."""
    return f"{urls.crl}/{issuer_id}.crl"


def delta_crl_url(urls: URLConfig, issuer_id: str) -> str:
    """Returns where the delta CRL of an issuer is published."""
    return f"{urls.crl}/{issuer_id}-delta.crl"


def ca_issuers_url(urls: URLConfig, issuer_id: str) -> str:
    """Returns where the certificate of an issuer can be downloaded (DER)."""
    return f"{urls.ca_issuers}/{issuer_id}.der"


def _key_usage(names: Sequence[str]) -> x509.KeyUsage:
    n = set(names)
    return x509.KeyUsage(
        digital_signature="digital_signature" in n,
        content_commitment="content_commitment" in n,
        key_encipherment="key_encipherment" in n,
        data_encipherment="data_encipherment" in n,
        key_agreement="key_agreement" in n,
        key_cert_sign="key_cert_sign" in n,
        crl_sign="crl_sign" in n,
        encipher_only=False,
        decipher_only=False,
    )


def certificate_builder(
    profile: ProfileConfig,
    *,
    serial: int,
    subject: x509.Name,
    sans: tuple[x509.GeneralName, ...],
    public_key: CertificatePublicKeyTypes,
    issuer: IssuerView,
    urls: URLConfig,
    now: datetime.datetime,
    validity_days: int | None = None,
) -> x509.CertificateBuilder:
    """Builds the unsigned certificate for a profile; the caller lints, records and signs it."""
    not_before = now - datetime.timedelta(seconds=profile.backdate_seconds)
    not_after = now + datetime.timedelta(days=validity_days or profile.validity_days)
    if issuer.not_after is not None:
        if issuer.not_after <= now:
            raise policy(f"issuer {issuer.issuer_id} has expired")
        # A certificate outliving its issuer cannot be validated for the rest of its life.
        not_after = min(not_after, issuer.not_after)
    is_ca = profile.kind in ("root", "intermediate")
    builder = (
        x509.CertificateBuilder()
        .serial_number(serial)
        .subject_name(subject)
        .issuer_name(issuer.name)
        .public_key(public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280 4.2.1.9: "Conforming CAs MUST include this extension in all CA
        # certificates ... and MUST mark the extension as critical".
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=profile.path_length if is_ca else None),
            critical=True,
        )
        .add_extension(_key_usage(profile.key_usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    # RFC 5280 4.2.1.1: the keyIdentifier "MUST be included in all certificates generated
    # by conforming CAs to facilitate certification path construction"; the exception for
    # self-signed roots is optional, and linting asks for it there too.
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key),  # type: ignore[arg-type]
        critical=False,
    )
    if profile.extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([_EKU[e] for e in profile.extended_key_usage]), critical=False
        )
    if sans:
        # RFC 5280 4.2.1.6: "If the subject field contains an empty sequence, then the
        # issuing CA MUST include a subjectAltName extension that is marked as critical."
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=len(subject) == 0
        )
    elif len(subject) == 0:
        raise policy("a certificate needs a subject or a subject alternative name")
    if profile.name_constraints is not None:
        nc = profile.name_constraints
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(d) for d in nc.permitted_dns] or None,
                excluded_subtrees=[x509.DNSName(d) for d in nc.excluded_dns] or None,
            ),
            critical=True,
        )
    if profile.kind != "root" and profile.crl_distribution_point:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(crl_url(urls, issuer.issuer_id))],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
    if profile.kind != "root" and profile.authority_info_access:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP,
                        x509.UniformResourceIdentifier(urls.ocsp),
                    ),
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(ca_issuers_url(urls, issuer.issuer_id)),
                    ),
                ]
            ),
            critical=False,
        )
    if profile.ocsp_no_check:
        # RFC 6960 4.2.2.2.1: a responder certificate "MAY" carry id-pkix-ocsp-nocheck so
        # that clients do not check it; its validity must then be short.
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
    return builder
