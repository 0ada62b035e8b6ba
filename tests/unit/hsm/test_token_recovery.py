"""Token outages against a real SoftHSM2: a wrong PIN is tried once, an outage heals itself."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import exceptions as p11

import hsm.token
from hsm import HSMECPrivateKey, HSMError, SoftHSMStore, Token
from hsm.errors import HSMErrorKind

ECDSA = ec.ECDSA(hashes.SHA256())
RECOVERY_DEADLINE = 10.0


class LoginSpy:
    """Wraps python-pkcs11 Token objects so that each C_Login (open with a PIN) is counted."""

    def __init__(self, find_token: Callable[[str], Any]) -> None:
        self.find_token = find_token
        self.logins = 0
        # Errors to raise instead of the next logins, as a racing process would see them.
        self.fail_next: list[p11.PKCS11Error] = []

    def __call__(self, label: str) -> Any:
        return _SpiedToken(self, self.find_token(label))


class _SpiedToken:
    def __init__(self, spy: LoginSpy, token: Any) -> None:
        self._spy = spy
        self._token = token

    def open(self, **kwargs: Any) -> Any:
        if "user_pin" in kwargs:
            self._spy.logins += 1
            if self._spy.fail_next:
                raise self._spy.fail_next.pop(0)
        return self._token.open(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._token, name)


@pytest.fixture
def login_spy(softhsm_token: Token, monkeypatch: pytest.MonkeyPatch) -> LoginSpy:
    library = hsm.token._library_for(softhsm_token.module_path)
    spy = LoginSpy(library.find_token)
    monkeypatch.setattr(library, "find_token", spy)
    return spy


def _sign_and_verify(key: HSMECPrivateKey, data: bytes) -> None:
    key.public_key().verify(key.sign(data, ECDSA), data, ECDSA)


def test_wrong_pin_is_tried_once_per_token_object(
    softhsm_token: Token, login_spy: LoginSpy
) -> None:
    softhsm_token.close()
    wrong = "wrong-" + secrets.token_hex(6)
    token = Token(softhsm_token.module_path, softhsm_token.label, wrong)
    for _ in range(20):
        with pytest.raises(HSMError) as caught:
            token.ping()
        assert caught.value.kind is HSMErrorKind.LOGIN
        assert caught.value.token_error == "PinIncorrect"
        assert wrong not in str(caught.value)
    with pytest.raises(HSMError):
        token.load_key("anything")
    assert login_spy.logins == 1


def test_login_race_error_is_retried_but_not_a_pin_error(
    softhsm_token: Token, login_spy: LoginSpy
) -> None:
    softhsm_token.close()
    login_spy.fail_next = [p11.GeneralError(), p11.GeneralError()]
    softhsm_token.ping()
    assert login_spy.logins == 3


def test_token_directory_away_and_back_recovers_without_a_new_token(
    softhsm_store: SoftHSMStore, tmp_path: Path
) -> None:
    tokens = softhsm_store.directory / "tokens"
    before = set(tokens.iterdir())
    token = softhsm_store.open_token()
    (token_dir,) = set(tokens.iterdir()) - before
    key = token.generate_key("ca", "ec-p256")
    assert isinstance(key, HSMECPrivateKey)
    _sign_and_verify(key, b"before")
    away = tmp_path / "away"
    shutil.move(token_dir, away)
    try:
        for _ in range(3):
            with pytest.raises(HSMError) as caught:
                _sign_and_verify(key, b"during")
            assert caught.value.kind is HSMErrorKind.UNAVAILABLE
    finally:
        shutil.move(away, token_dir)
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while True:
        try:
            _sign_and_verify(key, b"after")
            break
        except HSMError as exc:
            assert exc.kind is HSMErrorKind.UNAVAILABLE
            assert time.monotonic() < deadline, f"token did not come back: {exc}"
            time.sleep(0.05)
    token.ping()
    token.close()


def test_no_module_call_during_the_back_off(
    softhsm_token: Token, login_spy: LoginSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hsm.token, "RECOVERY_FIRST_PAUSE", 3600.0)
    missing = Token(softhsm_token.module_path, "gone-" + secrets.token_hex(4), "1234")
    with pytest.raises(HSMError, match="no token labelled"):
        missing.ping()
    library = hsm.token._library_for(softhsm_token.module_path)
    rescans = 0
    real = library.reinitialize

    def counted() -> None:
        nonlocal rescans
        rescans += 1
        real()

    monkeypatch.setattr(library, "reinitialize", counted)
    for _ in range(10):
        with pytest.raises(HSMError, match="next attempt in") as caught:
            missing.ping()
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE
    assert rescans == 0
    assert login_spy.logins == 0
    # Other tokens of the module are not held back; the first use re-initialises it once.
    softhsm_token.ping()
    assert rescans == 1
