"""PINs come from a file or an environment variable, never from config or a URI."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from hsm.errors import HSMError, HSMErrorKind


def read_pin(
    *,
    pin_file: str | os.PathLike[str] | None = None,
    pin_env: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Returns the PIN read from exactly one of `pin_file` or the variable `pin_env`."""
    if (pin_file is None) == (pin_env is None):
        raise HSMError(HSMErrorKind.INVALID, "give exactly one of pin_file or pin_env")
    if pin_file is not None:
        return _read_pin_file(Path(pin_file))
    assert pin_env is not None
    env = os.environ if environ is None else environ
    value = env.get(pin_env)
    if value is None:
        raise HSMError(HSMErrorKind.INVALID, f"PIN variable {pin_env} is not set")
    pin = _strip_newline(value)
    if not pin:
        raise HSMError(HSMErrorKind.INVALID, f"PIN variable {pin_env} is empty")
    return pin


def write_pin_file(path: str | os.PathLike[str], pin: str) -> Path:
    """Writes `pin` to `path` readable by the owner only, for tests and provisioning scripts."""
    target = Path(path)
    # O_EXCL is not used so that a re-run replaces the file; the mode is set at creation and
    # again afterwards because an existing file keeps its old mode.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pin.encode("utf-8") + b"\n")
    finally:
        os.close(fd)
    return target


def _read_pin_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise HSMError(HSMErrorKind.INVALID, f"PIN file {path} does not exist") from None
    except OSError as exc:
        raise HSMError(
            HSMErrorKind.INVALID, f"PIN file {path} cannot be opened: {exc.strerror}"
        ) from None
    try:
        # Check the mode of the file we opened, not of the path, so a swap between the check
        # and the read cannot slip a different file in.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HSMError(HSMErrorKind.INVALID, f"PIN file {path} is not a regular file")
        # Like ssh with a private key: a secret that group or others can read (or write) is
        # refused rather than used, so a careless deployment fails loudly at start-up.
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise HSMError(
                HSMErrorKind.INVALID,
                f"PIN file {path} is accessible by group or others (mode {mode:04o}); "
                "run chmod 600 on it",
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read()
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HSMError(HSMErrorKind.INVALID, f"PIN file {path} is not UTF-8") from None
    pin = _strip_newline(text)
    if not pin:
        raise HSMError(HSMErrorKind.INVALID, f"PIN file {path} is empty")
    return pin


def _strip_newline(value: str) -> str:
    # Only the line ending an editor or `echo` adds is removed; other whitespace may be part
    # of the PIN.
    if value.endswith("\r\n"):
        return value[:-2]
    if value.endswith("\n"):
        return value[:-1]
    return value
