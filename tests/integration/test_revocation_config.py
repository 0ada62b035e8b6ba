"""ca.toml [revocation] sets the OCSP and CRL windows and extended revoke."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from api.runtime import Runtime
from pki.errors import PKIError
from tests.conftest import CONFIG_DIR
from tests.integration.conftest import DevCA


def config_with(tmp_path: Path, revocation: str) -> Path:
    target = tmp_path / "ca-config"
    shutil.copytree(CONFIG_DIR, target)
    text = (target / "ca.toml").read_text().split("[revocation]")[0]
    (target / "ca.toml").write_text(text + "[revocation]\n" + revocation)
    return target


def test_revocation_section_reaches_ocsp_and_crl_configs(tmp_path: Path) -> None:
    cfg = config_with(
        tmp_path,
        "ocsp_validity_hours = 6\nocsp_max_age_seconds = 600\n"
        "extended_revoke = true\ncrl_validity_hours = 48\n",
    )
    rt = Runtime.open(cfg, tmp_path / "data", environ={})
    ocsp = rt.ocsp_config()
    assert ocsp.validity == datetime.timedelta(hours=6)
    assert ocsp.max_age_seconds == 600 and ocsp.extended_revoke is True
    assert rt.crl_config().full_validity == datetime.timedelta(hours=48)


def test_revocation_section_errors_name_the_field(tmp_path: Path) -> None:
    cfg = config_with(tmp_path, "ocsp_validity_hours = 0\n")
    with pytest.raises(PKIError, match=r"ca.toml: revocation.ocsp_validity_hours"):
        Runtime.open(cfg, tmp_path / "data", environ={})


def test_crl_next_update_follows_config(dev_ca: DevCA, tmp_path: Path) -> None:
    ca = DevCA(dev_ca.data_dir, config_with(tmp_path, "crl_validity_hours = 30\n"), None)
    ca.pki("crl", "publish", "--out-dir", str(tmp_path / "crls"))
    crl = x509.load_der_x509_crl((tmp_path / "crls" / "devices.crl").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(hours=30)
