"""Device names: the subject and subjectAltName the CA writes from the registry record.

DESIGN.md invariant 3: a device certificate's names come from the authenticated device,
never from its CSR. A broker that maps the certificate to a user (Mosquitto takes the CN)
trusts exactly these names, so a CSR may leave them out or repeat them, nothing else.
"""

from __future__ import annotations

import dataclasses

from cryptography import x509

from pki.config import ProfileConfig, SANTemplate, template_fields
from pki.csr import SUBJECT_OIDS, CertificateRequest, normalize_sans, normalize_subject
from pki.errors import ErrorKind, PKIError, internal
from pki.issuer import describe_san

_SAN_TYPES: dict[str, type[x509.DNSName | x509.UniformResourceIdentifier | x509.RFC822Name]] = {
    "dns": x509.DNSName,
    "uri": x509.UniformResourceIdentifier,
    "email": x509.RFC822Name,
}
_OID_NAMES = {oid: short for short, oid in SUBJECT_OIDS.items()}

# The audit detail of a CSR refused for naming what the CA does not write (a refusal of
# kind identity); the rest of the detail names the field.
NAME_MISMATCH = "CSR name mismatch"


@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    """DeviceRecord is what the registry says of a device: the inputs of its names."""

    device_id: str
    model: str | None = None
    batch: str | None = None


@dataclasses.dataclass(frozen=True)
class DeviceName:
    """DeviceName is the subject and subjectAltName a device certificate gets."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]


def _render(template: str, record: DeviceRecord) -> str | None:
    values = {"device_id": record.device_id, "model": record.model, "batch": record.batch}
    if any(values[f] is None for f in template_fields(template)):
        return None
    return template.format(**values)


def _san(template: SANTemplate, value: str) -> x509.GeneralName:
    return _SAN_TYPES[template.type](value)


def device_name(profile: ProfileConfig, record: DeviceRecord) -> DeviceName:
    """Builds the names a device certificate of `profile` carries for a registry record."""
    if profile.identity is None:
        raise internal(f"profile {profile.name} has no [identity]")
    attrs = []
    for short, template in profile.identity.subject.items():
        value = _render(template, record)
        if value is not None:
            attrs.append(x509.NameAttribute(SUBJECT_OIDS[short], value))
    sans = []
    for item in profile.identity.san:
        value = _render(item.value, record)
        if value is not None:
            sans.append(_san(item, value))
    # The registry's values pass the same checks as a CSR's (length, characters, syntax).
    return DeviceName(
        subject=normalize_subject(x509.Name(attrs), profile),
        sans=normalize_sans(sans, profile),
    )


def first_difference(
    request: CertificateRequest, subject: x509.Name, sans: tuple[x509.GeneralName, ...]
) -> str | None:
    """Says what a request asks for beyond `subject` and `sans`, or None if it only repeats."""
    written = {_OID_NAMES[a.oid]: a.value for a in subject}
    for attr in request.subject:
        short = _OID_NAMES[attr.oid]
        if short not in written:
            have = ", ".join(written) or "none"
            return f"subject attribute {short} is not one the CA writes (it writes: {have})"
        if attr.value != written[short]:
            return (
                f"subject attribute {short} is {attr.value!r}, "
                f"but the CA writes {written[short]!r} for this device"
            )
    for name in request.sans:
        if name not in sans:
            return (
                f"subject alternative name {describe_san(name)} is not one the CA writes "
                f"for this device"
            )
    return None


def named_request(
    request: CertificateRequest, profile: ProfileConfig, record: DeviceRecord
) -> CertificateRequest:
    """Checks that a CSR repeats only the device's names and returns it carrying them."""
    name = device_name(profile, record)
    problem = first_difference(request, name.subject, name.sans)
    if problem is not None:
        message = f"{problem} (profile {profile.name}, device {record.device_id})"
        raise PKIError(ErrorKind.POLICY, message, detail=f"{NAME_MISMATCH}: {message}")
    return dataclasses.replace(request, subject=name.subject, sans=name.sans)


def expected_attributes(profile: ProfileConfig) -> list[x509.ObjectIdentifier]:
    """Lists the subject attribute types a profile writes, in the order a subject holds them."""
    if profile.identity is None:
        return [SUBJECT_OIDS[a] for a in SUBJECT_OIDS if a in profile.subject.required]
    return [SUBJECT_OIDS[a] for a in SUBJECT_OIDS if a in profile.identity.subject]
