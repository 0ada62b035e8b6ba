"""Key ceremonies: the root, the intermediates and the OCSP signers, from reviewed configs."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from pki.config import CeremonyConfig, ProfileConfig
from pki.csr import SUBJECT_OIDS, CertificateRequest, key_type_of, subject_text
from pki.errors import conflict, policy
from pki.issuer import IssuanceService, Issued, Issuer, SelfSignedIssuer
from pki.store import IssuerRecord, audit, session_scope
from pki.store.repository import IssuerRepository


def ceremony_subject(ceremony: CeremonyConfig) -> x509.Name:
    """Builds the subject of a ceremony's certificate in canonical attribute order."""
    return x509.Name(
        [
            x509.NameAttribute(oid, ceremony.subject[short])
            for short, oid in SUBJECT_OIDS.items()
            if short in ceremony.subject
        ]
    )


def _request(subject: x509.Name, key: CertificateIssuerPrivateKeyTypes) -> CertificateRequest:
    public_key = key.public_key()
    return CertificateRequest(
        subject=subject,
        sans=(),
        public_key=public_key,
        key_type=key_type_of(public_key),
        device_id=None,
        challenge_password=None,
    )


class CeremonyService:
    """CeremonyService creates issuers; keys are made in the token by the caller."""

    def __init__(self, issuance: IssuanceService) -> None:
        self.issuance = issuance
        self.db = issuance.db

    def _check_profile(
        self, profile: ProfileConfig, kind: str, key: CertificateIssuerPrivateKeyTypes
    ) -> None:
        if profile.kind != kind:
            raise policy(f"profile {profile.name} is a {profile.kind} profile, not {kind}")
        kt = key_type_of(key.public_key())
        if kt not in profile.key_types:
            raise policy(f"key type {kt} is not allowed by profile {profile.name}")

    def _record_issuer(
        self,
        issuer_id: str,
        *,
        kind: str,
        parent: str | None,
        key_uri: str,
        subject: x509.Name,
        issued: Issued | None,
        actor: str,
    ) -> None:
        now = self.issuance.clock.now()
        with session_scope(self.db) as session:
            repo = IssuerRepository(session)
            record = repo.find(issuer_id)
            if record is None:
                record = repo.add(
                    IssuerRecord(
                        id=issuer_id,
                        parent_id=parent,
                        subject=subject_text(subject),
                        key_uri=key_uri,
                        kind=kind,
                        created_at=now,
                    )
                )
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="issuer.created",
                    target=issuer_id,
                    details={"kind": kind, "key": key_uri, "parent": parent},
                )
            elif record.cert_der is not None:
                raise conflict(f"issuer {issuer_id} already exists")
            if issued is not None:
                record.cert_der = issued.cert_der
                record.fingerprint_sha256 = issued.fingerprint
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="issuer.certified",
                    target=issuer_id,
                    details={"fingerprint_sha256": issued.fingerprint},
                )

    def _refuse_existing(self, issuer_id: str) -> None:
        with session_scope(self.db) as session:
            record = IssuerRepository(session).find(issuer_id)
            if record is not None and record.cert_der is not None:
                raise conflict(f"issuer {issuer_id} already exists")

    def root(
        self,
        ceremony: CeremonyConfig,
        profile: ProfileConfig,
        key: CertificateIssuerPrivateKeyTypes,
        *,
        key_uri: str,
        actor: str,
    ) -> Issuer:
        """Creates a self-signed root whose key is already in the token."""
        self._check_profile(profile, "root", key)
        self._refuse_existing(ceremony.issuer)
        subject = ceremony_subject(ceremony)
        # The issuer row comes first: the root's own certificate row refers to it.
        self._record_issuer(
            ceremony.issuer,
            kind="root",
            parent=None,
            key_uri=key_uri,
            subject=subject,
            issued=None,
            actor=actor,
        )
        signer = SelfSignedIssuer(ceremony.issuer, subject, key)
        issued = self.issuance.issue(
            signer,
            profile,
            _request(subject, key),
            actor=actor,
            validity_days=ceremony.validity_days,
        )
        self._record_issuer(
            ceremony.issuer,
            kind="root",
            parent=None,
            key_uri=key_uri,
            subject=subject,
            issued=issued,
            actor=actor,
        )
        return Issuer(ceremony.issuer, issued.certificate, key)

    def intermediate(
        self,
        ceremony: CeremonyConfig,
        profile: ProfileConfig,
        key: CertificateIssuerPrivateKeyTypes,
        parent: Issuer,
        *,
        key_uri: str,
        actor: str,
    ) -> Issuer:
        """Creates an intermediate CA signed by its parent, with its key in the token."""
        self._check_profile(profile, "intermediate", key)
        self._refuse_existing(ceremony.issuer)
        subject = ceremony_subject(ceremony)
        issued = self.issuance.issue(
            parent,
            profile,
            _request(subject, key),
            actor=actor,
            validity_days=ceremony.validity_days,
        )
        self._record_issuer(
            ceremony.issuer,
            kind="intermediate",
            parent=parent.issuer_id,
            key_uri=key_uri,
            subject=subject,
            issued=issued,
            actor=actor,
        )
        return Issuer(ceremony.issuer, issued.certificate, key)

    def ocsp_signer(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        key: CertificateIssuerPrivateKeyTypes,
        *,
        key_uri: str,
        actor: str,
    ) -> Issued:
        """Issues a delegated OCSP responder certificate for a key in the token."""
        self._check_profile(profile, "ocsp-signer", key)
        return self._signer(issuer, profile, key, "OCSP", key_uri=key_uri, actor=actor)

    def audit_signer(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        key: CertificateIssuerPrivateKeyTypes,
        *,
        key_uri: str,
        actor: str,
    ) -> Issued:
        """Issues the certificate of the audit key, which signs audit checkpoints only."""
        self._check_profile(profile, "end-entity", key)
        return self._signer(issuer, profile, key, "Audit", key_uri=key_uri, actor=actor)

    def _signer(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        key: CertificateIssuerPrivateKeyTypes,
        role: str,
        *,
        key_uri: str,
        actor: str,
    ) -> Issued:
        names = issuer.certificate.subject.get_attributes_for_oid(SUBJECT_OIDS["CN"])
        base = str(names[0].value) if names else issuer.issuer_id
        cn = f"{base[:40]} {role} {_stamp(self.issuance)}"
        subject = x509.Name([x509.NameAttribute(SUBJECT_OIDS["CN"], cn)])

        def remember_key(record: object) -> None:
            record.key_uri = key_uri  # type: ignore[attr-defined]

        return self.issuance.issue(
            issuer, profile, _request(subject, key), actor=actor, on_recorded=remember_key
        )


def _stamp(issuance: IssuanceService) -> str:
    now: datetime.datetime = issuance.clock.now()
    return now.strftime("%Y%m%d%H%M%S")
