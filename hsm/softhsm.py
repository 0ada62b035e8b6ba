"""SoftHSM2 set-up for development and tests: configuration, token initialisation, discovery."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from hsm.errors import HSMError, HSMErrorKind
from hsm.token import Token

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

# Where Debian and Ubuntu (softhsm2 package, per architecture) and a source build put it.
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

# CK_TOKEN_INFO.label is 32 bytes of UTF-8, blank padded (PKCS#11 CK_TOKEN_INFO).
_MAX_LABEL_BYTES = 32
_SOFTHSM_TIMEOUT = 60


def find_softhsm_module() -> str:
    """Returns the path of libsofthsm2.so from the usual install locations."""
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    raise HSMError(
        HSMErrorKind.UNAVAILABLE,
        "SoftHSM2 is not installed (looked in " + ", ".join(MODULE_CANDIDATES) + "); "
        "install it with `apt-get install softhsm2`",
    )


@dataclass(frozen=True)
class SoftHSMToken:
    """Names an initialised SoftHSM token: its configuration file, directory, module, label."""

    conf_path: Path
    token_dir: Path
    module_path: str
    label: str

    def environ(self) -> dict[str, str]:
        """Returns the environment a subprocess needs to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def open(self, pin: str) -> Token:
        """Returns a Token for this SoftHSM token; nothing is loaded until first use."""
        return Token(self.module_path, self.label, pin, softhsm_conf=self.conf_path)


def write_softhsm_conf(directory: Path) -> Path:
    """Writes directory/softhsm2.conf with a file object store in directory/tokens."""
    directory = Path(directory).resolve()
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf_path = directory / "softhsm2.conf"
    text = (
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    # Rewriting an identical file is skipped so a running process never sees it half written.
    if not conf_path.exists() or conf_path.read_text() != text:
        conf_path.write_text(text)
    return conf_path


def softhsm_token_labels(conf_path: Path) -> list[str]:
    """Returns the labels of the initialised tokens under a SoftHSM configuration."""
    result = _softhsm_util(conf_path, ["--show-slots"], secrets_to_hide=())
    labels: list[str] = []
    for line in result.splitlines():
        stripped = line.strip()
        if stripped.startswith("Label:"):
            label = stripped[len("Label:") :].strip()
            if label:
                labels.append(label)
    return labels


def init_softhsm_token(
    directory: Path,
    label: str,
    *,
    so_pin: str,
    user_pin: str,
    module_path: str = DEFAULT_MODULE,
) -> SoftHSMToken:
    """Returns the SoftHSM token `label` under `directory`, initialising it if it is new."""
    _check_label(label)
    if not so_pin or not user_pin:
        raise HSMError(HSMErrorKind.INVALID, "SoftHSM token PINs must not be empty")
    conf_path = write_softhsm_conf(Path(directory))
    token = SoftHSMToken(
        conf_path=conf_path,
        token_dir=conf_path.parent / "tokens",
        module_path=module_path,
        label=label,
    )
    # A lock file serialises initialisation across processes (parallel test workers, two
    # services starting together), so "exists?" and "initialise" do not interleave.
    lock_path = conf_path.parent / ".init.lock"
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if label in softhsm_token_labels(conf_path):
                return token
            # softhsm2-util takes PINs only as arguments or interactively; they are briefly
            # visible in the process list of this machine, acceptable for the development
            # and test tokens this function is for. Production tokens come from a ceremony.
            _softhsm_util(
                conf_path,
                [
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--so-pin",
                    so_pin,
                    "--pin",
                    user_pin,
                ],
                secrets_to_hide=(so_pin, user_pin),
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return token


class SoftHSMStore:
    """Holds the one SoftHSM configuration and token directory a process's tokens share."""

    # SoftHSM reads SOFTHSM2_CONF once, in C_Initialize, and python-pkcs11 loads a module
    # once per process, so every token one process opens must live under one configuration.
    # New tokens are initialised into the shared token directory under fresh labels; Token
    # finds a token created after the module was loaded by re-initialising the module (see
    # _Library.reinitialize in hsm/token.py).

    def __init__(self, directory: Path, module_path: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.module_path = module_path if module_path is not None else find_softhsm_module()
        self.conf_path = write_softhsm_conf(self.directory)

    def create_token(self, label: str | None = None) -> tuple[SoftHSMToken, str]:
        """Returns a new token with random PINs (fresh random label unless given) and its PIN."""
        label = label if label is not None else "t-" + secrets.token_hex(8)
        user_pin = secrets.token_hex(8)
        token = init_softhsm_token(
            self.directory,
            label,
            so_pin=secrets.token_hex(8),
            user_pin=user_pin,
            module_path=self.module_path,
        )
        return token, user_pin

    def open_token(self, label: str | None = None) -> Token:
        """Returns an opened Token on a newly created token with random PINs."""
        token, user_pin = self.create_token(label)
        return token.open(user_pin)


_shared_store: SoftHSMStore | None = None
_shared_lock = threading.Lock()


def shared_softhsm_store(directory: Path, module_path: str | None = None) -> SoftHSMStore:
    """Returns this process's SoftHSMStore, creating it under `directory` on the first call."""
    # Later calls get the first store whatever directory they pass: a second configuration
    # could not be loaded into this process anyway.
    global _shared_store
    with _shared_lock:
        if _shared_store is None:
            _shared_store = SoftHSMStore(directory, module_path)
        return _shared_store


def _check_label(label: str) -> None:
    if not label or label != label.strip():
        raise HSMError(HSMErrorKind.INVALID, "token label must be non-empty without outer blanks")
    if len(label.encode("utf-8")) > _MAX_LABEL_BYTES:
        raise HSMError(HSMErrorKind.INVALID, f"token label {label!r} is longer than 32 bytes")


def _softhsm_util(conf_path: Path, arguments: list[str], secrets_to_hide: tuple[str, ...]) -> str:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise HSMError(
            HSMErrorKind.UNAVAILABLE,
            "softhsm2-util is not on PATH; install it with `apt-get install softhsm2`",
        )
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path))
    try:
        completed = subprocess.run(
            [tool, *arguments],
            env=env,
            capture_output=True,
            text=True,
            timeout=_SOFTHSM_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        # The exception text would carry the command line, PINs included: never chain it.
        raise HSMError(
            HSMErrorKind.UNAVAILABLE,
            f"softhsm2-util {arguments[0]} could not run: {type(exc).__name__}",
        ) from None
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        for secret in secrets_to_hide:
            output = output.replace(secret, "***")
        raise HSMError(
            HSMErrorKind.UNAVAILABLE,
            f"softhsm2-util {arguments[0]} failed with exit code {completed.returncode}: {output}",
        )
    return completed.stdout
