"""Tests for IDevID enrollment: device bindings and the path to the manufacturer's anchor."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from pki.clock import SystemClock
from pki.device import DeviceService
from pki.enrollment import Enrolled, EnrollmentService
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig, anchor_paths, load_intermediates
from pki.identity import ClientIdentity
from pki.idevid import sha256_hex
from pki.revocation import RevocationService
from pki.store import AuditEvent, CertificateRecord, Database, session_scope
from pki.store.enrollment_models import DeviceBinding
from tests.csrs import der, device_csr
from tests.unit.pki.conftest import Hierarchy
from tests.unit.pki.test_enrollment import CA_KEY_USAGE, _basic, _est, _Issuers, _register
from tests.unit.pki.test_ocsp_responder import Setup, statuses

NOW = datetime.datetime.now(datetime.UTC)
Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _ca(
    name: str,
    parent: Pair | None = None,
    *,
    ca: bool = True,
    not_after: datetime.datetime | None = None,
) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = parent if parent is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=30))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca:
        builder = builder.add_extension(CA_KEY_USAGE, critical=True)
    if issuer_cert is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _idevid(ca: Pair, serial_number: str) -> x509.Certificate:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


ACME = _ca("Acme Root")
ACME_SUB = _ca("Acme Device Sub-CA", ACME)
OTHER = _ca("Other Manufacturer Root")


def _tls(*chain: x509.Certificate) -> ClientIdentity:
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)
    return ClientIdentity(tls_chain_der=ders, source="tls", address="192.0.2.10")


@pytest.fixture
def make_service(hierarchy: Hierarchy) -> Callable[..., EnrollmentService]:
    def make(*, auto_register: bool = True, intermediates: Any = ()) -> EnrollmentService:
        est = _est(hierarchy)
        label = est.labels["factory"].model_copy(update={"idevid_auto_register": auto_register})
        est = est.model_copy(update={"labels": {**est.labels, "factory": label}})
        clock = SystemClock()
        return EnrollmentService(
            db=hierarchy.db,
            clock=clock,
            config=hierarchy.config,
            est=est,
            issuance=hierarchy.issuance,
            issuers=_Issuers(hierarchy),
            devices=DeviceService(hierarchy.db, clock),
            revocation=RevocationService(hierarchy.db, clock),
            anchors={"factory": [ACME[0], OTHER[0]]},
            intermediates={"factory": list(intermediates)},
        )

    return make


@pytest.fixture
def service(make_service: Callable[..., EnrollmentService]) -> EnrollmentService:
    return make_service()


def _enroll(service: EnrollmentService, device_id: str, identity: ClientIdentity) -> Enrolled:
    csr, _ = device_csr(device_id)
    result = service.enroll(der(csr), "factory", identity)
    assert isinstance(result, Enrolled)
    return result


def _counts(db: Database) -> tuple[int, int, int]:
    with session_scope(db) as s:
        return tuple(  # type: ignore[return-value]
            int(s.execute(select(func.count()).select_from(m)).scalar_one())
            for m in (CertificateRecord, AuditEvent, DeviceBinding)
        )


def _refused(service: EnrollmentService, device_id: str, identity: ClientIdentity) -> str:
    """Asserts an enrollment is refused with 403 and that nothing is stored; the message."""
    before = _counts(service.db)
    csr, _ = device_csr(device_id)
    with pytest.raises(PKIError) as e:
        service.enroll(der(csr), "factory", identity)
    assert e.value.kind is ErrorKind.FORBIDDEN, e.value.message
    assert _counts(service.db) == before
    return e.value.message


def _ocsp(hierarchy: Hierarchy, enrolled: Enrolled) -> ocsp.OCSPCertStatus:
    """Asks the OCSP responder about a certificate."""
    setup = Setup(hierarchy)
    answer = setup.responder.respond(setup.request(enrolled.certificate.serial_number))
    (status,) = statuses(answer.der)
    return status


class TestBinding:
    def test_first_idevid_registers_and_binds_the_device(self, service: EnrollmentService) -> None:
        leaf = _idevid(ACME, "ACME-1")
        assert _enroll(service, "ACME-1", _tls(leaf)).method == "idevid"
        info = service.devices.show("ACME-1")
        assert info.enroll_method == "idevid"
        assert info.manufacturer_sha256 == sha256_hex(ACME[0])
        assert info.idevid_sha256 == sha256_hex(leaf)
        # The bound IDevID may enroll its device again (e.g. after a factory reset).
        assert _enroll(service, "ACME-1", _tls(leaf)).device_id == "ACME-1"

    def test_unregistered_device_refused_without_auto_registration(
        self, make_service: Callable[..., EnrollmentService]
    ) -> None:
        service = make_service(auto_register=False)
        leaf = _idevid(ACME, "ACME-2")
        assert "not registered" in _refused(service, "ACME-2", _tls(leaf))
        service.devices.add("ACME-2", manufacturer=sha256_hex(ACME[0]), actor="t")
        assert _enroll(service, "ACME-2", _tls(leaf)).device_id == "ACME-2"

    def test_other_manufacturers_idevid_refused(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        genuine = _enroll(service, "ACME-3", _tls(_idevid(ACME, "ACME-3")))
        message = _refused(service, "ACME-3", _tls(_idevid(OTHER, "ACME-3")))
        assert "another manufacturer" in message
        assert _ocsp(hierarchy, genuine) is ocsp.OCSPCertStatus.GOOD

    def test_registered_manufacturer_is_enforced_before_first_use(
        self, service: EnrollmentService
    ) -> None:
        # Colons as `openssl x509 -fingerprint -sha256` prints them are accepted.
        fingerprint = ":".join(f"{b:02X}" for b in bytes.fromhex(sha256_hex(ACME[0])))
        service.devices.add("ACME-4", manufacturer=fingerprint, actor="t")
        assert "another manufacturer" in _refused(service, "ACME-4", _tls(_idevid(OTHER, "ACME-4")))
        assert _enroll(service, "ACME-4", _tls(_idevid(ACME, "ACME-4"))).method == "idevid"

    def test_idevid_for_a_secret_device_refused(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        secret = _register(service, "DEV-1")
        csr, _ = device_csr("DEV-1")
        genuine = service.enroll(der(csr), None, _basic("DEV-1", secret))
        assert isinstance(genuine, Enrolled)
        assert "one-time secret" in _refused(service, "DEV-1", _tls(_idevid(ACME, "DEV-1")))
        assert _ocsp(hierarchy, genuine) is ocsp.OCSPCertStatus.GOOD

    def test_registered_secret_device_refused_before_enrolling(
        self, service: EnrollmentService
    ) -> None:
        _register(service, "DEV-2")
        assert "one-time secret" in _refused(service, "DEV-2", _tls(_idevid(ACME, "DEV-2")))

    def test_second_idevid_for_the_same_device_refused(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        genuine = _enroll(service, "ACME-5", _tls(_idevid(ACME, "ACME-5")))
        message = _refused(service, "ACME-5", _tls(_idevid(ACME, "ACME-5")))
        assert "another manufacturer certificate" in message
        assert _ocsp(hierarchy, genuine) is ocsp.OCSPCertStatus.GOOD

    def test_unbound_existing_device_is_not_claimed_by_an_idevid(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        # A device enrolled before bindings were recorded has no binding row: any trusted
        # manufacturer's IDevID naming it must not take it over.
        genuine = _enroll(service, "OLD-1", _tls(_idevid(ACME, "OLD-1")))
        with session_scope(service.db) as session:
            session.delete(session.get(DeviceBinding, "OLD-1"))
        for maker in (ACME, OTHER):
            refused = _refused(service, "OLD-1", _tls(_idevid(maker, "OLD-1")))
            assert "no enrollment binding" in refused
        with service.db.read_session() as session:
            assert session.get(DeviceBinding, "OLD-1") is None
        assert _ocsp(hierarchy, genuine) is ocsp.OCSPCertStatus.GOOD

    def test_csv_import_binds_every_new_device(
        self, service: EnrollmentService, hierarchy: Hierarchy
    ) -> None:
        acme = sha256_hex(ACME[0])
        text = f"id,model,manufacturer\nCSV-1,m,\nCSV-2,m,{acme}\n"
        assert service.devices.import_csv(text, actor="t").added == 2
        assert "one-time secret" in _refused(service, "CSV-1", _tls(_idevid(ACME, "CSV-1")))
        assert "another manufacturer" in _refused(service, "CSV-2", _tls(_idevid(OTHER, "CSV-2")))
        assert _enroll(service, "CSV-2", _tls(_idevid(ACME, "CSV-2"))).method == "idevid"

    def test_no_secret_for_an_idevid_device(self, service: EnrollmentService) -> None:
        service.devices.add("ACME-6", manufacturer=sha256_hex(ACME[0]), actor="t")
        with pytest.raises(PKIError) as e:
            service.devices.new_secret("ACME-6", actor="t")
        assert e.value.kind is ErrorKind.CONFLICT

    def test_bad_manufacturer_fingerprint_refused(self, service: EnrollmentService) -> None:
        with pytest.raises(PKIError) as e:
            service.devices.add("ACME-7", manufacturer="acme", actor="t")
        assert e.value.kind is ErrorKind.BAD_REQUEST


class TestPath:
    def test_chain_through_an_intermediate_enrolls(self, service: EnrollmentService) -> None:
        leaf = _idevid(ACME_SUB, "ACME-10")
        assert _enroll(service, "ACME-10", _tls(leaf, ACME_SUB[0])).method == "idevid"
        assert service.devices.show("ACME-10").manufacturer_sha256 == sha256_hex(ACME[0])

    def test_leaf_alone_needs_the_configured_intermediate(
        self, make_service: Callable[..., EnrollmentService]
    ) -> None:
        leaf = _idevid(ACME_SUB, "ACME-11")
        assert "does not verify" in _refused(make_service(), "ACME-11", _tls(leaf))
        service = make_service(intermediates=[ACME_SUB[0]])
        assert _enroll(service, "ACME-11", _tls(leaf)).device_id == "ACME-11"

    @pytest.mark.parametrize(
        ("intermediate", "reason"),
        [
            (_ca("Acme Expired Sub-CA", ACME, not_after=NOW - datetime.timedelta(days=1)), "valid"),
            (_ca("Acme Not-a-CA", ACME, ca=False), "basicConstraints"),
        ],
        ids=["expired", "not-ca"],
    )
    def test_bad_intermediate_refused(
        self, service: EnrollmentService, intermediate: Pair, reason: str
    ) -> None:
        leaf = _idevid(intermediate, "ACME-12")
        assert reason in _refused(service, "ACME-12", _tls(leaf, intermediate[0]))
        with pytest.raises(PKIError):
            service.devices.show("ACME-12")

    def test_anchor_of_another_label_refused(self, service: EnrollmentService) -> None:
        stranger = _ca("Unlisted Root")
        assert "does not verify" in _refused(service, "ACME-13", _tls(_idevid(stranger, "ACME-13")))

    def test_ca_certificate_as_idevid_refused(self, service: EnrollmentService) -> None:
        # A manufacturer's sub-CA is no device, even with a serialNumber.
        assert "does not verify" in _refused(service, "ACME-14", _tls(ACME_SUB[0]))


class TestConfiguration:
    def test_intermediates_load_and_join_the_tls_client_cas(
        self, hierarchy: Hierarchy, tmp_path: Path
    ) -> None:
        (tmp_path / "acme.pem").write_bytes(ACME[0].public_bytes(serialization.Encoding.PEM))
        (tmp_path / "sub.pem").write_bytes(ACME_SUB[0].public_bytes(serialization.Encoding.PEM))
        est = _est(hierarchy)
        label = est.labels["factory"].model_copy(update={"manufacturer_intermediates": ["sub.pem"]})
        est = est.model_copy(update={"labels": {**est.labels, "factory": label}})
        assert load_intermediates(est, "factory", tmp_path) == [ACME_SUB[0]]
        assert anchor_paths(est, tmp_path) == [tmp_path / "acme.pem", tmp_path / "sub.pem"]
        (tmp_path / "sub.pem").unlink()
        with pytest.raises(PKIError) as e:
            load_intermediates(est, "factory", tmp_path)
        assert e.value.kind is ErrorKind.CONFIG
        assert "labels.factory.manufacturer_intermediates" in e.value.message

    def test_intermediates_need_idevid(self, hierarchy: Hierarchy) -> None:
        base = _est(hierarchy).model_dump()
        base["labels"]["devices"]["manufacturer_intermediates"] = ["sub.pem"]
        with pytest.raises(ValueError, match="manufacturer_intermediates"):
            ESTConfig.model_validate(base)
