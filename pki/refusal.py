"""Audit of refused requests, folded per (kind, subject, source address) and minute.

Invariant 7 says refusals are audited; a flood of them must not grow the append-only log
without bound. `RefusalRecorder.refused` writes one audit event `refused.<kind>` on the first
refusal of a key in a minute and only counts the others; once the minute is over, a key
refused more than once gets one event `refused.<kind>.repeated` with the minute's count.
A source that names many subjects in one minute (guessing device IDs) is folded into the
subject "*" after MAX_SUBJECTS_PER_SOURCE of them.
"""

from __future__ import annotations

import datetime
import enum
import unicodedata

from pki.clock import Clock
from pki.store import Database, audit, session_scope
from pki.store.refusals import RefusalRepository

MAX_SUBJECTS_PER_SOURCE = 20
OVERFLOW_SUBJECT = "*"
MAX_REASON = 200
MAX_SUBJECT = 128
MAX_SOURCE = 64


class RefusalKind(enum.Enum):
    """RefusalKind is what was refused; it names the audit action `refused.<kind>`."""

    LOGIN = "login"  # failed authentication: Basic secret, bearer token, client certificate
    IDENTITY = "identity"  # authenticated, but the request names another identity (403)
    REENROLL = "reenroll"  # a re-enrollment refused (revoked, superseded, raced)
    THROTTLE = "throttle"  # refused because of too many attempts
    ROLE = "role"  # an admin call the caller's role may not make
    CONFIRMATION = "confirmation"  # a dangerous command without its confirmation


def _clean(text: str, limit: int) -> str:
    # Refused requests carry what an attacker typed: keep it short and printable.
    out = "".join(
        c if unicodedata.category(c)[0] != "C" else f"\\x{ord(c):02x}" for c in text[:limit]
    )
    return out[:limit]


def _minute(at: datetime.datetime) -> datetime.datetime:
    return at.replace(second=0, microsecond=0)


class RefusalRecorder:
    """RefusalRecorder audits refused requests with a bounded number of events per minute."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def refused(
        self, kind: RefusalKind, reason: str, *, source: str, subject: str | None = None
    ) -> None:
        """Audits one refusal: an event for the first of its key in a minute, else a count.

        `source` is the client's address (or "cli"), `subject` whom the request named (a
        device ID, an admin token); `reason` is for the log only, never for the client.
        """
        now = self.clock.now()
        minute = _minute(now)
        source = _clean(source or "unknown", MAX_SOURCE)
        named = _clean(subject or "", MAX_SUBJECT)
        with session_scope(self.db) as session:
            repo = RefusalRepository(session)
            if repo.bump(minute, kind.value, source, named):
                return
            if named and repo.subjects(minute, kind.value, source) >= MAX_SUBJECTS_PER_SOURCE:
                named = OVERFLOW_SUBJECT
                if repo.bump(minute, kind.value, source, named):
                    return
            text = _clean(reason, MAX_REASON)
            if not repo.first(minute, kind.value, source, named, text):
                repo.bump(minute, kind.value, source, named)  # a concurrent first won
                return
            audit.append(
                session,
                at=now,
                actor=f"client:{source}",
                action=f"refused.{kind.value}",
                target=named or "-",
                details={"reason": text, "source": source, "minute": minute.isoformat()},
            )
            # A new key's first refusal is the moment to write out the minutes now over.
            repo.write_closed(minute, now)

    def flush(self) -> int:
        """Writes the counts of every finished minute to the audit log; returns how many."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            return RefusalRepository(session).write_closed(_minute(now), now)
