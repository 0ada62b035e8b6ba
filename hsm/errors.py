"""The one error type of the hsm package, and the mapping of PKCS#11 errors onto it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pkcs11 import exceptions as p11


class HSMErrorKind(StrEnum):
    """What went wrong, coarse enough for a caller to choose an HTTP status or an exit code."""

    UNAVAILABLE = "unavailable"
    LOGIN = "login"
    NOT_FOUND = "not_found"
    UNSUPPORTED = "unsupported"
    INVALID = "invalid"
    EXISTS = "exists"


class HSMError(Exception):
    """Raises any failure of the token, the module or our use of them; never carries a PIN."""

    def __init__(
        self, kind: HSMErrorKind | str, message: str, *, token_error: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = HSMErrorKind(kind)
        self.message = message
        # The PKCS#11 exception class the token raised (e.g. "AttributeSensitive"), so that
        # callers and tests can tell what the token said without importing pkcs11.
        self.token_error = token_error

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error intact across multiprocessing and pickling, where the default
        # would call HSMError(message) and lose the kind.
        return (type(self), (self.kind.value, self.message), {"token_error": self.token_error})

    def __repr__(self) -> str:
        return f"HSMError({self.kind.value!r}, {self.message!r})"


# PKCS#11 return values grouped by what a caller can do about them. Anything not listed is
# treated as the token being unusable ("unavailable"), which the API answers with 503.
_LOGIN = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
    p11.UserPinNotInitialized,
    p11.UserNotLoggedIn,
)
_NOT_FOUND = (p11.NoSuchKey,)
_UNSUPPORTED = (
    p11.MechanismInvalid,
    p11.FunctionNotSupported,
    p11.KeyTypeInconsistent,
    p11.FunctionRejected,
    p11.AttributeSensitive,
    p11.KeyUnextractable,
    p11.AttributeTypeInvalid,
)
_INVALID = (
    p11.ArgumentsBad,
    p11.AttributeValueInvalid,
    p11.AttributeReadOnly,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.DomainParamsInvalid,
    p11.KeySizeRange,
    p11.MechanismParamInvalid,
    p11.MultipleObjectsReturned,
    p11.MultipleTokensReturned,
    p11.TemplateIncomplete,
    p11.TemplateInconsistent,
)

# Errors that mean "this session or handle is stale" rather than "the token said no": after a
# fork, a C_Finalize by another Token on the same module, or a token re-insertion the session
# and object handles are gone, and one reopen-and-retry is the right answer.
STALE_SESSION_ERRORS = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.UserNotLoggedIn,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
)

# Errors after which retrying a login is pointless or harmful: every wrong PIN counts towards
# the token's lock-out (CKF_USER_PIN_LOCKED), so a wrong PIN is never retried.
NO_RETRY_LOGIN_ERRORS = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
    p11.UserPinNotInitialized,
)


# Errors that mean the module lost the token or itself (token removed, device failure, a
# token directory gone): the session pool is dropped and the module re-initialised before
# the next use. Any other refusal (a protected attribute, a vendor error code) leaves the
# sessions alone.
OUTAGE_ERRORS = (
    p11.GeneralError,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.FunctionFailed,
    p11.HostMemory,
    p11.NoSuchToken,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.SlotIDInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
)
_OUTAGE_NAMES = frozenset(cls.__name__ for cls in OUTAGE_ERRORS)


def is_outage(error: HSMError) -> bool:
    """Tells whether an error means the token or module is gone, rather than a refusal."""
    if error.kind is not HSMErrorKind.UNAVAILABLE:
        return False
    # Our own "unavailable" errors (module not loadable, token label missing) carry no
    # PKCS#11 name; those from the module count only if they are outage errors.
    return error.token_error is None or error.token_error in _OUTAGE_NAMES


def kind_of(exc: p11.PKCS11Error) -> HSMErrorKind:
    """Returns the kind a PKCS#11 exception maps to."""
    if isinstance(exc, _LOGIN):
        return HSMErrorKind.LOGIN
    if isinstance(exc, _NOT_FOUND):
        return HSMErrorKind.NOT_FOUND
    if isinstance(exc, _UNSUPPORTED):
        return HSMErrorKind.UNSUPPORTED
    if isinstance(exc, _INVALID):
        return HSMErrorKind.INVALID
    return HSMErrorKind.UNAVAILABLE


def from_pkcs11(exc: p11.PKCS11Error, action: str) -> HSMError:
    """Returns the HSMError for a PKCS#11 exception raised while doing `action`."""
    name = type(exc).__name__
    # python-pkcs11 messages hold at most search templates and paths, never a PIN; we add
    # them for diagnosis but keep the class name first because it is what the token said.
    detail = str(exc).strip()
    message = f"{action}: {name}" + (f" ({detail})" if detail else "")
    return HSMError(kind_of(exc), message, token_error=name)
