"""EST enrollment: who may get which certificate, checked before anything is stored or signed.

`EnrollmentService` is the domain side of RFC 7030. The HTTP edge (api/est) decodes the
wire formats and builds a `ClientIdentity`; this module authenticates it against the
label's allowed methods, applies the profile's CSR policy, matches the CSR's device ID to
the authenticated device, and hands the request to the record-before-sign issuance cycle.

One active identity per device and profile (DESIGN.md invariant 5): when a device gets a
new certificate of a profile, every older unrevoked certificate of that device and profile
is revoked with reason superseded, at once or `supersede_grace_seconds` later (est.toml).
With a grace period, `sweep_superseded` (run after each enrollment and by
`pki enrollment sweep`) revokes those whose successor is old enough.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import idevid as idevids
from pki import serverkeygen
from pki.clock import Clock
from pki.config import ConfigSet, ProfileConfig
from pki.csr import CertificateRequest, check_request, load_csr, subject_text
from pki.device import BAD_SECRET, Authenticated, DeviceService, forbidden, unauthorized
from pki.enrollment_cycle import EnrollmentCycle, Grant
from pki.errors import ErrorKind, PKIError, bad_request, internal, not_found
from pki.est_config import ESTConfig, LabelConfig
from pki.identity import ClientIdentity
from pki.idevid import IDevID
from pki.issuer import IssuanceService, Issued, Issuer
from pki.naming import DeviceRecord, first_difference, named_request
from pki.revocation import RevocationService
from pki.serial import serial_hex
from pki.serverkeygen import ServerGeneratedKey
from pki.store import CertificateStatus, Database, audit, session_scope
from pki.store.enrollment_models import ApprovalState, PendingApproval
from pki.store.enrollment_repository import ApprovalRepository
from pki.store.repository import CertificateRepository, IssuedSummary, IssuerRepository

log = logging.getLogger(__name__)

Method = Literal["basic", "idevid", "reenroll"]


class IssuerSource(Protocol):
    """IssuerSource opens an issuer (certificate and signing key) by its ID."""

    def issuer(self, issuer_id: str) -> Issuer: ...


@dataclasses.dataclass(frozen=True)
class Enrolled:
    """Enrolled is a certificate issued over EST, with its issuing chain (issuer first)."""

    device_id: str
    certificate: x509.Certificate
    cert_der: bytes
    serial_hex: str
    chain: tuple[x509.Certificate, ...]
    method: Method


@dataclasses.dataclass(frozen=True)
class KeyGenerated:
    """KeyGenerated is a serverkeygen result: the certificate and its software-made key."""

    enrolled: Enrolled
    key: ServerGeneratedKey = dataclasses.field(repr=False)
    # CMS EnvelopedData of the key when the CSR asked for an encrypted key (RFC 7030 4.4.2).
    encrypted_key_der: bytes | None = None


@dataclasses.dataclass(frozen=True)
class ApprovalPending:
    """ApprovalPending says the request waits for an operator; retry after some seconds."""

    approval_id: int
    device_id: str
    retry_after: int


@dataclasses.dataclass(frozen=True)
class PendingRequest:
    """PendingRequest is a request waiting for approval: who asks for what, with which key."""

    approval_id: int
    device_id: str
    label: str
    operation: str
    subject: str  # what the CSR asks for, RFC 4514
    key_sha256: str  # SHA-256 of the CSR's SubjectPublicKeyInfo, hex
    since: datetime.datetime


def _pending_request(row: PendingApproval) -> PendingRequest:
    csr = x509.load_der_x509_csr(row.csr_der)
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PendingRequest(
        approval_id=row.id,
        device_id=row.device_id,
        label=row.label,
        operation=row.operation,
        subject=subject_text(csr.subject),
        key_sha256=hashlib.sha256(spki).hexdigest(),
        since=row.created_at,
    )


@dataclasses.dataclass(frozen=True)
class _Who:
    device_id: str
    method: Method
    secret: Authenticated | None = None
    register: bool = False
    idevid: IDevID | None = None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _sans(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


class EnrollmentService:
    """EnrollmentService answers EST requests for the labels of est.toml. See RFC 7030 4."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        config: ConfigSet,
        est: ESTConfig,
        issuance: IssuanceService,
        issuers: IssuerSource,
        devices: DeviceService,
        revocation: RevocationService,
        anchors: Mapping[str, Sequence[x509.Certificate]] | None = None,
        intermediates: Mapping[str, Sequence[x509.Certificate]] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.config = config
        self.est = est
        self.issuance = issuance
        self.issuers = issuers
        self.devices = devices
        self.revocation = revocation
        self.anchors = dict(anchors or {})
        self.intermediates = dict(intermediates or {})
        self.cycle = EnrollmentCycle(db, clock, issuance, devices)

    # --- read-only operations ---------------------------------------------------------

    def label(self, name: str | None) -> tuple[str, LabelConfig]:
        """Resolves a label from the URL (None: the default label)."""
        return self.est.label(name)

    def profile(self, label: str | None) -> ProfileConfig:
        """Returns the profile a label issues with (for csrattrs). See RFC 7030 4.5."""
        _, cfg = self.label(label)
        return self.config.profile(cfg.profile)

    def cacerts(self, label: str | None) -> list[x509.Certificate]:
        """Returns the label's issuing CA and its parents up to the root. See RFC 7030 4.1."""
        _, cfg = self.label(label)
        chain: list[x509.Certificate] = []
        issuer_id: str | None = cfg.issuer
        with self.db.read_session() as session:
            repo = IssuerRepository(session)
            while issuer_id is not None and len(chain) < 10:
                record = repo.get(issuer_id)
                if record.cert_der is None:
                    raise PKIError(ErrorKind.UNAVAILABLE, f"issuer {issuer_id} has no certificate")
                chain.append(x509.load_der_x509_certificate(record.cert_der))
                issuer_id = record.parent_id
        return chain

    # --- enrollment -------------------------------------------------------------------

    def enroll(
        self, csr_der: bytes, label: str | None, identity: ClientIdentity
    ) -> Enrolled | ApprovalPending:
        """Issues a device's certificate after Basic or IDevID login. See RFC 7030 4.2.1."""
        name, cfg = self.label(label)
        who = self._authenticate_initial(name, cfg, identity)
        csr = load_csr(csr_der)
        request = self._request_for(csr, cfg, who.device_id)
        if who.secret is not None and who.secret.spent:
            # The secret bought a certificate whose answer was lost: the same key gets it
            # again, any other key nothing.
            grant = Grant(label=name, device_id=who.device_id, method=who.method,
                          secret_id=who.secret.secret_id)  # fmt: skip
            return self._enrolled(name, who, self.cycle.resend(grant, request))
        pending = self._approval(name, cfg, who, csr_der, "simpleenroll")
        if pending is not None:
            return pending
        return self._issue(name, cfg, who, request, csr_der)

    def reenroll(self, csr_der: bytes, label: str | None, identity: ClientIdentity) -> Enrolled:
        """Renews a certificate for the holder of the current one. See RFC 7030 4.2.2."""
        name, cfg = self.label(label)
        if "reenroll" not in cfg.auth:
            raise forbidden(f"label {name} does not allow re-enrollment")
        record_serial, device_id, current = self._our_current_certificate(cfg, identity)
        csr = load_csr(csr_der)
        profile = self.config.profile(cfg.profile)
        asked = self._checked_csr(csr, profile, device_id)
        # RFC 7030 4.2.2: "The Subject field and SubjectAltName extension MUST be identical
        # to the corresponding fields in the certificate being renewed/rekeyed." The CA
        # writes both, so a CSR may leave names out, but it never asks for other ones.
        problem = first_difference(asked, current.subject, tuple(_sans(current)))
        if problem is not None:
            raise forbidden(
                f"the CSR differs from the current certificate "
                f"({subject_text(current.subject)}): {problem}"
            )
        if profile.identity is not None:
            # The names come from the registry, whatever the current certificate says: one
            # issued before the CA wrote the names is renewed with the right ones.
            asked = dataclasses.replace(asked, subject=x509.Name([]), sans=())
        request = self._named(asked, profile, device_id)
        who = _Who(device_id=device_id, method="reenroll")
        enrolled = self._issue(name, cfg, who, request, csr_der, renews=record_serial)
        log.info("device %s re-enrolled, superseding %s", device_id, record_serial)
        return enrolled

    def serverkeygen(
        self, csr_der: bytes, label: str | None, identity: ClientIdentity
    ) -> KeyGenerated | ApprovalPending:
        """Issues a certificate for a key made here, in software. See RFC 7030 4.4."""
        name, cfg = self.label(label)
        if not cfg.serverkeygen:
            raise not_found(f"label {name} does not offer server-side key generation")
        who = self._authenticate_initial(name, cfg, identity)
        if who.secret is not None and who.secret.spent:
            raise unauthorized(BAD_SECRET)  # a lost server-made key cannot be sent again
        csr = load_csr(csr_der)
        request = self._request_for(csr, cfg, who.device_id)
        wanted = serverkeygen.requested_decrypt_key_id(csr)
        recipient: x509.Certificate | None = None
        if wanted is not None:
            if wanted.kind == "symmetric":
                raise bad_request("DecryptKeyIdentifier (symmetric key wrapping) is not supported")
            recipient = self._recipient(identity, wanted.key_id)
        pending = self._approval(name, cfg, who, csr_der, "serverkeygen")
        if pending is not None:
            return pending
        profile = self.config.profile(cfg.profile)
        key_type = request.key_type
        if key_type not in serverkeygen.KEY_TYPES:
            key_type = next(k for k in profile.key_types if k in serverkeygen.KEY_TYPES)
        key = serverkeygen.generate_key(key_type)
        request = dataclasses.replace(request, public_key=key.public_key(), key_type=key_type)
        enrolled = self._issue(name, cfg, who, request, csr_der)
        encrypted = None
        if recipient is not None:
            encrypted = serverkeygen.encrypt_key_for_recipient(key, recipient)
        return KeyGenerated(enrolled, key, encrypted)

    # --- approvals --------------------------------------------------------------------

    def approve(self, approval_id: int, *, actor: str) -> PendingRequest:
        """Approves one waiting request by its ID; the client's next retry gets the certificate."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            row = ApprovalRepository(session).find_by_id(approval_id, for_update=True)
            if row is None or row.state is not ApprovalState.PENDING:
                raise not_found(f"no request {approval_id} waiting for approval")
            row.state = ApprovalState.APPROVED
            row.decided_at = now
            row.decided_by = actor
            audit.append(
                session,
                at=now,
                actor=actor,
                action="enrollment.approved",
                target=row.device_id,
                details={"approval": row.id, "label": row.label, "csr_sha256": row.csr_sha256},
            )
            return _pending_request(row)

    def pending_approvals(self) -> list[PendingRequest]:
        """Lists requests waiting for approval, with what each asks for."""
        with self.db.read_session() as session:
            rows = ApprovalRepository(session).by_state(ApprovalState.PENDING)
            return [_pending_request(r) for r in rows]

    # --- superseding ------------------------------------------------------------------

    def sweep_superseded(self, device_id: str | None = None) -> list[str]:
        """Revokes (superseded) certificates whose newer successor is past the grace period."""
        now = self.clock.now()
        due: list[tuple[str, str]] = []
        # A read-only transaction of a few columns: this runs after every enrollment, and
        # on SQLite a writing one would queue for the database's write lock.
        with self.db.read_session() as session:
            records = CertificateRepository(session).issued_of_device(device_id)
        groups: dict[tuple[str, str], list[IssuedSummary]] = {}
        for r in records:
            if r.device_id is not None and r.issued_at is not None:
                groups.setdefault((r.device_id, r.profile), []).append(r)
        for group in groups.values():
            group.sort(key=lambda r: (r.issued_at, r.id))
            newest = group[-1]
            assert newest.issued_at is not None
            if newest.issued_at + self.est.supersede_grace <= now:
                due.extend((r.serial_hex, r.issuer_id) for r in group[:-1])
        revoked = []
        for serial, issuer_id in due:
            try:
                self.revocation.revoke(
                    serial,
                    x509.ReasonFlags.superseded,
                    actor="est:supersede",
                    issuer_id=issuer_id,
                )
                revoked.append(serial)
            except PKIError as e:
                # The new certificate stands; the next sweep tries again.
                log.warning("could not revoke superseded %s/%s: %s", issuer_id, serial, e.message)
        return revoked

    def sweep_pending(self) -> list[str]:
        """Marks pending rows older than est.toml's pending_max_age_seconds abandoned."""
        return self.issuance.abandon_stale(self.est.pending_max_age, actor="est:sweep")

    # --- internals --------------------------------------------------------------------

    def _authenticate_initial(self, name: str, cfg: LabelConfig, identity: ClientIdentity) -> _Who:
        # RFC 7030 3.3.2: a client certificate that the server cannot use for this label does
        # not stop HTTP-based client authentication.
        refused: PKIError | None = None
        if "idevid" in cfg.auth and identity.has_certificate:
            try:
                idevid = self._idevid(name, cfg, identity)
            except PKIError as e:
                refused = e
            else:
                register = cfg.idevid_auto_register
                self.devices.check_binding(idevid.device_id, idevid, register=register)
                return _Who(idevid.device_id, "idevid", register=register, idevid=idevid)
        if "basic" in cfg.auth and identity.basic is not None:
            auth = self.devices.authenticate(
                identity.basic.username, identity.basic.password, address=identity.address
            )
            self._check_secret_label(name, auth)
            return _Who(device_id=auth.device_id, method="basic", secret=auth)
        if refused is not None:
            raise refused
        if "basic" in cfg.auth:
            raise unauthorized("authentication required: device ID and one-time secret")
        raise unauthorized(f"label {name} needs a client certificate")

    def _check_secret_label(self, name: str, auth: Authenticated) -> None:
        # A secret drawn for a label with manual approval must not buy a certificate on a
        # label without it: a secret is valid on the labels it was drawn for, and one drawn
        # before secrets had labels on the default label only.
        labels = self.devices.secret_labels(auth.secret_id)
        allowed = labels if labels is not None else (self.est.default_label,)
        if name not in allowed:
            # The answer of a wrong secret: on another label it is not a secret at all.
            raise unauthorized(BAD_SECRET)

    def _idevid(self, name: str, cfg: LabelConfig, identity: ClientIdentity) -> IDevID:
        # The chain as the client sent it (leaf first) and the label's configured
        # intermediates; the path must end at one of this label's anchors.
        return idevids.identify(
            [identity.leaf(), *identity.intermediates()],
            self.anchors.get(name, ()),
            self.intermediates.get(name, ()),
            self.clock.now(),
            cfg.idevid_device_id,
        )

    def _our_current_certificate(
        self, cfg: LabelConfig, identity: ClientIdentity
    ) -> tuple[str, str, x509.Certificate]:
        if not identity.has_certificate:
            raise unauthorized(
                "re-enrollment needs the current certificate as TLS client certificate"
            )
        leaf = identity.leaf()
        serial = serial_hex(leaf.serial_number)
        with session_scope(self.db) as session:
            try:
                record = CertificateRepository(session).by_serial(serial)
            except PKIError:
                record = None
            if record is None or record.cert_der != _der(leaf):
                raise forbidden("the client certificate was not issued by this CA")
            status, device_id, profile = record.status, record.device_id, record.profile
            not_after, reason = record.not_after, record.revocation_reason
        # Re-enrollment is by the device's current certificate only; whether a newer one
        # superseded it is decided under the device's lock (pki.enrollment_cycle: 409, or
        # the successor again for the request that lost its answer).
        if status is CertificateStatus.REVOKED and reason != x509.ReasonFlags.superseded.value:
            raise forbidden(f"the client certificate {serial} is revoked")
        if status not in (CertificateStatus.ISSUED, CertificateStatus.REVOKED):
            raise forbidden(f"the client certificate {serial} is not issued")
        if not_after <= self.clock.now():
            raise forbidden(f"the client certificate {serial} has expired")
        if device_id is None:
            raise forbidden("the client certificate is not a device certificate")
        if profile != cfg.profile:
            raise forbidden(f"the client certificate has profile {profile}, not {cfg.profile}")
        return serial, device_id, leaf

    def _request_for(
        self, csr: x509.CertificateSigningRequest, cfg: LabelConfig, device_id: str
    ) -> CertificateRequest:
        profile = self.config.profile(cfg.profile)
        return self._named(self._checked_csr(csr, profile, device_id), profile, device_id)

    def _checked_csr(
        self, csr: x509.CertificateSigningRequest, profile: ProfileConfig, device_id: str
    ) -> CertificateRequest:
        request = check_request(csr, profile)
        if request.device_id != device_id:
            raise forbidden(
                f"the CSR names device {request.device_id}, but the client authenticated "
                f"as device {device_id}"
            )
        return request

    def _named(
        self, request: CertificateRequest, profile: ProfileConfig, device_id: str
    ) -> CertificateRequest:
        # DESIGN.md invariant 3: the subject and SAN come from the registry record of the
        # authenticated device; the CSR can only repeat them.
        if profile.identity is None:
            # est.toml refuses such a label at load; never the CSR's own names.
            raise internal(f"profile {profile.name} has no [identity]: nothing is issued")
        found = self.devices.find(device_id)
        record = DeviceRecord(device_id)
        if found is not None:
            record = DeviceRecord(device_id, found.model, found.batch)
        return named_request(request, profile, record)

    def _recipient(self, identity: ClientIdentity, key_id: bytes) -> x509.Certificate:
        # RFC 7030 4.4.1.2: the AsymmetricDecryptKeyIdentifier names the client's key; the
        # one certificate of the client we hold is the one it authenticated TLS with.
        if identity.has_certificate:
            leaf = identity.leaf()
            try:
                ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            except x509.ExtensionNotFound:
                ski = x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
            if ski.digest == key_id:
                return leaf
        raise bad_request(
            "AsymmetricDecryptKeyIdentifier does not name the key of the TLS client certificate"
        )

    def _approval(
        self, name: str, cfg: LabelConfig, who: _Who, csr_der: bytes, operation: str
    ) -> ApprovalPending | None:
        if not cfg.manual_approval:
            return None
        digest = hashlib.sha256(csr_der).hexdigest()
        now = self.clock.now()
        with session_scope(self.db) as session:
            repo = ApprovalRepository(session)
            row = repo.find(who.device_id, name, digest)
            if row is not None and row.state is ApprovalState.APPROVED:
                return None
            if row is None:
                row = repo.add(
                    PendingApproval(
                        device_id=who.device_id,
                        label=name,
                        operation=operation,
                        csr_sha256=digest,
                        csr_der=csr_der,
                        state=ApprovalState.PENDING,
                        created_at=now,
                    )
                )
                audit.append(
                    session,
                    at=now,
                    actor=f"device:{who.device_id}",
                    action="enrollment.awaiting_approval",
                    target=who.device_id,
                    details={"approval": row.id, "label": name, "csr_sha256": digest},
                )
            return ApprovalPending(row.id, who.device_id, self.est.retry_after_seconds)

    def _issue(
        self,
        name: str,
        cfg: LabelConfig,
        who: _Who,
        request: CertificateRequest,
        csr_der: bytes,
        *,
        renews: str | None = None,
    ) -> Enrolled:
        profile = self.config.profile(cfg.profile)
        issuer = self.issuers.issuer(cfg.issuer)
        digest = None
        if cfg.manual_approval and who.method != "reenroll":
            digest = hashlib.sha256(csr_der).hexdigest()
        grant = Grant(
            label=name,
            device_id=who.device_id,
            method=who.method,
            secret_id=who.secret.secret_id if who.secret is not None else None,
            register=who.register,
            idevid=who.idevid,
            approval_digest=digest,
            renews=renews,
        )
        return self._enrolled(name, who, self.cycle.issue(grant, issuer, profile, request))

    def _enrolled(self, name: str, who: _Who, issued: Issued) -> Enrolled:
        # The certificate is recorded as issued: what follows must not turn it into an
        # error response, or the device would retry for a certificate it already has.
        try:
            self.sweep_superseded(who.device_id)
        except Exception as e:  # any failure: the next sweep tries again
            log.warning("superseded sweep after %s failed: %s", serial_hex(issued.serial), e)
        try:
            chain = tuple(self.cacerts(name))
        except Exception as e:  # the chain is also at /cacerts
            log.warning("chain for %s unavailable: %s", serial_hex(issued.serial), e)
            chain = ()
        return Enrolled(
            device_id=who.device_id,
            certificate=issued.certificate,
            cert_der=issued.cert_der,
            serial_hex=serial_hex(issued.serial),
            chain=chain,
            method=who.method,
        )
