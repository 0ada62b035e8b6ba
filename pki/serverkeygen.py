"""Server-side key generation for EST: make a device key, encode it, encrypt it to a recipient.

Keys made here are generated in software, never in the CA's token. A server-generated key
exists to leave the CA: it travels to the device in the serverkeygen response (RFC 7030 4.4).
A key made in the token with CKA_EXTRACTABLE=false could not leave at all, and making it
extractable would put material that is handed out into the token that guards the CA's own
keys, where one mistaken attribute or search would mix them. So the token holds only CA and
OCSP-signer keys (DESIGN.md invariant 2), and device keys live only in this process's memory
for as long as it takes to answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from asn1crypto import algos, cms, core, keys
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from pki.errors import bad_request, policy

ServerGeneratedKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")

OID_DECRYPT_KEY_ID = "1.2.840.113549.1.9.16.2.37"
OID_ASYMMETRIC_DECRYPT_KEY_ID = "1.2.840.113549.1.9.16.2.54"
# RFC 5753 7.1.4: ECDH with the ANSI X9.63 KDF over SHA-256 (openssl: dhSinglePass-stdDH-sha256kdf).
OID_DH_SINGLE_PASS_STD_DH_SHA256_KDF = "1.3.132.1.11.1"  # noqa: S105 (an OID)


def generate_key(key_type: str) -> ServerGeneratedKey:
    """Generates a device key pair in software for server-side key generation. See RFC 7030 4.4."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise policy(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")


def pkcs8_der(key: ServerGeneratedKey) -> bytes:
    """Encodes the key as an unencrypted PKCS#8 PrivateKeyInfo, DER. See RFC 7030 4.4.2."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def encrypt_key_for_recipient(key: ServerGeneratedKey, recipient_cert: x509.Certificate) -> bytes:
    """Wraps the PKCS#8 key in CMS EnvelopedData for the certificate's key. See RFC 7030 4.4.2."""
    content_key = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plaintext = padder.update(pkcs8_der(key)) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()

    public_key = recipient_cert.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        recipient_info = _key_transport(content_key, recipient_cert, public_key)
        version = "v0"
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        recipient_info = _key_agreement(content_key, recipient_cert, public_key)
        # RFC 5652 6.1: version is 2 when any RecipientInfo has a version other than 0.
        version = "v2"
    else:
        raise policy("the recipient certificate's key is neither RSA nor EC")

    enveloped = cms.EnvelopedData(
        {
            "version": version,
            "recipient_infos": [recipient_info],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {
                    "algorithm": "aes256_cbc",
                    "parameters": core.OctetString(iv),
                },
                "encrypted_content": ciphertext,
            },
        }
    )
    info = cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped})
    der: bytes = info.dump()
    return der


def _issuer_and_serial(cert: x509.Certificate) -> cms.IssuerAndSerialNumber:
    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return cms.IssuerAndSerialNumber(
        {"issuer": parsed.issuer, "serial_number": parsed.serial_number}
    )


def _key_transport(
    content_key: bytes, cert: x509.Certificate, public_key: rsa.RSAPublicKey
) -> cms.RecipientInfo:
    # RSAES-OAEP with SHA-256 rather than PKCS#1 v1.5, whose padding oracles (Bleichenbacher)
    # RFC 8017 7.2 warns about; openssl cms decrypts both.
    encrypted_key = public_key.encrypt(
        content_key,
        asym_padding.OAEP(
            mgf=asym_padding.MGF1(algorithm=hashes.SHA256()),
            algorithm=hashes.SHA256(),
            label=None,
        ),
    )
    oaep = algos.RSAESOAEPParams(
        {
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        }
    )
    return cms.RecipientInfo(
        name="ktri",
        value=cms.KeyTransRecipientInfo(
            {
                "version": "v0",
                "rid": cms.RecipientIdentifier(
                    name="issuer_and_serial_number", value=_issuer_and_serial(cert)
                ),
                "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": oaep},
                "encrypted_key": encrypted_key,
            }
        ),
    )


class _EccCmsSharedInfo(core.Sequence):  # type: ignore[misc]
    # RFC 5753 7.2: the KDF's SharedInfo.
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("key_info", cms.KeyEncryptionAlgorithm),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


def _key_agreement(
    content_key: bytes, cert: x509.Certificate, public_key: ec.EllipticCurvePublicKey
) -> cms.RecipientInfo:
    # RFC 5753 3.1.1 ephemeral-static ECDH: a fresh key on the recipient's curve, the X9.63
    # KDF over SHA-256 with ECC-CMS-SharedInfo, then AES-256 key wrap of the content key.
    ephemeral = ec.generate_private_key(public_key.curve)
    shared_secret = ephemeral.exchange(ec.ECDH(), public_key)
    wrap_algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"})
    shared_info = _EccCmsSharedInfo(
        {"key_info": wrap_algorithm, "supp_pub_info": (256).to_bytes(4, "big")}
    )
    kek = X963KDF(algorithm=hashes.SHA256(), length=32, sharedinfo=shared_info.dump()).derive(
        shared_secret
    )
    originator_key = keys.PublicKeyInfo.load(
        ephemeral.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return cms.RecipientInfo(
        name="kari",
        value=cms.KeyAgreeRecipientInfo(
            {
                "version": "v3",
                "originator": cms.OriginatorIdentifierOrKey(
                    name="originator_key", value=originator_key
                ),
                "key_encryption_algorithm": {
                    "algorithm": OID_DH_SINGLE_PASS_STD_DH_SHA256_KDF,
                    "parameters": wrap_algorithm,
                },
                "recipient_encrypted_keys": [
                    {
                        "rid": cms.KeyAgreementRecipientIdentifier(
                            name="issuer_and_serial_number", value=_issuer_and_serial(cert)
                        ),
                        "encrypted_key": aes_key_wrap(kek, content_key),
                    }
                ],
            }
        ),
    )


@dataclass(frozen=True)
class DecryptKeyRequest:
    """DecryptKeyRequest is the key a CSR asks the server to encrypt its new key to."""

    kind: Literal["symmetric", "asymmetric"]
    key_id: bytes


class _OctetStrings(core.SetOf):  # type: ignore[misc]
    _child_spec = core.OctetString


def requested_decrypt_key_id(csr: x509.CertificateSigningRequest) -> DecryptKeyRequest | None:
    """Reads the (Asymmetric)DecryptKeyIdentifier attribute of a CSR. See RFC 7030 4.4.1.2."""
    # cryptography's csr.attributes exposes only a raw value and a private tag, and rejects
    # some attribute shapes; asn1crypto reads the attribute set as it is on the wire.
    request = asn1_csr.CertificationRequest.load(csr.public_bytes(serialization.Encoding.DER))
    found: dict[str, list[bytes]] = {}
    for attribute in request["certification_request_info"]["attributes"]:
        oid = attribute["type"].dotted
        if oid not in (OID_DECRYPT_KEY_ID, OID_ASYMMETRIC_DECRYPT_KEY_ID):
            continue
        try:
            values = attribute["values"].parse(_OctetStrings)
            found.setdefault(oid, []).extend(value.native for value in values)
        except (ValueError, TypeError):
            raise bad_request(f"CSR attribute {oid} is not a set of OCTET STRING") from None
    if not found:
        return None
    if len(found) > 1:
        raise bad_request("CSR asks for both a symmetric and an asymmetric decryption key")
    oid, key_ids = next(iter(found.items()))
    if len(key_ids) != 1 or not key_ids[0]:
        raise bad_request(f"CSR attribute {oid} must hold exactly one non-empty key identifier")
    kind: Literal["symmetric", "asymmetric"] = (
        "symmetric" if oid == OID_DECRYPT_KEY_ID else "asymmetric"
    )
    return DecryptKeyRequest(kind=kind, key_id=key_ids[0])
