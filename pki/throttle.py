"""Failed-login throttling per source address and per (device ID, source address).

Failures from one address never lock a device out for a correct secret from another: the
secrets are 192-bit random values (pki/device.py), so guessing is stopped by entropy, and the
throttle only has to keep one address from hammering (NIST SP 800-63B 5.2.2: "the verifier
SHALL implement a rate-limiting mechanism that effectively limits the number of failed
authentication attempts"). Counters are keyed by the device ID as sent, so an unknown ID is
counted, and locked, exactly like a known one.
"""

from __future__ import annotations

import datetime

from pki.store import Database, audit, session_scope
from pki.store.enrollment_repository import AuthFailureRepository, FailureCount

# The per-address counter's device ID: never a valid device ID (pki.csr.DEVICE_ID_RE).
ANY_DEVICE = ""


class LoginThrottle:
    """LoginThrottle counts failed logins and says whether an (ID, address) is locked out."""

    def __init__(
        self,
        db: Database,
        *,
        max_failures: int,
        max_address_failures: int,
        window: datetime.timedelta,
    ) -> None:
        self.db = db
        self.max_failures = max_failures
        self.max_address_failures = max_address_failures
        self.window = window

    def locked(self, device_key: str, address: str, now: datetime.datetime) -> bool:
        """Says whether this address, or this device ID from this address, is locked out."""
        with self.db.read_session() as session:
            repo = AuthFailureRepository(session)
            return repo.locked([(ANY_DEVICE, address), (device_key, address)], now)

    def prune(self, now: datetime.datetime) -> int:
        """Deletes counters that neither lock nor count any more (idle for a whole window)."""
        with session_scope(self.db) as session:
            return AuthFailureRepository(session).prune(now - self.window)

    def fail(self, device_key: str, address: str, now: datetime.datetime) -> None:
        """Counts one failure for the address and for (device ID, address)."""
        counters = (
            (ANY_DEVICE, self.max_address_failures, "login.throttled"),
            (device_key, self.max_failures, "device.locked"),
        )
        with session_scope(self.db) as session:
            repo = AuthFailureRepository(session)
            for key, limit, action in counters:
                count = repo.add(key, address, now, limit=limit, window=self.window)
                if count.failures == limit:
                    audit.append(
                        session,
                        at=now,
                        actor=f"address:{address}",
                        action=action,
                        target=key or address,
                        details={
                            "address": address,
                            "failures": count.failures,
                            "locked_until": _iso(count),
                        },
                    )
                locked = count.locked_until is not None and count.locked_until > now
                if key == ANY_DEVICE and locked:
                    # A throttled address adds no per-device rows: a flood of made-up IDs
                    # from one address cannot grow the table without bound.
                    return


def _iso(count: FailureCount) -> str | None:
    return None if count.locked_until is None else count.locked_until.isoformat()
