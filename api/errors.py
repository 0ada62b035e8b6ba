"""The HTTP edge of the domain error: PKIError kinds to status codes and readable bodies."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from pki.errors import ErrorKind, PKIError

log = logging.getLogger(__name__)

# Seconds a client is asked to wait after a 503: the token's back-off tops out at 4 s and a
# database restart takes a few seconds more.
RETRY_AFTER = 30

Translate = Callable[[Exception], PKIError | None]

STATUS = {
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.POLICY: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.CONFIG: 500,
    ErrorKind.INTERNAL: 500,
}


BASIC_CHALLENGE = 'Basic realm="est", charset="UTF-8"'


def status_for(error: PKIError) -> int:
    """Returns the HTTP status for a domain error."""
    return STATUS[error.kind]


def error_response(error: PKIError, *, plain: bool = False) -> Response:
    """Builds the response for a domain error: JSON for APIs, text/plain for EST clients."""
    status = status_for(error)
    if status == 503:
        # One line per refused request and no traceback.
        log.warning("%s %s: %s", request.method, request.path, describe(error))
    # Internal and configuration errors say no more than that: details go to the log.
    message = error.message if status < 500 or status == 503 else "internal error"
    if plain and status == 401:
        # EST: every failed login alike, the challenge and an empty body. RFC 7030 clients
        # send credentials only after the challenge, and some abort on a 401 with a body;
        # and which failure it was (unknown device, wrong or used secret, lock-out) must not
        # show. The refusal audit keeps the reason.
        response = Response(b"", status=status, mimetype="text/plain")
    elif plain:
        response = Response(message + "\n", status=status, mimetype="text/plain")
    else:
        response = jsonify({"error": error.kind.value, "message": message})
        response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = BASIC_CHALLENGE
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


def describe(error: BaseException) -> str:
    """One line for the log: the error and the first line of its cause (the driver's or the
    token's words, never a statement or its parameters)."""
    text = error.message if isinstance(error, PKIError) else str(error)
    cause = error.__cause__
    if cause is None:
        return text
    lines = str(cause).strip().splitlines()
    return f"{text} ({type(cause).__name__}: {lines[0] if lines else ''})"


def install(
    app: Flask,
    *,
    plain: bool = False,
    observe: Callable[[PKIError], None] | None = None,
    translate: Translate | None = None,
) -> None:
    """Maps PKIError, and what `translate` turns into one, to responses for every view of an
    app; `observe` sees each error first."""

    @app.errorhandler(PKIError)
    def _handle(error: PKIError) -> Response:
        if observe is not None:
            observe(error)
        if status_for(error) >= 500 and status_for(error) != 503:
            app.logger.error("request failed: %s", error.message)
        return error_response(error, plain=plain)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response | HTTPException:
        if isinstance(error, HTTPException):
            return error
        domain = translate(error) if translate is not None else None
        if domain is not None:
            if domain.__cause__ is None:
                domain.__cause__ = error
            return _handle(domain)
        log.exception("unexpected error")
        return error_response(PKIError(ErrorKind.INTERNAL, "internal error"), plain=plain)
