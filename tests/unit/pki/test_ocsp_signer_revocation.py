"""A revoked OCSP signer is never used again: not live, not through what it pre-signed."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from sqlalchemy import func, select

from pki.ocsp_responder import SIGNER_RETRY, OCSPPresigner, SignerSet
from pki.serial import serial_hex
from pki.store import session_scope
from pki.store.revocation_models import OCSPResponseRecord
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_ocsp_responder import NONCE, Setup
from tests.unit.pki.test_revocation_support import add_ocsp_signer, issue_device

KC = x509.ReasonFlags.key_compromise


@pytest.fixture
def setup(hierarchy: Hierarchy) -> Setup:
    return Setup(hierarchy)


def signed_by(der: bytes) -> x509.Certificate:
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificates[0]


def rows_by_signer(setup: Setup) -> dict[str, int]:
    with session_scope(setup.h.db) as s:
        rows = s.execute(
            select(OCSPResponseRecord.signer_serial_hex, func.count())
            .where(OCSPResponseRecord.issuer_id == "devices")
            .group_by(OCSPResponseRecord.signer_serial_hex)
        ).all()
    return {signer: int(count) for signer, count in rows}


def revoke_signer(setup: Setup, signer: x509.Certificate) -> None:
    setup.revocation.revoke(
        serial_hex(signer.serial_number), KC, actor="t", issuer_id="devices", allow_guarded=True
    )


def test_revoking_the_signer_drops_what_it_signed_in_the_same_commit(setup: Setup) -> None:
    for i in range(3):
        issue_device(setup.h, f"DEV-{i}")
    setup.presigner.run("devices")
    old = serial_hex(setup.signer_cert.serial_number)
    assert rows_by_signer(setup) == {old: 4}  # three devices and the signer itself
    revoke_signer(setup, setup.signer_cert)
    assert rows_by_signer(setup) == {}


def test_next_live_answer_after_revocation_is_signed_by_the_new_signer(setup: Setup) -> None:
    cert = issue_device(setup.h).certificate
    first = setup.responder.respond(setup.request(cert.serial_number, nonce=NONCE))
    assert signed_by(first.der) == setup.signer_cert  # the signer set is loaded and cached
    setup.clock.advance(datetime.timedelta(seconds=2))
    newer = add_ocsp_signer(setup.h, setup.keys).certificate
    revoke_signer(setup, setup.signer_cert)
    answer = setup.responder.respond(setup.request(cert.serial_number, nonce=NONCE))
    assert answer.source == "live"
    assert signed_by(answer.der) == newer


def test_revoked_signer_without_successor_is_try_later_until_one_is_issued(setup: Setup) -> None:
    cert = issue_device(setup.h).certificate
    request = setup.request(cert.serial_number, nonce=NONCE)
    assert signed_by(setup.responder.respond(request).der) == setup.signer_cert
    revoke_signer(setup, setup.signer_cert)
    assert setup.responder.respond(request).status is ocsp.OCSPResponseStatus.TRY_LATER
    assert setup.responder.respond(request).status is ocsp.OCSPResponseStatus.TRY_LATER
    newer = add_ocsp_signer(setup.h, setup.keys).certificate  # signer renewal
    setup.clock.advance(SIGNER_RETRY)
    assert signed_by(setup.responder.respond(request).der) == newer


def test_a_response_stored_by_a_stale_presigner_is_never_served(setup: Setup) -> None:
    certs = [issue_device(setup.h, f"DEV-{i}").certificate for i in range(3)]
    # A pre-signing job elsewhere loaded its signers before the revocation ...
    stale = OCSPPresigner(
        setup.h.db, setup.clock, SignerSet(setup.h.db, setup.clock, setup.keys.__getitem__)
    )
    stale.signers.refresh(force=True)
    setup.clock.advance(datetime.timedelta(seconds=2))
    newer = add_ocsp_signer(setup.h, setup.keys).certificate
    revoke_signer(setup, setup.signer_cert)
    # ... and stores what the revoked signer signed after the revocation committed.
    for cert in certs:
        assert stale.resign("devices", serial_hex(cert.serial_number))
    old = serial_hex(setup.signer_cert.serial_number)
    assert rows_by_signer(setup) == {old: 3}
    for cert in certs:
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert answer.source == "live" and signed_by(answer.der) == newer
    # The next pre-signing run replaces each of them with the new signer's.
    assert setup.presigner.run("devices").signed["devices"] == 5  # 3 devices, 2 signers
    assert rows_by_signer(setup) == {serial_hex(newer.serial_number): 5}
    for cert in certs:
        answer = setup.responder.respond(setup.request(cert.serial_number))
        assert answer.source == "presigned" and signed_by(answer.der) == newer
