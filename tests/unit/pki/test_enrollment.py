"""Tests for pki.enrollment: EST enroll, re-enroll, IDevID, approval, serverkeygen, supersede."""

from __future__ import annotations

import datetime
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from pki import serverkeygen
from pki.clock import FixedClock, SystemClock
from pki.csr import check_request, load_csr, subject_text
from pki.device import DeviceService
from pki.enrollment import ApprovalPending, Enrolled, EnrollmentService, KeyGenerated
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig, load_est_config
from pki.identity import BasicCredentials, ClientIdentity
from pki.issuer import Issuer
from pki.revocation import RevocationService
from pki.store import CertificateRecord, CertificateStatus, Database, DeviceState, session_scope
from pki.store.enrollment_models import EnrollmentSecret, PendingApproval, SecretState
from pki.store.enrollment_repository import session_of
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy


class _Issuers:
    def __init__(self, h: Hierarchy) -> None:
        self.by_id = {"root": h.root, "devices": h.devices}

    def issuer(self, issuer_id: str) -> Issuer:
        return self.by_id[issuer_id]


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _manufacturer(name: str = "Acme Manufacturing CA") -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _idevid(ca: tuple[x509.Certificate, Any], serial_number: str) -> bytes:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


ACME = _manufacturer()


def _est(h: Hierarchy, **changes: Any) -> ESTConfig:
    base = load_est_config(h.config).model_dump()
    base["labels"]["factory"] = {
        "issuer": "devices",
        "profile": "device",
        "auth": ["idevid", "reenroll"],
        "manufacturer_anchors": ["acme.pem"],
        "idevid_auto_register": True,
    }
    base.update(changes)
    return ESTConfig.model_validate(base)


@pytest.fixture
def make_service(hierarchy: Hierarchy) -> Callable[..., EnrollmentService]:
    def make(clock: Any = None, **changes: Any) -> EnrollmentService:
        clock = clock or SystemClock()
        est = _est(hierarchy, **changes)
        return EnrollmentService(
            db=hierarchy.db,
            clock=clock,
            config=hierarchy.config,
            est=est,
            issuance=hierarchy.issuance,
            issuers=_Issuers(hierarchy),
            devices=DeviceService(hierarchy.db, clock, max_failures=est.max_failures),
            revocation=RevocationService(hierarchy.db, clock),
            anchors={"factory": [ACME[0]]},
        )

    return make


@pytest.fixture
def service(make_service: Callable[..., EnrollmentService]) -> EnrollmentService:
    return make_service()


def _basic(device_id: str, secret: str) -> ClientIdentity:
    return ClientIdentity(basic=BasicCredentials(device_id, secret))


def _tls(cert_der: bytes) -> ClientIdentity:
    return ClientIdentity(tls_chain_der=(cert_der,), source="tls")


def _register(service: EnrollmentService, device_id: str, labels: list[str] | None = None) -> str:
    service.devices.add(device_id, actor="t")
    return service.devices.new_secret(device_id, actor="t", labels=labels).secret


def _certs(db: Database) -> int:
    with session_scope(db) as s:
        return int(s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one())


def _status(db: Database, serial: str) -> tuple[CertificateStatus, str | None]:
    with session_scope(db) as s:
        r = s.execute(
            select(CertificateRecord).where(CertificateRecord.serial_hex == serial)
        ).scalar_one()
        return r.status, r.revocation_reason


def _enroll(
    service: EnrollmentService, device_id: str, secret: str, label: str | None = None
) -> Enrolled:
    csr, _ = device_csr(device_id)
    result = service.enroll(der(csr), label, _basic(device_id, secret))
    assert isinstance(result, Enrolled)
    return result


def _kind(call: Callable[[], object]) -> ErrorKind:
    with pytest.raises(PKIError) as e:
        call()
    return e.value.kind


class TestEnroll:
    def test_enroll_with_secret_issues_to_device(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1")
        enrolled = _enroll(service, "DEV-1", secret)
        attrs = enrolled.certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        assert attrs[0].value == "DEV-1"
        enrolled.certificate.verify_directly_issued_by(hierarchy.devices.certificate)
        assert [c.subject for c in enrolled.chain] == [
            hierarchy.devices.certificate.subject,
            hierarchy.root.certificate.subject,
        ]
        assert service.devices.show("DEV-1").state is DeviceState.ENROLLED
        with session_scope(hierarchy.db) as s:
            assert s.execute(select(EnrollmentSecret.state)).scalar_one() is SecretState.USED

    def test_reused_secret_refused_nothing_stored(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1")
        _enroll(service, "DEV-1", secret)
        before = _certs(hierarchy.db)
        csr, _ = device_csr("DEV-1")
        kind = _kind(lambda: service.enroll(der(csr), None, _basic("DEV-1", secret)))
        assert kind is ErrorKind.UNAUTHORIZED
        assert _certs(hierarchy.db) == before

    def test_wrong_secret_refused_and_counted(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        _register(service, "DEV-1")
        before = _certs(hierarchy.db)
        csr, _ = device_csr("DEV-1")
        kind = _kind(lambda: service.enroll(der(csr), None, _basic("DEV-1", "wrong")))
        assert kind is ErrorKind.UNAUTHORIZED
        assert _certs(hierarchy.db) == before
        assert service.devices.show("DEV-1").failures == 1

    def test_expired_secret_refused(self, make_service: Callable[..., EnrollmentService]) -> None:
        clock = FixedClock(datetime.datetime.now(datetime.UTC))
        service = make_service(clock)
        secret = _register(service, "DEV-1")
        clock.advance(datetime.timedelta(hours=73))
        csr, _ = device_csr("DEV-1")
        assert (
            _kind(lambda: service.enroll(der(csr), None, _basic("DEV-1", secret)))
            is ErrorKind.UNAUTHORIZED
        )

    def test_missing_auth_unauthorized(self, service: EnrollmentService) -> None:
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.enroll(der(csr), None, ClientIdentity())) is (
            ErrorKind.UNAUTHORIZED
        )

    def test_subject_mismatch_forbidden_secret_kept(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1")
        before = _certs(hierarchy.db)
        csr, _ = device_csr("DEV-2")
        kind = _kind(lambda: service.enroll(der(csr), None, _basic("DEV-1", secret)))
        assert kind is ErrorKind.FORBIDDEN
        assert _certs(hierarchy.db) == before
        _enroll(service, "DEV-1", secret)  # the secret still works

    def test_malformed_csr_bad_request(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        kind = _kind(lambda: service.enroll(b"\x30\x03junk", None, _basic("DEV-1", secret)))
        assert kind is ErrorKind.BAD_REQUEST

    def test_unknown_label_not_found(self, service: EnrollmentService) -> None:
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.enroll(der(csr), "nope", ClientIdentity())) is (
            ErrorKind.NOT_FOUND
        )

    def test_one_secret_two_concurrent_enrollments_one_wins(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1")
        before = _certs(hierarchy.db)
        results: list[object] = []
        barrier = threading.Barrier(4)

        def attempt() -> None:
            csr, _ = device_csr("DEV-1")
            barrier.wait()
            try:
                results.append(service.enroll(der(csr), None, _basic("DEV-1", secret)))
            except PKIError as e:
                results.append(e.kind)

        threads = [threading.Thread(target=attempt) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # The one in flight holds the device: the others get a conflict, or find the secret
        # spent (by then it bought a certificate for another key).
        assert sum(isinstance(r, Enrolled) for r in results) == 1
        assert results.count(ErrorKind.CONFLICT) + results.count(ErrorKind.UNAUTHORIZED) == 3
        assert _certs(hierarchy.db) == before + 1

    def test_second_enrollment_supersedes_first(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        again = service.devices.new_secret(
            "DEV-1", actor="t", may_redraw=True, reason="test"
        ).secret
        second = _enroll(service, "DEV-1", again)
        assert _status(hierarchy.db, first.serial_hex) == (CertificateStatus.REVOKED, "superseded")
        assert _status(hierarchy.db, second.serial_hex) == (CertificateStatus.ISSUED, None)
        assert service.devices.show("DEV-1").state is DeviceState.ENROLLED

    def test_supersede_waits_for_grace_period(
        self, make_service: Callable[..., EnrollmentService], hierarchy: Hierarchy
    ) -> None:
        service = make_service(supersede_grace_seconds=3600)
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        _enroll(
            service,
            "DEV-1",
            service.devices.new_secret("DEV-1", actor="t", may_redraw=True, reason="test").secret,
        )
        assert _status(hierarchy.db, first.serial_hex)[0] is CertificateStatus.ISSUED
        later = make_service(
            FixedClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)),
            supersede_grace_seconds=3600,
        )
        assert later.sweep_superseded() == [first.serial_hex]
        assert _status(hierarchy.db, first.serial_hex) == (CertificateStatus.REVOKED, "superseded")


class TestReenroll:
    def test_reenroll_renews_and_supersedes(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        csr, _ = device_csr("DEV-1")
        renewed = service.reenroll(der(csr), None, _tls(first.cert_der))
        assert renewed.certificate.subject == first.certificate.subject
        assert renewed.method == "reenroll"
        assert _status(hierarchy.db, first.serial_hex) == (CertificateStatus.REVOKED, "superseded")

    def test_reenroll_with_superseded_certificate_conflicts(
        self, make_service: Callable[..., EnrollmentService], hierarchy: Hierarchy
    ) -> None:
        # Within the grace period the superseded certificate is still unrevoked, but only the
        # current one re-enrolls.
        service = make_service(supersede_grace_seconds=3600)
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        csr, _ = device_csr("DEV-1")
        current = service.reenroll(der(csr), None, _tls(first.cert_der))
        assert _status(hierarchy.db, first.serial_hex)[0] is CertificateStatus.ISSUED
        before = _certs(hierarchy.db)
        # The same request again (its answer lost) gets the successor again; another key
        # gets nothing: the renewal already happened.
        again = service.reenroll(der(csr), None, _tls(first.cert_der))
        assert again.cert_der == current.cert_der
        other, _ = device_csr("DEV-1")
        with pytest.raises(PKIError) as e:
            service.reenroll(der(other), None, _tls(first.cert_der))
        assert e.value.kind is ErrorKind.CONFLICT and "superseded" in e.value.message
        assert _certs(hierarchy.db) == before
        assert service.reenroll(der(csr), None, _tls(current.cert_der)).device_id == "DEV-1"

    def test_reenroll_with_revoked_certificate_forbidden(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        service.revocation.revoke(first.serial_hex, x509.ReasonFlags.superseded, actor="t")
        before = _certs(hierarchy.db)
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.reenroll(der(csr), None, _tls(first.cert_der))) is (
            ErrorKind.FORBIDDEN
        )
        assert _certs(hierarchy.db) == before

    def test_reenroll_with_expired_certificate_forbidden(
        self, make_service: Callable[..., EnrollmentService]
    ) -> None:
        service = make_service()
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        late = make_service(
            FixedClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400))
        )
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: late.reenroll(der(csr), None, _tls(first.cert_der))) is (
            ErrorKind.FORBIDDEN
        )

    def test_reenroll_subject_change_forbidden(self, service: EnrollmentService) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        csr, _ = device_csr("DEV-1", extra=[x509.NameAttribute(NameOID.COMMON_NAME, "renamed")])
        assert _kind(lambda: service.reenroll(der(csr), None, _tls(first.cert_der))) is (
            ErrorKind.FORBIDDEN
        )

    def test_reenroll_san_change_forbidden(self, service: EnrollmentService) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        csr, _ = device_csr("DEV-1", sans=[x509.DNSName("dev-1.example")])
        assert _kind(lambda: service.reenroll(der(csr), None, _tls(first.cert_der))) is (
            ErrorKind.FORBIDDEN
        )

    def test_reenroll_with_foreign_certificate_forbidden(self, service: EnrollmentService) -> None:
        foreign = _idevid(ACME, "DEV-1")
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.reenroll(der(csr), None, _tls(foreign))) is (
            ErrorKind.FORBIDDEN
        )

    def test_reenroll_without_certificate_unauthorized(self, service: EnrollmentService) -> None:
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.reenroll(der(csr), None, ClientIdentity())) is (
            ErrorKind.UNAUTHORIZED
        )


class TestIDevID:
    def test_idevid_enrolls_and_registers_device(self, service: EnrollmentService) -> None:
        csr, _ = device_csr("ACME-42")
        result = service.enroll(der(csr), "factory", _tls(_idevid(ACME, "ACME-42")))
        assert isinstance(result, Enrolled)
        assert result.method == "idevid"
        assert service.devices.show("ACME-42").state is DeviceState.ENROLLED

    def test_idevid_unknown_manufacturer_forbidden(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        before = _certs(hierarchy.db)
        rogue = _manufacturer("Rogue CA")
        csr, _ = device_csr("ACME-42")
        kind = _kind(lambda: service.enroll(der(csr), "factory", _tls(_idevid(rogue, "ACME-42"))))
        assert kind is ErrorKind.FORBIDDEN
        assert _certs(hierarchy.db) == before

    def test_idevid_serial_mismatch_forbidden(self, service: EnrollmentService) -> None:
        csr, _ = device_csr("ACME-43")
        kind = _kind(lambda: service.enroll(der(csr), "factory", _tls(_idevid(ACME, "ACME-42"))))
        assert kind is ErrorKind.FORBIDDEN

    def test_basic_refused_on_idevid_label(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        kind = _kind(lambda: service.enroll(der(csr), "factory", _basic("DEV-1", secret)))
        assert kind is ErrorKind.UNAUTHORIZED


class TestApproval:
    def test_manual_approval_then_issue(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1", labels=["approval"])
        csr, _ = device_csr("DEV-1")
        before = _certs(hierarchy.db)
        first = service.enroll(der(csr), "approval", _basic("DEV-1", secret))
        again = service.enroll(der(csr), "approval", _basic("DEV-1", secret))
        assert isinstance(first, ApprovalPending) and isinstance(again, ApprovalPending)
        assert first.approval_id == again.approval_id
        assert first.retry_after == 60
        assert _certs(hierarchy.db) == before
        (pending,) = service.pending_approvals()
        assert (pending.approval_id, pending.device_id, pending.label) == (
            first.approval_id,
            "DEV-1",
            "approval",
        )
        assert pending.subject == subject_text(csr.subject)
        spki = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert pending.key_sha256 == hashlib.sha256(spki).hexdigest()
        assert service.approve(first.approval_id, actor="t").device_id == "DEV-1"
        assert service.pending_approvals() == []
        done = service.enroll(der(csr), "approval", _basic("DEV-1", secret))
        assert isinstance(done, Enrolled)
        with session_scope(hierarchy.db) as s:
            assert s.execute(select(PendingApproval.state)).scalar_one().value == "issued"
        # The same request again (its answer was lost) gets the same certificate; another
        # key gets nothing for the spent secret.
        resent = service.enroll(der(csr), "approval", _basic("DEV-1", secret))
        assert isinstance(resent, Enrolled) and resent.cert_der == done.cert_der
        other, _ = device_csr("DEV-1")
        assert _kind(lambda: service.enroll(der(other), "approval", _basic("DEV-1", secret))) is (
            ErrorKind.UNAUTHORIZED
        )
        assert _certs(hierarchy.db) == before + 1

    def test_approve_without_pending_not_found(self, service: EnrollmentService) -> None:
        _register(service, "DEV-1")
        assert _kind(lambda: service.approve(1, actor="t")) is ErrorKind.NOT_FOUND

    def test_approval_is_per_request(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1", labels=["approval"])
        first_csr, _ = device_csr("DEV-1")
        second_csr, _ = device_csr("DEV-1")
        first = service.enroll(der(first_csr), "approval", _basic("DEV-1", secret))
        second = service.enroll(der(second_csr), "approval", _basic("DEV-1", secret))
        assert isinstance(first, ApprovalPending) and isinstance(second, ApprovalPending)
        assert first.approval_id != second.approval_id
        service.approve(second.approval_id, actor="t")
        # The other request of the same device still waits.
        assert isinstance(
            service.enroll(der(first_csr), "approval", _basic("DEV-1", secret)), ApprovalPending
        )
        assert [p.approval_id for p in service.pending_approvals()] == [first.approval_id]
        done = service.enroll(der(second_csr), "approval", _basic("DEV-1", secret))
        assert isinstance(done, Enrolled)
        assert done.certificate.public_key() == second_csr.public_key()
        assert _kind(lambda: service.approve(second.approval_id, actor="t")) is (
            ErrorKind.NOT_FOUND
        )


class TestSecretLabels:
    def test_approval_secret_202_there_401_on_default(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1", labels=["approval"])
        csr, _ = device_csr("DEV-1")
        before = _certs(hierarchy.db)
        assert _kind(lambda: service.enroll(der(csr), None, _basic("DEV-1", secret))) is (
            ErrorKind.UNAUTHORIZED
        )
        assert _kind(lambda: service.enroll(der(csr), "devices", _basic("DEV-1", secret))) is (
            ErrorKind.UNAUTHORIZED
        )
        assert _certs(hierarchy.db) == before
        assert isinstance(
            service.enroll(der(csr), "approval", _basic("DEV-1", secret)), ApprovalPending
        )

    def test_default_secret_refused_on_approval_label(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        assert _kind(lambda: service.enroll(der(csr), "approval", _basic("DEV-1", secret))) is (
            ErrorKind.UNAUTHORIZED
        )
        assert isinstance(service.enroll(der(csr), None, _basic("DEV-1", secret)), Enrolled)


class TestServerKeyGen:
    def test_serverkeygen_key_matches_certificate(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        csr, csr_key = device_csr("DEV-1")
        result = service.serverkeygen(der(csr), None, _basic("DEV-1", secret))
        assert isinstance(result, KeyGenerated)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        pem = serialization.Encoding.PEM
        assert result.key.public_key().public_bytes(pem, spki) == (
            result.enrolled.certificate.public_key().public_bytes(pem, spki)
        )
        assert result.key.public_key().public_bytes(pem, spki) != (
            csr_key.public_key().public_bytes(pem, spki)
        )
        assert result.encrypted_key_der is None

    def test_serverkeygen_encrypts_to_tls_client_key(self, service: EnrollmentService) -> None:
        first = _enroll(service, "DEV-1", _register(service, "DEV-1"))
        ski = first.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        secret = service.devices.new_secret(
            "DEV-1", actor="t", may_redraw=True, reason="test"
        ).secret
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "DEV-1")]))
            .add_attribute(
                x509.ObjectIdentifier(serverkeygen.OID_ASYMMETRIC_DECRYPT_KEY_ID),
                ski.value.digest,
                _tag=x509.name._ASN1Type.OctetString,
            )
            .sign(key, hashes.SHA256())
        )
        identity = ClientIdentity(
            basic=BasicCredentials("DEV-1", secret), tls_chain_der=(first.cert_der,), source="tls"
        )
        result = service.serverkeygen(der(csr), None, identity)
        assert isinstance(result, KeyGenerated)
        assert result.encrypted_key_der is not None
        info = cms.ContentInfo.load(result.encrypted_key_der)
        assert info["content_type"].native == "enveloped_data"

    def test_serverkeygen_unknown_decrypt_key_refused(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "DEV-1")]))
            .add_attribute(
                x509.ObjectIdentifier(serverkeygen.OID_ASYMMETRIC_DECRYPT_KEY_ID),
                b"unknown-key",
                _tag=x509.name._ASN1Type.OctetString,
            )
            .sign(key, hashes.SHA256())
        )
        kind = _kind(lambda: service.serverkeygen(der(csr), None, _basic("DEV-1", secret)))
        assert kind is ErrorKind.BAD_REQUEST

    def test_serverkeygen_refused_where_not_offered(self, service: EnrollmentService) -> None:
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        kind = _kind(lambda: service.serverkeygen(der(csr), "approval", _basic("DEV-1", secret)))
        assert kind is ErrorKind.NOT_FOUND


class TestConfig:
    def test_cacerts_chain(self, service: EnrollmentService, hierarchy: Hierarchy) -> None:
        assert service.cacerts(None) == [hierarchy.devices.certificate, hierarchy.root.certificate]

    def test_label_with_unknown_issuer_names_file_and_field(
        self, hierarchy: Hierarchy, tmp_path: Any
    ) -> None:
        path = tmp_path / "est.toml"
        path.write_text('[labels.x]\nissuer = "nope"\nprofile = "device"\nauth = ["basic"]\n')
        with pytest.raises(PKIError) as e:
            load_est_config(hierarchy.config, path)
        assert e.value.kind is ErrorKind.CONFIG
        assert str(path) in e.value.message and "labels.x.issuer" in e.value.message

    def test_label_whose_profile_has_no_identity_refused(
        self, hierarchy: Hierarchy, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Without [identity] the certificate would carry whatever names the CSR chose.
        bare = hierarchy.config.profiles["device"].model_copy(update={"identity": None})
        monkeypatch.setitem(hierarchy.config.profiles, "device", bare)
        path = tmp_path / "est.toml"
        path.write_text('[labels.x]\nissuer = "devices"\nprofile = "device"\nauth = ["basic"]\n')
        with pytest.raises(PKIError) as e:
            load_est_config(hierarchy.config, path)
        assert e.value.kind is ErrorKind.CONFIG
        assert str(path) in e.value.message and "labels.x.profile" in e.value.message
        assert "[identity]" in e.value.message

    def test_idevid_without_anchors_refused(self, hierarchy: Hierarchy, tmp_path: Any) -> None:
        path = tmp_path / "est.toml"
        path.write_text('[labels.x]\nissuer = "devices"\nprofile = "device"\nauth = ["idevid"]\n')
        with pytest.raises(PKIError) as e:
            load_est_config(hierarchy.config, path)
        assert "labels.x" in e.value.message and "manufacturer_anchors" in e.value.message


class TestReenrollNames:
    def test_reenroll_of_an_old_certificate_gets_the_derived_names(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        """A certificate issued with the CSR's own CN (before [identity]) renews with CN=ID."""
        service.devices.add("DEV-1", actor="t")
        profile = hierarchy.config.profile("device")
        old_csr, _ = device_csr("DEV-1", extra=[x509.NameAttribute(NameOID.COMMON_NAME, "DEV-2")])
        old = hierarchy.issuance.issue(
            hierarchy.devices,
            profile,
            check_request(load_csr(der(old_csr)), profile),
            actor="t",
            on_recorded=lambda r: service.devices.record_enrollment(
                session_of(r), "DEV-1", None, r.id
            ),
        )
        result = service.reenroll(der(old_csr), None, _tls(old.cert_der))
        cn = result.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == ["DEV-1"]
