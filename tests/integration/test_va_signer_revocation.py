"""Revoking the OCSP signer on a running VA (gunicorn, SoftHSM): the next live answer and
every pre-signed answer served come from the renewed signer, never the revoked one."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509 import ocsp

from tests.integration.conftest import DevCA
from tests.integration.test_va_support import issue_device, ocsp_ask, responder_serial, serve_va


def test_revoked_signer_is_replaced_on_the_next_request(dev_ca_any: DevCA, tmp_path: Path) -> None:
    ca = dev_ca_any
    issuer = x509.load_pem_x509_certificate(ca.cert("devices.pem").read_bytes())
    old = x509.load_pem_x509_certificate(ca.cert("devices-ocsp.pem").read_bytes())
    devices = [issue_device(ca, tmp_path / "d", f"SIG-{i}").certificate for i in range(3)]
    ca.pki("ocsp", "presign")
    with serve_va(ca, tmp_path, workers=1) as va:
        for cert in devices:
            assert responder_serial(ocsp_ask(va, cert, issuer, nonce=False)) == old.serial_number
        assert responder_serial(ocsp_ask(va, devices[0], issuer, nonce=True)) == old.serial_number

        ca.pki("revoke", format(old.serial_number, "x"), "--reason", "keyCompromise", "--ca")
        renewed = ca.pki("ocsp", "renew-signers")
        assert "new OCSP signer" in renewed.stdout, renewed.stdout
        new = x509.load_pem_x509_certificate(ca.cert("devices-ocsp.pem").read_bytes())
        assert new.serial_number != old.serial_number

        # The VA loaded the old signer before; its very next live answer is the new signer's.
        live = ocsp_ask(va, devices[0], issuer, nonce=True)
        assert responder_serial(live) == new.serial_number
        assert live.certificate_status is ocsp.OCSPCertStatus.GOOD
        # What the old signer pre-signed went with its revocation: answered live meanwhile.
        for cert in devices:
            assert responder_serial(ocsp_ask(va, cert, issuer, nonce=False)) == new.serial_number
        presigned = ca.pki("ocsp", "presign")
        assert "devices: 0 responses" not in presigned.stdout, presigned.stdout
        for cert in devices:
            response = ocsp_ask(va, cert, issuer, nonce=False)
            assert responder_serial(response) == new.serial_number
            assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
