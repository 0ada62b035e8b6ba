"""The OCSP responder: issuer filter, then pre-signed store, then live signer (RFC 6960, 5019).

OCSPResponder.respond() turns request bytes into response bytes through a chain of sources
behind one small interface (OCSPSource): the issuer filter answers `unauthorized` for CertIDs
of issuers this service does not know; PresignedSource serves the stored response of a
single-certificate request without a nonce while it is fresh and still states the
certificate's current status; LiveSource signs everything else (nonces, several
certificates, cache misses) from the certificates table.

Why a stored response is checked against the certificate row: a revocation forgets the stored
response in its own transaction, but a pre-signing job that read the certificate just before
the revocation could store a `good` response just after it. Comparing the stored status with
the row (one indexed join) makes such a response a miss, so the answer is `revoked` from the
moment the revocation commits, whoever revoked and whether or not it had a signer key open.

Statuses (invariant 3): ISSUED and unexpired is `good`; REVOKED is `revoked` with time and
reason; PENDING, absent or expired is never `good` (`unknown`, or RFC 6960 §2.2 extended
revoke when configured).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import ocsp as x509_ocsp

from pki.clock import Clock
from pki.errors import ErrorKind, PKIError
from pki.ocsp import (
    CertID,
    CertStatus,
    IssuerMatcher,
    OCSPRequestInfo,
    OCSPSigner,
    SingleAnswer,
    build_error_response,
    build_response,
    never_issued_answer,
    parse_request,
)
from pki.revocation import REASONS, Revoked
from pki.serial import serial_hex
from pki.store import CertificateStatus, Database, session_scope
from pki.store.repository import IssuerRepository
from pki.store.revocation_models import (
    CertificateState,
    CertificateStateReader,
    CertificateStates,
    FreshResponses,
    OCSPResponseRecord,
    OCSPResponseRepository,
)

log = logging.getLogger(__name__)

KeyLoader = Callable[[str], CertificateIssuerPrivateKeyTypes]

# Signer certificates are looked up again this often, so a renewed signer is picked up.
SIGNER_RELOAD = datetime.timedelta(minutes=5)
# An issuer without a usable signer (revoked, not renewed yet) is looked up again this soon.
SIGNER_RETRY = datetime.timedelta(seconds=10)
# A signer whose key could not be opened (the token away) is tried again sooner; the
# token's own back-off keeps the attempts cheap.
KEY_RETRY = datetime.timedelta(seconds=2)
# The hash algorithm of pre-signed CertIDs: what OpenSSL and most clients send.
PRESIGN_HASH = "sha1"


@dataclasses.dataclass(frozen=True)
class OCSPResponderConfig:
    """OCSPResponderConfig holds the responder's windows; the zero values are safe defaults."""

    # nextUpdate = thisUpdate + validity for every response, live or pre-signed.
    validity: datetime.timedelta = datetime.timedelta(days=1)
    # HTTP caches may keep a response at most this long (and never beyond nextUpdate).
    max_age_seconds: int = 3600
    # RFC 6960 §2.2: answer never-issued serials `revoked` with the extended-revoke extension.
    extended_revoke: bool = False


@dataclasses.dataclass(frozen=True)
class OCSPAnswer:
    """OCSPAnswer is a response ready to send, with what HTTP caching headers need."""

    der: bytes
    source: str  # "presigned", "live" or "error"
    this_update: datetime.datetime | None = None
    next_update: datetime.datetime | None = None
    # RFC 5019 §6.2 caching applies to responses without a nonce; errors are not cached.
    cacheable: bool = False

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def status(self) -> x509_ocsp.OCSPResponseStatus:
        return x509_ocsp.OCSPResponseStatus(self.der[4] if len(self.der) > 4 else 0)


def error_answer(status: x509_ocsp.OCSPResponseStatus) -> OCSPAnswer:
    return OCSPAnswer(build_error_response(status), "error")


@dataclasses.dataclass(frozen=True)
class OCSPQuery:
    """OCSPQuery is a parsed request attributed to one issuer and its signer."""

    request: OCSPRequestInfo
    issuer_id: str
    matcher: IssuerMatcher
    # None while the issuer's signer key cannot be used (the token is away, or an offline
    # root whose answers are pre-signed and imported): stored responses are still served,
    # live signing answers tryLater.
    signer: OCSPSigner | None
    # For each CertID of the request: whether it names this issuer.
    owned: tuple[bool, ...]


class OCSPSource(Protocol):
    """OCSPSource is one link of the responder chain: an answer, or None to pass it on."""

    def answer(self, query: OCSPQuery) -> OCSPAnswer | None: ...


def certificate_status(state: CertificateState | None, now: datetime.datetime) -> CertStatus | None:
    """Returns the OCSP status of a certificate row, or None when it was never issued."""
    if state is None or state.status not in (CertificateStatus.ISSUED, CertificateStatus.REVOKED):
        return None  # pending, or abandoned: never released
    if state.status is CertificateStatus.REVOKED:
        assert state.revoked_at is not None
        reason = REASONS.get(state.revocation_reason or "unspecified")
        return CertStatus.revoked(state.revoked_at, reason)
    if state.not_after <= now:
        return CertStatus.unknown()  # expired: no longer vouched for
    return CertStatus.good()


def _stored_status(status: CertificateStatus) -> str:
    return "revoked" if status is CertificateStatus.REVOKED else "good"


# Why an issuer has no signer when it has no signer certificate at all (not a failure of one).
NO_SIGNER = "no valid OCSP signer certificate with a key in the token"


class SignerSet:
    """SignerSet knows every issuer's CertID hashes and holds each issuer's newest OCSP signer.

    The signer of an issuer is its newest valid OCSP-signer certificate whose key is in the
    token (certificates.key_uri); keys come from load_key, never a CA key.
    """

    def __init__(
        self,
        db: Database,
        clock: Clock,
        load_key: KeyLoader,
        *,
        reload_every: datetime.timedelta = SIGNER_RELOAD,
    ) -> None:
        self.db = db
        self.clock = clock
        self.load_key = load_key
        self.reload_every = reload_every
        self._lock = threading.Lock()
        self._loaded_at: datetime.datetime | None = None
        # The next reload: reload_every after the last, or the first signer's expiry.
        self._due: datetime.datetime | None = None
        self._matchers: dict[str, IssuerMatcher] = {}
        self._signers: dict[str, OCSPSigner] = {}
        self.problems: dict[str, str] = {}

    def _load(self, now: datetime.datetime) -> None:
        with session_scope(self.db) as session:
            issuers = [(r.id, r.cert_der) for r in IssuerRepository(session).all()]
            newest = CertificateStateReader(session).newest_signers(now)
        matchers: dict[str, IssuerMatcher] = {}
        for issuer_id, cert_der in issuers:
            if cert_der is not None:
                matchers[issuer_id] = IssuerMatcher(x509.load_der_x509_certificate(cert_der))
        signers: dict[str, OCSPSigner] = {}
        problems: dict[str, str] = {}
        unusable = False
        for issuer_id, (cert_der, key_uri) in newest.items():
            matcher = matchers.get(issuer_id)
            if matcher is None:
                continue
            previous = self._signers.get(issuer_id)
            responder_cert = x509.load_der_x509_certificate(cert_der)
            if previous is not None and previous.responder_cert == responder_cert:
                signers[issuer_id] = previous
                continue
            try:
                key = self.load_key(key_uri)
                signers[issuer_id] = OCSPSigner(matcher.issuer_cert, responder_cert, key)
            except Exception as exc:  # a token or config problem leaves this issuer unsigned
                log.error("OCSP signer of %s unavailable: %s", issuer_id, exc)
                problems[issuer_id] = str(exc)
                unusable = True
        for issuer_id in matchers:
            if issuer_id not in signers and issuer_id not in problems:
                problems[issuer_id] = NO_SIGNER
        self._matchers, self._signers, self.problems = matchers, signers, problems
        self._loaded_at = now
        due = [now + self.reload_every]
        due += [s.responder_cert.not_valid_after_utc for s in signers.values()]
        if problems:
            due.append(now + SIGNER_RETRY)
        if unusable:
            due.append(now + KEY_RETRY)
        self._due = min(due)

    def refresh(self, *, force: bool = False) -> None:
        """Reloads issuers and signers when due (or forced)."""
        now = self.clock.now()
        due = self._due
        if not force and due is not None and now < due:
            return  # every request asks: the common case takes no lock
        with self._lock:
            if force or self._due is None or now >= self._due:
                self._load(now)

    def matchers(self) -> Mapping[str, IssuerMatcher]:
        self.refresh()
        return self._matchers

    def signer(self, issuer_id: str) -> OCSPSigner | None:
        self.refresh()
        return self._signers.get(issuer_id)

    def issuer_of(self, cert_id: CertID) -> str | None:
        """Names the known issuer a CertID refers to, or None."""
        for issuer_id, matcher in self.matchers().items():
            if matcher.matches(cert_id):
                return issuer_id
        return None


class PresignedSource:
    """PresignedSource serves stored responses to single requests without a nonce; RFC 5019."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self.responses = FreshResponses(db)

    def answer(self, query: OCSPQuery) -> OCSPAnswer | None:
        request = query.request
        if request.nonce is not None or len(request.cert_ids) != 1 or not query.owned[0]:
            return None
        cert_id = request.cert_ids[0]
        if cert_id.serial <= 0 or cert_id.hash_algorithm != PRESIGN_HASH:
            return None
        # The client checks that the response's CertID is the one it sent (RFC 6960 §3.2).
        if query.matcher.cert_id(cert_id.serial, PRESIGN_HASH).der != cert_id.der:
            return None
        now = self.clock.now()
        stored = self.responses.find(query.issuer_id, serial_hex(cert_id.serial), now)
        if stored is None:
            return None
        if stored.status != _stored_status(stored.current):
            return None  # the certificate changed since it was signed: sign live
        return OCSPAnswer(
            stored.response_der, "presigned", stored.this_update, stored.next_update, True
        )


def _answers(
    query_cert_ids: Sequence[CertID],
    owned: Sequence[bool],
    states: Mapping[str, CertificateState],
    now: datetime.datetime,
    config: OCSPResponderConfig,
) -> tuple[list[SingleAnswer], bool]:
    next_update = now + config.validity
    answers: list[SingleAnswer] = []
    extended = False
    for cert_id, mine in zip(query_cert_ids, owned, strict=True):
        if not mine:
            # Another issuer's CertID inside an answerable request (RFC 6960 §2.2 unknown).
            answers.append(SingleAnswer(cert_id, CertStatus.unknown(), now, next_update))
            continue
        state = states.get(serial_hex(cert_id.serial)) if cert_id.serial > 0 else None
        status = certificate_status(state, now)
        if status is None:
            answers.append(never_issued_answer(cert_id, now, next_update, config.extended_revoke))
            extended = extended or config.extended_revoke
        else:
            answers.append(SingleAnswer(cert_id, status, now, next_update))
    return answers, extended


class LiveSource:
    """LiveSource signs a response now from the certificates table; it always answers.

    Before it signs it looks up its signer's own certificate row (one indexed lookup): a
    signer revoked since the signer set was loaded is never used (invariant 5); the set is
    reloaded at once, which leaves revoked signers out, and the answer is signed by the next
    valid signer, or is `tryLater` when there is none yet."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        config: OCSPResponderConfig,
        signers: SignerSet | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.config = config
        self.signers = signers
        self.states = CertificateStates(db)

    def _usable(self, issuer_id: str, signer: OCSPSigner) -> bool:
        serial = serial_hex(signer.responder_cert.serial_number)
        state = self.states.by_serials(issuer_id, [serial]).get(serial)
        return state is not None and state.status is CertificateStatus.ISSUED

    def _signer(self, query: OCSPQuery) -> OCSPSigner | None:
        if query.signer is None:
            return None  # no signer key can be opened now: tryLater
        if self.signers is None or self._usable(query.issuer_id, query.signer):
            return query.signer
        log.warning("OCSP signer of %s is no longer valid: reloading signers", query.issuer_id)
        self.signers.refresh(force=True)
        signer = self.signers.signer(query.issuer_id)
        if signer is None or not self._usable(query.issuer_id, signer):
            return None
        return signer

    def answer(self, query: OCSPQuery) -> OCSPAnswer | None:
        # No signer key for this issuer here (an offline root): only what was pre-signed and
        # imported can be served; RFC 6960 §2.3 "tryLater" for the rest.
        signer = self._signer(query)
        if signer is None:
            return error_answer(x509_ocsp.OCSPResponseStatus.TRY_LATER)
        now = self.clock.now()
        request = query.request
        wanted = [
            serial_hex(c.serial)
            for c, mine in zip(request.cert_ids, query.owned, strict=True)
            if mine and c.serial > 0
        ]
        states = self.states.by_serials(query.issuer_id, wanted)
        answers, extended = _answers(request.cert_ids, query.owned, states, now, self.config)
        der = build_response(signer, answers, now, nonce=request.nonce, extended_revoke=extended)
        next_update = min(a.next_update for a in answers)
        return OCSPAnswer(der, "live", now, next_update, cacheable=request.nonce is None)


class OCSPResponder:
    """OCSPResponder answers OCSP requests through the issuer filter and a chain of sources."""

    def __init__(self, signers: SignerSet, sources: Sequence[OCSPSource]) -> None:
        self.signers = signers
        self.sources = tuple(sources)

    @classmethod
    def standard(
        cls,
        db: Database,
        clock: Clock,
        signers: SignerSet,
        config: OCSPResponderConfig | None = None,
    ) -> OCSPResponder:
        """Builds the usual chain: pre-signed store, then live signer."""
        cfg = config or OCSPResponderConfig()
        return cls(signers, [PresignedSource(db, clock), LiveSource(db, clock, cfg, signers)])

    def respond(self, request_der: bytes) -> OCSPAnswer:
        """Answers one DER OCSPRequest; errors become unsigned error responses; RFC 6960 §2.3."""
        try:
            request = parse_request(request_der)
        except PKIError:
            return error_answer(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        try:
            issuers = [self.signers.issuer_of(c) for c in request.cert_ids]
            known = [i for i in issuers if i is not None]
            if not known:
                # RFC 6960 §2.3: "unauthorized ... the client is not authorized to make this
                # query to this server" -- and no certificate here is ours to answer for.
                return error_answer(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED)
            issuer_id = known[0]
            matcher = self.signers.matchers()[issuer_id]
            signer = self.signers.signer(issuer_id)
            owned = tuple(i == issuer_id for i in issuers)
            query = OCSPQuery(request, issuer_id, matcher, signer, owned)
            for source in self.sources:
                answer = source.answer(query)
                if answer is not None:
                    return answer
        except PKIError as exc:
            if exc.kind is ErrorKind.UNAVAILABLE:
                return error_answer(x509_ocsp.OCSPResponseStatus.TRY_LATER)
            log.error("OCSP request failed: %s", exc.message)
            return error_answer(x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR)
        return error_answer(x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR)


@dataclasses.dataclass(frozen=True)
class PresignResult:
    """PresignResult counts what one pre-signing run did per issuer."""

    signed: dict[str, int]
    skipped: dict[str, str]  # issuers without a usable signer, and why


class OCSPPresigner:
    """OCSPPresigner keeps a signed response for every issued, unexpired certificate; RFC 5019.

    A stored response is refreshed once half of its validity has passed. As a revocation
    listener it re-signs the revoked serial's response at once.
    """

    def __init__(
        self,
        db: Database,
        clock: Clock,
        signers: SignerSet,
        config: OCSPResponderConfig | None = None,
        *,
        batch: int = 500,
    ) -> None:
        self.db = db
        self.clock = clock
        self.signers = signers
        self.config = config or OCSPResponderConfig()
        self.batch = batch

    def _sign(self, signer: OCSPSigner, state: CertificateState) -> OCSPResponseRecord | None:
        now = self.clock.now()
        status = certificate_status(state, now)
        if status is None:
            return None
        next_update = now + self.config.validity
        serial = int(state.serial_hex, 16)
        answer = SingleAnswer(
            signer.matcher.cert_id(serial, PRESIGN_HASH), status, now, next_update
        )
        der = build_response(signer, [answer], now)
        return OCSPResponseRecord(
            certificate_id=state.certificate_id,
            issuer_id=state.issuer_id,
            serial_hex=state.serial_hex,
            status=_stored_status(state.status),
            this_update=now,
            next_update=next_update,
            signer_serial_hex=serial_hex(signer.responder_cert.serial_number),
            response_der=der,
        )

    def run(self, issuer_id: str | None = None) -> PresignResult:
        """Signs the missing, half-expired and outdated responses of one or every issuer."""
        self.signers.refresh(force=True)
        signed: dict[str, int] = {}
        skipped: dict[str, str] = {}
        issuer_ids = [issuer_id] if issuer_id else sorted(self.signers.matchers())
        for iid in issuer_ids:
            signer = self.signers.signer(iid)
            if signer is None:
                skipped[iid] = self.signers.problems.get(iid, "unknown issuer")
                continue
            signed[iid] = self._run_issuer(iid, signer)
        return PresignResult(signed, skipped)

    def _run_issuer(self, issuer_id: str, signer: OCSPSigner) -> int:
        count = 0
        after_id = 0
        while True:
            now = self.clock.now()
            refresh_before = now - self.config.validity / 2
            with session_scope(self.db) as session:
                states = CertificateStateReader(session).needing_response(
                    issuer_id, now, refresh_before, after_id=after_id, limit=self.batch
                )
            if not states:
                return count
            records = [r for r in (self._sign(signer, s) for s in states) if r is not None]
            with session_scope(self.db) as session:
                OCSPResponseRepository(session).put_all(records)
            count += len(records)
            after_id = states[-1].certificate_id

    def resign(self, issuer_id: str, serial: str) -> bool:
        """Re-signs one certificate's stored response now; False when no signer is at hand."""
        signer = self.signers.signer(issuer_id)
        if signer is None:
            return False
        with session_scope(self.db) as session:
            state = CertificateStateReader(session).by_serials(issuer_id, [serial]).get(serial)
        if state is None:
            return False
        record = self._sign(signer, state)
        if record is None:
            return False
        with session_scope(self.db) as session:
            repo = OCSPResponseRepository(session)
            # Store only if the certificate still has the status just signed.
            current = CertificateStateReader(session).by_serials(issuer_id, [serial]).get(serial)
            if current is None or current.status is not state.status:
                return False
            repo.put(record)
        return True

    def on_revoked(self, revoked: Revoked) -> None:
        """Revocation listener: re-signs the serial's response; failures only log (the VA then
        signs live, so correctness does not depend on this)."""
        try:
            self.resign(revoked.issuer_id, revoked.serial_hex)
        except Exception as exc:  # the revocation is committed; this is an optimisation
            log.warning("re-signing OCSP for %s failed: %s", revoked.serial_hex, exc)
