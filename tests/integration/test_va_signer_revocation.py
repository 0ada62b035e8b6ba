"""Revoking the OCSP signer on a running VA (gunicorn, SoftHSM): the next live answer and
every pre-signed answer served come from the renewed signer, never the revoked one."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from tests.integration.conftest import DevCA
from tests.integration.test_va_support import VAServer, issue_device, serve_va


def ask(
    va: VAServer, cert: x509.Certificate, issuer: x509.Certificate, *, nonce: bool
) -> ocsp.OCSPResponse:
    # RFC 5019 §2.1.1: clients name the certificate with a SHA-1 CertID.
    sha1 = hashes.SHA1()  # noqa: S303
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, sha1)
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    r = requests.post(
        va.ocsp_url,
        data=builder.build().public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=30,
    )
    assert r.status_code == 200
    return ocsp.load_der_ocsp_response(r.content)


def signer_serial(response: ocsp.OCSPResponse) -> int:
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    responder = response.certificates[0]
    responder.public_key().verify(  # type: ignore[call-arg, union-attr]
        response.signature,
        response.tbs_response_bytes,
        ec.ECDSA(response.signature_hash_algorithm),  # type: ignore[arg-type]
    )
    return responder.serial_number


def test_revoked_signer_is_replaced_on_the_next_request(dev_ca_any: DevCA, tmp_path: Path) -> None:
    ca = dev_ca_any
    issuer = x509.load_pem_x509_certificate(ca.cert("devices.pem").read_bytes())
    old = x509.load_pem_x509_certificate(ca.cert("devices-ocsp.pem").read_bytes())
    devices = [issue_device(ca, tmp_path / "d", f"SIG-{i}").certificate for i in range(3)]
    ca.pki("ocsp", "presign")
    with serve_va(ca, tmp_path, workers=1) as va:
        for cert in devices:
            assert signer_serial(ask(va, cert, issuer, nonce=False)) == old.serial_number
        assert signer_serial(ask(va, devices[0], issuer, nonce=True)) == old.serial_number

        ca.pki("revoke", format(old.serial_number, "x"), "--reason", "keyCompromise")
        renewed = ca.pki("ocsp", "renew-signers")
        assert "new OCSP signer" in renewed.stdout, renewed.stdout
        new = x509.load_pem_x509_certificate(ca.cert("devices-ocsp.pem").read_bytes())
        assert new.serial_number != old.serial_number

        # The VA loaded the old signer before; its very next live answer is the new signer's.
        live = ask(va, devices[0], issuer, nonce=True)
        assert signer_serial(live) == new.serial_number
        assert live.certificate_status is ocsp.OCSPCertStatus.GOOD
        # What the old signer pre-signed went with its revocation: answered live meanwhile.
        for cert in devices:
            assert signer_serial(ask(va, cert, issuer, nonce=False)) == new.serial_number
        presigned = ca.pki("ocsp", "presign")
        assert "devices: 0 responses" not in presigned.stdout, presigned.stdout
        for cert in devices:
            response = ask(va, cert, issuer, nonce=False)
            assert signer_serial(response) == new.serial_number
            assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
