"""Scheduled publishing jobs, each under a job lock: one of any number of schedulers runs it.

A job is named by what it does and for which issuer ("crl:devices", "presign:devices",
"renew-signer:devices"). Whether a job is due is decided while its lock is
held, so a scheduler that gets the lock after another one finished sees that publication and
does not repeat it: N schedulers give one publication per due job (invariant 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Callable, Iterator

from pki.clock import Clock
from pki.crl_publisher import CRLPublisher, PublishedCRL
from pki.errors import ErrorKind, PKIError
from pki.issuer import Issuer
from pki.ocsp_responder import OCSPPresigner, PresignResult
from pki.store import Database
from pki.store.job_lock import DEFAULT_LEASE, JobLocks

BUSY = "another scheduler is running this job"


@dataclasses.dataclass(frozen=True)
class CRLJob:
    """CRLJob says what one CRL job did: published, not due, or left to another scheduler."""

    issuer_id: str
    is_delta: bool
    published: PublishedCRL | None = None
    why: str | None = None  # why it was due, or why nothing was published
    offline: bool = False  # due, but the issuer's key is not in this token (an offline root)


class Jobs:
    """Jobs runs the publishing jobs of one scheduler, each under its job lock."""

    def __init__(
        self, db: Database, clock: Clock, *, lease: datetime.timedelta = DEFAULT_LEASE
    ) -> None:
        self.clock = clock
        self.locks = JobLocks(db, lease=lease)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Yields True while this scheduler holds the named job, False when another does."""
        with self.locks.hold(name, self.clock.now()) as held:
            yield held

    def crl(
        self,
        publisher: CRLPublisher,
        issuer_id: str,
        open_issuer: Callable[[], Issuer | None],
        *,
        delta: bool,
        when_due: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    ) -> CRLJob:
        """Publishes an issuer's next full or delta CRL; with when_due (period, delay), only
        when CRLPublisher.due says it is due. The issuer's key is opened only to sign;
        open_issuer returns None for an issuer whose key is elsewhere (offline).

        Full and delta CRLs of one issuer share one lock ("crl:<issuer>"), taken by the
        scheduled form and by a publication asked for by hand alike: a delta reserved while a
        full CRL is being signed would name the old base with a higher number, and no delta
        would then match the new full CRL's Freshest CRL (RFC 5280 §5.2.4). The scheduled form
        skips a held lock; the form asked for by hand refuses, to be tried again."""
        with self.exclusive(f"crl:{issuer_id}") as held:
            if when_due is None:
                if not held:
                    raise PKIError(
                        ErrorKind.UNAVAILABLE,
                        f"{issuer_id}: another publisher is signing its CRLs now; try again",
                    )
                return self._publish(publisher, issuer_id, open_issuer, delta=delta, why=None)
            if not held:
                return CRLJob(issuer_id, delta, why=BUSY)
            period, delay = when_due
            why = publisher.due(issuer_id, delta=delta, period=period, delay=delay)
            if why is None:
                return CRLJob(issuer_id, delta, why="not due")
            return self._publish(publisher, issuer_id, open_issuer, delta=delta, why=why)

    @staticmethod
    def _publish(
        publisher: CRLPublisher,
        issuer_id: str,
        open_issuer: Callable[[], Issuer | None],
        *,
        delta: bool,
        why: str | None,
    ) -> CRLJob:
        issuer = open_issuer()
        if issuer is None:
            return CRLJob(issuer_id, delta, why=why, offline=True)
        return CRLJob(issuer_id, delta, publisher.publish(issuer, delta=delta), why)

    def presign(self, presigner: OCSPPresigner, issuer_id: str | None = None) -> PresignResult:
        """Pre-signs the responses of one or every issuer, each issuer under its job lock."""
        presigner.signers.refresh(force=True)
        issuer_ids = [issuer_id] if issuer_id else sorted(presigner.signers.matchers())
        signed: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for iid in issuer_ids:
            with self.exclusive(f"presign:{iid}") as held:
                if not held:
                    skipped[iid] = BUSY
                    continue
                result = presigner.run(iid)
            signed.update(result.signed)
            skipped.update(result.skipped)
        return PresignResult(signed, skipped)
