"""Builders of test CSRs and keys."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


def device_csr(
    device_id: str,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    *,
    extra: list[x509.NameAttribute] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.CertificateSigningRequest, CertificateIssuerPrivateKeyTypes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id)] + (extra or [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()), key  # type: ignore[arg-type]


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)
