"""The CA writes the identity: EST simpleenroll through Flask's test client.

Authenticated as device A, a CSR can never get a certificate that names B, the CA's own
organisation, a name the profile does not derive, or a control/bidi character; refused
requests change nothing stored. The accepted one gets exactly the profile-derived names.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from api.est import wire
from pki.csr import SUBJECT_OIDS
from pki.naming import DeviceRecord, device_name
from tests.csrs import der, device_csr
from tests.est_front import EST, ESTFront, issued
from tests.unit.pki.conftest import build_hierarchy


@pytest.fixture
def front(sqlite_db: Any) -> ESTFront:
    return ESTFront(build_hierarchy(sqlite_db))


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _o(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.ORGANIZATION_NAME, value)


def _sans(cert: x509.Certificate) -> tuple[x509.GeneralName, ...]:
    try:
        return tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return ()


# (case, what the CSR asks for beyond serialNumber=DEV-A, what the refusal must name)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("CN of another device", {"extra": [_cn("DEV-B")]}, "CN"),
    ("O of another device", {"extra": [_o("DEV-B")]}, "O"),
    ("the CA's own O", {"extra": [_o("Example IoT Device CA")]}, "O"),
    (
        "OU not derived",
        {"extra": [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x")]},
        "OU",
    ),
    ("DNS SAN of another device", {"sans": [x509.DNSName("dev-b.example.com")]}, "dns:"),
    ("URI SAN", {"sans": [x509.UniformResourceIdentifier("urn:dev:DEV-B")]}, "uri:"),
    ("NUL in CN", {"extra": [_cn("DEV-A\x00DEV-B")]}, "U+0000"),
    ("ESC in CN", {"extra": [_cn("DEV-A\x1b[2K")]}, "U+001B"),
    ("DEL in CN", {"extra": [_cn("DEV-A\x7f")]}, "U+007F"),
    ("RLO in CN", {"extra": [_cn("DEV-A\u202eB-VED")]}, "U+202E"),
    ("zero-width joiner in O", {"extra": [_o("Example\u200d IoT")]}, "U+200D"),
    ("newline in CN", {"extra": [_cn("DEV-A\nDEV-B")]}, "U+000A"),
    ("ESC in a DNS SAN", {"sans": [x509.DNSName("a\x1b.example")]}, "U+001B"),
]


class TestDeviceIdentity:
    @pytest.mark.parametrize(("case", "csr_args", "field"), REFUSED, ids=[c[0] for c in REFUSED])
    def test_csr_naming_more_than_the_device_refused_400(
        self, front: ESTFront, case: str, csr_args: dict[str, Any], field: str
    ) -> None:
        secret = front.register("DEV-A")
        front.register("DEV-B")
        before = front.snapshot()
        csr, _ = device_csr("DEV-A", **csr_args)
        r = front.enroll("DEV-A", secret, der(csr))
        assert r.status_code == 400, (case, r.data)
        assert field in r.data.decode(), r.data
        assert front.snapshot() == before
        # The secret still works: a refused CSR did not spend it.
        assert front.enroll("DEV-A", secret, der(device_csr("DEV-A")[0])).status_code == 200

    def test_csr_naming_another_device_id_refused_403(self, front: ESTFront) -> None:
        secret = front.register("DEV-A")
        front.register("DEV-B")
        before = front.snapshot()
        csr, _ = device_csr("DEV-B", extra=[_cn("DEV-B")])
        r = front.enroll("DEV-A", secret, der(csr))
        assert r.status_code == 403, r.data
        assert b"DEV-B" in r.data
        assert front.snapshot() == before

    def test_accepted_csr_gets_exactly_the_derived_names(self, front: ESTFront) -> None:
        secret = front.register("DEV-A", model="M-1", batch="B-7")
        r = front.enroll("DEV-A", secret, der(device_csr("DEV-A")[0]))
        assert r.status_code == 200, r.data
        cert = issued(r)
        expected = device_name(
            front.h.config.profile("device"), DeviceRecord("DEV-A", "M-1", "B-7")
        )
        assert cert.subject == expected.subject
        assert _sans(cert) == expected.sans
        # A broker that takes the CN as user name (Mosquitto) sees the device ID.
        assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
            "DEV-A"
        ]

    def test_csr_repeating_the_derived_names_accepted(self, front: ESTFront) -> None:
        secret = front.register("DEV-A")
        expected = device_name(front.h.config.profile("device"), DeviceRecord("DEV-A"))
        repeated = [a for a in expected.subject if a.oid != NameOID.SERIAL_NUMBER]
        assert repeated  # the profile writes more than the device ID
        r = front.enroll("DEV-A", secret, der(device_csr("DEV-A", extra=repeated)[0]))
        assert r.status_code == 200, r.data
        assert issued(r).subject == expected.subject

    def test_csrattrs_announces_the_derived_attributes(self, front: ESTFront) -> None:
        r = front.client.get(f"{EST}/csrattrs")
        assert r.status_code == 200
        items = wire.parse_csr_attrs(base64.b64decode(r.data))
        identity = front.h.config.profile("device").identity
        assert identity is not None
        wanted = [SUBJECT_OIDS[a].dotted_string for a in SUBJECT_OIDS if a in identity.subject]
        assert [i for i in items if isinstance(i, str) and i.startswith("2.5.4.")] == wanted
