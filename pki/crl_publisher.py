"""CRL publishing: full and delta CRLs per issuer from the certificates table (RFC 5280 §5).

Publishing runs off the request path (`pki crl publish`, or a scheduler). Its order follows
the issuance cycle: reserve the CRL number in the database, then build, sign and lint, then
store the DER. Numbers come from a unique (issuer_id, crl_number) index: concurrent
publishers that pick the same number clash, and the loser retries with the next one, so
numbers strictly increase per issuer (invariant 4). The entries are read in the transaction
that reserves the number, so a higher number never lists an older state. A reservation
whose CRL is never stored leaves a gap, which RFC 5280 allows (numbers need only increase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
from collections.abc import Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from pki import lint
from pki.clock import Clock
from pki.config import URLConfig
from pki.crl import CRLHashAlgorithm as CRLHash
from pki.crl import RevokedEntry, build_crl
from pki.errors import conflict, internal
from pki.issuer import Issuer, lint_key_for
from pki.profile import crl_url, delta_crl_url
from pki.revocation import REASONS
from pki.store import CertificateStatus, Database, session_scope
from pki.store.revocation_models import (
    CertificateState,
    CertificateStateReader,
    CRLNumberClash,
    CRLRepository,
)


@dataclasses.dataclass(frozen=True)
class CRLPublisherConfig:
    """CRLPublisherConfig holds the CRL windows; the zero values are safe defaults."""

    # nextUpdate = thisUpdate + validity (RFC 5280 §5.1.2.5).
    full_validity: datetime.timedelta = datetime.timedelta(days=7)
    delta_validity: datetime.timedelta = datetime.timedelta(days=1)
    # A delta lists changes from a little before its base's thisUpdate: listing a change the
    # base already has is harmless, missing one that committed late is not.
    delta_overlap: datetime.timedelta = datetime.timedelta(minutes=10)
    # Full CRLs point at the delta CRL (Freshest CRL, RFC 5280 §5.2.6).
    deltas: bool = True
    attempts: int = 20


@dataclasses.dataclass(frozen=True)
class PublishedCRL:
    """PublishedCRL describes a CRL now stored and served."""

    issuer_id: str
    crl_number: int
    is_delta: bool
    base_number: int | None
    this_update: datetime.datetime
    next_update: datetime.datetime
    entries: int
    crl_der: bytes


def _entry(state: CertificateState) -> RevokedEntry:
    assert state.revoked_at is not None
    reason = REASONS.get(state.revocation_reason or "unspecified")
    return RevokedEntry(int(state.serial_hex, 16), state.revoked_at, reason)


def full_entries(states: list[CertificateState]) -> list[RevokedEntry]:
    """Lists the revoked certificates of a full CRL."""
    return [_entry(s) for s in states if s.status is CertificateStatus.REVOKED]


def revoked_list(
    rows: Iterable[tuple[str, datetime.datetime | None, str | None]],
) -> list[RevokedEntry]:
    """Lists the entries of a full CRL from (serial_hex, revoked_at, reason) rows."""
    entries: list[RevokedEntry] = []
    append = entries.append
    reasons = REASONS.get
    for serial, at, reason in rows:
        if at is None:
            raise internal(f"revoked certificate {serial} has no revocation time")
        append(RevokedEntry(int(serial, 16), at, reasons(reason or "unspecified")))
    return entries


def delta_entries(states: list[CertificateState], now: datetime.datetime) -> list[RevokedEntry]:
    """Lists what changed since the base: revocations, and removeFromCRL for released holds."""
    entries: list[RevokedEntry] = []
    for s in states:
        if s.not_after <= now:
            continue  # expired: RFC 5280 §3.3 lets it drop off both lists
        if s.status is CertificateStatus.REVOKED:
            entries.append(_entry(s))
        elif s.status is CertificateStatus.ISSUED:
            # RFC 5280 §5.3.1: removeFromCRL "indicates that a certificate is to be removed from
            # a CRL because ... was removed from hold".
            entries.append(RevokedEntry(int(s.serial_hex, 16), now, remove_from_crl=True))
    return entries


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while a CRL is read, built and checked.

    Reading 10^6 rows creates millions of tuples, and each allocation-triggered collection
    walks all of them: with the collector on, turning the rows into entries took 3.5 times as
    long. Nothing built here forms a cycle, and reference counting still frees everything. The
    pause is process-wide: in the CA front's scheduler, other threads' cycles wait a few
    seconds longer to be collected."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


# pkilint decodes a whole CRL into pyasn1 objects: ~0.4 ms and ~10 KiB per entry, so a CRL of
# 10^6 entries would take minutes and gigabytes. Above this size the lint runs on a sample.
LINT_ALL_ENTRIES_UP_TO = 1000
LINT_SAMPLE_HEAD = 100


def lint_sample(entries: list[RevokedEntry]) -> list[RevokedEntry]:
    """Picks the entries whose encoding can differ: every (reason, removeFromCRL) kind, the
    smallest and largest serials and the first few; all entries come from the same builder."""
    if len(entries) <= LINT_ALL_ENTRIES_UP_TO:
        return entries
    picked: dict[int, RevokedEntry] = {e.serial: e for e in entries[:LINT_SAMPLE_HEAD]}
    kinds: set[tuple[x509.ReasonFlags | None, bool]] = set()
    for e in entries:
        kind = (e.reason, e.remove_from_crl)
        if kind not in kinds:
            kinds.add(kind)
            picked.setdefault(e.serial, e)
    for e in (min(entries, key=lambda e: e.serial), max(entries, key=lambda e: e.serial)):
        picked.setdefault(e.serial, e)
    return list(picked.values())


def _lint_issuer(
    issuer_cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes, hash_algorithm: CRLHash
) -> x509.Certificate:
    """A stand-in issuer certificate: the issuer's name and key identifier, a throwaway key,
    so that a lint sample is never signed with the CA key (as for certificates)."""
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        x509.CertificateBuilder()
        .subject_name(issuer_cert.subject)
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(issuer_cert.not_valid_before_utc)
        .not_valid_after(issuer_cert.not_valid_after_utc)
        .add_extension(ski.value, critical=ski.critical)
        .sign(key, hash_algorithm)
    )


class CRLPublisher:
    """CRLPublisher signs and stores full and delta CRLs with an issuer's key."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        urls: URLConfig,
        config: CRLPublisherConfig | None = None,
        *,
        lint_crls: bool = True,
    ) -> None:
        self.db = db
        self.clock = clock
        self.urls = urls
        self.config = config or CRLPublisherConfig()
        self.lint_crls = lint_crls

    def due(
        self,
        issuer_id: str,
        *,
        delta: bool = False,
        period: datetime.timedelta,
        delay: datetime.timedelta,
    ) -> str | None:
        """Says why the next CRL of an issuer is due, or None when it is not.

        Due when there is none yet, when the latest is `period` old, or when a revocation
        change is `delay` old and not on it yet: a scheduler that asks every minute publishes
        within `delay` (plus a minute) after a revocation, once for a burst of them.
        """
        now = self.clock.now()
        with session_scope(self.db) as session:
            repo = CRLRepository(session)
            latest = repo.latest(issuer_id, is_delta=delta)
            if delta:
                base = repo.latest(issuer_id, is_delta=False)
                if base is None:
                    return None  # a delta needs a base; the full CRL's schedule makes one
                if latest is None or latest.this_update < base.this_update:
                    latest = base
            if latest is None:
                return "no CRL yet"
            if now - latest.this_update >= period:
                return "period elapsed"
            first = CertificateStateReader(session).first_change_since(
                issuer_id, latest.this_update
            )
        if first is not None and now - first >= delay:
            return "revocations since the last CRL"
        return None

    def publish(self, issuer: Issuer, *, delta: bool = False) -> PublishedCRL:
        """Publishes the next full CRL (or delta CRL) of an issuer; RFC 5280 §5."""
        with _collector_paused():
            return self._publish(issuer, delta=delta)

    def _publish(self, issuer: Issuer, *, delta: bool) -> PublishedCRL:
        issuer_id = issuer.issuer_id
        validity = self.config.delta_validity if delta else self.config.full_validity
        for _attempt in range(self.config.attempts):
            now = self.clock.now()
            try:
                with session_scope(self.db) as session:
                    repo = CRLRepository(session)
                    base_number: int | None = None
                    since: datetime.datetime | None = None
                    if delta:
                        base = repo.latest(issuer_id, is_delta=False)
                        if base is None:
                            raise conflict(f"publish a full CRL of {issuer_id} before a delta")
                        base_number = base.crl_number
                        since = base.this_update - self.config.delta_overlap
                    record = repo.reserve(
                        issuer_id,
                        is_delta=delta,
                        base_number=base_number,
                        this_update=now,
                        next_update=now + validity,
                    )
                    reader = CertificateStateReader(session)
                    if since is None:
                        # Turned into entries as the rows stream in, inside the transaction.
                        entries = revoked_list(reader.revoked_entries(issuer_id, now))
                    else:
                        entries = delta_entries(reader.changed_since(issuer_id, since), now)
                    reservation = (record.id, record.crl_number)
            except CRLNumberClash:
                continue
            break
        else:
            raise internal(f"no free CRL number for {issuer_id} after {self.config.attempts} tries")

        record_id, number = reservation
        try:
            build = functools.partial(
                build_crl,
                crl_number=number,
                this_update=now,
                next_update=now + validity,
                distribution_point_url=crl_url(self.urls, issuer_id),
                freshest_crl_url=(
                    delta_crl_url(self.urls, issuer_id)
                    if self.config.deltas and not delta
                    else None
                ),
                delta_of=base_number,
                hash_algorithm=issuer.hash,
            )
            crl_der = build(issuer_cert=issuer.certificate, issuer_key=issuer.key, entries=entries)
            if self.lint_crls:
                sample = lint_sample(entries)
                lint_der = crl_der
                if len(sample) != len(entries):
                    # Same builder, same fields, fewer entries, a throwaway key.
                    key = lint_key_for(issuer.key)
                    lint_der = build(
                        issuer_cert=_lint_issuer(issuer.certificate, key, issuer.hash),
                        issuer_key=key,
                        entries=sample,
                    )
                lint.require_clean(
                    lint.lint_crl(lint_der, authority=is_self_signed(issuer.certificate)),
                    f"CRL {number} of {issuer_id}",
                )
            # The CRL's bytes are ours (pki.crl encodes the entries), so they are read back
            # with cryptography's strict DER parser, which parses every entry, and the
            # signature is checked: cryptography re-encodes the TBSCertList it parsed and
            # verifies the signature over that, so a valid signature also says the TBS
            # round-trips byte for byte, and that the signature algorithm suits the key.
            crl = x509.load_der_x509_crl(crl_der)
            if len(crl) != len(entries):
                raise internal(f"CRL lists {len(crl)} entries, not {len(entries)}")
            if not crl.is_signature_valid(issuer.key.public_key()):
                raise internal("CRL signature does not verify with the issuer's public key")
        except BaseException:
            with session_scope(self.db) as session:
                CRLRepository(session).discard(record_id)
            raise
        with session_scope(self.db) as session:
            stored = CRLRepository(session).get(record_id)
            stored.crl_der = crl_der
            stored.entries = len(entries)
        return PublishedCRL(
            issuer_id, number, delta, base_number, now, now + validity, len(entries), crl_der
        )
