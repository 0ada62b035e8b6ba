"""Importing an offline root's CRL: checked like one signed here, and complete against the store."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from pki.crl import RevokedEntry, build_crl
from pki.crl_import import CRLImporter
from pki.crl_publisher import CRLPublisher
from pki.errors import ErrorKind, PKIError
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.store import session_scope
from pki.store.revocation_models import CRLRepository
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_revocation_support import MovableClock, add_ocsp_signer

LONG = datetime.timedelta(days=30)


class Setup:
    def __init__(self, h: Hierarchy) -> None:
        self.h = h
        self.clock = MovableClock()
        self.importer = CRLImporter(h.db, self.clock)
        self.publisher = CRLPublisher(h.db, self.clock, h.config.ca.urls)

    def root_crl(
        self, number: int, revoked: Sequence[int] = (), *, delta_of: int | None = None
    ) -> bytes:
        now = self.clock.now()
        return build_crl(
            issuer_cert=self.h.root.certificate,
            issuer_key=self.h.root.key,
            entries=[RevokedEntry(s, now, x509.ReasonFlags.key_compromise) for s in revoked],
            crl_number=number,
            this_update=now,
            next_update=now + datetime.timedelta(days=7),
            distribution_point_url=None,
            delta_of=delta_of,
            hash_algorithm=self.h.root.hash,
        )

    def store(self, der: bytes) -> int:
        return self.importer.store("root", self.h.root.certificate, der).crl_number

    def due(self) -> str | None:
        return self.publisher.due("root", period=LONG, delay=datetime.timedelta(0))


@pytest.fixture
def setup(hierarchy: Hierarchy) -> Setup:
    return Setup(hierarchy)


def refused(setup: Setup, der: bytes, kind: ErrorKind) -> str:
    with pytest.raises(PKIError) as e:
        setup.store(der)
    assert e.value.kind is kind
    return e.value.message


def test_imported_root_crl_is_the_latest_and_counts_as_complete(setup: Setup) -> None:
    assert setup.due() == "no CRL yet"
    assert setup.store(setup.root_crl(5)) == 5
    assert setup.due() is None
    with session_scope(setup.h.db) as s:
        latest = CRLRepository(s).latest("root", is_delta=False)
        assert latest is not None and latest.crl_number == 5
    # The scheduler's own root CRLs continue above the imported number.
    assert setup.publisher.publish(setup.h.root).crl_number == 6


def test_import_refuses_a_crl_without_a_revoked_certificate(setup: Setup) -> None:
    keys: dict[str, CertificateIssuerPrivateKeyTypes] = {}
    signer = add_ocsp_signer(setup.h, keys, issuer="root").certificate
    setup.store(setup.root_crl(1))
    RevocationService(setup.h.db, setup.clock).revoke(
        serial_hex(signer.serial_number),
        x509.ReasonFlags.key_compromise,
        actor="t",
        issuer_id="root",
    )
    assert setup.due() == "revocations since the last CRL"
    message = refused(setup, setup.root_crl(2), ErrorKind.CONFLICT)
    assert "lacks 1 revoked certificate" in message
    assert setup.store(setup.root_crl(3, [signer.serial_number])) == 3
    assert setup.due() is None


def test_import_refuses_what_would_not_be_signed_here(setup: Setup) -> None:
    setup.store(setup.root_crl(4))
    assert "not above" in refused(setup, setup.root_crl(4), ErrorKind.CONFLICT)
    assert "not above" in refused(setup, setup.root_crl(3), ErrorKind.CONFLICT)
    good = setup.root_crl(7)
    tampered = good[:-1] + bytes((good[-1] ^ 1,))
    assert "signature" in refused(setup, tampered, ErrorKind.BAD_REQUEST)
    assert "delta" in refused(setup, setup.root_crl(8, delta_of=4), ErrorKind.BAD_REQUEST)
    assert "not a DER CRL" in refused(setup, b"\x30\x00", ErrorKind.BAD_REQUEST)
    setup.clock.advance(datetime.timedelta(days=8))
    assert "expired" in refused(setup, good, ErrorKind.BAD_REQUEST)
    with session_scope(setup.h.db) as s:
        assert CRLRepository(s).numbers("root") == [4]
