"""The [identity] of a profile: strict parsing (file: field errors) and the names it writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.config import ConfigSet
from pki.csr import check_request, load_csr
from pki.errors import ErrorKind, PKIError
from pki.naming import DeviceRecord, device_name, first_difference, named_request
from tests.conftest import CONFIG_DIR
from tests.csrs import der, device_csr

BASE = """name = "device"
kind = "end-entity"
validity_days = 365
key_types = ["ec-p256"]
key_usage = ["digital_signature"]
extended_key_usage = ["client_auth"]
san_types = ["uri", "dns"]
device_id_attribute = "serialNumber"

[subject]
required = ["serialNumber"]
allowed = ["CN", "O", "OU", "serialNumber"]
"""

IDENTITY = """
[identity.subject]
serialNumber = "{device_id}"
CN = "{device_id}"
O = "Example IoT"
OU = "{model}"

[[identity.san]]
type = "uri"
value = "urn:dev:{batch}:{device_id}"
"""


def _config(tmp_path: Path, device_toml: str) -> ConfigSet:
    directory = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, directory)
    (directory / "profiles" / "device.toml").write_text(device_toml)
    return ConfigSet(directory)


def _config_error(tmp_path: Path, device_toml: str) -> str:
    with pytest.raises(PKIError) as e:
        _config(tmp_path, device_toml)
    assert e.value.kind is ErrorKind.CONFIG
    return e.value.message


class TestIdentityConfig:
    @pytest.mark.parametrize(
        ("change", "field", "why"),
        [
            ('CN = "{device_id}"', "identity.subject.CN", None),
            ('CN = "{serial}"', "identity.subject.CN", "unknown field {serial}"),
            ('CN = "{device_id!r}"', "identity.subject.CN", "unknown field"),
            ('CN = "{device_id"', "identity.subject.CN", "not a valid template"),
            ('CN = "a\\u202eb"', "identity.subject.CN", "U+202E"),
            ('CN = "  "', "identity.subject.CN", "must not be empty"),
            ('L = "x"', "identity.subject.L", "not in subject.allowed"),
            ('XX = "x"', "identity.subject.XX", None),
            ('serialNumber = "{model}"', "identity.subject.serialNumber", "{device_id}"),
        ],
    )
    def test_bad_subject_template_names_file_and_field(
        self, tmp_path: Path, change: str, field: str, why: str | None
    ) -> None:
        text = BASE + '\n[identity.subject]\nserialNumber = "{device_id}"\n' + change + "\n"
        if change.startswith("serialNumber"):
            text = BASE + "\n[identity.subject]\n" + change + "\n"
        if why is None and change == 'CN = "{device_id}"':
            assert _config(tmp_path, text).profile("device").identity is not None
            return
        message = _config_error(tmp_path, text)
        assert "device.toml: " in message and field in message, message
        if why is not None:
            assert why in message, message

    def test_san_type_outside_san_types_refused(self, tmp_path: Path) -> None:
        text = BASE + IDENTITY.replace('type = "uri"', 'type = "email"')
        message = _config_error(tmp_path, text)
        assert "device.toml: " in message and "identity.san.0.type" in message, message

    def test_unknown_identity_key_refused(self, tmp_path: Path) -> None:
        message = _config_error(tmp_path, BASE + IDENTITY + "\n[identity.extra]\nx = 1\n")
        assert "identity.extra" in message, message


class TestDeviceName:
    def test_names_come_from_the_record(self, tmp_path: Path) -> None:
        profile = _config(tmp_path, BASE + IDENTITY).profile("device")
        name = device_name(profile, DeviceRecord("DEV-1", model="M-1", batch="b7"))
        assert name.subject == x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example IoT"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "M-1"),
                x509.NameAttribute(NameOID.COMMON_NAME, "DEV-1"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "DEV-1"),
            ]
        )
        assert name.sans == (x509.UniformResourceIdentifier("urn:dev:b7:DEV-1"),)

    def test_missing_registry_field_leaves_the_name_out(self, tmp_path: Path) -> None:
        profile = _config(tmp_path, BASE + IDENTITY).profile("device")
        name = device_name(profile, DeviceRecord("DEV-1"))
        assert not name.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert name.sans == ()

    def test_registry_value_with_control_character_refused(self, tmp_path: Path) -> None:
        profile = _config(tmp_path, BASE + IDENTITY).profile("device")
        with pytest.raises(PKIError) as e:
            device_name(profile, DeviceRecord("DEV-1", model="M\u202e1"))
        assert e.value.kind is ErrorKind.POLICY and "OU" in e.value.message

    def test_csr_repeating_a_subset_gets_all_names(self, tmp_path: Path) -> None:
        profile = _config(tmp_path, BASE + IDENTITY).profile("device")
        csr, _ = device_csr(
            "DEV-1",
            extra=[x509.NameAttribute(NameOID.COMMON_NAME, "DEV-1")],
            sans=[x509.UniformResourceIdentifier("urn:dev:b7:DEV-1")],
        )
        request = named_request(
            check_request(load_csr(der(csr)), profile), profile, DeviceRecord("DEV-1", "M", "b7")
        )
        assert len(request.subject) == 4 and len(request.sans) == 1

    @pytest.mark.parametrize(
        ("extra", "sans", "named"),
        [
            ([x509.NameAttribute(NameOID.COMMON_NAME, "DEV-2")], [], "CN"),
            ([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "M-2")], [], "OU"),
            ([], [x509.UniformResourceIdentifier("urn:dev:b7:DEV-2")], "uri:"),
            ([], [x509.DNSName("dev-1.example")], "dns:"),
        ],
    )
    def test_csr_asking_for_other_names_refused(
        self,
        tmp_path: Path,
        extra: list[x509.NameAttribute],
        sans: list[x509.GeneralName],
        named: str,
    ) -> None:
        profile = _config(tmp_path, BASE + IDENTITY).profile("device")
        csr, _ = device_csr("DEV-1", extra=extra, sans=sans)
        request = check_request(load_csr(der(csr)), profile)
        name = device_name(profile, DeviceRecord("DEV-1", "M-1", "b7"))
        problem = first_difference(request, name.subject, name.sans)
        assert problem is not None and named in problem
        with pytest.raises(PKIError) as e:
            named_request(request, profile, DeviceRecord("DEV-1", "M-1", "b7"))
        assert e.value.kind is ErrorKind.POLICY and named in e.value.message


class TestCharacterRules:
    @pytest.mark.parametrize(
        "bad", ["\x00", "\x1b", "\x7f", "\u202e", "\u2066", "\u200b", "\u2028"]
    )
    def test_server_profile_refuses_control_format_and_bidi(self, bad: str) -> None:
        profile = ConfigSet(CONFIG_DIR).profile("server")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"broker{bad}")]))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("broker.example")]), critical=False
            )
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        )
        with pytest.raises(PKIError) as e:
            check_request(load_csr(der(csr)), profile)
        assert e.value.kind is ErrorKind.POLICY
        assert "subject attribute CN" in e.value.message
        assert f"U+{ord(bad):04X}" in e.value.message


def test_ceremony_subject_with_bidi_character_is_a_config_error(tmp_path: Path) -> None:
    config = ConfigSet(CONFIG_DIR)
    path = tmp_path / "evil.toml"
    path.write_text(
        'issuer = "devices"\nprofile = "intermediate"\nkey_type = "ec-p256"\n\n'
        '[subject]\nCN = "Example IoT \\u202eAC ecived"\n'
    )
    with pytest.raises(PKIError) as e:
        config.ceremony(path)
    assert e.value.kind is ErrorKind.CONFIG
    assert "evil.toml: subject.CN" in e.value.message and "U+202E" in e.value.message
