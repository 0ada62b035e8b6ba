"""pki.store.lean on SQLite and PostgreSQL: typed rows, fresh reads, a lost connection."""

from __future__ import annotations

import datetime
import os

import pytest
from sqlalchemy import bindparam, select, text

from pki.store import CertificateRecord, CertificateStatus, Database, session_scope
from pki.store.lean import LeanQuery
from pki.store.models import IssuerRecord

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)

BY_SERIAL = (
    select(CertificateRecord.status, CertificateRecord.not_after, CertificateRecord.tbs_der)
    .where(
        CertificateRecord.issuer_id == bindparam("issuer_id"),
        CertificateRecord.serial_hex == bindparam("serial_hex"),
        CertificateRecord.not_after > bindparam("now"),
    )
    .limit(1)
)


def add_certificate(db: Database, serial: str, status: CertificateStatus) -> None:
    with session_scope(db) as session:
        if session.get(IssuerRecord, "devices") is None:
            session.add(
                IssuerRecord(
                    id="devices",
                    subject="CN=Devices",
                    key_uri="pkcs11:object=devices",
                    kind="intermediate",
                    created_at=NOW,
                )
            )
            session.flush()
        session.add(
            CertificateRecord(
                issuer_id="devices",
                serial_hex=serial,
                profile="device",
                status=status,
                subject=f"CN={serial}",
                not_before=NOW,
                not_after=NOW + datetime.timedelta(days=1),
                tbs_der=b"\x30\x00",
                created_at=NOW,
            )
        )


def test_rows_come_back_typed_and_fresh(db: Database) -> None:
    query = LeanQuery(db, BY_SERIAL)
    assert query.first(issuer_id="devices", serial_hex="01", now=NOW) is None
    # A row committed after the query's connection was opened is seen at once: each lookup is
    # its own transaction, no snapshot is held between lookups.
    add_certificate(db, "01", CertificateStatus.ISSUED)
    row = query.first(issuer_id="devices", serial_hex="01", now=NOW)
    assert row is not None
    status, not_after, tbs = row
    assert status is CertificateStatus.ISSUED
    assert not_after == NOW + datetime.timedelta(days=1) and not_after.tzinfo is not None
    assert tbs == b"\x30\x00"
    with session_scope(db) as session:
        record = session.scalars(select(CertificateRecord)).one()
        record.status = CertificateStatus.REVOKED
    row = query.first(issuer_id="devices", serial_hex="01", now=NOW)
    assert row is not None and row[0] is CertificateStatus.REVOKED
    # The bound datetime goes through the column type: past not_after, nothing is found.
    later = NOW + datetime.timedelta(days=2)
    assert query.first(issuer_id="devices", serial_hex="01", now=later) is None
    query.close()


def test_a_lost_connection_is_replaced_and_the_lookup_repeated(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("a SQLite file has no server to drop the connection")
    add_certificate(db, "02", CertificateStatus.ISSUED)
    query = LeanQuery(db, BY_SERIAL)
    assert query.first(issuer_id="devices", serial_hex="02", now=NOW) is not None
    with db.engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert killed >= 1
    # The dead connection fails once inside first(), which opens a new one and asks again.
    assert query.first(issuer_id="devices", serial_hex="02", now=NOW) is not None
    query.close()


def test_a_forked_child_neither_uses_nor_closes_the_parents_connection(db: Database) -> None:
    add_certificate(db, "03", CertificateStatus.ISSUED)
    query = LeanQuery(db, BY_SERIAL)
    assert query.first(issuer_id="devices", serial_hex="03", now=NOW) is not None
    pid = os.fork()
    if pid == 0:  # the child: its own connection, then exit without closing the parent's
        code = 1
        try:
            row = query.first(issuer_id="devices", serial_hex="03", now=NOW)
            code = 0 if row is not None and row[0] is CertificateStatus.ISSUED else 2
            query.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection still answers: the child did not terminate it.
    assert query.first(issuer_id="devices", serial_hex="03", now=NOW) is not None
    query.close()
