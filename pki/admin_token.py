"""Admin API tokens: random bearer tokens with a role, stored only as SHA-256 hashes.

A token is 32 random bytes, so a plain SHA-256 (not a slow password hash) is enough to keep
the stored form useless to a reader of the database, and lets every request be checked with
one indexed lookup.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import secrets

from pki.clock import Clock
from pki.errors import ErrorKind, PKIError, bad_request
from pki.store import Database, audit, session_scope
from pki.store.revocation_models import AdminToken, AdminTokenRepository

TOKEN_PREFIX = "pkiadm_"  # noqa: S105 -- a marker, not a secret
MAX_TOKEN_LENGTH = 128


class Role(enum.Enum):
    """Role is what an admin token may do."""

    ADMIN = "admin"  # everything
    OPERATOR = "operator"  # revoke and read
    FACTORY = "factory"  # provision devices (bulk registration), nothing else here
    AUDITOR = "auditor"  # read only


@dataclasses.dataclass(frozen=True)
class AdminIdentity:
    """AdminIdentity is who called the admin API: a token id and its role."""

    token_id: int
    role: Role
    label: str

    @property
    def actor(self) -> str:
        return f"admin-token:{self.token_id}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise bad_request(f"unknown role {text!r} (one of: {allowed})") from None


def unauthorized(message: str) -> PKIError:
    return PKIError(ErrorKind.UNAUTHORIZED, message)


def forbidden(message: str) -> PKIError:
    return PKIError(ErrorKind.FORBIDDEN, message)


class AdminTokenService:
    """AdminTokenService creates tokens and authenticates bearer tokens."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def create(self, role: Role, *, actor: str, label: str = "") -> tuple[int, str]:
        """Creates a token; returns its id and the token itself, which is never stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now()
        with session_scope(self.db) as session:
            record = AdminTokenRepository(session).add(
                AdminToken(
                    token_sha256=token_hash(token),
                    role=role.value,
                    label=label[:128],
                    created_at=now,
                    created_by=actor,
                )
            )
            audit.append(
                session,
                at=now,
                actor=actor,
                action="admin_token.created",
                target=f"admin-token:{record.id}",
                details={"role": role.value, "label": label[:128]},
            )
            return record.id, token

    def authenticate(self, token: str | None) -> AdminIdentity:
        """Returns who a bearer token belongs to; raises UNAUTHORIZED for anything else."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX):
            raise unauthorized("a valid bearer token is required")
        digest = token_hash(token)
        with session_scope(self.db) as session:
            record = AdminTokenRepository(session).by_hash(digest)
            if (
                record is None
                or record.disabled_at is not None
                or not hmac.compare_digest(record.token_sha256, digest)
            ):
                raise unauthorized("a valid bearer token is required")
            return AdminIdentity(record.id, Role(record.role), record.label)


def require_role(identity: AdminIdentity, allowed: frozenset[Role]) -> None:
    """Raises FORBIDDEN unless the identity's role is allowed (admin always is)."""
    if identity.role is not Role.ADMIN and identity.role not in allowed:
        raise forbidden(f"role {identity.role.value} may not do this")
