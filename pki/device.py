"""The device registry: devices, their states and their one-time enrollment secrets.

A device is registered (by an operator or a factory CSV), gets a one-time secret, enrolls
over EST, and from then on re-enrolls with its certificate. States: registered → enrolled →
revoked or decommissioned. Secrets are drawn from `secrets` (192 bits), shown once, stored
only as a SHA-256 hash, expire, and are consumed by the transaction that records the
certificate they bought, so two requests can never both spend one secret.

Why SHA-256 and not a slow key-derivation function: a KDF only slows the guessing of a
low-entropy secret, and these are never chosen by a person. NIST SP 800-63B 5.1.2.1
(look-up secrets): "Look-up secrets having at least 112 bits of entropy SHALL be hashed
with an approved one-way function"; only those with fewer bits need a salted KDF. At 192
bits a stolen hash cannot be reversed by search either way, and scrypt (N=2^14, r=8) cost
~42 ms of CPU on every enrollment. Hashes stored before the change (`scrypt$...`) still
verify until their secret is spent or expires.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import hmac
import io
import secrets
from collections.abc import Sequence

from cryptography import x509

from pki.clock import Clock
from pki.csr import DEVICE_ID_RE
from pki.errors import ErrorKind, PKIError, bad_request, conflict
from pki.revocation import RevocationService
from pki.store import Database, Device, DeviceState, Session, audit, session_scope
from pki.store.enrollment_models import AuthFailure, EnrollmentSecret, SecretState
from pki.store.enrollment_repository import (
    ApprovalRepository,
    AuthFailureRepository,
    DeviceRepository,
    SecretRepository,
    login_state,
)
from pki.store.repository import CertificateRepository

SECRET_BYTES = 24  # 192 bits of entropy, 32 URL-safe characters
MAX_SECRET_LENGTH = 256
MAX_CSV_ERRORS = 20
CSV_COLUMNS = ("id", "model", "batch")

# States in which a device may get a secret and enroll.
ENROLLABLE = (DeviceState.REGISTERED, DeviceState.ENROLLED)

# One message for every wrong, used, expired or unknown secret: which of them it was would
# tell an attacker which device IDs exist and which secrets were once right.
BAD_SECRET = "enrollment secret is wrong, used or expired"  # noqa: S105 (a message)


def unauthorized(message: str) -> PKIError:
    return PKIError(ErrorKind.UNAUTHORIZED, message)


def forbidden(message: str) -> PKIError:
    return PKIError(ErrorKind.FORBIDDEN, message)


def hash_secret(secret: str) -> str:
    """Hashes a server-drawn secret with SHA-256; the scheme name travels with the hash."""
    return "sha256$" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    """Checks a secret against a stored hash (`sha256$...`, or `scrypt$...` from before)."""
    scheme, _, rest = stored.partition("$")
    try:
        if scheme == "sha256":
            expected = bytes.fromhex(rest)
            actual = hashlib.sha256(secret.encode("utf-8")).digest()
        elif scheme == "scrypt":
            n, r, p, salt, digest = rest.split("$")
            expected = bytes.fromhex(digest)
            actual = _scrypt(secret, bytes.fromhex(salt), int(n), int(r), int(p))
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # Hashes written before secrets were stored as SHA-256; verified, never written.
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32
    )


# Checked against when there is no stored hash, so an unknown device ID costs one SHA-256
# and a compare like a known one. (A known device whose secret was stored as scrypt before
# the change costs more, until that secret is spent or expires: secret_lifetime_hours.)
_DUMMY_HASH = hash_secret(secrets.token_urlsafe(SECRET_BYTES))


def _burn_time(secret: str) -> None:
    # An unknown device costs as much as a known one, so timing does not tell them apart.
    verify_secret(secret, _DUMMY_HASH)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """DeviceInfo is what the registry knows about a device (never a secret)."""

    device_id: str
    model: str | None
    batch: str | None
    state: DeviceState
    created_at: datetime.datetime
    updated_at: datetime.datetime
    secret_expires_at: datetime.datetime | None = None
    failures: int = 0
    locked_until: datetime.datetime | None = None

    def as_dict(self) -> dict[str, object]:
        def iso(t: datetime.datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "id": self.device_id,
            "model": self.model,
            "batch": self.batch,
            "state": self.state.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "secret_expires_at": iso(self.secret_expires_at),
            "failed_logins": self.failures,
            "locked_until": iso(self.locked_until),
        }


@dataclasses.dataclass(frozen=True)
class NewSecret:
    """NewSecret is a freshly drawn one-time secret; the only time it exists in clear."""

    device_id: str
    secret: str = dataclasses.field(repr=False)
    expires_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """ImportResult counts what a CSV import added and what was already there."""

    added: int
    unchanged: int


@dataclasses.dataclass(frozen=True)
class Authenticated:
    """Authenticated is a device whose one-time secret verified.

    `spent` says the secret already bought a certificate: the request may only get that
    certificate again (its answer was lost), never a new one.
    """

    device_id: str
    secret_id: int
    spent: bool = False


def _info(
    device: Device, failure: AuthFailure | None, secret: EnrollmentSecret | None
) -> DeviceInfo:
    return DeviceInfo(
        device_id=device.id,
        model=device.model,
        batch=device.batch,
        state=device.state,
        created_at=device.created_at,
        updated_at=device.updated_at,
        secret_expires_at=secret.expires_at if secret is not None else None,
        failures=failure.failures if failure is not None else 0,
        locked_until=failure.locked_until if failure is not None else None,
    )


def _check_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id):
        raise bad_request(
            f"device ID {device_id[:70]!r} must be 1-64 characters of letters, digits, "
            "'.', ':' and '-', starting with a letter or digit"
        )
    return device_id


def _check_attr(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > 128 or not value.isprintable():
        raise bad_request(f"{name} must be at most 128 printable characters")
    return value


@dataclasses.dataclass(frozen=True)
class Decommissioned:
    """Decommissioned says what retiring a device revoked and erased."""

    device: DeviceInfo
    revoked: tuple[str, ...]  # serials, lower-case hex
    erased: tuple[str, ...]  # what the registry no longer holds, e.g. "model", "2 secrets"


def _erase(session: Session, device: Device, now: datetime.datetime) -> tuple[str, ...]:
    """Erases a device's registry data that the audit trail does not need; says what.

    The device ID, its certificates and their revocations stay: the audit log, the CRLs and
    OCSP refer to them. Pending rows are abandoned (never released, nothing to keep).
    """
    erased: list[str] = []
    for field in ("model", "batch"):
        if getattr(device, field) is not None:
            setattr(device, field, None)
            erased.append(field)
    secrets_gone = SecretRepository(session).delete_of_device(device.id)
    if secrets_gone:
        erased.append(f"{secrets_gone} enrollment secret(s)")
    if AuthFailureRepository(session).delete(device.id):
        erased.append("failed-login record")
    requests = ApprovalRepository(session).delete_of_device(device.id)
    if requests:
        erased.append(f"{requests} request(s) awaiting approval")
    certs = CertificateRepository(session)
    abandoned = sum(1 for r in certs.pending_of_device(device.id) if certs.abandon(r.id))
    if abandoned:
        erased.append(f"{abandoned} pending certificate request(s)")
    if erased:
        device.updated_at = now
    return tuple(erased)


class DeviceService:
    """DeviceService registers devices, issues their one-time secrets and checks them."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        secret_lifetime: datetime.timedelta = datetime.timedelta(hours=72),
        max_failures: int = 5,
        lockout: datetime.timedelta = datetime.timedelta(minutes=15),
        revocation: RevocationService | None = None,
    ) -> None:
        self.revocation = revocation
        self.db = db
        self.clock = clock
        self.secret_lifetime = secret_lifetime
        self.max_failures = max_failures
        self.lockout = lockout

    # --- registry ---------------------------------------------------------------------

    def add(
        self, device_id: str, *, model: str | None = None, batch: str | None = None, actor: str
    ) -> DeviceInfo:
        """Registers one device; a device ID can be registered only once."""
        _check_id(device_id)
        model, batch = _check_attr("model", model), _check_attr("batch", batch)
        now = self.clock.now()
        with session_scope(self.db) as session:
            repo = DeviceRepository(session)
            if repo.find(device_id) is not None:
                raise conflict(f"device {device_id} is already registered")
            device = repo.add(
                Device(
                    id=device_id,
                    model=model,
                    batch=batch,
                    state=DeviceState.REGISTERED,
                    created_at=now,
                    updated_at=now,
                )
            )
            audit.append(
                session,
                at=now,
                actor=actor,
                action="device.registered",
                target=device_id,
                details={"model": model, "batch": batch},
            )
            return _info(device, None, None)

    def import_csv(self, text: str, *, actor: str, source: str = "CSV") -> ImportResult:
        """Registers devices from CSV (header id[,model][,batch]); all or nothing, idempotent."""
        rows, errors = self._parse_csv(text, source)
        now = self.clock.now()
        with session_scope(self.db) as session:
            repo = DeviceRepository(session)
            existing = repo.existing(rows)
            for device_id, (line, model, batch) in rows.items():
                have = existing.get(device_id)
                if have is not None and (have.model, have.batch) != (model, batch):
                    errors.append(
                        f"line {line}: device {device_id} is already registered with "
                        f"model {have.model!r}, batch {have.batch!r}"
                    )
            if errors:
                shown = errors[:MAX_CSV_ERRORS]
                more = len(errors) - len(shown)
                tail = f"; and {more} more" if more else ""
                raise bad_request(f"{source}: nothing imported: " + "; ".join(shown) + tail)
            new = [
                Device(
                    id=device_id,
                    model=model,
                    batch=batch,
                    state=DeviceState.REGISTERED,
                    created_at=now,
                    updated_at=now,
                )
                for device_id, (_line, model, batch) in rows.items()
                if device_id not in existing
            ]
            repo.add_all(new)
            result = ImportResult(added=len(new), unchanged=len(rows) - len(new))
            if new:
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="device.imported",
                    target=source,
                    details={
                        "added": result.added,
                        "unchanged": result.unchanged,
                        "sha256": hashlib.sha256(text.encode()).hexdigest(),
                        "first": new[0].id,
                        "last": new[-1].id,
                    },
                )
        return result

    @staticmethod
    def _parse_csv(
        text: str, source: str
    ) -> tuple[dict[str, tuple[int, str | None, str | None]], list[str]]:
        reader = csv.reader(io.StringIO(text))
        errors: list[str] = []
        rows: dict[str, tuple[int, str | None, str | None]] = {}
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise bad_request(f"{source}: line 1: {e}") from None
        if header is None:
            raise bad_request(f"{source}: empty file (expected a header line: id,model,batch)")
        columns = [h.strip().lower() for h in header]
        unknown = [c for c in columns if c not in CSV_COLUMNS]
        if unknown or "id" not in columns or len(set(columns)) != len(columns):
            raise bad_request(
                f"{source}: line 1: header must name id and optionally model, batch "
                f"(got {','.join(columns)})"
            )
        try:
            for record in reader:
                line = reader.line_num
                if not record or all(not f.strip() for f in record):
                    continue
                if len(record) != len(columns):
                    errors.append(f"line {line}: expected {len(columns)} fields, got {len(record)}")
                    continue
                fields = dict(zip(columns, record, strict=True))
                try:
                    device_id = _check_id(fields["id"].strip())
                    model = _check_attr("model", fields.get("model"))
                    batch = _check_attr("batch", fields.get("batch"))
                except PKIError as e:
                    errors.append(f"line {line}: {e.message}")
                    continue
                seen = rows.get(device_id)
                if seen is not None and seen[1:] != (model, batch):
                    errors.append(
                        f"line {line}: device {device_id} also on line {seen[0]} with other data"
                    )
                    continue
                rows.setdefault(device_id, (line, model, batch))
        except csv.Error as e:
            errors.append(f"line {reader.line_num}: {e}")
        return rows, errors

    def show(self, device_id: str) -> DeviceInfo:
        """Returns one device and the state of its secret and failed logins."""
        with session_scope(self.db) as session:
            device = DeviceRepository(session).get(device_id)
            active = SecretRepository(session).active(device_id)
            failure = AuthFailureRepository(session).find(device_id)
            return _info(device, failure, active[0] if active else None)

    def list(
        self,
        *,
        state: DeviceState | None = None,
        batch: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Sequence[DeviceInfo]:
        """Lists devices by ID, optionally of one state or batch."""
        with session_scope(self.db) as session:
            rows = DeviceRepository(session).list(
                state=state, batch=batch, limit=limit, offset=offset
            )
            return [_info(d, None, None) for d in rows]

    def decommission(self, device_id: str, *, actor: str) -> Decommissioned:
        """Retires a device for good, in one transaction: revokes its active certificates
        (cessationOfOperation), erases what the registry holds beyond the audit trail's
        needs, and leaves it unable to enroll again."""
        now = self.clock.now()
        with session_scope(self.db) as session:
            device = DeviceRepository(session).get(device_id, for_update=True)
            revoked = []
            if self.revocation is not None:
                revoked = self.revocation.revoke_device_in(
                    session, device_id, x509.ReasonFlags.cessation_of_operation, now
                )
            for r in revoked:
                if r.changed:
                    audit.append(
                        session,
                        at=now,
                        actor=actor,
                        action="certificate.revoked",
                        target=f"{r.issuer_id}/{r.serial_hex}",
                        details={"reason": r.reason.value},
                    )
            erased = _erase(session, device, now)
            if device.state is not DeviceState.DECOMMISSIONED or revoked or erased:
                device.state = DeviceState.DECOMMISSIONED
                device.updated_at = now
                audit.append(
                    session,
                    at=now,
                    actor=actor,
                    action="device.decommissioned",
                    target=device_id,
                    details={
                        "revoked": [f"{r.issuer_id}/{r.serial_hex}" for r in revoked],
                        "erased": list(erased),
                    },
                )
            info = _info(device, None, None)
        if self.revocation is not None:
            self.revocation.notify(revoked)
        return Decommissioned(info, tuple(r.serial_hex for r in revoked), erased)

    # --- one-time secrets -------------------------------------------------------------

    def new_secret(self, device_id: str, *, actor: str) -> NewSecret:
        """Draws a new one-time secret for a device; any unused older one stops working."""
        now = self.clock.now()
        secret = secrets.token_urlsafe(SECRET_BYTES)
        hashed = hash_secret(secret)
        expires_at = now + self.secret_lifetime
        with session_scope(self.db) as session:
            device = DeviceRepository(session).get(device_id, for_update=True)
            if device.state not in ENROLLABLE:
                raise conflict(f"device {device_id} is {device.state.value}: it cannot enroll")
            repo = SecretRepository(session)
            replaced = repo.replace_active(device_id)
            repo.add(
                EnrollmentSecret(
                    device_id=device_id,
                    secret_hash=hashed,
                    state=SecretState.ACTIVE,
                    created_at=now,
                    expires_at=expires_at,
                    used_at=None,
                )
            )
            AuthFailureRepository(session).reset(device_id)
            audit.append(
                session,
                at=now,
                actor=actor,
                action="device.secret_issued",
                target=device_id,
                details={"expires_at": expires_at.isoformat(), "replaced": replaced},
            )
        return NewSecret(device_id, secret, expires_at)

    def authenticate(self, device_id: str, secret: str) -> Authenticated:
        """Checks a device's one-time secret without spending it; failures are counted."""
        now = self.clock.now()
        if not DEVICE_ID_RE.match(device_id) or len(secret) > MAX_SECRET_LENGTH:
            _burn_time(secret[:MAX_SECRET_LENGTH])
            raise unauthorized(BAD_SECRET)
        with self.db.read_session() as session:
            login = login_state(session, device_id)
        state = login.state if login is not None else None
        locked_until = login.locked_until if login is not None else None
        candidates = login.secrets if login is not None else ()
        if state is None:
            _burn_time(secret)
            raise unauthorized(BAD_SECRET)
        if locked_until is not None and locked_until > now:
            raise unauthorized(
                f"device {device_id} is locked after too many failed logins until "
                f"{locked_until.isoformat()}"
            )
        match = None
        for secret_id, hashed, expires_at in candidates:
            if verify_secret(secret, hashed) and expires_at > now:
                match = secret_id
        spent = login.spent if login is not None else None
        spent_match = match is None and spent is not None and verify_secret(secret, spent[1])
        if not candidates and spent is None:
            _burn_time(secret)
        if match is None and not spent_match:
            self._count_failure(device_id, now)
            raise unauthorized(BAD_SECRET)
        if state not in ENROLLABLE:
            raise forbidden(f"device {device_id} is {state.value}: it cannot enroll")
        if match is None:
            assert spent is not None
            return Authenticated(device_id, spent[0], spent=True)
        return Authenticated(device_id, match)

    def _count_failure(self, device_id: str, now: datetime.datetime) -> None:
        with session_scope(self.db) as session:
            row = AuthFailureRepository(session).locked(device_id, create_at=now)
            if row.locked_until is not None and row.locked_until <= now:
                row.failures = 0  # the lock-out served its time: count afresh
                row.locked_until = None
            row.failures += 1
            row.last_failure_at = now
            if row.failures >= self.max_failures:
                row.locked_until = now + self.lockout
                audit.append(
                    session,
                    at=now,
                    actor=f"device:{device_id}",
                    action="device.locked",
                    target=device_id,
                    details={
                        "failures": row.failures,
                        "locked_until": row.locked_until.isoformat(),
                    },
                )

    def record_enrollment(
        self,
        session: Session,
        device_id: str,
        secret_id: int | None,
        certificate_id: int,
        *,
        register: bool = False,
    ) -> None:
        """Spends the secret and marks the device enrolled, in the issued transaction.

        Runs in the transaction that records the certificate as issued: if the secret was
        spent or replaced in the meantime, this raises and nothing is recorded as issued.
        """
        now = self.clock.now()
        repo = DeviceRepository(session)
        device = repo.find(device_id, for_update=True)
        if device is None:
            if not register:
                raise forbidden(f"device {device_id} is not registered")
            # A manufacturer certificate (IDevID) proves the device; it joins the registry
            # on its first enrollment.
            device = repo.add(
                Device(
                    id=device_id,
                    model=None,
                    batch=None,
                    state=DeviceState.REGISTERED,
                    created_at=now,
                    updated_at=now,
                )
            )
        if device.state not in ENROLLABLE:
            raise forbidden(f"device {device_id} is {device.state.value}: it cannot enroll")
        if secret_id is not None:
            if not SecretRepository(session).consume(secret_id, now, certificate_id):
                raise unauthorized(BAD_SECRET)
            AuthFailureRepository(session).reset(device_id)
        if device.state is not DeviceState.ENROLLED:
            device.state = DeviceState.ENROLLED
            device.updated_at = now
