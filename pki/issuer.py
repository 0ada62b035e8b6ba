"""Issuers and the issuance cycle: validate, lint, record as pending, sign, record as issued.

The order is the point (docs/issuance-cycle.md): nothing is signed that was not
validated, linted and durably recorded first, so a crash at any step leaves at worst a
pending row that the OCSP responder never calls good, never a signed certificate the
database does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)

from pki import issuer_standing, lint
from pki.clock import Clock
from pki.config import ProfileConfig, URLConfig
from pki.csr import CertificateRequest, subject_text
from pki.errors import ErrorKind, PKIError, config_error, internal
from pki.issuer_standing import expiry_problem, revocation_problem, unfit
from pki.profile import IssuerView, certificate_builder
from pki.serial import new_serial, serial_hex
from pki.store import (
    CertificateRecord,
    CertificateStatus,
    Database,
    Session,
    audit,
    session_scope,
)
from pki.store.device_lock import try_device_lock
from pki.store.repository import CertificateRepository, DuplicateSerial

SERIAL_ATTEMPTS = 5


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """Picks the hash that matches the strength of an issuing key."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@functools.cache
def _lint_key(kind: str, size: int) -> CertificateIssuerPrivateKeyTypes:
    # Linting needs a signed certificate; a throwaway key of the issuer's own type gives
    # one with the same signatureAlgorithm and TBS without touching the token.
    if kind == "ec":
        curve = ec.SECP384R1() if size >= 384 else ec.SECP256R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def lint_key_for(key: CertificateIssuerPrivateKeyTypes) -> CertificateIssuerPrivateKeyTypes:
    """Returns a cached in-memory key of the same type as the issuing key, for linting."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _lint_key("ec", key.curve.key_size)
    if isinstance(key, rsa.RSAPrivateKey):
        return _lint_key("rsa", key.key_size)
    raise config_error(f"unsupported issuer key type {type(key).__name__}")


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def same_public_key(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    """Compares two public keys by their SubjectPublicKeyInfo encoding."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(
        serialization.Encoding.DER, fmt
    )


class Issuer:
    """Issuer is one CA: its certificate and the key object (any token) that signs for it."""

    def __init__(
        self,
        issuer_id: str,
        certificate: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
        *,
        profiles: tuple[str, ...] = (),
    ) -> None:
        # Invariant 2: an issuer refuses to run unless its key matches its certificate.
        if not same_public_key(key.public_key(), certificate.public_key()):
            raise config_error(
                f"issuer {issuer_id}: the key in the token does not match the issuer "
                f"certificate (serial {serial_hex(certificate.serial_number)}); refusing to start"
            )
        self.issuer_id = issuer_id
        self.certificate = certificate
        self.key = key
        self.profiles = profiles
        self.hash = signature_hash(key)

    @property
    def view(self) -> IssuerView:
        return IssuerView(
            issuer_id=self.issuer_id,
            name=self.certificate.subject,
            public_key=self.certificate.public_key(),
            not_after=self.certificate.not_valid_after_utc,
        )

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Signs a builder with the issuing key."""
        return builder.sign(self.key, self.hash)

    def precertificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Signs a builder with a throwaway key of the same type, for linting only."""
        return builder.sign(lint_key_for(self.key), self.hash)


class SelfSignedIssuer(Issuer):
    """SelfSignedIssuer signs its own certificate: a root during its key ceremony."""

    def __init__(
        self, issuer_id: str, subject: x509.Name, key: CertificateIssuerPrivateKeyTypes
    ) -> None:
        self.issuer_id = issuer_id
        self.subject = subject
        self.key = key
        self.profiles = ()
        self.hash = signature_hash(key)

    @property
    def view(self) -> IssuerView:
        return IssuerView(
            issuer_id=self.issuer_id,
            name=self.subject,
            public_key=self.key.public_key(),
            not_after=None,
        )


class IssuanceHook(Protocol):
    """IssuanceHook is told each step of the cycle; tests use it to crash between steps."""

    def __call__(self, step: str, record_id: int) -> None: ...


def _no_hook(step: str, record_id: int) -> None:
    del step, record_id


@dataclasses.dataclass(frozen=True)
class Issued:
    """Issued is the outcome of the cycle: the signed certificate and its stored record."""

    certificate: x509.Certificate
    cert_der: bytes
    record_id: int
    serial: int
    fingerprint: str


def describe_san(name: x509.GeneralName) -> str:
    kinds = {
        x509.DNSName: "dns",
        x509.IPAddress: "ip",
        x509.UniformResourceIdentifier: "uri",
        x509.RFC822Name: "email",
    }
    return f"{kinds.get(type(name), type(name).__name__)}:{name.value}"


class IssuanceService:
    """IssuanceService runs the record-before-sign cycle for one database and clock."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        urls: URLConfig,
        *,
        hook: IssuanceHook = _no_hook,
        lint_certificates: bool = True,
    ) -> None:
        self.db = db
        self.clock = clock
        self.urls = urls
        self.hook = hook
        self.lint_certificates = lint_certificates

    def issue(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        request: CertificateRequest,
        *,
        actor: str,
        validity_days: int | None = None,
        on_recorded: Callable[[CertificateRecord], None] | None = None,
        issued_session: Session | None = None,
        on_issued: Callable[[int], None] | None = None,
    ) -> Issued:
        """Issues a certificate for a checked request: lint, record pending, sign, record.

        With `issued_session`, the certificate is recorded as issued (and `on_issued` runs,
        before the audit event) in that session's transaction, which the caller commits;
        otherwise in one of its own.
        """
        self._check_profile(issuer, profile)
        now = self.clock.now()
        own = getattr(issuer, "certificate", None)  # a root in its ceremony has none yet
        if own is not None and (problem := expiry_problem(issuer.issuer_id, own, now)):
            raise unfit(problem)
        sans = [describe_san(n) for n in request.sans]
        for _attempt in range(SERIAL_ATTEMPTS):
            serial = new_serial()
            builder, tbs, pre = self._build(issuer, profile, request, serial, now, validity_days)
            try:
                with session_scope(self.db) as session:
                    certificates = CertificateRepository(session)
                    # In the transaction that records the certificate: a revocation of the
                    # issuer committed before it is seen, and nothing is recorded or signed.
                    if own is not None and (
                        problem := revocation_problem(certificates, issuer.issuer_id, own)
                    ):
                        raise unfit(problem)
                    if problem := issuer_standing.retirement_problem(session, issuer.issuer_id):
                        raise issuer_standing.Retired(problem)
                    record = certificates.add_pending(
                        issuer_id=issuer.issuer_id,
                        serial_hex=serial_hex(serial),
                        profile=profile.name,
                        subject=subject_text(request.subject),
                        sans=sans,
                        device_id=request.device_id,
                        not_before=pre.not_valid_before_utc,
                        not_after=pre.not_valid_after_utc,
                        tbs_der=tbs,
                        at=now,
                    )
                    if on_recorded is not None:
                        on_recorded(record)
                    audit.append(
                        session,
                        at=now,
                        actor=actor,
                        action="certificate.pending",
                        target=f"{issuer.issuer_id}/{serial_hex(serial)}",
                        details={
                            "profile": profile.name,
                            "subject": record.subject,
                            "sans": sans,
                            "device_id": request.device_id,
                        },
                    )
                    record_id = record.id
            except DuplicateSerial:
                continue  # a serial collision: draw again
            except issuer_standing.Retired as retired:
                raise self._refused(issuer, profile, request, actor, str(retired)) from None
            break
        else:
            raise internal(f"no free serial number after {SERIAL_ATTEMPTS} attempts")

        self.hook("pending", record_id)
        return self._sign_and_record(
            issuer, builder, tbs, record_id, serial, actor, issued_session, on_issued
        )

    def complete(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        request: CertificateRequest,
        record: CertificateRecord,
        *,
        actor: str,
        issued_session: Session | None = None,
        on_issued: Callable[[int], None] | None = None,
    ) -> Issued | None:
        """Signs a pending row left by a failed request, for a retry of that request.

        The TBS is built again from the request, the row's serial and its recording time,
        and linted again; it is signed only if it is byte-identical to the recorded TBS
        (None otherwise: the caller abandons the row and issues afresh).
        """
        self._check_profile(issuer, profile)
        if record.status is not CertificateStatus.PENDING or record.issuer_id != issuer.issuer_id:
            return None
        # The issue-time checks again: the issuer may have been revoked or expired since
        # the row was recorded, and then it signs nothing (pki.issuer_standing).
        own = getattr(issuer, "certificate", None)
        if own is not None:
            problem = expiry_problem(issuer.issuer_id, own, self.clock.now())
            if problem is None:
                with self.db.read_session() as session:
                    problem = revocation_problem(
                        CertificateRepository(session), issuer.issuer_id, own
                    )
            if problem is not None:
                raise unfit(problem)
        serial = int(record.serial_hex, 16)
        builder, tbs, _pre = self._build(issuer, profile, request, serial, record.created_at, None)
        if tbs != record.tbs_der:
            return None
        with self.db.read_session() as session:
            problem = issuer_standing.retirement_problem(session, issuer.issuer_id)
        if problem:
            raise self._refused(issuer, profile, request, actor, problem)
        return self._sign_and_record(
            issuer, builder, tbs, record.id, serial, actor, issued_session, on_issued
        )

    def abandon_stale(self, max_age: datetime.timedelta, *, actor: str) -> list[str]:
        """Marks pending rows older than max_age abandoned, each audited; returns their serials.

        A row whose device's enrollment lock is held is left alone: a live request is working
        on it (it may be signing it right now)."""
        now = self.clock.now()
        done: list[str] = []
        # The locks close after the transaction commits: no request sees a row in between.
        with contextlib.ExitStack() as locks, session_scope(self.db) as session:
            repo = CertificateRepository(session)
            for record in repo.stale_pending(now - max_age):
                if record.device_id is not None and not try_device_lock(
                    locks, session, self.db, record.device_id
                ):
                    continue
                if repo.abandon(record.id):
                    audit.append(
                        session,
                        at=now,
                        actor=actor,
                        action="certificate.abandoned",
                        target=f"{record.issuer_id}/{record.serial_hex}",
                        details={
                            "device_id": record.device_id,
                            "pending_since": record.created_at.isoformat(),
                            "why": "older than the pending age",
                        },
                    )
                    done.append(record.serial_hex)
        return done

    def _refused(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        request: CertificateRequest,
        actor: str,
        problem: str,
    ) -> PKIError:
        details: dict[str, object] = {"profile": profile.name, "device_id": request.device_id}
        return issuer_standing.refused(
            self.db, self.clock.now(), actor, issuer.issuer_id, problem, details
        )

    def _check_profile(self, issuer: Issuer, profile: ProfileConfig) -> None:
        if issuer.profiles and profile.name not in issuer.profiles:
            raise PKIError(
                ErrorKind.POLICY, f"issuer {issuer.issuer_id} does not issue profile {profile.name}"
            )

    def _build(
        self,
        issuer: Issuer,
        profile: ProfileConfig,
        request: CertificateRequest,
        serial: int,
        now: datetime.datetime,
        validity_days: int | None,
    ) -> tuple[x509.CertificateBuilder, bytes, x509.Certificate]:
        builder = certificate_builder(
            profile,
            serial=serial,
            subject=request.subject,
            sans=request.sans,
            public_key=request.public_key,
            issuer=issuer.view,
            urls=self.urls,
            now=now,
            validity_days=validity_days,
        )
        pre = issuer.precertificate(builder)
        if self.lint_certificates:
            lint.require_clean(
                lint.lint_certificate(pre.public_bytes(serialization.Encoding.DER)),
                f"certificate for {subject_text(request.subject)}",
            )
        return builder, pre.tbs_certificate_bytes, pre

    def _sign_and_record(
        self,
        issuer: Issuer,
        builder: x509.CertificateBuilder,
        tbs: bytes,
        record_id: int,
        serial: int,
        actor: str,
        issued_session: Session | None,
        on_issued: Callable[[int], None] | None,
    ) -> Issued:
        cert = issuer.sign(builder)
        if cert.tbs_certificate_bytes != tbs:
            # The signed TBS must be the one that was linted and recorded (Boulder's
            # issuance cycle); otherwise nothing of it leaves the CA.
            raise internal("signed certificate differs from the recorded one; not released")
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        digest = fingerprint(cert_der)

        def record_issued(session: Session) -> None:
            CertificateRepository(session).mark_issued(
                record_id, cert_der=cert_der, fingerprint_sha256=digest, at=self.clock.now()
            )
            # Row work first, the audit append last: a transaction waiting on a row lock
            # must not hold the audit chain's head, which every issuance needs.
            if on_issued is not None:
                on_issued(record_id)
            audit.append(
                session,
                at=self.clock.now(),
                actor=actor,
                action="certificate.issued",
                target=f"{issuer.issuer_id}/{serial_hex(serial)}",
                details={"fingerprint_sha256": digest, "key": _key_name(issuer)},
            )

        if issued_session is not None:
            record_issued(issued_session)
        else:
            with session_scope(self.db) as session:
                record_issued(session)
        self.hook("issued", record_id)
        return Issued(cert, cert_der, record_id, serial, digest)


def _key_name(issuer: Issuer) -> str:
    return str(getattr(issuer.key, "uri", type(issuer.key).__name__))


def sans_of(record: CertificateRecord) -> list[str]:
    return list(json.loads(record.sans))
