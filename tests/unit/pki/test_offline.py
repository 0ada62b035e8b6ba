"""Offline-root files: a carried CSR is checked against the review, imports against the chain."""

from __future__ import annotations

import datetime
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sqlalchemy import insert

from pki.clock import SystemClock
from pki.config import CeremonyConfig
from pki.errors import ErrorKind, PKIError
from pki.offline import ImportService, intermediate_csr, sign_intermediate
from pki.serial import serial_hex
from pki.store import Database, session_scope
from pki.store.repository import CertificateRepository
from pki.store.revocation_models import OCSPResponseRecord, OCSPResponseRepository
from tests.conftest import CONFIG_DIR
from tests.unit.pki.conftest import Hierarchy, build_hierarchy
from tests.unit.pki.test_crl_marker import wait_for_lock_waiters


def _ceremony(h: Hierarchy, name: str = "devices") -> CeremonyConfig:
    return h.config.ceremony(CONFIG_DIR / "ceremonies" / f"{name}.toml")


@pytest.fixture
def h(sqlite_db: Database) -> Hierarchy:
    return build_hierarchy(sqlite_db)


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Database:
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('online') / 'pki.db'}")
    db.upgrade()
    return db


class TestSignIntermediate:
    def test_csr_is_signed_as_reviewed(self, h: Hierarchy) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = intermediate_csr(_ceremony(h), h.config.profile("intermediate"), key)
        issued = sign_intermediate(
            h.issuance, _ceremony(h), h.config.profile("intermediate"), csr, h.root, actor="t"
        )
        assert issued.certificate.public_key() == key.public_key()
        issued.certificate.verify_directly_issued_by(h.root.certificate)

    def test_csr_with_another_subject_refused(self, h: Hierarchy) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Evil CA")]))
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(PKIError) as caught:
            sign_intermediate(
                h.issuance, _ceremony(h), h.config.profile("intermediate"), csr, h.root, actor="t"
            )
        assert caught.value.kind is ErrorKind.POLICY and "reviewed" in caught.value.message

    def test_csr_key_type_outside_profile_refused(self, h: Hierarchy) -> None:
        key = ec.generate_private_key(ec.SECP521R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "DE"),
                        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Example IoT"),
                        x509.NameAttribute(x509.NameOID.COMMON_NAME, "Example IoT Device CA"),
                    ]
                )
            )
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(PKIError):
            sign_intermediate(
                h.issuance, _ceremony(h), h.config.profile("intermediate"), csr, h.root, actor="t"
            )


class TestImport:
    def _import_root(self, h: Hierarchy, db: Database) -> ImportService:
        service = ImportService(db, SystemClock())
        service.issuer_certificate(
            "root",
            h.root.certificate,
            parent_id=None,
            profile=h.config.profile("root"),
            token_public_key=None,
            key_uri="offline:root",
            actor="t",
        )
        return service

    def test_intermediate_imports_once(self, h: Hierarchy, fresh: Database) -> None:
        service = self._import_root(h, fresh)
        kwargs = {
            "parent_id": "root",
            "profile": h.config.profile("intermediate"),
            "token_public_key": h.devices.key.public_key(),
            "key_uri": "memory:devices",
            "actor": "t",
        }
        service.issuer_certificate("devices", h.devices.certificate, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(PKIError) as caught:
            service.issuer_certificate("devices", h.devices.certificate, **kwargs)  # type: ignore[arg-type]
        assert caught.value.kind is ErrorKind.CONFLICT

    def test_intermediate_for_another_key_refused(self, h: Hierarchy, fresh: Database) -> None:
        service = self._import_root(h, fresh)
        with pytest.raises(PKIError, match="another key"):
            service.issuer_certificate(
                "devices",
                h.devices.certificate,
                parent_id="root",
                profile=h.config.profile("intermediate"),
                token_public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
                key_uri="memory:other",
                actor="t",
            )

    def test_intermediate_of_another_root_refused(
        self, h: Hierarchy, fresh: Database, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        other_db = Database(f"sqlite:///{tmp_path_factory.mktemp('other') / 'pki.db'}")
        other_db.upgrade()
        other = build_hierarchy(other_db)
        service = self._import_root(h, fresh)
        with pytest.raises(PKIError, match="does not chain"):
            service.issuer_certificate(
                "devices",
                other.devices.certificate,
                parent_id="root",
                profile=h.config.profile("intermediate"),
                token_public_key=other.devices.key.public_key(),
                key_uri="memory:other",
                actor="t",
            )

    def test_root_certificate_is_no_intermediate(self, h: Hierarchy, fresh: Database) -> None:
        service = self._import_root(h, fresh)
        with pytest.raises(PKIError, match="pathLenConstraint"):
            service.issuer_certificate(
                "devices",
                h.root.certificate,
                parent_id="root",
                profile=h.config.profile("intermediate"),
                token_public_key=None,
                key_uri="memory:x",
                actor="t",
            )


class TestOCSPImport:
    def test_import_beside_a_concurrent_writer_of_the_same_response(
        self, hierarchy: Hierarchy
    ) -> None:
        h = hierarchy
        if h.db.is_sqlite:
            pytest.skip("SQLite has one writer at a time: no two writers of one row")
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        subject = h.devices.certificate
        response_der = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=subject,
                issuer=h.root.certificate,
                algorithm=hashes.SHA1(),  # noqa: S303 RFC 5019 CertIDs use SHA-1
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=now,
                next_update=now + datetime.timedelta(days=1),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, h.root.certificate)
            .sign(h.root.key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        serial = serial_hex(subject.serial_number)
        with session_scope(h.db) as s:
            certificate_id = CertificateRepository(s).by_serial(serial, "root").id
        # A pre-signing run writes the same certificate's response and has not committed yet.
        holder = h.db.engine.connect()
        holder.begin()
        holder.execute(
            insert(OCSPResponseRecord).values(
                certificate_id=certificate_id,
                issuer_id="root",
                serial_hex=serial,
                status="good",
                this_update=now,
                next_update=now + datetime.timedelta(hours=1),
                signer_serial_hex="00",
                response_der=b"other",
            )
        )
        results: list[object] = []

        def run() -> None:
            db = Database(h.db.url)  # its own engine, as another process
            try:
                results.append(
                    ImportService(db, SystemClock()).ocsp_response(response_der, actor="t")
                )
            except BaseException as e:  # counted below
                results.append(e)
            finally:
                db.dispose()

        worker = threading.Thread(target=run)
        worker.start()
        try:
            wait_for_lock_waiters(h.db, 1)
            holder.commit()
        finally:
            holder.close()
            worker.join(timeout=60)
        assert not worker.is_alive()
        assert results == [("root", serial, "good")]
        with session_scope(h.db) as s:
            assert OCSPResponseRepository(s).of_issuer("root") == [(serial, response_der)]
