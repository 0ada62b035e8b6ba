"""Tests for pki.crl: what openssl and pkilint say about the CRLs it builds."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from pki.crl import MAX_CRL_NUMBER, MAX_SERIAL, RevokedEntry, build_crl
from pki.crl import CRLHashAlgorithm as CRLHash
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
            [RevokedEntry(1, datetime.datetime(1949, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))],
            [RevokedEntry(1, NOW, "keyCompromise")],  # type: ignore[arg-type]
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


def _self_signed(
    key: CertificateIssuerPrivateKeyTypes, hash_algorithm: CRLHash | None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "encoder test CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hash_algorithm)
    )


def _cryptography_crl(
    cert: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    hash_algorithm: CRLHash | None,
    entries: list[RevokedEntry],
    **fields: object,
) -> x509.CertificateRevocationList:
    """The same CRL as build_crl's, built entirely by cryptography's builders."""
    ours = x509.load_der_x509_crl(
        build_crl(
            issuer_cert=cert,
            issuer_key=key,
            entries=entries,
            crl_number=5,
            this_update=NOW,
            next_update=NOW + DAY,
            hash_algorithm=hash_algorithm,
            **fields,  # type: ignore[arg-type]
        )
    )
    revoked = []
    for e in entries:
        reason = x509.ReasonFlags.remove_from_crl if e.remove_from_crl else e.reason
        extensions: list[x509.Extension[x509.ExtensionType]] = []
        if reason not in (None, x509.ReasonFlags.unspecified):
            extensions.append(x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(reason)))
        revoked.append(x509.RevokedCertificateBuilder(e.serial, e.revoked_at, extensions).build())
    # The CRL extensions are those build_crl wrote, in its order.
    return x509.CertificateRevocationListBuilder(
        issuer_name=cert.subject,
        last_update=NOW,
        next_update=NOW + DAY,
        extensions=list(ours.extensions),
        revoked_certificates=revoked,
    ).sign(key, hash_algorithm)


def _tbs_fields(tbs_der: bytes) -> list[int]:
    """Returns the tags of the TBSCertList's fields (a DER walk independent of pki.crl)."""
    tags = []

    def header(at: int) -> tuple[int, int]:
        first = tbs_der[at + 1]
        if first < 0x80:
            return at + 2, first
        count = first & 0x7F
        return at + 2 + count, int.from_bytes(tbs_der[at + 2 : at + 2 + count], "big")

    at, length = header(0)
    end = at + length
    while at < end:
        tags.append(tbs_der[at])
        content, length = header(at)
        at = content + length
    return tags


UTC_PLUS_2 = datetime.timezone(datetime.timedelta(hours=2))
# Every encoding the entries can take: serial lengths (a leading zero octet when the top bit
# is set, the largest 20-octet serial), UTCTime from 1950 through 2049 and GeneralizedTime from
# 2050, a zone that is not UTC, fractional seconds, and each reason code.
VARIED_ENTRIES = [
    RevokedEntry(1, NOW, x509.ReasonFlags.key_compromise),
    RevokedEntry(0x7F, datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)),
    RevokedEntry(0x80, datetime.datetime(2050, 1, 1, tzinfo=datetime.UTC)),
    RevokedEntry(0xFF00, datetime.datetime(1950, 1, 1, tzinfo=datetime.UTC)),
    RevokedEntry(0x10001, datetime.datetime(2050, 1, 1, 1, 30, tzinfo=UTC_PLUS_2)),
    RevokedEntry(0x10002, datetime.datetime(2031, 5, 6, 7, 8, 9, 999_999, tzinfo=datetime.UTC)),
    RevokedEntry(MAX_SERIAL, datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)),
    RevokedEntry(2**127 + 5, NOW, x509.ReasonFlags.unspecified),
    *(
        RevokedEntry(0x20000 + i, NOW - i * DAY, reason)
        for i, reason in enumerate(x509.ReasonFlags)
        if reason is not x509.ReasonFlags.remove_from_crl
    ),
]


class TestEntryEncoding:
    """build_crl encodes the entries itself; cryptography's builder is the reference."""

    @pytest.mark.parametrize(
        ("make_key", "hash_algorithm"),
        [
            (lambda: ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
            (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
            (
                lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
                hashes.SHA256(),
            ),
            (ed25519.Ed25519PrivateKey.generate, None),
        ],
        ids=["p256", "p384", "rsa2048", "ed25519"],
    )
    def test_tbs_is_byte_identical_to_cryptography_builder(
        self,
        make_key: Callable[[], CertificateIssuerPrivateKeyTypes],
        hash_algorithm: CRLHash | None,
    ) -> None:
        key = make_key()
        cert = _self_signed(key, hash_algorithm)
        fields = {"distribution_point_url": CRL_URL, "freshest_crl_url": DELTA_CRL_URL}
        der = build_crl(
            issuer_cert=cert,
            issuer_key=key,
            entries=VARIED_ENTRIES,
            crl_number=5,
            this_update=NOW,
            next_update=NOW + DAY,
            hash_algorithm=hash_algorithm,
            **fields,  # type: ignore[arg-type]
        )
        ours = x509.load_der_x509_crl(der)
        reference = _cryptography_crl(cert, key, hash_algorithm, VARIED_ENTRIES, **fields)
        assert ours.tbs_certlist_bytes == reference.tbs_certlist_bytes
        assert ours.signature_algorithm_oid == reference.signature_algorithm_oid
        assert ours.public_bytes(Encoding.DER) == der
        assert ours.is_signature_valid(cert.public_key())  # type: ignore[arg-type]

    def test_entries_read_back_as_given(self, tpki: RevocationPKI) -> None:
        crl = x509.load_der_x509_crl(crl_der(tpki, VARIED_ENTRIES))
        assert [r.serial_number for r in crl] == [e.serial for e in VARIED_ENTRIES]
        for entry, read in zip(VARIED_ENTRIES, crl, strict=True):
            assert read.revocation_date_utc == entry.revoked_at.replace(microsecond=0)
            reasons = [
                x.value.reason for x in read.extensions if isinstance(x.value, x509.CRLReason)
            ]
            if entry.reason in (None, x509.ReasonFlags.unspecified):
                assert reasons == []
            else:
                assert reasons == [entry.reason]
                assert not read.extensions.get_extension_for_class(x509.CRLReason).critical

    def test_utctime_through_2049_generalizedtime_from_2050(self, tpki: RevocationPKI) -> None:
        der = crl_der(tpki, VARIED_ENTRIES)
        # RFC 5280 §5.1.2.4 (which §5.1.2.6 applies to revocationDate): "UTCTime for dates
        # through the year 2049" and "GeneralizedTime for dates in the year 2050 or later".
        assert b"\x17\x0d491231235959Z" in der
        assert b"\x18\x0f20500101000000Z" in der
        assert b"\x18\x0f20491231233000Z" not in der
        assert b"\x17\x0d491231233000Z" in der  # 2050-01-01 01:30 +02:00 is 2049 in UTC
        assert b"\x17\x0d500101000000Z" in der
        assert b"\x18\x0f99991231235959Z" in der
        assert b"\x17\x0d310506070809Z" in der  # no fractional seconds

    def test_delta_remove_from_crl_matches_cryptography(self, tpki: RevocationPKI) -> None:
        entries = [
            RevokedEntry(0x43, NOW, x509.ReasonFlags.certificate_hold),
            RevokedEntry(0x44, NOW, None, remove_from_crl=True),
            RevokedEntry(0x45, datetime.datetime(2050, 6, 1, tzinfo=datetime.UTC), None, True),
        ]
        key = tpki.intermediate_key
        fields = {"distribution_point_url": CRL_URL, "delta_of": 4}
        ours = x509.load_der_x509_crl(crl_der(tpki, entries, **fields))
        reference = _cryptography_crl(tpki.intermediate, key, hashes.SHA256(), entries, **fields)
        assert ours.tbs_certlist_bytes == reference.tbs_certlist_bytes
        removed = ours.get_revoked_certificate_by_serial_number(0x44)
        assert removed is not None
        reason = removed.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.remove_from_crl

    def test_no_entries_leaves_revoked_certificates_out(self, tpki: RevocationPKI) -> None:
        crl = x509.load_der_x509_crl(crl_der(tpki, []))
        # RFC 5280 §5.1.2.6: "When there are no revoked certificates, the revoked certificates
        # list MUST be absent." Version, signature, issuer, thisUpdate, nextUpdate, [0].
        assert _tbs_fields(crl.tbs_certlist_bytes) == [0x02, 0x30, 0x30, 0x17, 0x17, 0xA0]
        assert len(crl) == 0
        reference = _cryptography_crl(
            tpki.intermediate,
            tpki.intermediate_key,
            hashes.SHA256(),
            [],
            distribution_point_url=CRL_URL,
        )
        assert crl.tbs_certlist_bytes == reference.tbs_certlist_bytes

    def test_one_entry_puts_revoked_certificates_before_extensions(
        self, tpki: RevocationPKI
    ) -> None:
        crl = x509.load_der_x509_crl(crl_der(tpki, [revoked_leaf0(tpki)]))
        assert _tbs_fields(crl.tbs_certlist_bytes) == [0x02, 0x30, 0x30, 0x17, 0x17, 0x30, 0xA0]

    def test_openssl_prints_every_entry(self, tpki: RevocationPKI, tmp_path: Path) -> None:
        (tmp_path / "crl.der").write_bytes(crl_der(tpki, VARIED_ENTRIES))
        text = openssl("crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-text", "-noout")
        assert text.returncode == 0, text.stderr
        assert text.stdout.count("Serial Number: ") == len(VARIED_ENTRIES)
        assert f"Serial Number: {MAX_SERIAL:X}" in text.stdout
        assert "Revocation Date: Jan  1 00:00:00 2050 GMT" in text.stdout
        assert "Revocation Date: Dec 31 23:59:59 9999 GMT" in text.stdout
        for phrase in ("Key Compromise", "CA Compromise", "Certificate Hold", "AA Compromise"):
            assert phrase in text.stdout

    def test_pkilint_finds_no_error_in_every_kind_of_entry(self, tpki: RevocationPKI) -> None:
        entries = [e for e in VARIED_ENTRIES if e.serial != MAX_SERIAL] + [
            RevokedEntry(0x30000 + i, NOW - i * DAY, x509.ReasonFlags.superseded)
            for i in range(200)
        ]
        assert lint_crl(crl_der(tpki, entries, freshest_crl_url=DELTA_CRL_URL)) == []
