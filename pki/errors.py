"""The one error type of the CA domain; api/errors.py maps its kind to an HTTP status."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, in terms a caller can act on."""

    BAD_REQUEST = "bad_request"  # malformed input: unparsable CSR, bad base64, bad field
    POLICY = "policy"  # well-formed input that the profile or policy refuses
    UNAUTHORIZED = "unauthorized"  # no or wrong credentials
    FORBIDDEN = "forbidden"  # credentials fine, not allowed to do this
    NOT_FOUND = "not_found"  # no such profile, issuer, certificate, device, label
    CONFLICT = "conflict"  # state does not allow it (already revoked with another reason...)
    TOO_LARGE = "too_large"  # input over a size limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # wrong content type
    UNAVAILABLE = "unavailable"  # token or database not reachable right now
    CONFIG = "config"  # configuration file is wrong
    INTERNAL = "internal"  # a bug or an invariant check that failed


class PKIError(Exception):
    """PKIError carries a kind and a message safe to show to the caller (never a secret)."""

    def __init__(self, kind: ErrorKind, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # What the audit log records about a refusal beyond the message (e.g. "unknown
        # device" behind a uniform 401); never shown to the caller.
        self.detail = detail

    def __repr__(self) -> str:
        return f"PKIError({self.kind.value}, {self.message!r})"


def bad_request(message: str) -> PKIError:
    return PKIError(ErrorKind.BAD_REQUEST, message)


def policy(message: str) -> PKIError:
    return PKIError(ErrorKind.POLICY, message)


def not_found(message: str) -> PKIError:
    return PKIError(ErrorKind.NOT_FOUND, message)


def conflict(message: str) -> PKIError:
    return PKIError(ErrorKind.CONFLICT, message)


def config_error(message: str) -> PKIError:
    return PKIError(ErrorKind.CONFIG, message)


def internal(message: str) -> PKIError:
    return PKIError(ErrorKind.INTERNAL, message)
