"""Tests for SoftHSM configuration and token initialisation (softhsm2-util, no module load)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from hsm import HSMError, SoftHSMStore, find_softhsm_module, init_softhsm_token
from hsm import softhsm as softhsm_module
from hsm.errors import HSMErrorKind
from hsm.softhsm import softhsm_token_labels, write_softhsm_conf


@pytest.fixture(autouse=True)
def _needs_softhsm(softhsm_store: SoftHSMStore) -> None:
    """Skips these tests where SoftHSM is missing (the store fixture does the check)."""


class TestConf:
    def test_write_softhsm_conf_contents(self, tmp_path: Path) -> None:
        conf = write_softhsm_conf(tmp_path)
        assert conf == tmp_path.resolve() / "softhsm2.conf"
        lines = conf.read_text().splitlines()
        assert f"directories.tokendir = {tmp_path.resolve() / 'tokens'}" in lines
        assert "objectstore.backend = file" in lines
        assert "log.level = ERROR" in lines
        assert (tmp_path / "tokens").is_dir()


class TestInitToken:
    def test_init_creates_token(self, tmp_path: Path) -> None:
        token = init_softhsm_token(tmp_path, "pki-dev", so_pin="so-12345", user_pin="user-1234")
        assert token.label == "pki-dev"
        assert token.conf_path == tmp_path.resolve() / "softhsm2.conf"
        assert token.token_dir == tmp_path.resolve() / "tokens"
        assert token.module_path == "/usr/lib/softhsm/libsofthsm2.so"
        assert token.environ() == {"SOFTHSM2_CONF": str(token.conf_path)}
        assert softhsm_token_labels(token.conf_path) == ["pki-dev"]

    def test_init_is_idempotent(self, tmp_path: Path) -> None:
        first = init_softhsm_token(tmp_path, "pki-dev", so_pin="so-12345", user_pin="user-1234")
        token_dirs = sorted(p.name for p in first.token_dir.iterdir())
        second = init_softhsm_token(tmp_path, "pki-dev", so_pin="so-99999", user_pin="user-9999")
        assert second == first
        assert sorted(p.name for p in first.token_dir.iterdir()) == token_dirs
        assert softhsm_token_labels(first.conf_path) == ["pki-dev"]

    def test_init_second_label_adds_token(self, tmp_path: Path) -> None:
        init_softhsm_token(tmp_path, "a", so_pin="so-12345", user_pin="user-1234")
        init_softhsm_token(tmp_path, "b", so_pin="so-12345", user_pin="user-1234")
        assert sorted(softhsm_token_labels(tmp_path / "softhsm2.conf")) == ["a", "b"]

    def test_init_failure_does_not_leak_pins(self, tmp_path: Path) -> None:
        user_pin = "user-" + secrets.token_hex(6)
        so_pin = "x"  # shorter than SoftHSM's minimum PIN length: softhsm2-util fails
        with pytest.raises(HSMError) as caught:
            init_softhsm_token(tmp_path, "bad", so_pin=so_pin, user_pin=user_pin)
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE
        assert "softhsm2-util --init-token failed" in str(caught.value)
        assert user_pin not in str(caught.value)
        assert f"--so-pin {so_pin}" not in str(caught.value)
        assert caught.value.__cause__ is None
        assert "bad" not in softhsm_token_labels(tmp_path / "softhsm2.conf")

    @pytest.mark.parametrize("label", ["", " padded", "x" * 33])
    def test_init_bad_label_refused(self, tmp_path: Path, label: str) -> None:
        with pytest.raises(HSMError) as caught:
            init_softhsm_token(tmp_path, label, so_pin="so-12345", user_pin="user-1234")
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_init_empty_pin_refused(self, tmp_path: Path) -> None:
        with pytest.raises(HSMError, match="PINs"):
            init_softhsm_token(tmp_path, "t", so_pin="", user_pin="user-1234")

    def test_missing_softhsm_util_is_unavailable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(HSMError, match="apt-get install softhsm2") as caught:
            init_softhsm_token(tmp_path, "t", so_pin="so-12345", user_pin="user-1234")
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE


class TestFindModule:
    def test_find_softhsm_module_returns_existing_file(self) -> None:
        path = find_softhsm_module()
        assert os.path.isfile(path)
        assert path in softhsm_module.MODULE_CANDIDATES

    def test_find_softhsm_module_missing_gives_install_hint(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(softhsm_module, "MODULE_CANDIDATES", ("/nonexistent/libsofthsm2.so",))
        with pytest.raises(HSMError, match="apt-get install softhsm2") as caught:
            find_softhsm_module()
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE


class TestStore:
    def test_create_token_gives_random_labels_and_pins(self, softhsm_store: SoftHSMStore) -> None:
        first, first_pin = softhsm_store.create_token()
        second, second_pin = softhsm_store.create_token()
        assert first.label != second.label
        assert first_pin != second_pin
        assert first.conf_path == second.conf_path == softhsm_store.conf_path
        labels = softhsm_token_labels(softhsm_store.conf_path)
        assert {first.label, second.label} <= set(labels)

    def test_shared_store_is_one_per_process(
        self, softhsm_store: SoftHSMStore, tmp_path: Path
    ) -> None:
        assert softhsm_module.shared_softhsm_store(tmp_path) is softhsm_store
