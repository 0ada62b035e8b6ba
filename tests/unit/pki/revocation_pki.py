"""A small in-memory PKI (root, intermediate, OCSP signer, leaves) and the tools that check it."""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkilint import loader, pkix, report
from pkilint.pkix import crl as pkilint_crl
from pkilint.pkix import extension as pkilint_extension
from pkilint.pkix import name as pkilint_name
from pkilint.pkix import ocsp as pkilint_ocsp
from pkilint.validation import ValidationFindingSeverity

CRL_URL = "http://va.example.test/crl/int.crl"
DELTA_CRL_URL = "http://va.example.test/crl/int-delta.crl"
OCSP_URL = "http://va.example.test/ocsp"

# openssl compares CRL and OCSP times with the real clock, so the test PKI lives around now.
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IoT PKI Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    *,
    ca: bool,
    extra: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class RevocationPKI:
    """RevocationPKI holds the hierarchy's certificates and keys."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    ocsp_signer: x509.Certificate
    ocsp_signer_key: ec.EllipticCurvePrivateKey
    leaves: list[x509.Certificate]

    def write(self, directory: Path) -> dict[str, Path]:
        """Writes every certificate as PEM into directory and returns the paths by role."""
        paths = {
            "root": directory / "root.pem",
            "int": directory / "int.pem",
            "signer": directory / "signer.pem",
            "chain": directory / "chain.pem",
        }
        paths["root"].write_bytes(self.root.public_bytes(Encoding.PEM))
        paths["int"].write_bytes(self.intermediate.public_bytes(Encoding.PEM))
        paths["signer"].write_bytes(self.ocsp_signer.public_bytes(Encoding.PEM))
        paths["chain"].write_bytes(
            self.root.public_bytes(Encoding.PEM) + self.intermediate.public_bytes(Encoding.PEM)
        )
        for i, leaf in enumerate(self.leaves):
            path = directory / f"leaf{i}.pem"
            path.write_bytes(leaf.public_bytes(Encoding.PEM))
            paths[f"leaf{i}"] = path
        return paths


def make_pki(leaf_count: int = 3) -> RevocationPKI:
    """Builds a P-256 root, intermediate, delegated OCSP signer and leaf_count leaves."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue(
        _name("Test Root"),
        root_key,
        None,
        root_key,
        1,
        ca=True,
        extra=[(_key_usage(key_cert_sign=True, crl_sign=True), True)],
    )
    int_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _issue(
        _name("Test Intermediate"),
        int_key,
        root,
        root_key,
        2,
        ca=True,
        extra=[(_key_usage(key_cert_sign=True, crl_sign=True), True)],
    )
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = _issue(
        _name("Test Intermediate OCSP Signer"),
        signer_key,
        intermediate,
        int_key,
        3,
        ca=False,
        extra=[
            (_key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
            (x509.OCSPNoCheck(), False),
        ],
    )
    crl_dp = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(CRL_URL)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(OCSP_URL)
            )
        ]
    )
    leaves = []
    for i in range(leaf_count):
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaves.append(
            _issue(
                _name(f"device-{i}"),
                leaf_key,
                intermediate,
                int_key,
                0x1000 + i,
                ca=False,
                extra=[
                    (_key_usage(digital_signature=True), True),
                    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                    (crl_dp, False),
                    (aia, False),
                ],
            )
        )
    return RevocationPKI(root, root_key, intermediate, int_key, signer, signer_key, leaves)


def openssl(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs the openssl command line and returns its output as text."""
    return subprocess.run(
        ["openssl", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def _serious(results: object) -> list[str]:
    """Returns the findings of severity ERROR or worse, as text."""
    findings = []
    for result in results:  # type: ignore[attr-defined]
        for description in result.finding_descriptions:
            if description.finding.severity <= ValidationFindingSeverity.ERROR:
                findings.append(repr(description))
    assert report.get_findings_count(results, ValidationFindingSeverity.ERROR) == len(findings)
    return findings


def lint_crl(crl_der: bytes) -> list[str]:
    """Lints a CRL with pkilint's PKIX profile (type CRL), as lint_crl does, returning errors."""
    validator = pkilint_crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(pkilint_name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(pkilint_extension.EXTENSION_MAPPINGS),
        ],
        [
            pkilint_crl.create_issuer_validator_container([]),
            pkilint_crl.create_validity_validator_container([]),
            pkilint_crl.create_extensions_validator_container([]),
        ],
    )
    doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(crl_der, "crl")
    return _serious(validator.validate(doc.root))


def lint_ocsp_response(response_der: bytes) -> list[str]:
    """Lints an OCSP response with pkilint's RFC 6960 validator, returning errors."""
    validator = pkilint_ocsp.create_pkix_ocsp_response_validator_container(
        [
            pkilint_ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(pkilint_name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(pkilint_extension.EXTENSION_MAPPINGS),
        ],
        [],
    )
    doc = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(response_der, "ocsp")
    return _serious(validator.validate(doc.root))
