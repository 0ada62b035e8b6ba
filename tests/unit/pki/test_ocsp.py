"""Tests for pki.ocsp: openssl makes the requests; openssl, pkilint, cryptography check replies."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.errors import ErrorKind, PKIError
from pki.ocsp import (
    EPOCH,
    CertID,
    CertStatus,
    CertStatusKind,
    IssuerMatcher,
    OCSPSigner,
    SingleAnswer,
    build_error_response,
    build_response,
    never_issued_answer,
    parse_request,
)
from tests.unit.pki.revocation_pki import (
    NOW,
    RevocationPKI,
    lint_ocsp_response,
    make_pki,
    openssl,
)

HOUR = datetime.timedelta(hours=1)
NEXT = NOW + 12 * HOUR


@pytest.fixture(scope="module")
def tpki() -> RevocationPKI:
    return make_pki(leaf_count=3)


@pytest.fixture(scope="module")
def paths(tpki: RevocationPKI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tpki.write(tmp_path_factory.mktemp("ocsp"))


@pytest.fixture(scope="module")
def signer(tpki: RevocationPKI) -> OCSPSigner:
    return OCSPSigner(tpki.intermediate, tpki.ocsp_signer, tpki.ocsp_signer_key)


def openssl_request(
    paths: dict[str, Path], out: Path, *leaves: str, nonce: bool = True, digest: str | None = None
) -> bytes:
    """Writes a request made by `openssl ocsp` for the named leaves and returns its DER."""
    args: list[str | Path] = ["ocsp", "-issuer", paths["int"]]
    if digest is not None:
        args.append(f"-{digest}")  # the CertID digest applies to the -cert options after it
    for leaf in leaves:
        args += ["-cert", paths[leaf]]
    args += ["-reqout", out]
    if not nonce:
        args.append("-no_nonce")
    result = openssl(*args)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def check_response(
    paths: dict[str, Path], response: bytes, tmp_path: Path, *leaves: str, digest: str | None = None
) -> str:
    """Has `openssl ocsp` verify a response and report the leaves' statuses; returns its output."""
    (tmp_path / "resp.der").write_bytes(response)
    args: list[str | Path] = ["ocsp", "-respin", tmp_path / "resp.der", "-issuer", paths["int"]]
    args += ["-CAfile", paths["root"], "-verify_other", paths["int"], "-resp_text", "-no_nonce"]
    if digest is not None:
        args.append(f"-{digest}")
    for leaf in leaves:
        args += ["-cert", paths[leaf]]
    result = openssl(*args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Response verify OK" in output
    return output


def cryptography_request(
    tpki: RevocationPKI, nonce: bytes | None, algorithm: hashes.HashAlgorithm | None = None
) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    builder = ocsp.OCSPRequestBuilder().add_certificate(
        tpki.leaves[0],
        tpki.intermediate,
        algorithm or hashes.SHA1(),  # noqa: S303 CertID default
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(Encoding.DER)


class TestParseRequest:
    def test_openssl_request_with_nonce(
        self, tpki: RevocationPKI, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "req.der", "leaf0"))
        assert len(info.cert_ids) == 1
        cert_id = info.cert_ids[0]
        assert cert_id.hash_algorithm == "sha1"
        assert cert_id.serial == tpki.leaves[0].serial_number
        assert signer.matcher.matches(cert_id)
        # openssl wraps its 16 random octets in an OCTET STRING inside extnValue (RFC 8954).
        assert info.nonce is not None
        assert info.nonce[:2] == b"\x04\x10"
        assert len(info.nonce) == 18
        assert info.extension_oids == ()

    def test_openssl_request_without_nonce(self, paths: dict[str, Path], tmp_path: Path) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf0", nonce=False))
        assert info.nonce is None

    def test_openssl_request_for_two_certificates(
        self, tpki: RevocationPKI, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf0", "leaf1"))
        assert [c.serial for c in info.cert_ids] == [
            tpki.leaves[0].serial_number,
            tpki.leaves[1].serial_number,
        ]
        assert all(signer.matcher.matches(c) for c in info.cert_ids)

    def test_openssl_request_with_sha256_cert_id(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf0", digest="sha256"))
        assert info.cert_ids[0].hash_algorithm == "sha256"
        assert len(info.cert_ids[0].issuer_key_hash) == 32
        assert signer.matcher.matches(info.cert_ids[0])

    def test_cert_id_der_is_the_request_encoding(
        self, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        der = openssl_request(paths, tmp_path / "r.der", "leaf0", "leaf1")
        info = parse_request(der)
        request = asn1_ocsp.OCSPRequest.load(der)
        expected = [r["req_cert"].dump() for r in request["tbs_request"]["request_list"]]
        assert [c.der for c in info.cert_ids] == expected

    def test_cryptography_request_matches(self, tpki: RevocationPKI, signer: OCSPSigner) -> None:
        for algorithm in (hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):  # noqa: S303
            info = parse_request(cryptography_request(tpki, None, algorithm))
            assert info.cert_ids[0].hash_algorithm == algorithm.name
            assert signer.matcher.matches(info.cert_ids[0])

    def test_32_octet_nonce_is_accepted(self, tpki: RevocationPKI) -> None:
        info = parse_request(cryptography_request(tpki, b"\x01" * 32))
        assert info.nonce == b"\x04\x20" + b"\x01" * 32

    def test_33_octet_nonce_is_malformed(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError) as exc:
            parse_request(cryptography_request(tpki, b"\x01" * 33))
        assert exc.value.kind is ErrorKind.BAD_REQUEST

    def test_empty_nonce_is_malformed(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError):
            parse_request(cryptography_request(tpki, b""))

    def test_other_extensions_are_listed(self) -> None:
        request = asn1_ocsp.OCSPRequest(
            {
                "tbs_request": {
                    "request_list": [{"req_cert": _asn1_cert_id("sha1")}],
                    "request_extensions": [
                        {
                            "extn_id": "acceptable_responses",
                            "extn_value": ["basic_ocsp_response"],
                        }
                    ],
                }
            }
        )
        info = parse_request(request.dump())
        assert info.extension_oids == ("1.3.6.1.5.5.7.48.1.4",)
        assert info.nonce is None

    def test_unknown_hash_algorithm_parses_but_matches_no_issuer(self, signer: OCSPSigner) -> None:
        request = asn1_ocsp.OCSPRequest(
            {"tbs_request": {"request_list": [{"req_cert": _asn1_cert_id("md5")}]}}
        )
        info = parse_request(request.dump())
        assert info.cert_ids[0].hash_algorithm == "1.2.840.113549.2.5"  # md5, by OID
        assert not signer.matcher.matches(info.cert_ids[0])

    @pytest.mark.parametrize(
        "der",
        [
            b"",
            b"hello, OCSP",
            b"\x30\x80\x30\x00\x00\x00",  # BER indefinite length
            b"\x30\x04\x30\x02\x30\x00",  # zero requests
            b"\x30\x81\x04\x30\x02\x30\x00",  # length not in shortest form
            b"\x04\x00",
        ],
    )
    def test_garbage_is_malformed(self, der: bytes) -> None:
        with pytest.raises(PKIError) as exc:
            parse_request(der)
        assert exc.value.kind is ErrorKind.BAD_REQUEST

    def test_truncated_request_is_malformed(self, paths: dict[str, Path], tmp_path: Path) -> None:
        der = openssl_request(paths, tmp_path / "r.der", "leaf0", "leaf1")
        for cut in range(1, len(der)):
            with pytest.raises(PKIError):
                parse_request(der[:cut])

    def test_trailing_data_is_malformed(self, paths: dict[str, Path], tmp_path: Path) -> None:
        der = openssl_request(paths, tmp_path / "r.der", "leaf0")
        with pytest.raises(PKIError):
            parse_request(der + b"\x00")

    def test_repeated_nonce_is_malformed(self) -> None:
        nonce = {"extn_id": "nonce", "extn_value": b"\x01" * 16}
        request = asn1_ocsp.OCSPRequest(
            {
                "tbs_request": {
                    "request_list": [{"req_cert": _asn1_cert_id("sha1")}],
                    "request_extensions": [nonce, nonce],
                }
            }
        )
        with pytest.raises(PKIError):
            parse_request(request.dump())


def _asn1_cert_id(algorithm: str) -> asn1_ocsp.CertId:
    return asn1_ocsp.CertId(
        {
            "hash_algorithm": {"algorithm": algorithm},
            "issuer_name_hash": b"\x00" * 20,
            "issuer_key_hash": b"\x00" * 20,
            "serial_number": 7,
        }
    )


class TestIssuerMatcher:
    def test_foreign_issuer_does_not_match(self, tpki: RevocationPKI, signer: OCSPSigner) -> None:
        root_id = IssuerMatcher(tpki.root).cert_id(tpki.leaves[0].serial_number)
        assert not signer.matcher.matches(root_id)

    @pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
    def test_built_cert_id_equals_the_clients(
        self, tpki: RevocationPKI, algorithm: str, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        der = openssl_request(paths, tmp_path / "r.der", "leaf0", nonce=False, digest=algorithm)
        sent = parse_request(der).cert_ids[0]
        built = IssuerMatcher(tpki.intermediate).cert_id(sent.serial, algorithm)
        assert built == sent
        assert built.der == sent.der

    def test_unsupported_algorithm_is_refused(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError):
            IssuerMatcher(tpki.intermediate).cert_id(1, "md5")


def answer(cert_id: CertID, status: CertStatus) -> SingleAnswer:
    return SingleAnswer(cert_id, status, NOW, NEXT)


def revoked_key_compromise() -> CertStatus:
    return CertStatus.revoked(NOW - HOUR, x509.ReasonFlags.key_compromise)


class TestBuildResponse:
    def test_good_response_verifies_in_openssl(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf0", nonce=False))
        response = build_response(signer, [answer(info.cert_ids[0], CertStatus.good())], NOW)
        output = check_response(paths, response, tmp_path, "leaf0")
        assert f"{paths['leaf0']}: good" in output
        assert lint_ocsp_response(response) == []

    def test_revoked_response_shows_reason(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf1", nonce=False))
        response = build_response(signer, [answer(info.cert_ids[0], revoked_key_compromise())], NOW)
        output = check_response(paths, response, tmp_path, "leaf1")
        assert f"{paths['leaf1']}: revoked" in output
        assert "Reason: keyCompromise" in output
        assert lint_ocsp_response(response) == []

    def test_unknown_response(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf2", nonce=False))
        response = build_response(signer, [answer(info.cert_ids[0], CertStatus.unknown())], NOW)
        output = check_response(paths, response, tmp_path, "leaf2")
        assert f"{paths['leaf2']}: unknown" in output

    def test_every_certificate_of_a_request_is_answered(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        info = parse_request(openssl_request(paths, tmp_path / "r.der", "leaf0", "leaf1", "leaf2"))
        statuses = [CertStatus.good(), revoked_key_compromise(), CertStatus.unknown()]
        answers = [answer(c, s) for c, s in zip(info.cert_ids, statuses, strict=True)]
        response = build_response(signer, answers, NOW, nonce=info.nonce)
        output = check_response(paths, response, tmp_path, "leaf0", "leaf1", "leaf2")
        assert f"{paths['leaf0']}: good" in output
        assert f"{paths['leaf1']}: revoked" in output
        assert f"{paths['leaf2']}: unknown" in output
        assert lint_ocsp_response(response) == []
        loaded = ocsp.load_der_ocsp_response(response)
        assert [r.serial_number for r in loaded.responses] == [c.serial for c in info.cert_ids]

    def test_nonce_is_echoed(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        request = openssl_request(paths, tmp_path / "req.der", "leaf0")
        info = parse_request(request)
        assert info.nonce is not None
        response = build_response(
            signer, [answer(info.cert_ids[0], CertStatus.good())], NOW, nonce=info.nonce
        )
        (tmp_path / "resp.der").write_bytes(response)
        # With -reqin and no -cert, openssl checks the nonce of that very request.
        result = openssl(
            "ocsp", "-respin", tmp_path / "resp.der", "-reqin", tmp_path / "req.der",
            "-issuer", paths["int"], "-CAfile", paths["root"], "-verify_other", paths["int"],
            "-resp_text",
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Nonce Verify error" not in output
        assert "Response verify OK" in output
        assert info.nonce[2:].hex().upper() in output
        parsed = asn1_ocsp.OCSPResponse.load(response)
        tbs = parsed["response_bytes"]["response"].parsed["tbs_response_data"]
        assert tbs["response_extensions"][0]["extn_value"].contents == info.nonce
        assert lint_ocsp_response(response) == []

    def test_sha256_cert_id_is_answered(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        request = openssl_request(paths, tmp_path / "r.der", "leaf0", nonce=False, digest="sha256")
        info = parse_request(request)
        response = build_response(signer, [answer(info.cert_ids[0], CertStatus.good())], NOW)
        output = check_response(paths, response, tmp_path, "leaf0", digest="sha256")
        assert f"{paths['leaf0']}: good" in output

    def test_cryptography_loads_and_verifies(self, tpki: RevocationPKI, signer: OCSPSigner) -> None:
        info = parse_request(cryptography_request(tpki, None))
        response = build_response(signer, [answer(info.cert_ids[0], revoked_key_compromise())], NOW)
        loaded = ocsp.load_der_ocsp_response(response)
        assert loaded.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert loaded.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert loaded.revocation_reason is x509.ReasonFlags.key_compromise
        assert loaded.revocation_time_utc == NOW - HOUR
        assert loaded.this_update_utc == NOW
        assert loaded.next_update_utc == NEXT
        assert loaded.produced_at_utc == NOW
        assert loaded.serial_number == tpki.leaves[0].serial_number
        assert loaded.certificates == [tpki.ocsp_signer]
        ski = tpki.ocsp_signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert loaded.responder_key_hash == ski.value.digest
        assert loaded.responder_name is None
        public_key = tpki.ocsp_signer.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert loaded.signature_hash_algorithm is not None
        public_key.verify(
            loaded.signature,
            loaded.tbs_response_bytes,
            ec.ECDSA(loaded.signature_hash_algorithm),
        )

    def test_never_issued_is_unknown_by_default(
        self, paths: dict[str, Path], signer: OCSPSigner, tmp_path: Path
    ) -> None:
        cert_id = signer.matcher.cert_id(0xDEAD)
        single = never_issued_answer(cert_id, NOW, NEXT, extended_revoke=False)
        assert single.status == CertStatus.unknown()

    def test_never_issued_with_extended_revoke(
        self, tpki: RevocationPKI, signer: OCSPSigner, tmp_path: Path
    ) -> None:
        cert_id = signer.matcher.cert_id(0xDEAD)
        single = never_issued_answer(cert_id, NOW, NEXT, extended_revoke=True)
        assert single.status == CertStatus.revoked(EPOCH, x509.ReasonFlags.certificate_hold)
        response = build_response(signer, [single], NOW, extended_revoke=True)
        (tmp_path / "resp.der").write_bytes(response)
        text = openssl("ocsp", "-respin", tmp_path / "resp.der", "-resp_text", "-noverify").stdout
        assert "Cert Status: revoked" in text
        assert "Revocation Time: Jan  1 00:00:00 1970 GMT" in text
        assert "Revocation Reason: certificateHold (0x6)" in text
        # OpenSSL 3.0 still names 1.3.6.1.5.5.7.48.1.9 after its older use, "id-pkix-OCSP-valid".
        assert "Response Extensions:\n        valid: " in text
        loaded = ocsp.load_der_ocsp_response(response)
        revoke = loaded.extensions.get_extension_for_oid(
            x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.9")
        )
        assert not revoke.critical
        assert lint_ocsp_response(response) == []

    def test_rsa_and_ed25519_signers(self, tpki: RevocationPKI) -> None:
        info = parse_request(cryptography_request(tpki, None))
        for key in (
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ed25519.Ed25519PrivateKey.generate(),
        ):
            responder = _responder_cert(tpki, key)
            signer = OCSPSigner(tpki.intermediate, responder, key)
            response = build_response(signer, [answer(info.cert_ids[0], CertStatus.good())], NOW)
            loaded = ocsp.load_der_ocsp_response(response)
            if isinstance(key, rsa.RSAPrivateKey):
                from cryptography.hazmat.primitives.asymmetric import padding

                key.public_key().verify(
                    loaded.signature, loaded.tbs_response_bytes, padding.PKCS1v15(), hashes.SHA256()
                )
            else:
                key.public_key().verify(loaded.signature, loaded.tbs_response_bytes)
            assert lint_ocsp_response(response) == []

    def test_live_response_cost_beyond_signature(
        self, tpki: RevocationPKI, signer: OCSPSigner, paths: dict[str, Path], tmp_path: Path
    ) -> None:
        request = openssl_request(paths, tmp_path / "r.der", "leaf0")
        rounds = 2000
        started = time.perf_counter()
        for _ in range(rounds):
            info = parse_request(request)
            build_response(signer, [answer(info.cert_ids[0], CertStatus.good())], NOW, info.nonce)
        total = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for _ in range(rounds):
            tpki.ocsp_signer_key.sign(request, ec.ECDSA(hashes.SHA256()))
        signing = (time.perf_counter() - started) / rounds
        print(
            f"\nparse + build one nonce response: {total * 1e6:.0f} µs, of which P-256 signature "
            f"{signing * 1e6:.0f} µs, Python beyond it {(total - signing) * 1e6:.0f} µs"
        )


def _responder_cert(
    tpki: RevocationPKI, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other OCSP signer")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(tpki.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(77)
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + 24 * HOUR)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .sign(tpki.intermediate_key, hashes.SHA256())
    )


class TestBuildResponseErrors:
    def test_no_answers(self, signer: OCSPSigner) -> None:
        with pytest.raises(PKIError):
            build_response(signer, [], NOW)

    def test_naive_produced_at(self, signer: OCSPSigner) -> None:
        single = answer(signer.matcher.cert_id(1), CertStatus.good())
        with pytest.raises(PKIError):
            build_response(signer, [single], NOW.replace(tzinfo=None))

    def test_next_update_not_after_this_update(self, signer: OCSPSigner) -> None:
        single = SingleAnswer(signer.matcher.cert_id(1), CertStatus.good(), NOW, NOW)
        with pytest.raises(PKIError):
            build_response(signer, [single], NOW)

    def test_good_for_another_issuer_is_refused(
        self, tpki: RevocationPKI, signer: OCSPSigner
    ) -> None:
        foreign = IssuerMatcher(tpki.root).cert_id(1)
        with pytest.raises(PKIError) as exc:
            build_response(signer, [answer(foreign, CertStatus.good())], NOW)
        assert exc.value.kind is ErrorKind.INTERNAL

    def test_unknown_for_another_issuer_is_allowed(
        self, tpki: RevocationPKI, signer: OCSPSigner
    ) -> None:
        foreign = IssuerMatcher(tpki.root).cert_id(1)
        assert build_response(signer, [answer(foreign, CertStatus.unknown())], NOW)

    def test_empty_nonce(self, signer: OCSPSigner) -> None:
        single = answer(signer.matcher.cert_id(1), CertStatus.good())
        with pytest.raises(PKIError):
            build_response(signer, [single], NOW, nonce=b"")

    def test_inconsistent_statuses(self) -> None:
        with pytest.raises(PKIError):
            CertStatus(CertStatusKind.REVOKED)
        with pytest.raises(PKIError):
            CertStatus(CertStatusKind.GOOD, reason=x509.ReasonFlags.superseded)
        with pytest.raises(PKIError):
            CertStatus.revoked(NOW.replace(tzinfo=None))
        with pytest.raises(PKIError):
            CertStatus.revoked(NOW, x509.ReasonFlags.remove_from_crl)


class TestOCSPSigner:
    def test_responder_without_ocsp_signing_is_refused(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError) as exc:
            OCSPSigner(tpki.intermediate, tpki.leaves[0], tpki.ocsp_signer_key)
        assert exc.value.kind is ErrorKind.CONFIG

    def test_responder_of_another_issuer_is_refused(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError) as exc:
            OCSPSigner(tpki.root, tpki.ocsp_signer, tpki.ocsp_signer_key)
        assert exc.value.kind is ErrorKind.CONFIG

    def test_wrong_key_is_refused(self, tpki: RevocationPKI) -> None:
        with pytest.raises(PKIError) as exc:
            OCSPSigner(tpki.intermediate, tpki.ocsp_signer, tpki.intermediate_key)
        assert exc.value.kind is ErrorKind.CONFIG


class TestErrorResponse:
    @pytest.mark.parametrize(
        ("status", "text"),
        [
            (ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedrequest (1)"),
            (ocsp.OCSPResponseStatus.INTERNAL_ERROR, "internalerror (2)"),
            (ocsp.OCSPResponseStatus.TRY_LATER, "trylater (3)"),
            (ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized (6)"),
        ],
    )
    def test_status_is_printed(
        self, status: ocsp.OCSPResponseStatus, text: str, tmp_path: Path
    ) -> None:
        der = build_error_response(status)
        (tmp_path / "err.der").write_bytes(der)
        result = openssl("ocsp", "-respin", tmp_path / "err.der", "-resp_text", "-noverify")
        assert f"Responder Error: {text}" in result.stdout + result.stderr
        assert ocsp.load_der_ocsp_response(der).response_status is status
        assert asn1_ocsp.OCSPResponse.load(der)["response_bytes"].native is None

    def test_successful_is_not_an_error(self) -> None:
        with pytest.raises(PKIError):
            build_error_response(ocsp.OCSPResponseStatus.SUCCESSFUL)


class TestRequestVersion:
    def test_explicit_v1_is_accepted_and_v2_refused(self, tpki: RevocationPKI) -> None:
        der = cryptography_request(tpki, None)
        # Insert version [0] EXPLICIT INTEGER at the start of tbsRequest.
        outer = asn1_ocsp.OCSPRequest.load(der)
        tbs_contents = outer["tbs_request"].contents
        for version, ok in ((b"\x00", True), (b"\x01", False)):
            tbs = b"\xa0\x03\x02\x01" + version + tbs_contents
            request = b"\x30" + bytes((len(tbs) + 2,)) + b"\x30" + bytes((len(tbs),)) + tbs
            if ok:
                assert parse_request(request).cert_ids[0].serial == tpki.leaves[0].serial_number
            else:
                with pytest.raises(PKIError):
                    parse_request(request)
