"""Tests for HSMError and the mapping of PKCS#11 exceptions onto it."""

from __future__ import annotations

import pickle

import pytest
from pkcs11 import exceptions as p11

from hsm import HSMError
from hsm.errors import HSMErrorKind, from_pkcs11


class TestHSMError:
    def test_kind_accepts_string(self) -> None:
        error = HSMError("not_found", "no key 'x'")
        assert error.kind is HSMErrorKind.NOT_FOUND
        assert str(error) == "no key 'x'"

    def test_unknown_kind_refused(self) -> None:
        with pytest.raises(ValueError, match="bogus"):
            HSMError("bogus", "message")

    def test_pickle_round_trip_keeps_kind_and_token_error(self) -> None:
        error = HSMError("login", "log in failed", token_error="PinIncorrect")
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert (copy.kind, copy.message, copy.token_error) == (
            HSMErrorKind.LOGIN,
            "log in failed",
            "PinIncorrect",
        )


class TestFromPKCS11:
    @pytest.mark.parametrize(
        ("exc", "kind"),
        [
            (p11.PinIncorrect(), HSMErrorKind.LOGIN),
            (p11.PinLocked(), HSMErrorKind.LOGIN),
            (p11.NoSuchKey("No key matching"), HSMErrorKind.NOT_FOUND),
            (p11.MechanismInvalid(), HSMErrorKind.UNSUPPORTED),
            (p11.AttributeSensitive(), HSMErrorKind.UNSUPPORTED),
            (p11.TemplateInconsistent(), HSMErrorKind.INVALID),
            (p11.DeviceRemoved(), HSMErrorKind.UNAVAILABLE),
            (p11.TokenNotPresent(), HSMErrorKind.UNAVAILABLE),
            (p11.GeneralError(), HSMErrorKind.UNAVAILABLE),
            (p11.PKCS11Error("OS exception while loading x.so"), HSMErrorKind.UNAVAILABLE),
        ],
    )
    def test_kind_mapping(self, exc: p11.PKCS11Error, kind: HSMErrorKind) -> None:
        error = from_pkcs11(exc, "do something")
        assert error.kind is kind
        assert error.token_error == type(exc).__name__
        assert str(error).startswith(f"do something: {type(exc).__name__}")
