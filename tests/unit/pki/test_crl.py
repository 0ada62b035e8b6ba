"""Tests for pki.crl: what openssl and pkilint say about the CRLs it builds."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from pki.crl import MAX_CRL_NUMBER, RevokedEntry, build_crl
from pki.errors import ErrorKind, PKIError
from tests.unit.pki.revocation_pki import (
    CRL_URL,
    DELTA_CRL_URL,
    NOW,
    RevocationPKI,
    lint_crl,
    make_pki,
    openssl,
)

DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def tpki() -> RevocationPKI:
    return make_pki(leaf_count=3)


@pytest.fixture(scope="module")
def paths(tpki: RevocationPKI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tpki.write(tmp_path_factory.mktemp("crl"))


def crl_der(tpki: RevocationPKI, entries: list[RevokedEntry], **overrides: object) -> bytes:
    args: dict[str, object] = {
        "issuer_cert": tpki.intermediate,
        "issuer_key": tpki.intermediate_key,
        "entries": entries,
        "crl_number": 5,
        "this_update": NOW,
        "next_update": NOW + DAY,
        "distribution_point_url": CRL_URL,
    }
    args.update(overrides)
    return build_crl(**args)  # type: ignore[arg-type]


def write_pem(directory: Path, name: str, der: bytes) -> Path:
    path = directory / name
    path.write_bytes(x509.load_der_x509_crl(der).public_bytes(Encoding.PEM))
    return path


def revoked_leaf0(tpki: RevocationPKI) -> RevokedEntry:
    return RevokedEntry(
        tpki.leaves[0].serial_number,
        NOW - datetime.timedelta(hours=1),
        x509.ReasonFlags.key_compromise,
    )


class TestBuildCRL:
    def test_full_crl_text_shows_number_aki_next_update_and_reasons(
        self, tpki: RevocationPKI, tmp_path: Path
    ) -> None:
        der = crl_der(
            tpki,
            [revoked_leaf0(tpki), RevokedEntry(0x77, NOW, x509.ReasonFlags.superseded)],
            freshest_crl_url=DELTA_CRL_URL,
        )
        (tmp_path / "crl.der").write_bytes(der)
        text = openssl("crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-text", "-noout")
        assert text.returncode == 0, text.stderr
        out = text.stdout
        ski = tpki.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert "X509v3 CRL Number: \n                5" in out
        assert "X509v3 Authority Key Identifier" in out
        assert ski.value.digest.hex(":").upper() in out
        assert "Next Update: " in out
        assert "X509v3 Issuing Distribution Point: critical" in out
        assert f"URI:{CRL_URL}" in out
        assert "X509v3 Freshest CRL" in out
        assert f"URI:{DELTA_CRL_URL}" in out
        assert "Key Compromise" in out
        assert "Superseded" in out
        assert "Delta CRL Indicator" not in out

    def test_signature_verifies_with_issuer_key(self, tpki: RevocationPKI) -> None:
        crl = x509.load_der_x509_crl(crl_der(tpki, [revoked_leaf0(tpki)]))
        public_key = tpki.intermediate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert crl.is_signature_valid(public_key)
        assert crl.issuer == tpki.intermediate.subject

    def test_unspecified_reason_is_left_out(self, tpki: RevocationPKI) -> None:
        der = crl_der(tpki, [RevokedEntry(0x42, NOW, x509.ReasonFlags.unspecified)])
        entry = x509.load_der_x509_crl(der).get_revoked_certificate_by_serial_number(0x42)
        assert entry is not None
        assert len(entry.extensions) == 0

    def test_openssl_verify_rejects_revoked_leaf(
        self, tpki: RevocationPKI, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        crl_pem = write_pem(tmp_path, "crl.pem", crl_der(tpki, [revoked_leaf0(tpki)]))
        result = openssl(
            "verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", paths["chain"], paths["leaf0"]
        )
        assert result.returncode != 0
        assert "certificate revoked" in result.stdout + result.stderr

    def test_openssl_verify_accepts_good_leaf(
        self, tpki: RevocationPKI, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        crl_pem = write_pem(tmp_path, "crl.pem", crl_der(tpki, [revoked_leaf0(tpki)]))
        result = openssl(
            "verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", paths["chain"], paths["leaf1"]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{paths['leaf1']}: OK" in result.stdout

    def test_delta_crl_shows_indicator_and_base(self, tpki: RevocationPKI, tmp_path: Path) -> None:
        der = crl_der(
            tpki,
            [
                RevokedEntry(tpki.leaves[1].serial_number, NOW, x509.ReasonFlags.certificate_hold),
                RevokedEntry(0x99, NOW, None, remove_from_crl=True),
            ],
            crl_number=6,
            delta_of=5,
        )
        (tmp_path / "delta.der").write_bytes(der)
        out = openssl("crl", "-inform", "DER", "-in", tmp_path / "delta.der", "-text", "-noout")
        assert "X509v3 Delta CRL Indicator: critical\n                5" in out.stdout
        assert "X509v3 CRL Number: \n                6" in out.stdout
        assert "Certificate Hold" in out.stdout
        assert "Remove From CRL" in out.stdout
        assert "Freshest CRL" not in out.stdout

    def test_openssl_use_deltas_rejects_leaf_held_in_delta(
        self, tpki: RevocationPKI, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        base = crl_der(tpki, [revoked_leaf0(tpki)], freshest_crl_url=DELTA_CRL_URL)
        held = RevokedEntry(tpki.leaves[1].serial_number, NOW, x509.ReasonFlags.certificate_hold)
        delta = crl_der(tpki, [held], crl_number=6, delta_of=5, next_update=NOW + DAY / 4)
        both = tmp_path / "both.pem"
        both.write_bytes(
            write_pem(tmp_path, "b.pem", base).read_bytes()
            + write_pem(tmp_path, "d.pem", delta).read_bytes()
        )
        args = ("verify", "-crl_check", "-use_deltas", "-CRLfile", both, "-CAfile", paths["chain"])
        held_result = openssl(*args, paths["leaf1"])
        assert "certificate revoked" in held_result.stdout + held_result.stderr
        good_result = openssl(*args, paths["leaf2"])
        assert good_result.returncode == 0, good_result.stdout + good_result.stderr

    def test_pkilint_finds_no_error_in_full_crl(self, tpki: RevocationPKI) -> None:
        der = crl_der(
            tpki,
            [revoked_leaf0(tpki), RevokedEntry(0x42, NOW, None)],
            freshest_crl_url=DELTA_CRL_URL,
        )
        assert lint_crl(der) == []

    def test_pkilint_finds_no_error_in_delta_crl(self, tpki: RevocationPKI) -> None:
        der = crl_der(
            tpki,
            [
                RevokedEntry(0x43, NOW, x509.ReasonFlags.certificate_hold),
                RevokedEntry(0x44, NOW, None, remove_from_crl=True),
            ],
            crl_number=6,
            delta_of=5,
        )
        assert lint_crl(der) == []

    def test_pkilint_finds_no_error_in_empty_crl_without_idp(self, tpki: RevocationPKI) -> None:
        assert lint_crl(crl_der(tpki, [], distribution_point_url=None)) == []

    def test_lint_helper_reports_errors_it_should(self, tpki: RevocationPKI) -> None:
        # Guards the helper: a CRL without AKI and CRL Number must not lint clean.
        from cryptography.hazmat.primitives import hashes

        bare = x509.CertificateRevocationListBuilder(tpki.intermediate.subject, NOW, NOW + DAY)
        der = bare.sign(tpki.intermediate_key, hashes.SHA256()).public_bytes(Encoding.DER)
        assert any("authority_key_identifier_missing" in f for f in lint_crl(der))

    def test_largest_crl_number_is_accepted(self, tpki: RevocationPKI) -> None:
        der = crl_der(tpki, [], crl_number=MAX_CRL_NUMBER)
        number = x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber)
        assert number.value.crl_number == MAX_CRL_NUMBER

    def test_100k_entries_build_time(self, tpki: RevocationPKI) -> None:
        entries = [
            RevokedEntry(0x10000 + i, NOW, x509.ReasonFlags.key_compromise if i % 2 else None)
            for i in range(100_000)
        ]
        started = time.perf_counter()
        der = crl_der(tpki, entries)
        elapsed = time.perf_counter() - started
        print(f"\nbuild_crl, 100,000 entries: {elapsed:.2f} s, {len(der)} bytes")
        assert len(x509.load_der_x509_crl(der)) == 100_000


class TestBuildCRLErrors:
    @pytest.mark.parametrize(
        "overrides",
        [
            {"next_update": NOW},
            {"next_update": NOW - DAY},
            {"crl_number": -1},
            {"crl_number": MAX_CRL_NUMBER + 1},
            {"delta_of": 5},
            {"delta_of": 6},
            {"delta_of": -1},
            {"delta_of": 4, "freshest_crl_url": DELTA_CRL_URL},
            {"this_update": NOW.replace(tzinfo=None)},
        ],
    )
    def test_nonsensical_parameters_are_rejected(
        self, tpki: RevocationPKI, overrides: dict[str, object]
    ) -> None:
        with pytest.raises(PKIError) as exc:
            crl_der(tpki, [], **overrides)
        assert exc.value.kind is ErrorKind.BAD_REQUEST

    @pytest.mark.parametrize(
        "entries",
        [
            [RevokedEntry(1, NOW, None, remove_from_crl=True)],
            [RevokedEntry(1, NOW, x509.ReasonFlags.remove_from_crl)],
            [RevokedEntry(1, NOW, None), RevokedEntry(1, NOW, None)],
            [RevokedEntry(-1, NOW, None)],
            [RevokedEntry(2**160, NOW, None)],
            [RevokedEntry(1, NOW.replace(tzinfo=None), None)],
        ],
    )
    def test_bad_entries_are_rejected(
        self, tpki: RevocationPKI, entries: list[RevokedEntry]
    ) -> None:
        with pytest.raises(PKIError) as exc:
            crl_der(tpki, entries)
        assert exc.value.kind is ErrorKind.BAD_REQUEST

    def test_key_of_another_issuer_is_rejected(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError) as exc:
            crl_der(tpki, [], issuer_key=tpki.root_key)
        assert exc.value.kind is ErrorKind.INTERNAL

    def test_issuer_without_ski_is_rejected(self, tpki: RevocationPKI) -> None:
        from cryptography.hazmat.primitives import hashes

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "no ski")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(9)
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(PKIError) as exc:
            crl_der(tpki, [], issuer_cert=cert, issuer_key=key)
        assert exc.value.kind is ErrorKind.CONFIG
