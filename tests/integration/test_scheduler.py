"""The scheduler publishes what is due: CRLs after revocations, OCSP pre-signing."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from sqlalchemy import func, select

from pki.store import Database, session_scope
from pki.store.revocation_models import CRLRepository, OCSPResponseRecord
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import issue_device


def test_scheduler_round_publishes_revocation_and_presigns(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = dev_ca
    good = issue_device(ca, tmp_path / "a", "SCH-1")
    bad = issue_device(ca, tmp_path / "b", "SCH-2")
    first = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "devices: CRL number" in first.stdout, first.stdout + first.stderr
    ca.pki("revoke", bad.serial_hex, "--reason", "keyCompromise")
    second = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "failed" not in second.stderr, second.stderr
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            latest = CRLRepository(s).latest("devices", is_delta=False)
            assert latest is not None and latest.crl_der
            crl = x509.load_der_x509_crl(latest.crl_der)
            presigned = s.execute(select(func.count()).select_from(OCSPResponseRecord))
            assert presigned.scalar_one() >= 2
    finally:
        db.dispose()
    assert crl.get_revoked_certificate_by_serial_number(bad.certificate.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(good.certificate.serial_number) is None
    # Nothing new: the next round publishes no full CRL.
    third = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "devices: not due" in third.stdout
