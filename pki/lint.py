"""Linting of certificates, CRLs and OCSP responses with pkilint before they leave the CA."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pkilint import loader, pkix, validation
from pkilint.pkix import certificate, crl, extension, name, ocsp

from pki.errors import ErrorKind, PKIError

BLOCKING = ("ERROR", "FATAL")


@dataclasses.dataclass(frozen=True)
class Finding:
    """Finding is one pkilint result: its severity, code and where in the document."""

    severity: str
    code: str
    path: str
    message: str | None

    def __str__(self) -> str:
        text = f"{self.severity} {self.code} at {self.path}"
        return f"{text}: {self.message}" if self.message else text


@functools.cache
def _certificate_validator() -> Any:
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


@functools.cache
def _crl_validator(crl_type: str) -> Any:
    del crl_type  # the PKIX profile checks CRLs and ARLs alike
    return crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )


@functools.cache
def _ocsp_validator() -> Any:
    return ocsp.create_pkix_ocsp_response_validator_container(
        [
            ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )


def _findings(results: Any) -> list[Finding]:
    out = []
    for result in results:
        for desc in result.finding_descriptions:
            severity = desc.finding.severity
            out.append(
                Finding(
                    severity=str(getattr(severity, "name", severity)),
                    code=desc.finding.code,
                    path=str(result.node.path),
                    message=desc.message,
                )
            )
    return out


def _run(validator: Any, doc_loader: Any, der: bytes, what: str) -> list[Finding]:
    try:
        doc = doc_loader.load_der_document(der, what)
        return _findings(validator.validate(doc.root))
    except (ValueError, validation.ValidationFindingEncountered) as e:
        return [Finding("FATAL", "decoding_failed", what, str(e))]


def lint_certificate(cert_der: bytes) -> list[Finding]:
    """Returns every pkilint finding for a certificate under the RFC 5280 profile."""
    return _run(
        _certificate_validator(),
        loader.RFC5280CertificateDocumentLoader(),
        cert_der,
        "certificate",
    )


def lint_crl(crl_der: bytes, *, authority: bool = False) -> list[Finding]:
    """Returns every pkilint finding for a CRL (or, with authority, an ARL)."""
    return _run(
        _crl_validator("ARL" if authority else "CRL"),
        loader.RFC5280CertificateListDocumentLoader(),
        crl_der,
        "crl",
    )


def lint_ocsp_response(resp_der: bytes) -> list[Finding]:
    """Returns every pkilint finding for an OCSP response under RFC 6960."""
    return _run(
        _ocsp_validator(), loader.RFC6960OCSPResponseDocumentLoader(), resp_der, "ocsp-response"
    )


def blocking(findings: list[Finding]) -> list[Finding]:
    """Returns the findings that stop a document from being signed or served."""
    return [f for f in findings if f.severity in BLOCKING]


def require_clean(findings: list[Finding], what: str) -> None:
    """Raises a policy error naming the findings when any of them blocks."""
    bad = blocking(findings)
    if bad:
        detail = "; ".join(str(f) for f in bad)
        raise PKIError(ErrorKind.POLICY, f"{what} fails lint: {detail}")
