"""Tests for reading PINs from files and environment variables."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hsm import HSMError, read_pin, write_pin_file
from hsm.errors import HSMErrorKind

SECRET = "s3cret-PIN-value"


def _pin_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "token.pin"
    path.write_bytes(content)
    path.chmod(mode)
    return path


class TestReadPinFile:
    def test_read_pin_file_strips_one_trailing_newline(self, tmp_path: Path) -> None:
        assert read_pin(pin_file=_pin_file(tmp_path, SECRET.encode() + b"\n")) == SECRET

    def test_read_pin_file_strips_crlf(self, tmp_path: Path) -> None:
        assert read_pin(pin_file=_pin_file(tmp_path, SECRET.encode() + b"\r\n")) == SECRET

    def test_read_pin_file_keeps_inner_and_leading_blanks(self, tmp_path: Path) -> None:
        assert read_pin(pin_file=_pin_file(tmp_path, b" a b\n")) == " a b"

    def test_read_pin_file_accepts_str_path(self, tmp_path: Path) -> None:
        assert read_pin(pin_file=str(_pin_file(tmp_path, SECRET.encode()))) == SECRET

    @pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620])
    def test_read_pin_file_group_or_world_accessible_refused(
        self, tmp_path: Path, mode: int
    ) -> None:
        path = _pin_file(tmp_path, SECRET.encode(), mode)
        with pytest.raises(HSMError) as caught:
            read_pin(pin_file=path)
        assert caught.value.kind is HSMErrorKind.INVALID
        assert str(path) in str(caught.value)
        assert "chmod 600" in str(caught.value)
        assert SECRET not in str(caught.value)

    def test_read_pin_file_missing_names_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.pin"
        with pytest.raises(HSMError, match=r"absent\.pin") as caught:
            read_pin(pin_file=path)
        assert caught.value.kind is HSMErrorKind.INVALID

    @pytest.mark.parametrize("content", [b"", b"\n"])
    def test_read_pin_file_empty_refused(self, tmp_path: Path, content: bytes) -> None:
        with pytest.raises(HSMError, match="is empty"):
            read_pin(pin_file=_pin_file(tmp_path, content))

    def test_read_pin_file_directory_refused(self, tmp_path: Path) -> None:
        directory = tmp_path / "dir"
        directory.mkdir(mode=0o700)
        with pytest.raises(HSMError, match="not a regular file"):
            read_pin(pin_file=directory)

    def test_read_pin_file_not_utf8_refused(self, tmp_path: Path) -> None:
        with pytest.raises(HSMError, match="not UTF-8"):
            read_pin(pin_file=_pin_file(tmp_path, b"\xff\xfe"))


class TestReadPinEnv:
    def test_read_pin_env_returns_value(self) -> None:
        assert read_pin(pin_env="HSM_PIN", environ={"HSM_PIN": SECRET}) == SECRET

    def test_read_pin_env_strips_trailing_newline(self) -> None:
        assert read_pin(pin_env="HSM_PIN", environ={"HSM_PIN": SECRET + "\n"}) == SECRET

    def test_read_pin_env_defaults_to_process_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("HSM_TEST_PIN", SECRET)
        assert read_pin(pin_env="HSM_TEST_PIN") == SECRET

    def test_read_pin_env_missing_names_variable(self) -> None:
        with pytest.raises(HSMError, match="HSM_PIN is not set") as caught:
            read_pin(pin_env="HSM_PIN", environ={})
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_read_pin_env_empty_names_variable(self) -> None:
        with pytest.raises(HSMError, match="HSM_PIN is empty"):
            read_pin(pin_env="HSM_PIN", environ={"HSM_PIN": ""})


class TestReadPinSource:
    def test_read_pin_without_source_refused(self) -> None:
        with pytest.raises(HSMError, match="exactly one"):
            read_pin()

    def test_read_pin_with_two_sources_refused(self, tmp_path: Path) -> None:
        with pytest.raises(HSMError, match="exactly one"):
            read_pin(
                pin_file=_pin_file(tmp_path, b"x"), pin_env="HSM_PIN", environ={"HSM_PIN": "y"}
            )


class TestWritePinFile:
    def test_write_pin_file_is_owner_only_and_readable_back(self, tmp_path: Path) -> None:
        path = write_pin_file(tmp_path / "pin", SECRET)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert read_pin(pin_file=path) == SECRET

    def test_write_pin_file_tightens_existing_file(self, tmp_path: Path) -> None:
        path = _pin_file(tmp_path, b"old", 0o644)
        write_pin_file(path, SECRET)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert read_pin(pin_file=path) == SECRET
