"""One enrollment of a device at a time: a lock held from the checks to the issued commit.

Two requests for one device (two re-enrollments with one certificate, two clients with one
secret) must not both get a certificate. The first takes the device's lock before anything
is recorded or signed and holds it until its certificate is recorded as issued; the others
find it taken and get a conflict at once. The lock dies with its holder (a killed worker,
a terminated connection), so a retry after a crash is never locked out:

- PostgreSQL: a transaction-scoped advisory lock keyed by the device ID (it also covers a
  device that is not registered yet) and `SELECT … FOR UPDATE` of the device row, on a
  connection of its own; that transaction then records the certificate as issued.
- SQLite: the database has one writer at a time, and the pending row must commit before
  signing, so the write transaction cannot span the cycle; a POSIX record lock on a byte
  of `<database>.locks` picked by the device ID (released by the kernel when the process
  dies) plus an in-process set stand in for the row lock. The issued transaction is the
  ordinary write transaction, begun only after signing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pki.errors import PKIError, conflict
from pki.store.db import Database, session_scope, sqlite_path
from pki.store.models import Device

# classid of the two-key advisory lock form: device enrollment locks.
_ADVISORY_CLASS = 0x454E52  # "ENR"


def _busy(device_id: str) -> Exception:
    return conflict(f"another enrollment of device {device_id} is in progress; retry later")


def _key(device_id: str) -> int:
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big", signed=True)


class _FileLocks:
    """Per-device locks among the processes of one host sharing one SQLite file."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[tuple[str, str]] = set()
        self._files: dict[str, BinaryIO] = {}
        self._pid = os.getpid()

    def _file(self, path: str) -> BinaryIO:
        if self._pid != os.getpid():  # record locks are not inherited across fork
            self._files.clear()
            self._held.clear()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            # Never closed: closing any descriptor of the file would drop every record
            # lock this process holds on it (POSIX fcntl semantics).
            # Mode 0600 like the database beside it (the data directory is the owner's).
            f = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
            self._files[path] = f
        return f

    @contextlib.contextmanager
    def hold(self, path: str | None, device_id: str) -> Iterator[None]:
        offset = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:6], "big")
        with self._mutex:
            if (path or "", device_id) in self._held:
                raise _busy(device_id)
            f = self._file(path) if path is not None else None
            if f is not None:
                try:
                    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
                except OSError:
                    raise _busy(device_id) from None
            self._held.add((path or "", device_id))
        try:
            yield
        finally:
            with self._mutex:
                self._held.discard((path or "", device_id))
                if f is not None:
                    fcntl.lockf(f, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


_FILE_LOCKS = _FileLocks()


def _lock_path(db: Database) -> str | None:
    path = sqlite_path(db.url)
    return None if path is None else f"{path}.locks"


@contextlib.contextmanager
def device_lock(db: Database, device_id: str) -> Iterator[Session]:
    """Holds a device's enrollment lock; yields the session of the issued transaction.

    The session commits when the block ends without error. On SQLite it begins its write
    transaction only when first used, so use it only after the pending row is committed.
    """
    if db.is_sqlite:
        with _FILE_LOCKS.hold(_lock_path(db), device_id), session_scope(db) as session:
            yield session
        return
    # session_scope: a lost connection is the `unavailable` error, like every transaction's.
    with session_scope(db) as session:
        got = session.execute(
            select(func.pg_try_advisory_xact_lock(_ADVISORY_CLASS, _key(device_id)))
        ).scalar_one()
        if not got:
            raise _busy(device_id)
        try:
            session.execute(
                select(Device.id).where(Device.id == device_id).with_for_update(nowait=True)
            )
        except OperationalError as e:
            # 55P03 lock_not_available: a decommission or a new secret holds the row.
            if getattr(e.orig, "sqlstate", None) == "55P03":
                raise _busy(device_id) from None
            raise
        yield session


def try_device_lock(
    locks: contextlib.ExitStack, session: Session, db: Database, device_id: str
) -> bool:
    """Takes a device's enrollment lock for a sweep, if free: False while a request holds it.

    The lock lasts until `locks` closes (SQLite) or the session's transaction ends
    (PostgreSQL), so a sweep never changes a row that a live request is working on."""
    if db.is_sqlite:
        try:
            locks.enter_context(_FILE_LOCKS.hold(_lock_path(db), device_id))
        except PKIError:
            return False
        return True
    return bool(
        session.execute(
            select(func.pg_try_advisory_xact_lock(_ADVISORY_CLASS, _key(device_id)))
        ).scalar_one()
    )
