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

from pki import binding as bindings
from pki.clock import Clock
from pki.csr import DEVICE_ID_RE
from pki.errors import ErrorKind, PKIError, bad_request, conflict
from pki.idevid import IDevID
from pki.revocation import RevocationService
from pki.store import Database, Device, DeviceState, Session, audit, session_scope
from pki.store.enrollment_models import (
    DeviceBinding,
    EnrollmentSecret,
    EnrollMethod,
    SecretState,
)
from pki.store.enrollment_repository import (
    ApprovalRepository,
    AuthFailureRepository,
    BindingRepository,
    DeviceRepository,
    FailureCount,
    SecretRepository,
    login_state,
)
from pki.store.repository import CertificateRepository
from pki.throttle import LoginThrottle

SECRET_BYTES = 24  # 192 bits of entropy, 32 URL-safe characters
MAX_SECRET_LENGTH = 256
MAX_CSV_ERRORS = 20
CSV_COLUMNS = ("id", "model", "batch", "manufacturer")
_Row = tuple[int, str | None, str | None, str | None]  # line, model, batch, manufacturer

# States in which a device may get a secret and enroll.
ENROLLABLE = (DeviceState.REGISTERED, DeviceState.ENROLLED)

# One message for every wrong, used, expired or unknown secret and every lock-out: which of
# them it was would tell an attacker which device IDs exist and which secrets were once right.
BAD_SECRET = "enrollment secret is wrong, used or expired"  # noqa: S105 (a message)

# The throttling key of a user name that cannot be a device ID (never a valid device ID).
_INVALID_ID = "-"


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
    enroll_method: str | None = None
    manufacturer_sha256: str | None = None
    idevid_sha256: str | None = None

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
            "enroll_method": self.enroll_method,
            "manufacturer_sha256": self.manufacturer_sha256,
            "idevid_sha256": self.idevid_sha256,
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
    device: Device,
    failure: FailureCount | None,
    secret: EnrollmentSecret | None,
    binding: DeviceBinding | None = None,
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
        enroll_method=binding.method.value if binding is not None else None,
        manufacturer_sha256=binding.manufacturer_sha256 if binding is not None else None,
        idevid_sha256=binding.idevid_sha256 if binding is not None else None,
    )


def _binding(device_id: str, manufacturer: str | None) -> DeviceBinding:
    # A registered device is bound to secrets, or to its manufacturer when one is named.
    method = EnrollMethod.SECRET if manufacturer is None else EnrollMethod.IDEVID
    return DeviceBinding(device_id=device_id, method=method, manufacturer_sha256=manufacturer)


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
    if AuthFailureRepository(session).reset(device.id):
        erased.append("failed-login records")
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
        max_address_failures: int = 50,
        lockout: datetime.timedelta = datetime.timedelta(minutes=15),
        revocation: RevocationService | None = None,
    ) -> None:
        self.revocation = revocation
        self.db = db
        self.clock = clock
        self.secret_lifetime = secret_lifetime
        self.max_failures = max_failures
        self.lockout = lockout
        self.throttle = LoginThrottle(
            db,
            max_failures=max_failures,
            max_address_failures=max_address_failures,
            window=lockout,
        )

    # --- registry ---------------------------------------------------------------------

    def add(
        self,
        device_id: str,
        *,
        model: str | None = None,
        batch: str | None = None,
        manufacturer: str | None = None,
        actor: str,
    ) -> DeviceInfo:
        """Registers one device, for secrets or for one manufacturer's IDevID; once per ID."""
        _check_id(device_id)
        model, batch = _check_attr("model", model), _check_attr("batch", batch)
        anchor = bindings.manufacturer_fingerprint(manufacturer) if manufacturer else None
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
            binding = BindingRepository(session).add(_binding(device_id, anchor))
            audit.append(
                session,
                at=now,
                actor=actor,
                action="device.registered",
                target=device_id,
                details={"model": model, "batch": batch, "manufacturer_sha256": anchor},
            )
            return _info(device, None, None, binding)

    def import_csv(self, text: str, *, actor: str, source: str = "CSV") -> ImportResult:
        """Registers devices from CSV (id[,model][,batch][,manufacturer]); all or nothing.

        Idempotent: a device already registered with the same model and batch is left as it
        is, binding included. A new device is bound to one-time secrets, or to the
        manufacturer whose anchor's SHA-256 fingerprint its row names.
        """
        rows, errors = self._parse_csv(text, source)
        now = self.clock.now()
        with session_scope(self.db) as session:
            repo = DeviceRepository(session)
            existing = repo.existing(rows)
            for device_id, (line, model, batch, _maker) in rows.items():
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
                for device_id, (_line, model, batch, _maker) in rows.items()
                if device_id not in existing
            ]
            repo.add_all(new)
            BindingRepository(session).add_all([_binding(d.id, rows[d.id][3]) for d in new])
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
    def _parse_csv(text: str, source: str) -> tuple[dict[str, _Row], list[str]]:
        reader = csv.reader(io.StringIO(text))
        errors: list[str] = []
        rows: dict[str, _Row] = {}
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
                f"{source}: line 1: header must name id and optionally model, batch, "
                "manufacturer "
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
                    maker = (fields.get("manufacturer") or "").strip() or None
                    maker = bindings.manufacturer_fingerprint(maker) if maker else None
                except PKIError as e:
                    errors.append(f"line {line}: {e.message}")
                    continue
                seen = rows.get(device_id)
                if seen is not None and seen[1:] != (model, batch, maker):
                    errors.append(
                        f"line {line}: device {device_id} also on line {seen[0]} with other data"
                    )
                    continue
                rows.setdefault(device_id, (line, model, batch, maker))
        except csv.Error as e:
            errors.append(f"line {reader.line_num}: {e}")
        return rows, errors

    def show(self, device_id: str) -> DeviceInfo:
        """Returns one device and the state of its secret and failed logins."""
        with session_scope(self.db) as session:
            device = DeviceRepository(session).get(device_id)
            active = SecretRepository(session).active(device_id)
            failure = AuthFailureRepository(session).of_device(device_id)
            binding = BindingRepository(session).find(device_id)
            return _info(device, failure, active[0] if active else None, binding)

    def find(self, device_id: str) -> DeviceInfo | None:
        """Returns a registered device, or None: one read, no secrets or failure counts."""
        with self.db.read_session() as session:
            device = DeviceRepository(session).find(device_id)
            return None if device is None else _info(device, None, None)

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

    def certificates(self, device_id: str) -> Sequence[bytes]:
        """Returns a registered device's issued certificates (DER), newest first."""
        with self.db.read_session() as session:
            DeviceRepository(session).get(device_id)
            return CertificateRepository(session).issued_der_of_device(device_id)

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

    def new_secret(
        self,
        device_id: str,
        *,
        actor: str,
        labels: Sequence[str] | None = None,
        may_redraw: bool = False,
        reason: str | None = None,
    ) -> NewSecret:
        """Draws a new one-time secret for a device, valid on `labels` (None: the default label).

        Any unused older secret of the device stops working. A secret for a device that has
        enrolled would let its holder take the device's identity over: it is drawn only with
        `may_redraw` (the admin role, the pki command) and a reason, which the audit event
        records.
        """
        if labels is not None and (not labels or any("," in label for label in labels)):
            raise bad_request("a secret needs at least one label, and label names have no ','")
        now = self.clock.now()
        secret = secrets.token_urlsafe(SECRET_BYTES)
        hashed = hash_secret(secret)
        expires_at = now + self.secret_lifetime
        with session_scope(self.db) as session:
            devices = DeviceRepository(session)
            device = devices.get(device_id, for_update=True)
            if device.state not in ENROLLABLE:
                raise conflict(f"device {device_id} is {device.state.value}: it cannot enroll")
            binding = BindingRepository(session).find(device_id)
            if binding is not None and binding.method is not EnrollMethod.SECRET:
                raise conflict(
                    f"device {device_id} enrolls with its manufacturer certificate (IDevID), "
                    "not a secret"
                )
            redrawn = devices.ever_enrolled(device)
            if redrawn and not may_redraw:
                raise PKIError(
                    ErrorKind.FORBIDDEN,
                    f"device {device_id} has enrolled: a new secret for it needs the admin role",
                )
            if redrawn and not (reason and reason.strip()):
                raise bad_request(
                    f"device {device_id} has enrolled: give the reason for a new secret"
                )
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
                    labels=",".join(labels) if labels is not None else None,
                )
            )
            AuthFailureRepository(session).reset(device_id)
            audit.append(
                session,
                at=now,
                actor=actor,
                action="device.secret_redrawn" if redrawn else "device.secret_issued",
                target=device_id,
                details={
                    "expires_at": expires_at.isoformat(),
                    "replaced": replaced,
                    "labels": list(labels) if labels is not None else None,
                    **({"reason": (reason or "").strip()[:200]} if redrawn else {}),
                },
            )
        return NewSecret(device_id, secret, expires_at)

    def secret_labels(self, secret_id: int) -> tuple[str, ...] | None:
        """Returns the labels a secret is valid on; None means the default label only."""
        with self.db.read_session() as session:
            stored = SecretRepository(session).labels_of(secret_id)
        return None if stored is None else tuple(stored.split(","))

    def authenticate(self, device_id: str, secret: str, *, address: str = "") -> Authenticated:
        """Checks a device's one-time secret without spending it; failures are throttled.

        Every failure (unknown ID, wrong, used or expired secret, lock-out) is the same error
        after the same work: one look-up of the throttle, one of the device, one hash
        comparison (against a dummy when there is no stored hash) and one throttle write.
        """
        now = self.clock.now()
        valid = DEVICE_ID_RE.match(device_id) is not None
        key = device_id if valid else _INVALID_ID
        secret = secret[: MAX_SECRET_LENGTH + 1]
        address = address[:64]
        locked = self.throttle.locked(key, address, now)
        with self.db.read_session() as session:
            login = login_state(session, key) if valid else None
        candidates = login.secrets if login is not None else ()
        # Without an active secret, the one that bought the device's certificate is checked
        # instead (the same one hash comparison): a retry whose answer was lost.
        spent = login.spent if login is not None and not candidates else None
        match = None
        for secret_id, hashed, expires_at in candidates:
            if verify_secret(secret, hashed) and expires_at > now:
                match = secret_id
        if spent is not None:
            if verify_secret(secret, spent[1]):
                match = spent[0]
        elif not candidates:
            _burn_time(secret)
        if login is None or match is None or locked or len(secret) > MAX_SECRET_LENGTH:
            self.throttle.fail(key, address, now)
            # The caller sees BAD_SECRET only; the refusal audit keeps which failure it was.
            reason = (
                "throttled"
                if locked
                else "unknown device"
                if login is None
                else "wrong, used or expired secret"
            )
            raise PKIError(ErrorKind.UNAUTHORIZED, BAD_SECRET, detail=reason)
        if login.state not in ENROLLABLE:
            raise forbidden(f"device {device_id} is {login.state.value}: it cannot enroll")
        return Authenticated(device_id, match, spent=spent is not None)

    def check_binding(self, device_id: str, idevid: IDevID, *, register: bool) -> None:
        """Refuses, before anything is stored, an IDevID the device is not bound to."""
        with self.db.read_session() as session:
            device = DeviceRepository(session).find(device_id)
            if device is None:
                if not register:
                    raise forbidden(f"device {device_id} is not registered")
                return
            bindings.check(device_id, BindingRepository(session).find(device_id), idevid)

    def record_enrollment(
        self,
        session: Session,
        device_id: str,
        secret_id: int | None,
        certificate_id: int,
        *,
        register: bool = False,
        idevid: IDevID | None = None,
    ) -> None:
        """Spends the secret and marks the device enrolled, in the issued transaction.

        Runs in the transaction that records the certificate as issued: if the secret was
        spent or replaced in the meantime, this raises and nothing is recorded as issued.
        """
        now = self.clock.now()
        repo = DeviceRepository(session)
        device = repo.find(device_id, for_update=True)
        new = device is None
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
        if secret_id is not None or idevid is not None:
            # Re-enrollment (neither) is by the device's own certificate: no binding applies.
            bindings.bind(device, idevid, now, new=new)
        if secret_id is not None:
            if not SecretRepository(session).consume(secret_id, now, certificate_id):
                raise unauthorized(BAD_SECRET)
            AuthFailureRepository(session).reset(device_id)
        if device.state is not DeviceState.ENROLLED:
            device.state = DeviceState.ENROLLED
            device.updated_at = now
