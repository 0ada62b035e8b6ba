"""Tokens per role: each PIN reaches one token, and no server opens the root's token."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.serialization import pkcs7

from tests.conftest import CONFIG_DIR
from tests.csrs import der, device_csr
from tests.integration.conftest import DevCA
from tests.integration.test_est import EST
from tests.integration.test_va_support import openssl_ocsp, run, serve_ca, serve_va

ROOT, CA, VA = "pki-root", "pki-ca", "pki-va"
PINS = {ROOT: "secrets/root-user.pin", CA: "secrets/ca-user.pin", VA: "secrets/va-user.pin"}


def _sign(ca: DevCA, token: str, pin_of: str, label: str, tmp_path: Path) -> bool:
    """Tells whether pkcs11-tool, logged in to `token` with the PIN of `pin_of`, signs."""
    data = tmp_path / "digest.bin"
    data.write_bytes(bytes(32))
    result = ca.pkcs11_tool(
        token, PINS[pin_of], "--sign", "--mechanism", "ECDSA", "--label", label,
        "--input-file", str(data), "--output-file", str(tmp_path / "signature.bin"),
    )  # fmt: skip
    return result.returncode == 0


def _private_labels(ca: DevCA, token: str) -> list[str]:
    listed = ca.pkcs11_tool(token, PINS[token], "--list-objects", "--type", "privkey")
    assert listed.returncode == 0, listed.stderr
    return [
        line.split(":", 1)[1].strip()
        for line in listed.stdout.splitlines()
        if line.strip().startswith("label:")
    ]


class TestPINsPerToken:
    def test_three_tokens_with_their_keys(self, dev_ca: DevCA) -> None:
        assert _private_labels(dev_ca, ROOT) == ["root-ca"]
        assert sorted(_private_labels(dev_ca, CA)) == ["audit", "devices-ca"]
        va_keys = _private_labels(dev_ca, VA)
        assert len(va_keys) == 2
        assert all(label.startswith(("root-ocsp-", "devices-ocsp-")) for label in va_keys)
        pins = {(dev_ca.data_dir / p).read_text() for p in PINS.values()}
        assert len(pins) == 3

    def test_va_pin_signs_with_no_ca_key(self, dev_ca: DevCA, tmp_path: Path) -> None:
        signer = next(k for k in _private_labels(dev_ca, VA) if k.startswith("devices-ocsp-"))
        # The control: the tool and the PIN work for what the VA holds.
        assert _sign(dev_ca, VA, VA, signer, tmp_path)
        assert not _sign(dev_ca, ROOT, VA, "root-ca", tmp_path)
        assert not _sign(dev_ca, CA, VA, "devices-ca", tmp_path)
        # And the VA's own token holds no CA key (pkcs11-tool --sign does not select by
        # label, so the listing is the check).
        assert not {"root-ca", "devices-ca"} & set(_private_labels(dev_ca, VA))

    def test_ca_front_pin_signs_with_no_root_key(self, dev_ca: DevCA, tmp_path: Path) -> None:
        assert _sign(dev_ca, CA, CA, "devices-ca", tmp_path)
        assert not _sign(dev_ca, ROOT, CA, "root-ca", tmp_path)
        assert "root-ca" not in _private_labels(dev_ca, CA)


def _remove_root_token(ca: DevCA) -> None:
    tokens = [
        d
        for d in (ca.data_dir / "tokens").iterdir()
        if ROOT.encode() in (d / "token.object").read_bytes()
    ]
    assert len(tokens) == 1
    shutil.rmtree(tokens[0])
    (ca.data_dir / PINS[ROOT]).unlink()


class TestRootOffline:
    def test_servers_and_scheduler_work_without_root_token(
        self, dev_ca: DevCA, tmp_path: Path
    ) -> None:
        _remove_root_token(dev_ca)
        assert dev_ca.pki("key", "show", "root-ca", "--token", "root", check=False).returncode
        scheduled = dev_ca.pki("scheduler", "run", "--rounds", "1", "--interval", "1")
        assert "failed" not in scheduled.stderr, scheduled.stderr
        assert "root: its token is offline here" in scheduled.stdout
        dev_ca.pki("device", "add", "ROLE-1")
        secret = dev_ca.pki("device", "secret", "ROLE-1", "--stdout").stdout.strip()
        csr, _ = device_csr("ROLE-1")
        with serve_ca(dev_ca, tmp_path) as url:
            r = requests.post(
                f"{url}{EST}/simpleenroll",
                data=base64.encodebytes(der(csr)),
                auth=("ROLE-1", secret),
                headers={"Content-Type": "application/pkcs10"},
                verify=str(dev_ca.cert("chain.pem")),
                timeout=30,
            )
            assert r.status_code == 200, r.text
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.content))
        device_pem = tmp_path / "device.pem"
        device_pem.write_bytes(cert.public_bytes(pkcs7.serialization.Encoding.PEM))
        with serve_va(dev_ca, tmp_path, workers=1) as va:
            answer = openssl_ocsp(dev_ca, va, "-cert", device_pem)
            assert answer.returncode == 0, answer.stderr
            assert f"{device_pem}: good" in answer.stdout
            # The root's answer about the intermediate comes from the root's OCSP signer,
            # whose key the VA's token holds.
            root_answer = run(
                "openssl", "ocsp", "-issuer", dev_ca.cert("root.pem"),
                "-cert", dev_ca.cert("devices.pem"), "-url", va.ocsp_url,
                "-CAfile", dev_ca.cert("root.pem"), "-timeout", "20",
            )  # fmt: skip
            assert root_answer.returncode == 0, root_answer.stderr
            assert ": good" in root_answer.stdout


def _config_with(tmp_path: Path, processes: str) -> Path:
    target = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, target)
    text = (target / "ca.toml").read_text()
    head, rest = text.split("[processes]\n", 1)
    rest = rest.split("\n\n", 1)[1]
    (target / "ca.toml").write_text(head + "[processes]\n" + processes + "\n\n" + rest)
    return target


class TestProcessTokens:
    @pytest.mark.parametrize(
        ("processes", "command", "named"),
        [
            ('va = ["va", "root"]', ("serve", "va"), "root"),
            ('va = ["va", "ca"]', ("serve", "va"), "ca"),
            ('ca = ["ca", "root"]', ("serve", "ca"), "root"),
            ('ca = ["ca", "va"]', ("serve", "ca"), "va"),
            ('scheduler = ["ca"]', ("scheduler", "run", "--rounds", "1"), "va"),
        ],
    )
    def test_process_with_a_token_it_does_not_need_refuses(
        self,
        dev_ca: DevCA,
        tmp_path: Path,
        processes: str,
        command: tuple[str, ...],
        named: str,
    ) -> None:
        ca = DevCA(dev_ca.data_dir, _config_with(tmp_path, processes), None)
        result = ca.pki(*command, check=False, timeout=60)
        assert result.returncode == 4, result.stderr
        assert f"processes.{command[-1] if command[0] == 'serve' else 'scheduler'}" in (
            result.stderr
        )
        assert named in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
