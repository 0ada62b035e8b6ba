"""The OCSP responder chain over a real database: issuer filter, pre-signed store, live signer."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import ocsp

from pki import lint
from pki.ocsp import IssuerMatcher
from pki.ocsp_responder import (
    OCSPPresigner,
    OCSPResponder,
    OCSPResponderConfig,
    SignerSet,
)
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.store import CertificateRecord, CertificateStatus, session_scope
from pki.store.revocation_models import OCSPResponseRepository
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.revocation_pki import make_pki
from tests.unit.pki.test_revocation_support import (
    MovableClock,
    add_ocsp_signer,
    issue_device,
    ocsp_request,
)

NONCE = bytes(range(16))


class Setup:
    def __init__(self, h: Hierarchy, config: OCSPResponderConfig | None = None) -> None:
        self.h = h
        self.keys: dict[str, CertificateIssuerPrivateKeyTypes] = {}
        self.signer_cert = add_ocsp_signer(h, self.keys).certificate
        add_ocsp_signer(h, self.keys, issuer="root")
        self.clock = MovableClock()
        self.config = config or OCSPResponderConfig()
        self.signers = SignerSet(h.db, self.clock, self.keys.__getitem__)
        self.responder = OCSPResponder.standard(h.db, self.clock, self.signers, self.config)
        self.presigner = OCSPPresigner(h.db, self.clock, self.signers, self.config)
        self.matcher = IssuerMatcher(h.devices.certificate)
        self.revocation = RevocationService(h.db, self.clock)

    def request(self, *serials: int, nonce: bytes | None = None, alg: str = "sha1") -> bytes:
        return ocsp_request([self.matcher.cert_id(s, alg) for s in serials], nonce)


@pytest.fixture
def setup(hierarchy: Hierarchy) -> Setup:
    return Setup(hierarchy)


def statuses(der: bytes) -> list[ocsp.OCSPCertStatus]:
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return [r.certificate_status for r in response.responses]


class TestOCSPResponder:
    def test_respond_issued_is_good_and_lints_clean(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.GOOD]
        assert answer.source == "live" and answer.cacheable
        assert lint.blocking(lint.lint_ocsp_response(answer.der)) == []
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.certificates[0] == setup.signer_cert
        response.certificates[0].public_key().verify(  # type: ignore[call-arg]
            response.signature,
            response.tbs_response_bytes,
            ec.ECDSA(response.signature_hash_algorithm),  # type: ignore[arg-type]
        )

    def test_respond_revoked_carries_time_and_reason(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.revocation.revoke(
            serial_hex(cert.serial_number), x509.ReasonFlags.key_compromise, actor="t"
        )
        response = ocsp.load_der_ocsp_response(
            setup.responder.respond(setup.request(cert.serial_number)).der
        )
        assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert response.revocation_reason is x509.ReasonFlags.key_compromise
        assert response.revocation_time_utc == setup.clock.now()

    def test_respond_never_issued_is_unknown(self, setup: Setup) -> None:
        answer = setup.responder.respond(setup.request(0x1234567))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.UNKNOWN]

    def test_respond_never_issued_extended_revoke(self, hierarchy: Hierarchy) -> None:
        s = Setup(hierarchy, OCSPResponderConfig(extended_revoke=True))
        response = ocsp.load_der_ocsp_response(s.responder.respond(s.request(0x1234567)).der)
        assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert response.revocation_reason is x509.ReasonFlags.certificate_hold
        oids = [e.oid.dotted_string for e in response.extensions]
        assert "1.3.6.1.5.5.7.48.1.9" in oids

    def test_respond_pending_is_never_good(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        with session_scope(setup.h.db) as s:
            row = s.query(CertificateRecord).filter_by(serial_hex=serial_hex(cert.serial_number))
            row.one().status = CertificateStatus.PENDING
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.UNKNOWN]

    def test_respond_expired_is_never_good(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.presigner.run()
        with session_scope(setup.h.db) as s:
            row = s.query(CertificateRecord).filter_by(serial_hex=serial_hex(cert.serial_number))
            row.one().not_after = setup.clock.now() - datetime.timedelta(seconds=1)
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert answer.source == "live"  # the stored "good" is not served past expiry
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.UNKNOWN]

    def test_respond_foreign_issuer_unauthorized(self, setup: Setup) -> None:
        other = make_pki(leaf_count=1)
        foreign = IssuerMatcher(other.intermediate).cert_id(other.leaves[0].serial_number)
        answer = setup.responder.respond(ocsp_request([foreign]))
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
        assert not answer.cacheable

    def test_respond_malformed(self, setup: Setup) -> None:
        for bad in (b"", b"\x30\x03\x02\x01\x01", b"garbage" * 10):
            response = ocsp.load_der_ocsp_response(setup.responder.respond(bad).der)
            assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST

    def test_respond_several_certificates_answers_each(self, setup: Setup) -> None:
        good = issue_device(setup.h, "DEV-A").certificate
        revoked = issue_device(setup.h, "DEV-B").certificate
        setup.revocation.revoke(
            serial_hex(revoked.serial_number), x509.ReasonFlags.superseded, actor="t"
        )
        other = make_pki(leaf_count=1)
        foreign = IssuerMatcher(other.intermediate).cert_id(other.leaves[0].serial_number)
        der = ocsp_request(
            [
                setup.matcher.cert_id(good.serial_number),
                setup.matcher.cert_id(revoked.serial_number, "sha256"),
                setup.matcher.cert_id(0xABCDEF),
                foreign,
            ]
        )
        assert statuses(setup.responder.respond(der).der) == [
            ocsp.OCSPCertStatus.GOOD,
            ocsp.OCSPCertStatus.REVOKED,
            ocsp.OCSPCertStatus.UNKNOWN,
            ocsp.OCSPCertStatus.UNKNOWN,
        ]

    def test_respond_sha256_cert_id(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        answer = setup.responder.respond(setup.request(cert.serial_number, alg="sha256"))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.GOOD]

    def test_respond_nonce_is_echoed_and_signed_live(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.presigner.run()
        answer = setup.responder.respond(setup.request(cert.serial_number, nonce=NONCE))
        assert answer.source == "live" and not answer.cacheable
        response = ocsp.load_der_ocsp_response(answer.der)
        nonce = response.extensions.get_extension_for_class(x509.OCSPNonce)
        assert nonce.value.nonce == NONCE

    def test_respond_without_nonce_from_presigned_store(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        result = setup.presigner.run()
        assert result.signed["devices"] >= 1
        setup.clock.advance(datetime.timedelta(seconds=30))
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert answer.source == "presigned"
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.GOOD]
        assert lint.blocking(lint.lint_ocsp_response(answer.der)) == []
        # A SHA-256 CertID does not match the stored SHA-1 one: signed live instead.
        live = setup.responder.respond(setup.request(cert.serial_number, alg="sha256"))
        assert live.source == "live"

    def test_respond_revoked_at_once_after_presigning(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.presigner.run()
        # The revoking process has no signer (no listener): the VA must still say revoked.
        setup.revocation.revoke(
            serial_hex(cert.serial_number), x509.ReasonFlags.key_compromise, actor="t"
        )
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.REVOKED]
        assert answer.source == "live"

    def test_respond_stale_good_written_after_revocation_is_a_miss(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.presigner.run()
        with session_scope(setup.h.db) as s:
            stored = OCSPResponseRepository(s).fresh(
                "devices", serial_hex(cert.serial_number), setup.clock.now()
            )
            assert stored is not None
            good_row = stored[0]
        setup.revocation.revoke(
            serial_hex(cert.serial_number), x509.ReasonFlags.key_compromise, actor="t"
        )
        # A pre-signing job that read the row before the revocation writes "good" after it.
        with session_scope(setup.h.db) as s:
            OCSPResponseRepository(s).put(good_row)
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.REVOKED]

    def test_respond_without_signer_is_try_later(self, hierarchy: Hierarchy) -> None:
        clock = MovableClock()
        signers = SignerSet(
            hierarchy.db, clock, lambda uri: ec.generate_private_key(ec.SECP256R1())
        )
        responder = OCSPResponder.standard(hierarchy.db, clock, signers)
        cert = issue_device(hierarchy).certificate
        der = ocsp_request(
            [IssuerMatcher(hierarchy.devices.certificate).cert_id(cert.serial_number)]
        )
        response = ocsp.load_der_ocsp_response(responder.respond(der).der)
        assert response.response_status is ocsp.OCSPResponseStatus.TRY_LATER


class TestOCSPPresigner:
    def test_run_signs_every_issued_certificate_once(self, setup: Setup) -> None:
        for i in range(3):
            issue_device(setup.h, f"DEV-{i}")
        first = setup.presigner.run("devices")
        assert first.signed["devices"] == 4  # three devices and the signer itself
        assert setup.presigner.run("devices").signed["devices"] == 0

    def test_run_refreshes_after_half_the_validity(self, setup: Setup) -> None:
        issue_device(setup.h)
        setup.presigner.run("devices")
        setup.clock.advance(setup.config.validity / 2 - datetime.timedelta(minutes=1))
        assert setup.presigner.run("devices").signed["devices"] == 0
        setup.clock.advance(datetime.timedelta(minutes=2))
        assert setup.presigner.run("devices").signed["devices"] == 2

    def test_on_revoked_resigns_the_serial(self, setup: Setup) -> None:
        cert = issue_device(setup.h).certificate
        setup.presigner.run("devices")
        setup.revocation.listeners.append(setup.presigner.on_revoked)
        setup.revocation.revoke(
            serial_hex(cert.serial_number), x509.ReasonFlags.key_compromise, actor="t"
        )
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert answer.source == "presigned"
        assert statuses(answer.der) == [ocsp.OCSPCertStatus.REVOKED]

    def test_run_skips_issuer_without_signer(self, hierarchy: Hierarchy) -> None:
        clock = MovableClock()
        signers = SignerSet(
            hierarchy.db, clock, lambda uri: ec.generate_private_key(ec.SECP256R1())
        )
        result = OCSPPresigner(hierarchy.db, clock, signers).run()
        assert result.signed == {}
        assert set(result.skipped) == {"root", "devices"}

    def test_signer_set_uses_the_newest_signer(self, setup: Setup) -> None:
        setup.clock.advance(datetime.timedelta(seconds=2))
        newer = add_ocsp_signer(setup.h, setup.keys).certificate
        setup.clock.advance(datetime.timedelta(seconds=2))
        setup.signers.refresh(force=True)
        signer = setup.signers.signer("devices")
        assert signer is not None and signer.responder_cert == newer
