"""CRL publishing: full and delta CRLs per issuer from the certificates table (RFC 5280 §5).

Publishing runs off the request path (`pki crl publish`, or a scheduler). Its order follows
the issuance cycle: reserve the CRL number in the database, then build, sign and lint, then
store the DER. Numbers come from a unique (issuer_id, crl_number) index: concurrent
publishers that pick the same number clash, and the loser retries with the next one, so
numbers strictly increase per issuer (invariant 6). The entries are read in the transaction
that reserves the number, after the issuer's revocation marker, so a higher number never lists
an older state and a revocation that commits later makes the next CRL due. A reservation
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
    CRLRecord,
    CRLRepository,
)

# Why due() says a CRL is due because its period passed; an imported CRL is exempt.
PERIOD_ELAPSED = "period elapsed"


@dataclasses.dataclass(frozen=True)
class CRLPublisherConfig:
    """CRLPublisherConfig holds the CRL windows; the zero values are safe defaults."""

    # nextUpdate = thisUpdate + validity (RFC 5280 §5.1.2.5).
    full_validity: datetime.timedelta = datetime.timedelta(days=7)
    delta_validity: datetime.timedelta = datetime.timedelta(days=1)
    # Delta CRLs of the intermediates: one with every full CRL, which then points at it
    # (Freshest CRL, RFC 5280 §5.2.6), and more on their own schedule.
    deltas: bool = True
    # A CRL is due again once this fraction of its validity has passed, whatever the period,
    # so that relying parties never hold one past its nextUpdate.
    renew_fraction: float = 0.5
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
    # The issuer's revocation marker read before the entries: the CRL holds every change up
    # to it.
    marker: int = 0
    # The delta CRL stored together with a full CRL (same base), when deltas are on.
    delta: PublishedCRL | None = None


@dataclasses.dataclass
class _Reservation:
    """_Reservation is a CRL number taken in the database and the entries read for it."""

    record_id: int
    number: int
    is_delta: bool
    base_number: int | None
    next_update: datetime.datetime
    entries: list[RevokedEntry]
    crl_der: bytes = b""


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

    def has_deltas(self, issuer: Issuer) -> bool:
        """Says whether the issuer's full CRLs come with delta CRLs.

        A root's CRL lists CA certificates revoked in ceremonies, and an offline root's CRL
        arrives as a file: it has no delta, and so no Freshest CRL pointer that could lead
        nowhere."""
        return self.config.deltas and not is_self_signed(issuer.certificate)

    def due(
        self,
        issuer_id: str,
        *,
        delta: bool = False,
        period: datetime.timedelta,
        delay: datetime.timedelta,
    ) -> str | None:
        """Says why the next CRL of an issuer is due, or None when it is not.

        Due when there is none yet (for a delta: none of the current base), when the latest
        is `period` old or past the renewal fraction of its validity, or when a revocation
        change committed after the latest read its entries and is `delay` old: a scheduler
        that asks every minute publishes within `delay` (plus a minute) after a revocation,
        once for a burst of them. Whether a change is on the latest CRL is decided by the
        issuer's revocation marker, which orders changes as they commit, not by timestamps.
        """
        now = self.clock.now()
        with self.db.read_session() as session:
            repo = CRLRepository(session)
            latest = repo.latest(issuer_id, is_delta=False)
            if latest is None:
                return None if delta else "no CRL yet"  # a delta waits for its base
            if delta:
                latest = repo.current_delta(issuer_id)
                if latest is None:
                    return "no delta CRL of the current base"
            validity = latest.next_update - latest.this_update
            if now >= latest.this_update + validity * self.config.renew_fraction:
                return "renewal before nextUpdate"
            if now - latest.this_update >= period:
                return PERIOD_ELAPSED
            if latest.marker is None:
                return "no revocation marker yet"
            first = CertificateStateReader(session).first_change_after(issuer_id, latest.marker)
        if first is not None and now - first >= delay:
            return "revocations since the last CRL"
        return None

    def publish(self, issuer: Issuer, *, delta: bool = False) -> PublishedCRL:
        """Publishes the next full CRL (with its delta CRL when deltas are on), or a delta CRL
        against the latest full CRL; RFC 5280 §5."""
        if delta and not self.has_deltas(issuer):
            raise conflict(f"{issuer.issuer_id} publishes no delta CRLs")
        with _collector_paused():
            return self._publish(issuer, delta=delta)

    def _publish(self, issuer: Issuer, *, delta: bool) -> PublishedCRL:
        issuer_id = issuer.issuer_id
        for _attempt in range(self.config.attempts):
            now = self.clock.now()
            try:
                with session_scope(self.db) as session:
                    marker, reservations = self._reserve(
                        CRLRepository(session),
                        CertificateStateReader(session),
                        issuer,
                        now,
                        delta=delta,
                    )
            except CRLNumberClash:
                continue
            break
        else:
            raise internal(f"no free CRL number for {issuer_id} after {self.config.attempts} tries")

        try:
            for r in reservations:
                r.crl_der = self._sign(issuer, r, now, with_delta=len(reservations) > 1)
        except BaseException:
            with session_scope(self.db) as session:
                for r in reservations:
                    CRLRepository(session).discard(r.record_id)
            raise
        # A full CRL and its delta become visible in one commit: a Freshest CRL pointer never
        # leads to a delta of another base (RFC 5280 §5.2.4, §5.2.6).
        with session_scope(self.db) as session:
            repo = CRLRepository(session)
            for r in reservations:
                stored = repo.get(r.record_id)
                stored.crl_der = r.crl_der
                stored.entries = len(r.entries)
        published = [
            PublishedCRL(
                issuer_id,
                r.number,
                r.is_delta,
                r.base_number,
                now,
                r.next_update,
                len(r.entries),
                r.crl_der,
                marker,
            )
            for r in reservations
        ]
        if len(published) > 1:
            return dataclasses.replace(published[0], delta=published[1])
        return published[0]

    def _reserve(
        self,
        repo: CRLRepository,
        reader: CertificateStateReader,
        issuer: Issuer,
        now: datetime.datetime,
        *,
        delta: bool,
    ) -> tuple[int, list[_Reservation]]:
        """Reserves the CRL numbers and reads the entries, in one transaction of the caller."""
        issuer_id = issuer.issuer_id
        # The marker is read first. Revoking transactions advance it as they commit, so every
        # change up to it is committed and seen by the reads below (SQLite: one write
        # transaction; PostgreSQL read committed: each later statement sees at least what
        # this one saw). A change that commits later has a higher marker and makes the next
        # CRL due; one that slips in between is listed here and again next time, harmlessly.
        marker = reader.marker(issuer_id)
        full_until = now + self.config.full_validity
        delta_until = now + self.config.delta_validity

        def reserve(is_delta: bool, base: int | None, until: datetime.datetime) -> CRLRecord:
            return repo.reserve(
                issuer_id,
                is_delta=is_delta,
                base_number=base,
                this_update=now,
                next_update=until,
                marker=marker,
            )

        if delta:
            base = repo.latest(issuer_id, is_delta=False)
            if base is None:
                raise conflict(f"publish a full CRL of {issuer_id} before a delta")
            record = reserve(True, base.crl_number, delta_until)
            # RFC 5280 §5.2.4: a delta lists what changed since its base; the base holds every
            # change up to its marker. CRLs from before markers existed count as marker 0.
            changed = reader.changed_after(issuer_id, base.marker or 0)
            entries = delta_entries(changed, now)
            return marker, [
                _Reservation(
                    record.id, record.crl_number, True, base.crl_number, delta_until, entries
                )
            ]
        record = reserve(False, None, full_until)
        # Turned into entries as the rows stream in, inside the transaction.
        entries = revoked_list(reader.revoked_entries(issuer_id, now))
        reservations = [
            _Reservation(record.id, record.crl_number, False, None, full_until, entries)
        ]
        if self.has_deltas(issuer):
            companion = reserve(True, record.crl_number, delta_until)
            changed = reader.changed_after(issuer_id, marker)
            reservations.append(
                _Reservation(
                    companion.id,
                    companion.crl_number,
                    True,
                    record.crl_number,
                    delta_until,
                    delta_entries(changed, now),
                )
            )
        return marker, reservations

    def _sign(
        self, issuer: Issuer, r: _Reservation, now: datetime.datetime, *, with_delta: bool
    ) -> bytes:
        """Builds, signs, lints and reads back one reserved CRL; returns its DER."""
        issuer_id = issuer.issuer_id
        root = is_self_signed(issuer.certificate)
        build = functools.partial(
            build_crl,
            crl_number=r.number,
            this_update=now,
            next_update=r.next_update,
            # A root's CRL carries no Issuing Distribution Point: a named one would put the
            # root's own certificate, which has no CRL Distribution Points, out of the CRL's
            # scope for relying parties that check the whole chain (RFC 5280 §6.3.3 (b)).
            distribution_point_url=None if root else crl_url(self.urls, issuer_id),
            # RFC 5280 §5.2.6: the Freshest CRL names where the delta CRLs are; it is written
            # only on a full CRL stored together with its delta.
            freshest_crl_url=(
                delta_crl_url(self.urls, issuer_id) if with_delta and not r.is_delta else None
            ),
            delta_of=r.base_number,
            hash_algorithm=issuer.hash,
        )
        entries = r.entries
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
                lint.lint_crl(lint_der, authority=root),
                f"CRL {r.number} of {issuer_id}",
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
        return crl_der
