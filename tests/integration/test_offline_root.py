"""The offline root: two data directories that exchange only the files the runbook carries."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from pki import lint
from tests.conftest import CONFIG_DIR
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_est import EST
from tests.integration.test_va_support import run, serve_ca, serve_va


def _root_config(tmp_path: Path) -> Path:
    """The root side's ca.toml: the root's OCSP-signer key lives in the root's token too."""
    target = tmp_path / "root-config"
    shutil.copytree(CONFIG_DIR, target)
    text = (target / "ca.toml").read_text()
    old = 'ocsp_signer_key_label = "root-ocsp"\nocsp_signer_token = "va"'
    assert old in text
    (target / "ca.toml").write_text(
        text.replace(old, 'ocsp_signer_key_label = "root-ocsp"\nocsp_signer_token = "root"')
    )
    return target


def _lint_clean(findings: list[lint.Finding], what: str) -> None:
    assert lint.blocking(findings) == [], (what, findings)


@pytest.fixture
def sides(tmp_path: Path) -> tuple[DevCA, DevCA, Path]:
    root = DevCA(tmp_path / "root-side", _root_config(tmp_path), None)
    online = DevCA(tmp_path / "online-side", CONFIG_DIR, None)
    carried = tmp_path / "carried"
    carried.mkdir()
    return root, online, carried


def test_offline_root_flow(sides: tuple[DevCA, DevCA, Path], tmp_path: Path) -> None:
    root, online, carried = sides
    ceremonies = CONFIG_DIR / "ceremonies"
    # Root side: its token and database only.
    root.pki("token", "init", "root")
    root.pki("db", "upgrade")
    root.pki("ceremony", "root", str(ceremonies / "root.toml"))
    shutil.copy(root.cert("root.pem"), carried / "root.pem")

    # Online side: the issuing CA's and the VA's tokens; the root comes as a certificate.
    online.pki("token", "init", "ca")
    online.pki("token", "init", "va")
    # A ceremony checks the schema before it makes any key.
    refused = online.pki(
        "ceremony", "intermediate", str(ceremonies / "devices.toml"),
        "--csr", str(carried / "devices.csr"), check=False,
    )  # fmt: skip
    assert refused.returncode == 4 and "pki db upgrade" in refused.stderr
    online.pki("db", "upgrade")
    online.pki("issuer", "import", "root", str(carried / "root.pem"))
    online.pki(
        "ceremony", "intermediate", str(ceremonies / "devices.toml"),
        "--csr", str(carried / "devices.csr"),
    )  # fmt: skip
    # Interrupted and run again: the key is never silently duplicated, --resume reuses it.
    again = online.pki(
        "ceremony", "intermediate", str(ceremonies / "devices.toml"),
        "--csr", str(carried / "devices.csr"), check=False,
    )  # fmt: skip
    assert again.returncode != 0 and "--resume" in again.stderr
    first_csr = x509.load_pem_x509_csr((carried / "devices.csr").read_bytes())
    online.pki(
        "ceremony", "intermediate", str(ceremonies / "devices.toml"),
        "--csr", str(carried / "devices.csr"), "--resume",
    )  # fmt: skip
    csr = x509.load_pem_x509_csr((carried / "devices.csr").read_bytes())
    assert csr.public_key() == first_csr.public_key()

    # Root side: certify the CSR as reviewed; the root's CRL and OCSP answers.
    root.pki(
        "ceremony", "sign", str(ceremonies / "devices.toml"),
        "--csr", str(carried / "devices.csr"), "--out", str(carried / "devices.pem"),
    )  # fmt: skip
    root.pki("ceremony", "ocsp-signer", "--issuer", "root")
    root.pki("crl", "publish", "--issuer", "root", "--next-update", "30", "--out-dir", str(carried))
    root.pki("ocsp", "presign", "--issuer", "root", "--out", str(carried / "ocsp"))

    # Online side: install, then run without the root's token.
    online.pki("issuer", "import", "devices", str(carried / "devices.pem"))
    online.pki("crl", "import", str(carried / "root.crl"))
    # One answer per certificate the root issued; the online side needs the intermediate's.
    intermediate = x509.load_pem_x509_certificate((carried / "devices.pem").read_bytes())
    answer_file = carried / "ocsp" / f"{intermediate.serial_number:x}.ocsp"
    assert answer_file.is_file()
    online.pki("ocsp", "import", str(answer_file))
    online.pki("ceremony", "ocsp-signer", "--issuer", "devices")
    online.pki("ceremony", "audit-signer")
    online.pki("broker", "server-cert", "127.0.0.1", "--out-dir", str(online.data_dir / "tls"))
    assert not (online.data_dir / "secrets" / "root-user.pin").exists()

    online.pki("device", "add", "OFF-1")
    secret = online.pki("device", "secret", "OFF-1", "--stdout").stdout.strip()
    request, _ = device_csr("OFF-1")
    with serve_ca(online, tmp_path) as url:
        r = requests.post(
            f"{url}{EST}/simpleenroll",
            data=base64.encodebytes(der(request)),
            auth=("OFF-1", secret),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(online.cert("chain.pem")),
            timeout=30,
        )
        assert r.status_code == 200, r.text
    (device,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
    device_pem = tmp_path / "device.pem"
    device_pem.write_bytes(device.public_bytes(serialization.Encoding.PEM))
    online.pki("crl", "publish", "--out-dir", str(tmp_path))

    checked = run(
        "openssl", "verify", "-crl_check_all",
        "-CAfile", carried / "root.pem", "-untrusted", carried / "devices.pem",
        "-CRLfile", carried / "root.crl", "-CRLfile", tmp_path / "devices.crl", device_pem,
    )  # fmt: skip
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout + checked.stderr

    with serve_va(online, tmp_path, workers=1) as va:
        # The root's answer about the intermediate: imported, signed on the root's side.
        answer = run(
            "openssl", "ocsp", "-issuer", carried / "root.pem", "-cert", carried / "devices.pem",
            "-url", va.ocsp_url, "-CAfile", carried / "root.pem", "-no_nonce",
            "-respout", tmp_path / "root-answer.der", "-timeout", "20",
        )  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        assert f"{carried / 'devices.pem'}: good" in answer.stdout
        crl = requests.get(f"{va.url}/crl/root.crl", timeout=10)
        assert crl.status_code == 200 and crl.content == (carried / "root.crl").read_bytes()
        device_answer = run(
            "openssl", "ocsp", "-issuer", carried / "devices.pem", "-cert", device_pem,
            "-url", va.ocsp_url, "-CAfile", carried / "root.pem", "-timeout", "20",
        )  # fmt: skip
        assert f"{device_pem}: good" in device_answer.stdout, device_answer.stderr

    for path in (carried / "root.pem", carried / "devices.pem", device_pem):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        _lint_clean(lint.lint_certificate(cert.public_bytes(serialization.Encoding.DER)), path.name)
    _lint_clean(lint.lint_crl((carried / "root.crl").read_bytes(), authority=True), "root.crl")
    _lint_clean(lint.lint_crl((tmp_path / "devices.crl").read_bytes()), "devices.crl")
    _lint_clean(lint.lint_ocsp_response((tmp_path / "root-answer.der").read_bytes()), "root OCSP")
