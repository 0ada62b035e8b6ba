"""Ceremonies with an offline root: requests, certificates, CRLs and OCSP answers as files.

The root's side and the online side share no database and no token. What crosses between
them is a CSR (online → root), and certificates, the root's CRL and the root's pre-signed
OCSP responses (root → online); each is checked on arrival before anything is stored.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509 import ocsp

from pki import lint
from pki.ceremony import ceremony_subject
from pki.clock import Clock
from pki.config import CeremonyConfig, ProfileConfig
from pki.crl_import import CRLImporter
from pki.csr import CertificateRequest, key_type_of, subject_text
from pki.errors import ErrorKind, PKIError, bad_request, conflict, not_found, policy
from pki.issuer import IssuanceService, Issued, Issuer, fingerprint, same_public_key
from pki.serial import serial_hex
from pki.store import Database, IssuerRecord, audit, session_scope
from pki.store.repository import CertificateRepository, IssuerRepository
from pki.store.revocation_models import (
    OCSPResponseRecord,
    OCSPResponseRepository,
)

_EC_OR_RSA_HASH = hashes.SHA256()


def intermediate_csr(
    ceremony: CeremonyConfig, profile: ProfileConfig, key: CertificateIssuerPrivateKeyTypes
) -> x509.CertificateSigningRequest:
    """Builds the CSR of an intermediate whose key was just made in the issuing token."""
    if profile.kind != "intermediate":
        raise policy(f"profile {profile.name} is a {profile.kind} profile, not intermediate")
    if key_type_of(key.public_key()) not in profile.key_types:
        raise policy(f"key type {key_type_of(key.public_key())} is not allowed by {profile.name}")
    builder = x509.CertificateSigningRequestBuilder().subject_name(ceremony_subject(ceremony))
    # RFC 2986 §3: the signature proves possession of the private key to the root's side.
    return builder.sign(key, _EC_OR_RSA_HASH)


def load_csr_file(data: bytes) -> x509.CertificateSigningRequest:
    """Reads a CSR in PEM or DER."""
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as e:
        raise bad_request(f"not a PKCS#10 request: {e}") from None


def load_certificate_file(data: bytes) -> x509.Certificate:
    """Reads one certificate in PEM (the first) or DER."""
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificates(data)[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise bad_request(f"not an X.509 certificate: {e}") from None


def sign_intermediate(
    issuance: IssuanceService,
    ceremony: CeremonyConfig,
    profile: ProfileConfig,
    csr: x509.CertificateSigningRequest,
    parent: Issuer,
    *,
    actor: str,
) -> Issued:
    """Certifies a carried intermediate CSR with the root, after checking it against the review."""
    if profile.kind != "intermediate":
        raise policy(f"profile {profile.name} is a {profile.kind} profile, not intermediate")
    if not csr.is_signature_valid:
        raise bad_request("the CSR's signature does not verify: it was changed on the way")
    subject = ceremony_subject(ceremony)
    if csr.subject != subject:
        raise policy(
            f"the CSR asks for {subject_text(csr.subject)}, the ceremony file reviewed "
            f"{subject_text(subject)}"
        )
    public_key = csr.public_key()
    key_type = key_type_of(public_key)
    if key_type not in profile.key_types:
        raise policy(f"key type {key_type} is not allowed by profile {profile.name}")
    request = CertificateRequest(
        subject=subject,
        sans=(),
        public_key=public_key,
        key_type=key_type,
        device_id=None,
        challenge_password=None,
    )
    return issuance.issue(
        parent, profile, request, actor=actor, validity_days=ceremony.validity_days
    )


class ImportService:
    """ImportService installs what the root's side produced, after checking each file."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def issuer_certificate(
        self,
        issuer_id: str,
        cert: x509.Certificate,
        *,
        parent_id: str | None,
        profile: ProfileConfig,
        token_public_key: CertificatePublicKeyTypes | None,
        key_uri: str,
        actor: str,
    ) -> None:
        """Installs a root or an intermediate certificate carried from the root's side."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            issuers = IssuerRepository(session)
            existing = issuers.find(issuer_id)
            if existing is not None and existing.cert_der is not None:
                raise conflict(f"issuer {issuer_id} already has a certificate")
            if parent_id is None:
                parent_cert = cert
            else:
                parent = issuers.find(parent_id)
                if parent is None or parent.cert_der is None:
                    raise not_found(f"import the parent {parent_id} first")
                parent_cert = x509.load_der_x509_certificate(parent.cert_der)
            _check_issued_by(cert, parent_cert, issuer_id)
            _check_ca_profile(cert, profile, now)
            if token_public_key is not None and not same_public_key(
                cert.public_key(), token_public_key
            ):
                raise policy(
                    f"the certificate of {issuer_id} is for another key than {key_uri}: "
                    "it does not belong to this token's key"
                )
            cert_der = cert.public_bytes(serialization.Encoding.DER)
            digest = fingerprint(cert_der)
            kind = "root" if parent_id is None else "intermediate"
            if existing is None:
                issuers.add(
                    IssuerRecord(
                        id=issuer_id,
                        parent_id=parent_id,
                        subject=subject_text(cert.subject),
                        key_uri=key_uri,
                        kind=kind,
                        created_at=now,
                    )
                )
                session.flush()
                existing = issuers.find(issuer_id)
                assert existing is not None
            existing.cert_der = cert_der
            existing.fingerprint_sha256 = digest
            # The certificate is one of its parent's, so the parent's CRLs and OCSP answers
            # (imported too) have a row to refer to.
            _record_certificate(
                CertificateRepository(session), parent_id or issuer_id, cert, profile.name, now
            )
            audit.append(
                session,
                at=now,
                actor=actor,
                action="issuer.imported",
                target=issuer_id,
                details={"kind": kind, "parent": parent_id, "fingerprint_sha256": digest},
            )

    def crl(self, crl_der: bytes, *, actor: str) -> tuple[str, int]:
        """Stores a CRL signed on the root's side, so the VA serves it; returns issuer, number."""
        try:
            issuer_name = x509.load_der_x509_crl(crl_der).issuer
        except ValueError as e:
            raise bad_request(f"not a DER CRL: {e}") from None
        with session_scope(self.db) as session:
            record = _issuer_named(IssuerRepository(session).all(), issuer_name)
            issuer_id, cert_der = record.id, record.cert_der or b""
        # The checks and the storage are the publisher's own (pki.crl_import).
        stored = CRLImporter(self.db, self.clock).store(
            issuer_id, x509.load_der_x509_certificate(cert_der), crl_der
        )
        with session_scope(self.db) as session:
            audit.append(
                session,
                at=self.clock.now(),
                actor=actor,
                action="crl.imported",
                target=f"{issuer_id}/{stored.crl_number}",
                details={"entries": stored.entries, "next_update": stored.next_update.isoformat()},
            )
        return issuer_id, stored.crl_number

    def ocsp_response(self, resp_der: bytes, *, actor: str) -> tuple[str, str, str]:
        """Stores an OCSP response pre-signed on the root's side; returns issuer, serial, status."""
        try:
            response = ocsp.load_der_ocsp_response(resp_der)
        except ValueError as e:
            raise bad_request(f"not a DER OCSP response: {e}") from None
        if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise policy(f"the OCSP response is {response.response_status.name}, not successful")
        now = self.clock.now()
        if response.next_update_utc is None or response.next_update_utc <= now:
            raise policy("the OCSP response is past its nextUpdate: pre-sign again")
        with session_scope(self.db) as session:
            record = _issuer_by_key_hash(
                IssuerRepository(session).all(), response.issuer_key_hash, response.hash_algorithm
            )
            issuer_cert = x509.load_der_x509_certificate(record.cert_der or b"")
            signer = _ocsp_signer(response, issuer_cert)
            if not _signature_valid(signer, response):
                raise policy("the OCSP response's signature does not verify")
            if signer is not issuer_cert:
                # The pre-signed store serves an answer only while its signer's row says
                # issued, so the root's responder certificate is recorded with the answer.
                _record_certificate(
                    CertificateRepository(session), record.id, signer, "ocsp-signer", now
                )
            serial = serial_hex(response.serial_number)
            cert = CertificateRepository(session).by_serial(serial, record.id)
            status = response.certificate_status.name.lower()
            # An upsert, not a read-then-write merge: a pre-signing run writing the same
            # certificate's response at once must not make either fail on the primary key.
            OCSPResponseRepository(session).put_all(
                [
                    OCSPResponseRecord(
                        certificate_id=cert.id,
                        issuer_id=record.id,
                        serial_hex=serial,
                        status=status,
                        this_update=response.this_update_utc,
                        next_update=response.next_update_utc,
                        signer_serial_hex=serial_hex(signer.serial_number),
                        response_der=resp_der,
                    )
                ]
            )
            audit.append(
                session,
                at=now,
                actor=actor,
                action="ocsp.imported",
                target=f"{record.id}/{serial}",
                details={"status": status, "next_update": response.next_update_utc.isoformat()},
            )
            return record.id, serial, status


def stored_ocsp_responses(db: Database, issuer_id: str) -> list[tuple[str, bytes]]:
    """Returns the issuer's pre-signed responses (serial, DER), to carry to the online side."""
    with session_scope(db) as session:
        return OCSPResponseRepository(session).of_issuer(issuer_id)


def _record_certificate(
    certificates: CertificateRepository,
    issuer_id: str,
    cert: x509.Certificate,
    profile: str,
    now: datetime.datetime,
) -> None:
    """Records a certificate the root's side issued as issued here, once."""
    serial = serial_hex(cert.serial_number)
    try:
        certificates.by_serial(serial, issuer_id)
        return
    except PKIError as e:
        if e.kind is not ErrorKind.NOT_FOUND:
            raise
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    record = certificates.add_pending(
        issuer_id=issuer_id,
        serial_hex=serial,
        profile=profile,
        subject=subject_text(cert.subject),
        sans=[],
        device_id=None,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        tbs_der=cert.tbs_certificate_bytes,
        at=now,
    )
    certificates.mark_issued(
        record.id, cert_der=cert_der, fingerprint_sha256=fingerprint(cert_der), at=now
    )


def _check_issued_by(cert: x509.Certificate, parent: x509.Certificate, issuer_id: str) -> None:
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise policy(
            f"the certificate of {issuer_id} does not chain to {subject_text(parent.subject)}"
        ) from None


def _check_ca_profile(
    cert: x509.Certificate, profile: ProfileConfig, now: datetime.datetime
) -> None:
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise policy("the certificate is not valid now")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as e:
        raise policy(f"the certificate lacks {e.oid._name}: not a CA certificate") from None
    if not constraints.ca or not usage.key_cert_sign or not usage.crl_sign:
        raise policy("the certificate is not a CA certificate (cA, keyCertSign, cRLSign)")
    if profile.path_length is not None and constraints.path_length != profile.path_length:
        raise policy(
            f"pathLenConstraint is {constraints.path_length}, profile {profile.name} says "
            f"{profile.path_length}"
        )
    if key_type_of(cert.public_key()) not in profile.key_types:
        raise policy(f"key type {key_type_of(cert.public_key())} is not allowed by {profile.name}")
    lint.require_clean(
        lint.lint_certificate(cert.public_bytes(serialization.Encoding.DER)), "imported certificate"
    )


def _issuer_named(records: Sequence[IssuerRecord], name: x509.Name) -> IssuerRecord:
    for record in records:
        if record.cert_der and x509.load_der_x509_certificate(record.cert_der).subject == name:
            return record
    raise not_found(f"no issuer {subject_text(name)} here: import its certificate first")


def _issuer_by_key_hash(
    records: Sequence[IssuerRecord], key_hash: bytes, algorithm: hashes.HashAlgorithm
) -> IssuerRecord:
    for record in records:
        if record.cert_der is None:
            continue
        cert = x509.load_der_x509_certificate(record.cert_der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # RFC 6960 4.1.1: issuerKeyHash is the hash of the issuer's public key BIT STRING.
        from asn1crypto import keys

        bits = keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]
        digest = hashes.Hash(algorithm)
        digest.update(bits)
        if digest.finalize() == key_hash:
            return record
    raise not_found("the OCSP response is for an issuer that is not here")


def _ocsp_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    # RFC 6960 4.2.2.2: signed by the CA itself, or by a responder certificate the CA issued
    # with id-kp-OCSPSigning.
    for cert in response.certificates:
        try:
            cert.verify_directly_issued_by(issuer)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            return cert
    return issuer


def _signature_valid(signer: x509.Certificate, response: ocsp.OCSPResponse) -> bool:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True
