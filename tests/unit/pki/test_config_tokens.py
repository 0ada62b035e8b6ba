"""ca.toml tokens: which token holds which key, and which tokens each process opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pki.config import ConfigSet
from pki.errors import ErrorKind, PKIError
from tests.conftest import CONFIG_DIR

SINGLE_HSM = """
[hsm]
token = "pki-dev"
pin_file = "secrets/hsm-user.pin"

[issuers.root]
key_label = "root-ca"
ocsp_signer_key_label = "root-ocsp"
issues = ["intermediate", "ocsp-signer"]

[issuers.devices]
key_label = "devices-ca"
parent = "root"
ocsp_signer_key_label = "devices-ocsp"
issues = ["device", "server", "ocsp-signer", "audit"]
"""


def config(
    tmp_path: Path, ca_toml: str | None = None, replace: tuple[str, str] = ("", "")
) -> ConfigSet:
    target = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, target)
    if ca_toml is not None:
        (target / "ca.toml").write_text(ca_toml)
    elif replace[0]:
        text = (target / "ca.toml").read_text()
        assert replace[0] in text
        (target / "ca.toml").write_text(text.replace(*replace))
    return ConfigSet(target)


class TestTokens:
    def test_shipped_config_separates_roles(self, tmp_path: Path) -> None:
        ca = config(tmp_path).ca
        assert ca.issuer_token("root") == "root"
        assert ca.issuer_token("devices") == "ca"
        assert ca.signer_token("root") == ca.signer_token("devices") == "va"
        assert ca.audit_token() == "ca"
        assert ca.process_tokens("va") == {"va"}
        assert ca.process_tokens("ca") == {"ca"}
        assert ca.process_tokens("scheduler") == {"ca", "va"}

    def test_single_hsm_section_still_reads(self, tmp_path: Path) -> None:
        ca = config(tmp_path, SINGLE_HSM).ca
        assert list(ca.tokens) == ["hsm"]
        assert ca.issuer_token("root") == ca.signer_token("devices") == "hsm"
        assert ca.process_tokens("va") == {"hsm"}

    def test_unknown_token_refused(self, tmp_path: Path) -> None:
        with pytest.raises(PKIError, match=r"issuers.devices.token: .*unknown token 'hsm2'"):
            config(tmp_path, replace=('token = "ca"\nparent', 'token = "hsm2"\nparent'))

    def test_issuer_without_token_refused_when_several(self, tmp_path: Path) -> None:
        with pytest.raises(PKIError, match=r"issuers.devices.token: name one of the tokens"):
            config(tmp_path, replace=('token = "ca"\nparent', "parent"))

    def test_process_with_extra_token_refused(self, tmp_path: Path) -> None:
        ca = config(tmp_path, replace=('va = ["va"]', 'va = ["va", "root"]')).ca
        with pytest.raises(PKIError) as caught:
            ca.process_tokens("va")
        assert caught.value.kind is ErrorKind.CONFIG
        assert "processes.va" in caught.value.message and "root" in caught.value.message

    def test_process_missing_token_refused(self, tmp_path: Path) -> None:
        ca = config(tmp_path, replace=('scheduler = ["ca", "va"]', 'scheduler = ["ca"]')).ca
        with pytest.raises(PKIError, match=r"processes.scheduler: .*needs token\(s\) va"):
            ca.process_tokens("scheduler")

    def test_scheduler_may_open_an_online_root(self, tmp_path: Path) -> None:
        ca = config(
            tmp_path, replace=('scheduler = ["ca", "va"]', 'scheduler = ["ca", "va", "root"]')
        ).ca
        assert ca.process_tokens("scheduler") == {"ca", "va", "root"}
