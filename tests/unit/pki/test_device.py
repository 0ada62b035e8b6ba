"""Tests for pki.device: registry, CSV import, one-time secrets, throttled failed logins."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select

import pki.device
from pki.clock import FixedClock
from pki.device import (
    BAD_SECRET,
    SECRET_BYTES,
    DeviceService,
    hash_secret,
    verify_secret,
)
from pki.errors import ErrorKind, PKIError
from pki.store import AuditEvent, Database, Device, DeviceState, session_scope
from pki.store.enrollment_models import AuthFailure, EnrollmentSecret, SecretState

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def devices(db: Database, clock: FixedClock) -> DeviceService:
    return DeviceService(db, clock, max_failures=3, lockout=datetime.timedelta(minutes=10))


def _count(db: Database, model: type[object]) -> int:
    with session_scope(db) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


@contextlib.contextmanager
def _statements(db: Database) -> Iterator[list[str]]:
    """Collects the SQL statements the engine runs inside the block."""
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.strip())

    event.listen(db.engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", listener)


def _scrypt_hash(secret: str) -> str:
    # The form secrets were stored in before SHA-256 (N=2^14, r=8, p=1, 16-byte salt).
    salt = bytes(range(16))
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


class TestSecretHash:
    def test_hash_secret_is_tagged_sha256(self) -> None:
        hashed = hash_secret("s3cret")
        assert hashed == "sha256$" + hashlib.sha256(b"s3cret").hexdigest()
        assert verify_secret("s3cret", hashed)
        assert not verify_secret("s3cret!", hashed)

    def test_verify_secret_accepts_stored_scrypt_hashes(self) -> None:
        stored = _scrypt_hash("s3cret")
        assert verify_secret("s3cret", stored)
        assert not verify_secret("s3cret!", stored)

    def test_verify_secret_refuses_garbage(self) -> None:
        assert not verify_secret("x", "plain")
        assert not verify_secret("x", "bcrypt$1$2$3$00$00")
        assert not verify_secret("x", "sha256$not-hex")
        assert not verify_secret("x", "scrypt$16384$8$1$00")
        # The hex of the right digest without its scheme tag is not a stored hash.
        assert not verify_secret("x", hashlib.sha256(b"x").hexdigest())


class TestRegistry:
    def test_add_and_show(self, devices: DeviceService) -> None:
        info = devices.add("DEV-0001", model="m1", batch="b1", actor="test")
        assert info.state is DeviceState.REGISTERED
        shown = devices.show("DEV-0001")
        assert (shown.model, shown.batch, shown.secret_expires_at) == ("m1", "b1", None)

    def test_add_twice_conflicts(self, devices: DeviceService) -> None:
        devices.add("DEV-0001", actor="test")
        with pytest.raises(PKIError) as e:
            devices.add("DEV-0001", actor="test")
        assert e.value.kind is ErrorKind.CONFLICT

    @pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 65, "é", "a/b"])
    def test_add_bad_id_refused(self, devices: DeviceService, bad: str) -> None:
        with pytest.raises(PKIError) as e:
            devices.add(bad, actor="test")
        assert e.value.kind is ErrorKind.BAD_REQUEST

    def test_show_unknown_not_found(self, devices: DeviceService) -> None:
        with pytest.raises(PKIError) as e:
            devices.show("NOPE")
        assert e.value.kind is ErrorKind.NOT_FOUND

    def test_list_by_batch_and_state(self, devices: DeviceService) -> None:
        devices.add("A", batch="x", actor="t")
        devices.add("B", batch="y", actor="t")
        devices.decommission("B", actor="t")
        assert [d.device_id for d in devices.list(batch="x")] == ["A"]
        assert [d.device_id for d in devices.list(state=DeviceState.DECOMMISSIONED)] == ["B"]

    def test_registration_is_audited(self, db: Database, devices: DeviceService) -> None:
        devices.add("A", actor="t")
        with session_scope(db) as s:
            actions = s.execute(select(AuditEvent.action)).scalars().all()
        assert "device.registered" in actions


class TestImport:
    def test_import_adds_and_is_idempotent(self, db: Database, devices: DeviceService) -> None:
        text = "id,model,batch\nD-1,m,b1\nD-2,m,b1\n\nD-3,,b2\n"
        first = devices.import_csv(text, actor="t")
        assert (first.added, first.unchanged) == (3, 0)
        again = devices.import_csv(text, actor="t")
        assert (again.added, again.unchanged) == (0, 3)
        assert devices.show("D-3").model is None
        assert _count(db, Device) == 3

    def test_import_id_only_header(self, devices: DeviceService) -> None:
        assert devices.import_csv("id\nX1\nX2\n", actor="t").added == 2

    def test_import_is_all_or_nothing_and_names_lines(
        self, db: Database, devices: DeviceService
    ) -> None:
        text = "id,model\nGOOD-1,m\nbad id,m\nGOOD-2,m,extra\nGOOD-1,other\n"
        with pytest.raises(PKIError) as e:
            devices.import_csv(text, actor="t", source="devices.csv")
        msg = e.value.message
        assert e.value.kind is ErrorKind.BAD_REQUEST
        assert "devices.csv" in msg
        assert "line 3" in msg and "line 4" in msg and "line 5" in msg
        assert "line 2:" not in msg
        assert _count(db, Device) == 0

    def test_import_conflicting_existing_device_refused(
        self, db: Database, devices: DeviceService
    ) -> None:
        devices.add("D-1", model="m", actor="t")
        with pytest.raises(PKIError) as e:
            devices.import_csv("id,model\nD-2,m\nD-1,n\n", actor="t")
        assert "line 3" in e.value.message
        assert _count(db, Device) == 1

    @pytest.mark.parametrize("text", ["", "model,batch\nx,y\n", "id,colour\nx,red\n"])
    def test_import_bad_header(self, devices: DeviceService, text: str) -> None:
        with pytest.raises(PKIError) as e:
            devices.import_csv(text, actor="t")
        assert e.value.kind is ErrorKind.BAD_REQUEST


class TestSecrets:
    def test_new_secret_is_long_random_and_stored_hashed(
        self, db: Database, devices: DeviceService
    ) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        assert len(new.secret) >= SECRET_BYTES * 4 // 3
        assert new.secret not in repr(new)
        assert new.expires_at == T0 + datetime.timedelta(hours=72)
        with session_scope(db) as s:
            stored = s.execute(select(EnrollmentSecret.secret_hash)).scalar_one()
            events = s.execute(select(AuditEvent.details)).scalars().all()
        assert new.secret not in stored
        assert all(new.secret not in d for d in events)
        assert verify_secret(new.secret, stored)

    def test_secret_is_never_logged(
        self, devices: DeviceService, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        devices.authenticate("D-1", new.secret)
        assert new.secret not in caplog.text

    def test_authenticate_good_secret(self, devices: DeviceService) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        assert devices.authenticate("D-1", new.secret).device_id == "D-1"

    def test_authenticate_secret_stored_as_scrypt(
        self, db: Database, devices: DeviceService
    ) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        with session_scope(db) as s:
            row = s.execute(select(EnrollmentSecret)).scalar_one()
            row.secret_hash = _scrypt_hash(new.secret)
        assert devices.authenticate("D-1", new.secret).device_id == "D-1"
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", new.secret + "x")
        assert e.value.kind is ErrorKind.UNAUTHORIZED

    def test_new_secret_replaces_old(self, db: Database, devices: DeviceService) -> None:
        devices.add("D-1", actor="t")
        old = devices.new_secret("D-1", actor="t")
        devices.new_secret("D-1", actor="t")
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", old.secret)
        assert e.value.kind is ErrorKind.UNAUTHORIZED
        with session_scope(db) as s:
            states = sorted(s.execute(select(EnrollmentSecret.state)).scalars(), key=str)
        assert states == [SecretState.ACTIVE, SecretState.REPLACED]

    def test_expired_secret_refused(self, devices: DeviceService, clock: FixedClock) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        clock.advance(datetime.timedelta(hours=72))
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", new.secret)
        assert e.value.kind is ErrorKind.UNAUTHORIZED

    def test_unknown_device_and_bad_id_unauthorized(self, devices: DeviceService) -> None:
        for device_id in ("NOPE", "bad id", "x" * 500):
            with pytest.raises(PKIError) as e:
                devices.authenticate(device_id, "whatever")
            assert e.value.kind is ErrorKind.UNAUTHORIZED

    def test_secret_for_decommissioned_device_refused(self, devices: DeviceService) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        devices.decommission("D-1", actor="t")
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", new.secret)
        assert e.value.kind is ErrorKind.UNAUTHORIZED
        with pytest.raises(PKIError) as e:
            devices.new_secret("D-1", actor="t")
        assert e.value.kind is ErrorKind.CONFLICT

    def test_failures_lock_out_then_expire(self, devices: DeviceService, clock: FixedClock) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        for _ in range(3):
            with pytest.raises(PKIError):
                devices.authenticate("D-1", "wrong", address="192.0.2.1")
        info = devices.show("D-1")
        assert info.failures == 3
        assert info.locked_until == T0 + datetime.timedelta(minutes=10)
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", new.secret, address="192.0.2.1")
        # The lock-out says nothing that a wrong secret would not say.
        assert (e.value.kind, e.value.message) == (ErrorKind.UNAUTHORIZED, BAD_SECRET)
        clock.advance(datetime.timedelta(minutes=10))
        assert devices.authenticate("D-1", new.secret, address="192.0.2.1").device_id == "D-1"

    def test_failures_from_one_address_do_not_lock_out_another(
        self, devices: DeviceService
    ) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        for _ in range(5):
            with pytest.raises(PKIError):
                devices.authenticate("D-1", "wrong", address="127.0.0.1")
        with pytest.raises(PKIError):
            devices.authenticate("D-1", new.secret, address="127.0.0.1")
        assert devices.authenticate("D-1", new.secret, address="127.0.0.2").device_id == "D-1"

    def test_failures_of_one_device_do_not_lock_another(self, devices: DeviceService) -> None:
        devices.add("D-1", actor="t")
        devices.add("D-2", actor="t")
        new = devices.new_secret("D-2", actor="t")
        for _ in range(5):
            with pytest.raises(PKIError):
                devices.authenticate("D-1", "wrong")
        assert devices.authenticate("D-2", new.secret).device_id == "D-2"

    def test_many_ids_from_one_address_throttle_the_address(
        self, db: Database, clock: FixedClock
    ) -> None:
        devices = DeviceService(db, clock, max_failures=3, max_address_failures=4)
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        for i in range(4):
            with pytest.raises(PKIError):
                devices.authenticate(f"GUESS-{i}", "wrong", address="198.51.100.7")
        with pytest.raises(PKIError) as e:
            devices.authenticate("D-1", new.secret, address="198.51.100.7")
        assert e.value.message == BAD_SECRET
        rows_before = _count(db, AuthFailure)
        for i in range(10):
            with pytest.raises(PKIError):
                devices.authenticate(f"MORE-{i}", "wrong", address="198.51.100.7")
        # A throttled address adds no per-device counters, however many IDs it makes up.
        assert _count(db, AuthFailure) == rows_before
        assert devices.authenticate("D-1", new.secret, address="198.51.100.8").device_id == "D-1"

    def test_stale_counters_are_pruned(
        self, db: Database, devices: DeviceService, clock: FixedClock
    ) -> None:
        for i in range(3):
            with pytest.raises(PKIError):
                devices.authenticate(f"GONE-{i}", "wrong", address="192.0.2.9")
        assert devices.throttle.prune(clock.now()) == 0  # still counting
        clock.advance(datetime.timedelta(minutes=5))
        with pytest.raises(PKIError):
            devices.authenticate("GONE-0", "wrong", address="192.0.2.9")
        clock.advance(datetime.timedelta(minutes=6))
        # GONE-1 and GONE-2 idle for a window; GONE-0 and the address counted 6 minutes ago.
        assert devices.throttle.prune(clock.now()) == 2
        assert _count(db, AuthFailure) == 2

    def test_unknown_id_costs_what_a_known_one_costs(
        self, db: Database, devices: DeviceService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        devices.add("D-1", actor="t")
        new = devices.new_secret("D-1", actor="t")
        hashes: list[str] = []
        real_verify = pki.device.verify_secret

        def counting_verify(secret: str, stored: str) -> bool:
            hashes.append(stored)
            return real_verify(secret, stored)

        monkeypatch.setattr(pki.device, "verify_secret", counting_verify)

        def cost(device_id: str, secret: str, address: str) -> tuple[int, list[str], int]:
            hashes.clear()
            with _statements(db) as statements, pytest.raises(PKIError) as e:
                devices.authenticate(device_id, secret, address=address)
            assert (e.value.kind, e.value.message) == (ErrorKind.UNAUTHORIZED, BAD_SECRET)
            writes = [s for s in statements if s.split()[0] in ("INSERT", "UPDATE", "DELETE")]
            return len(statements), [h.split("$")[0] for h in hashes], len(writes)

        known = cost("D-1", "wrong", "192.0.2.1")
        unknown = cost("NO-SUCH-1", "wrong", "192.0.2.2")
        assert known == unknown
        assert known[1] == ["sha256"] and known[2] == 2  # one hash, two counter upserts
        for _ in range(3):
            cost("D-1", "wrong", "192.0.2.3")
            cost("NO-SUCH-2", "wrong", "192.0.2.4")
        # Locked out: a known ID with its right secret costs what an unknown one does.
        assert cost("D-1", new.secret, "192.0.2.3") == cost("NO-SUCH-2", "x", "192.0.2.4")

    def test_concurrent_failures_counted(self, db: Database, devices: DeviceService) -> None:
        devices.add("D-1", actor="t")
        devices.new_secret("D-1", actor="t")
        big = DeviceService(db, devices.clock, max_failures=100)

        def attempt() -> None:
            with pytest.raises(PKIError):
                big.authenticate("D-1", "wrong")

        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert devices.show("D-1").failures == 8
