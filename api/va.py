"""The validation authority: OCSP (RFC 6960, RFC 5019), CRL and caIssuers downloads over HTTP.

A separate process from the CA front (`pki serve va`). It opens only the OCSP-signer keys
(through Runtime.load_key, lazily, after gunicorn forks) and never a CA key; CRLs are served as
the stored DER that `pki crl publish` signed.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import logging
import os
import threading

from cryptography.x509 import ocsp as x509_ocsp
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import http_date

from api import errors
from api.runtime import Runtime, domain_error
from pki.errors import ErrorKind, PKIError
from pki.ocsp import CertStatus, SingleAnswer, build_response
from pki.ocsp_responder import (
    NO_SIGNER,
    OCSPAnswer,
    OCSPResponder,
    OCSPResponderConfig,
    SignerSet,
    error_answer,
)
from pki.store import session_scope
from pki.store.repository import IssuerRepository
from pki.store.revocation_models import CRLRepository

log = logging.getLogger(__name__)

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
CRL_TYPE = "application/pkix-crl"
CERT_TYPE = "application/pkix-cert"
# An OCSP request for a few certificates is a few hundred octets; RFC 5019 §5 clients use
# GET below 255 octets. Anything far above is not an OCSP request.
MAX_OCSP_REQUEST = 16 * 1024
# CRLs and CA certificates change rarely but must not be cached past nextUpdate.
MAX_CRL_AGE = 3600
# nextUpdate of the throw-away response /healthz signs (it must be after thisUpdate).
HEALTH_PROBE_VALIDITY = datetime.timedelta(minutes=1)


class VA:
    """VA holds what one worker process opened: the signer set and the responder."""

    def __init__(self, runtime: Runtime, config: OCSPResponderConfig) -> None:
        self.runtime = runtime
        self.config = config
        self._lock = threading.Lock()
        self._responder: OCSPResponder | None = None
        self._signers: SignerSet | None = None

    @property
    def signers(self) -> SignerSet:
        with self._lock:
            if self._signers is None:
                rt = self.runtime
                # Only OCSP-signer keys, named by the pkcs11: URI of their certificates.
                self._signers = SignerSet(rt.db, rt.clock, rt.load_key)
            return self._signers

    @property
    def responder(self) -> OCSPResponder:
        signers = self.signers
        with self._lock:
            if self._responder is None:
                rt = self.runtime
                self._responder = OCSPResponder.standard(rt.db, rt.clock, signers, self.config)
            return self._responder


def _max_age(until: datetime.datetime, now: datetime.datetime, cap: int) -> int:
    return max(0, min(cap, int((until - now).total_seconds())))


@functools.lru_cache(maxsize=4096)
def _http_date(at: datetime.datetime) -> str:
    # Pre-signed responses of one run share thisUpdate and nextUpdate: format them once.
    return http_date(at)


def ocsp_headers(
    answer: OCSPAnswer, now: datetime.datetime, max_age_cap: int
) -> list[tuple[str, str]]:
    """The HTTP headers of an OCSP answer, for the Flask app and the OCSP worker alike."""
    headers = [("Content-Type", OCSP_RESPONSE_TYPE)]
    if not answer.cacheable or answer.this_update is None or answer.next_update is None:
        # A nonce response answers one request only; error responses are not cached either.
        headers.append(("Cache-Control", "no-store"))
        return headers
    # RFC 5019 §6.2: max-age "SHOULD be ... less than or equal to nextUpdate - now"; ETag,
    # Last-Modified (thisUpdate) and Expires (nextUpdate) let caches revalidate.
    max_age = _max_age(answer.next_update, now, max_age_cap)
    headers += [
        ("Cache-Control", f"max-age={max_age}, public, no-transform, must-revalidate"),
        ("ETag", f'"{answer.etag}"'),
        ("Last-Modified", _http_date(answer.this_update)),
        ("Expires", _http_date(answer.next_update)),
    ]
    return headers


def _ocsp_response(va: VA, answer: OCSPAnswer) -> Response:
    headers = ocsp_headers(answer, va.runtime.clock.now(), va.config.max_age_seconds)
    return Response(answer.der, status=200, headers=headers)


def answer_ocsp(va: VA, request_der: bytes) -> OCSPAnswer:
    """Answers one OCSP request; an outage of the token or database is tryLater, one line."""
    try:
        return va.responder.respond(request_der)
    except Exception as exc:
        error = domain_error(exc)
        if error is None:
            log.exception("OCSP failed")
        elif error.kind is ErrorKind.UNAVAILABLE:
            # RFC 6960 §2.3: tryLater, "Try again later"; the client retries.
            log.warning("OCSP tryLater: %s: %s", error.message, exc)
            return error_answer(x509_ocsp.OCSPResponseStatus.TRY_LATER)
        else:
            log.error("OCSP failed: %s", error.message)
    return error_answer(x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR)


def live_signing(va: VA) -> dict[str, str]:
    """Signs a throw-away response with every issuer's OCSP signer; "ok" or what failed."""
    signers = va.signers
    signers.refresh()
    now = va.runtime.clock.now()
    report: dict[str, str] = {}
    for issuer_id in signers.matchers():
        signer = signers.signer(issuer_id)
        if signer is None:
            report[issuer_id] = signers.problems.get(issuer_id, "no OCSP signer")
            continue
        # Serial 1 with status unknown: nothing is stored and nothing is sent.
        cert_id = signer.matcher.cert_id(1)
        probe = SingleAnswer(cert_id, CertStatus.unknown(), now, now + HEALTH_PROBE_VALIDITY)
        try:
            build_response(signer, [probe], now)
        except Exception as exc:
            error = domain_error(exc)
            if error is None or error.kind is not ErrorKind.UNAVAILABLE:
                raise
            report[issuer_id] = f"unavailable: {exc}"
            continue
        report[issuer_id] = "ok"
    return report


def decode_get(encoded: str) -> bytes | None:
    """Decodes the GET form: base64 of the DER, URL-encoded; RFC 6960 Appendix A.1."""
    # Some clients leave '+' unescaped and proxies turn it into a space.
    text = encoded.replace(" ", "+").lstrip("/")
    # A slash appended after the base64 is dropped; a final "/" that is the base64's own last
    # character (a length that is a multiple of 4) stays.
    if text.endswith("/") and len(text) % 4 == 1:
        text = text[:-1]
    if len(text) > MAX_OCSP_REQUEST * 2:
        return None
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def create_va_app(runtime: Runtime, config: OCSPResponderConfig | None = None) -> Flask:
    """Builds the VA app: /ocsp (GET, POST), /crl/<issuer>.crl, /ca/<issuer>.der, /healthz."""
    app = Flask(__name__)
    # Base64 may hold "//": keep the path as the client sent it.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_OCSP_REQUEST
    va = VA(runtime, config or runtime.ocsp_config())
    app.extensions["pki_va"] = va
    # A database or token outage on a download is 503 with Retry-After and one log line, as
    # on the CA front; OCSP answers its own outages with tryLater.
    errors.install(app, plain=True, translate=domain_error)

    def ocsp_post() -> Response:
        content_type = (request.mimetype or "").lower()
        if content_type and content_type != OCSP_REQUEST_TYPE:
            return Response("expected application/ocsp-request\n", 415, mimetype="text/plain")
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            return Response("OCSP request too large\n", 413, mimetype="text/plain")
        if len(body) > MAX_OCSP_REQUEST:
            return Response("OCSP request too large\n", 413, mimetype="text/plain")
        return _ocsp_response(va, answer_ocsp(va, body))

    def ocsp_get(encoded: str) -> Response:
        der = decode_get(encoded)
        if der is None:
            answer = error_answer(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        else:
            answer = answer_ocsp(va, der)
        response = _ocsp_response(va, answer)
        response.make_conditional(request)
        return response

    app.add_url_rule("/ocsp", "ocsp_post", ocsp_post, methods=["POST"])
    app.add_url_rule("/ocsp/", "ocsp_post_slash", ocsp_post, methods=["POST"])
    app.add_url_rule("/", "ocsp_post_root", ocsp_post, methods=["POST"])
    app.add_url_rule("/ocsp/<path:encoded>", "ocsp_get", ocsp_get, methods=["GET"])

    @app.get("/crl/<name>")
    def crl(name: str) -> Response:
        if name.endswith("-delta.crl"):
            issuer_id, is_delta = name[: -len("-delta.crl")], True
        elif name.endswith(".crl"):
            issuer_id, is_delta = name[: -len(".crl")], False
        else:
            abort(404)
        with session_scope(runtime.db) as session:
            repo = CRLRepository(session)
            # A delta is served only while it names the newest full CRL as its base.
            record = (
                repo.current_delta(issuer_id)
                if is_delta
                else repo.latest(issuer_id, is_delta=False)
            )
        if record is None or record.crl_der is None:
            abort(404)
        response = Response(record.crl_der, 200, mimetype=CRL_TYPE)
        now = runtime.clock.now()
        response.cache_control.max_age = _max_age(record.next_update, now, MAX_CRL_AGE)
        response.cache_control.public = True
        response.cache_control.no_transform = True
        response.set_etag(f"{issuer_id}-{record.crl_number}")
        response.last_modified = record.this_update
        response.expires = record.next_update
        response.make_conditional(request)
        return response

    @app.get("/ca/<name>")
    def ca_certificate(name: str) -> Response:
        if not name.endswith(".der"):
            abort(404)
        with session_scope(runtime.db) as session:
            record = IssuerRepository(session).find(name[: -len(".der")])
            cert_der = record.cert_der if record is not None else None
            digest = record.fingerprint_sha256 if record is not None else None
        if cert_der is None:
            abort(404)
        response = Response(cert_der, 200, mimetype=CERT_TYPE)
        response.cache_control.max_age = MAX_CRL_AGE
        response.cache_control.public = True
        if digest:
            response.set_etag(digest)
        response.make_conditional(request)
        return response

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        report: dict[str, object] = {}
        healthy = True
        try:
            runtime.db.ping()
            report["database"] = "ok"
        except PKIError as exc:
            report["database"] = exc.message
            healthy = False
        if healthy:
            try:
                signers = live_signing(va)
                report["ocsp_signers"] = signers
                # Each issuer with a signer must sign live; one without any is no failure.
                healthy = any(v == "ok" for v in signers.values()) and all(
                    v in ("ok", NO_SIGNER) for v in signers.values()
                )
            except PKIError as exc:  # the database failed while the signers reloaded
                report["ocsp_signers"] = f"unavailable: {exc.message}"
                healthy = False
        report["status"] = "ok" if healthy else "unavailable"
        return jsonify(report), 200 if healthy else 503

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return Response(f"{exc.name}\n", exc.code or 500, mimetype="text/plain")

    return app


def app_from_environment() -> Flask:
    """Builds the VA app from PKI_CONFIG_DIR and PKI_DATA_DIR, for `gunicorn 'api.va:...'`."""
    return create_va_app(
        Runtime.open(os.environ.get("PKI_CONFIG_DIR"), os.environ.get("PKI_DATA_DIR")).use_process(
            "va"
        )
    )
