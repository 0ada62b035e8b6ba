"""CSR parsing and policy: what a profile lets a certificate request ask for."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AttributeOID, NameOID

from pki.config import ProfileConfig, forbidden_character
from pki.errors import bad_request, policy

MAX_CSR_BYTES = 16 * 1024

# Attribute short names of the configuration, their OIDs, and the order in which a
# normalised subject lists them (most general first, as X.500 names are read).
SUBJECT_OIDS: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "emailAddress": NameOID.EMAIL_ADDRESS,
}
_NAMES_BY_OID = {oid: short for short, oid in SUBJECT_OIDS.items()}

# RFC 5280 Appendix A upper bounds (ub-common-name 64, ub-serial-number 64, ...).
_UPPER_BOUNDS = {
    "C": 2,
    "ST": 128,
    "L": 128,
    "O": 64,
    "OU": 64,
    "CN": 64,
    "serialNumber": 64,
    "emailAddress": 255,
}

# Device IDs end up in subject serialNumber, a PrintableString (X.520): letters, digits,
# space and '()+,-./:=? only. We allow the subset that is also safe in file names and URLs.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,63}$")

_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
_RSA_SIZES = {2048: "rsa-2048", 3072: "rsa-3072", 4096: "rsa-4096"}


@dataclasses.dataclass(frozen=True)
class CertificateRequest:
    """CertificateRequest is a CSR that passed its profile's policy, with normalised names."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    public_key: CertificatePublicKeyTypes
    key_type: str
    device_id: str | None
    challenge_password: str | None


def subject_text(name: x509.Name) -> str:
    """Formats a name as RFC 4514 text, spelling serialNumber out."""
    return name.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parses a PKCS#10 request in DER or PEM and checks its self-signature."""
    if len(data) > MAX_CSR_BYTES:
        raise bad_request(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise bad_request("not a PKCS#10 certificate request") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported algorithms raise from inside cryptography
        raise bad_request("CSR signature algorithm is not supported") from None
    if not valid:
        raise bad_request("CSR signature does not verify")
    return csr


def key_type_of(public_key: CertificatePublicKeyTypes) -> str:
    """Names a public key as the configuration does ("ec-p256", "rsa-2048", ...)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        kt = _CURVES.get(public_key.curve.name)
        if kt is None:
            raise policy(f"elliptic curve {public_key.curve.name} is not allowed")
        return kt
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise policy(f"RSA key of {public_key.key_size} bits is too small (minimum 2048)")
        kt = _RSA_SIZES.get(public_key.key_size)
        if kt is None:
            raise policy(f"RSA key size {public_key.key_size} is not allowed")
        if public_key.public_numbers().e != 65537:
            raise policy("RSA public exponent must be 65537")
        return kt
    raise policy(f"key algorithm {type(public_key).__name__} is not allowed")


def normalize_subject(subject: x509.Name, profile: ProfileConfig) -> x509.Name:
    """Rebuilds a subject with only allowed attributes, trimmed, in canonical order."""
    values: dict[str, str] = {}
    for rdn in subject.rdns:
        if len(rdn) != 1:
            raise policy("multi-valued RDNs are not allowed in the subject")
        (attr,) = list(rdn)
        short = _NAMES_BY_OID.get(attr.oid)
        if short is None or short not in profile.subject.allowed:
            name = short or attr.oid.dotted_string
            raise policy(f"subject attribute {name} is not allowed by profile {profile.name}")
        if short in values:
            raise policy(f"subject attribute {short} appears more than once")
        value = attr.value if isinstance(attr.value, str) else ""
        check_text(f"subject attribute {short}", value)
        value = " ".join(value.split())
        if not value:
            raise policy(f"subject attribute {short} is empty")
        if len(value) > _UPPER_BOUNDS[short]:
            raise policy(f"subject attribute {short} is longer than {_UPPER_BOUNDS[short]}")
        values[short] = value
    for required in profile.subject.required:
        if required not in values:
            raise policy(f"subject attribute {required} is required by profile {profile.name}")
    if "C" in values and not re.fullmatch(r"[A-Z]{2}", values["C"]):
        raise policy("subject attribute C must be two upper-case letters")
    return x509.Name(
        [x509.NameAttribute(SUBJECT_OIDS[s], values[s]) for s in SUBJECT_OIDS if s in values]
    )


def _san_type(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return "dns"
    if isinstance(name, x509.IPAddress):
        return "ip"
    if isinstance(name, x509.UniformResourceIdentifier):
        return "uri"
    if isinstance(name, x509.RFC822Name):
        return "email"
    return type(name).__name__


_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def check_text(field: str, value: str) -> str:
    """Refuses a name holding control, format or bidi characters (NUL, ESC, DEL, U+202E ...)."""
    bad = forbidden_character(value)
    if bad is not None:
        raise policy(f"{field} contains the control, format or bidi character {bad}")
    return value


def _normalize_san(name: x509.GeneralName) -> x509.GeneralName:
    if isinstance(name, x509.DNSName | x509.UniformResourceIdentifier | x509.RFC822Name):
        check_text(f"subject alternative name {_san_type(name)}", name.value)
    if isinstance(name, x509.DNSName):
        value = name.value.strip().lower().rstrip(".")
        labels = value.split(".")
        if labels and labels[0] == "*":
            raise policy("wildcard DNS names are not allowed")
        if not value or len(value) > 253 or not all(_DNS_LABEL.match(x) for x in labels):
            raise policy(f"not a valid DNS name: {name.value[:80]!r}")
        return x509.DNSName(value)
    if isinstance(name, x509.UniformResourceIdentifier):
        if ":" not in name.value or any(c.isspace() for c in name.value):
            raise policy(f"not a valid URI: {name.value[:80]!r}")
        return name
    if isinstance(name, x509.RFC822Name):
        local, _, domain = name.value.partition("@")
        if not local or not domain:
            raise policy(f"not a valid e-mail address: {name.value[:80]!r}")
        return x509.RFC822Name(f"{local}@{domain.lower()}")
    if isinstance(name, x509.IPAddress) and isinstance(
        name.value, ipaddress.IPv4Network | ipaddress.IPv6Network
    ):
        raise policy("IP networks are not allowed as subject alternative names")
    return name


def requested_sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    """Returns the SubjectAltName entries a CSR asks for (none if it asks for none)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError:
        raise bad_request("CSR extensionRequest cannot be parsed") from None
    return list(ext.value)


def normalize_sans(
    sans: list[x509.GeneralName], profile: ProfileConfig
) -> tuple[x509.GeneralName, ...]:
    """Checks SAN types against the profile and normalises them, keeping order, no duplicates."""
    out: list[x509.GeneralName] = []
    for name in sans:
        kind = _san_type(name)
        if kind not in profile.san_types:
            raise policy(
                f"subject alternative name type {kind} is not allowed by profile {profile.name}"
            )
        normal = _normalize_san(name)
        if normal not in out:
            out.append(normal)
    if profile.san_required and not out:
        raise policy(f"profile {profile.name} requires a subject alternative name")
    return tuple(out)


def check_device_id(device_id: str) -> str:
    """Checks that a device ID can stand in subject serialNumber, file names and URLs."""
    if not DEVICE_ID_RE.match(device_id):
        raise bad_request(
            "device ID must be 1-64 characters of letters, digits, '.', ':' and '-', "
            "starting with a letter or digit"
        )
    return device_id


def challenge_password(csr: x509.CertificateSigningRequest) -> str | None:
    """Returns the CSR's challengePassword attribute, if any (RFC 2985 5.4.1)."""
    try:
        attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    except x509.AttributeNotFound:
        return None
    except ValueError:
        raise bad_request("CSR attributes cannot be parsed") from None
    return attr.value.decode("utf-8", "replace")


def check_request(
    csr: x509.CertificateSigningRequest, profile: ProfileConfig
) -> CertificateRequest:
    """Applies a profile's key, subject and SAN policy to a CSR whose signature verified."""
    public_key = csr.public_key()
    key_type = key_type_of(public_key)
    if key_type not in profile.key_types:
        raise policy(
            f"key type {key_type} is not allowed by profile {profile.name} "
            f"(allowed: {', '.join(profile.key_types)})"
        )
    subject = normalize_subject(csr.subject, profile)
    sans = normalize_sans(requested_sans(csr), profile)
    device_id = None
    if profile.device_id_attribute is not None:
        oid = SUBJECT_OIDS[profile.device_id_attribute]
        attrs = subject.get_attributes_for_oid(oid)
        if not attrs:
            raise policy(
                f"profile {profile.name} needs the device ID in subject "
                f"{profile.device_id_attribute}"
            )
        device_id = check_device_id(str(attrs[0].value))
    return CertificateRequest(
        subject=subject,
        sans=sans,
        public_key=public_key,
        key_type=key_type,
        device_id=device_id,
        challenge_password=challenge_password(csr),
    )
