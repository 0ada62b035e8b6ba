"""Intermediate rollover: a second issuing CA under the same root takes over EST; the old one
is retired and the VA keeps answering OCSP and serving CRLs for what it issued."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from sqlalchemy import func, select

from pki.store import AuditEvent, CertificateRecord, Database, session_scope
from tests.conftest import CONFIG_DIR
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import VAServer, ocsp_ask, serve_ca, serve_va

EST = "/.well-known/est"
OLD, NEW = "devices", "devices2"

NEW_ISSUER = f"""
[issuers.{NEW}]
key_label = "{NEW}-ca"
token = "ca"
parent = "root"
ocsp_signer_key_label = "{NEW}-ocsp"
ocsp_signer_token = "va"
issues = ["device", "server", "ocsp-signer", "audit"]
"""

NEW_CEREMONY = f"""issuer = "{NEW}"
profile = "intermediate"
key_type = "ec-p256"
validity_days = 3650

[subject]
C = "DE"
O = "Example IoT"
CN = "Example IoT Device CA 2"
"""

# A label left on the old issuer: after retirement it answers 503.
LEGACY_LABEL = f"""
[labels.legacy]
issuer = "{OLD}"
profile = "device"
auth = ["basic"]
"""


def rolled_config(directory: Path) -> Path:
    """The configuration after the rollover: the new issuer in ca.toml, EST labels moved."""
    shutil.copytree(CONFIG_DIR, directory)
    with (directory / "ca.toml").open("a") as f:
        f.write(NEW_ISSUER)
    est = directory / "est.toml"
    moved = est.read_text().replace(f'issuer = "{OLD}"', f'issuer = "{NEW}"')
    assert moved != est.read_text()
    est.write_text(moved + LEGACY_LABEL)
    (directory / "ceremonies" / f"{NEW}.toml").write_text(NEW_CEREMONY)
    return directory


def register(ca: DevCA, device_id: str, *labels: str) -> str:
    ca.pki("device", "add", device_id, "--model", "test")
    options = [arg for label in labels for arg in ("--label", label)]
    return ca.pki("device", "secret", device_id, "--stdout", *options).stdout.strip()


def post(url: str, ca: DevCA, path: str, body: bytes, **kwargs: object) -> requests.Response:
    return requests.post(
        f"{url}{EST}{path}",
        data=base64.encodebytes(body),
        headers={"Content-Type": "application/pkcs10"},
        verify=str(ca.cert("chain.pem")),
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


def one_certificate(response: requests.Response) -> x509.Certificate:
    assert response.status_code == 200, response.text
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    return cert


def enroll(
    url: str, ca: DevCA, device_id: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    secret = register(ca, device_id)
    csr, key = device_csr(device_id)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return one_certificate(post(url, ca, "/simpleenroll", der(csr), auth=(device_id, secret))), key


def status(va: VAServer, cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPCertStatus:
    response = ocsp_ask(va, cert, issuer, nonce=True)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return response.certificate_status


def pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def counts(ca: DevCA, action: str) -> tuple[int, int]:
    """Certificates recorded, and audit events of one action."""
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            certs = s.execute(select(func.count()).select_from(CertificateRecord)).scalar_one()
            events = s.execute(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action)
            ).scalar_one()
        return int(certs), int(events)
    finally:
        db.dispose()


def test_rollover_old_devices_stay_good_and_reenroll_onto_new_issuer(
    dev_ca: DevCA, tmp_path: Path
) -> None:
    # Before: three devices enrolled under the old issuer.
    with serve_ca(dev_ca, tmp_path) as url:
        (kept, kept_key), (revoked, _), (idle, _) = (
            enroll(url, dev_ca, f"ROLL-{n}") for n in (1, 2, 3)
        )
    old_ca = pem(dev_ca.cert(f"{OLD}.pem"))
    assert {c.issuer for c in (kept, revoked, idle)} == {old_ca.subject}

    # The rollover: a new key in the issuing token, certified by the (dev, online) root.
    ca = DevCA(dev_ca.data_dir, rolled_config(tmp_path / "config"), None)
    ca.pki("ceremony", "intermediate", str(ca.config_dir / "ceremonies" / f"{NEW}.toml"))
    ca.pki("ceremony", "ocsp-signer", "--issuer", NEW)
    new_ca = pem(ca.cert(f"{NEW}.pem"))
    root = pem(ca.cert("root.pem"))
    assert new_ca.issuer == root.subject and new_ca.public_key() != old_ca.public_key()
    ca.pki("revoke", format(revoked.serial_number, "x"), "--reason", "keyCompromise")
    # The scheduler publishes for both issuers.
    ran = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert f"{OLD}: CRL number" in ran.stdout and f"{NEW}: CRL number" in ran.stdout, ran.stdout

    with serve_va(ca, tmp_path) as va, serve_ca(ca, tmp_path) as url:
        # cacerts serves the new chain: the new issuer and the root (a SET OF: any order).
        r = requests.get(f"{url}{EST}/cacerts", verify=str(ca.cert("chain.pem")), timeout=30)
        assert r.status_code == 200
        served = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
        assert sorted(served, key=lambda c: c.serial_number) == sorted(
            [new_ca, root], key=lambda c: c.serial_number
        )

        # Old devices stay good; the revoked one is on the old issuer's CRL, served by the VA.
        assert status(va, kept, old_ca) is ocsp.OCSPCertStatus.GOOD
        assert status(va, revoked, old_ca) is ocsp.OCSPCertStatus.REVOKED
        crl = x509.load_der_x509_crl(requests.get(f"{va.url}/crl/{OLD}.crl", timeout=30).content)
        assert crl.is_signature_valid(old_ca.public_key())  # type: ignore[arg-type]
        assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
        new_crl = requests.get(f"{va.url}/crl/{NEW}.crl", timeout=30)
        assert new_crl.status_code == 200
        assert x509.load_der_x509_crl(new_crl.content).issuer == new_ca.subject

        # Re-enrollment with the old issuer's certificate over TLS yields one from the new one.
        cert_pem, key_pem = tmp_path / "kept.pem", tmp_path / "kept.key"
        cert_pem.write_bytes(kept.public_bytes(serialization.Encoding.PEM))
        key_pem.write_bytes(
            kept_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        csr, _ = device_csr("ROLL-1", kept_key)
        renewed = one_certificate(
            post(url, ca, "/simplereenroll", der(csr), cert=(str(cert_pem), str(key_pem)))
        )
        assert renewed.issuer == new_ca.subject and renewed.subject == kept.subject
        renewed.verify_directly_issued_by(new_ca)
        assert status(va, renewed, new_ca) is ocsp.OCSPCertStatus.GOOD
        assert status(va, kept, old_ca) is ocsp.OCSPCertStatus.REVOKED  # superseded
        # The TLS layer trusts the new issuer's certificates too (the dev chain.pem names
        # only the old one): the renewed certificate renews again.
        cert_pem.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
        again = one_certificate(
            post(url, ca, "/simplereenroll", der(csr), cert=(str(cert_pem), str(key_pem)))
        )
        assert again.issuer == new_ca.subject and again.serial_number != renewed.serial_number

        # Retire the old issuer: it issues nothing, by EST or by command, and says why.
        legacy_secret = register(ca, "ROLL-4", "legacy")
        ca.pki("issuer", "retire", OLD)
        before = counts(ca, "refused.issuance")
        legacy_csr, _ = device_csr("ROLL-4")
        refused = post(
            url, ca, "/legacy/simpleenroll", der(legacy_csr), auth=("ROLL-4", legacy_secret)
        )
        assert refused.status_code == 503 and f"issuer {OLD} is retired" in refused.text
        request = tmp_path / "late.csr"
        request.write_bytes(der(device_csr("ROLL-5")[0]))
        issued = ca.pki(
            "issue", "--profile", "device", "--issuer", OLD, "--csr", str(request), check=False
        )
        assert issued.returncode == 5 and f"issuer {OLD} is retired" in issued.stderr
        assert issued.stderr.count("\n") == 1
        after = counts(ca, "refused.issuance")
        assert after == (before[0], before[1] + 2)  # nothing recorded, both refusals audited
        assert counts(ca, "issuer.retired")[1] == 1
        twice = ca.pki("issuer", "retire", OLD, check=False)
        assert twice.returncode != 0 and "already retired" in twice.stderr

        # The new issuer still issues; the VA still answers for the old one and its CRL.
        fresh, _ = enroll(url, ca, "ROLL-6")
        assert fresh.issuer == new_ca.subject
        assert status(va, idle, old_ca) is ocsp.OCSPCertStatus.GOOD
        assert status(va, revoked, old_ca) is ocsp.OCSPCertStatus.REVOKED
        assert requests.get(f"{va.url}/crl/{OLD}.crl", timeout=30).status_code == 200
        # The scheduler keeps publishing the retired issuer's CRL.
        ran = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
        assert "failed" not in ran.stderr, ran.stderr
