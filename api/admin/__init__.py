"""The admin API (bearer tokens with roles), mounted on the CA front.

Every call is authenticated before it touches anything (invariant 7): no or an unknown token
is 401, a role that may not do the call is 403. Every call that was let in is written to the
audit log with its outcome; refused ones (401, 403) are audited as refusals, folded per
token, address and minute (pki.refusal), so that a flood cannot grow the append-only log.
A revocation is a database write (see pki.revocation): the VA answers `revoked` from the
commit on, whatever this process holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request

from api.admin.devices import add_device_routes
from api.errors import error_response
from api.refusals import admin_refusal
from api.runtime import Runtime
from pki.admin_token import AdminIdentity, AdminTokenService, Role, require_role
from pki.errors import ErrorKind, PKIError, bad_request, not_found
from pki.est_config import load_est_config
from pki.refusal import RefusalRecorder
from pki.revocation import MAX_BULK, RevocationService, Revoked, parse_reason
from pki.serial import parse_serial, serial_hex
from pki.store import audit, session_scope
from pki.store.repository import CertificateRepository, certificate_summary

PREFIX = "/api/v1"
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
MAX_BODY = 4 * 1024 * 1024

READERS = frozenset({Role.OPERATOR, Role.AUDITOR})
REVOKERS = frozenset({Role.OPERATOR})


def _serial(text: str) -> str:
    """Parses a serial in the path; one that cannot exist is simply not found."""
    try:
        return serial_hex(parse_serial(text))
    except PKIError:
        raise not_found(f"no certificate with serial {text[:64]!r}") from None


def _revoked(r: Revoked) -> dict[str, Any]:
    return {"issuer": r.issuer_id, "serial": r.serial_hex, "reason": r.reason.value}


def _json_body() -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PKIError(ErrorKind.TOO_LARGE, "request body too large")
    if request.mimetype != "application/json":
        raise PKIError(ErrorKind.UNSUPPORTED_MEDIA, "expected application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{key} must be a string")
    return value


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def create_blueprint(runtime: Runtime) -> Blueprint:
    """Builds the admin API blueprint over a runtime's database and clock."""
    bp = Blueprint("admin_api", __name__, url_prefix=PREFIX)
    tokens = AdminTokenService(runtime.db, runtime.clock)
    revocations = RevocationService(runtime.db, runtime.clock)
    refusals = RefusalRecorder(runtime.db, runtime.clock)
    proxies = load_est_config(runtime.config).proxy_networks()

    def identity(allowed: frozenset[Role]) -> AdminIdentity:
        ident: AdminIdentity = g.admin_identity
        require_role(ident, allowed)
        return ident

    @bp.before_request
    def _authenticate() -> None:
        g.admin_identity = None
        if request.endpoint == "admin_api.openapi":
            return
        g.admin_identity = tokens.authenticate(_bearer())

    @bp.after_request
    def _audit(response: Response) -> Response:
        ident: AdminIdentity | None = g.get("admin_identity")
        if ident is not None and response.status_code not in (401, 403):
            now = runtime.clock.now()
            try:
                with session_scope(runtime.db) as session:
                    audit.append(
                        session,
                        at=now,
                        actor=ident.actor,
                        action="admin.call",
                        target=f"{request.method} {request.path}"[:512],
                        details={"role": ident.role.value, "status": response.status_code},
                    )
            except PKIError as error:
                # A call that cannot be audited is answered as failed, never as a 500.
                if error.kind is not ErrorKind.UNAVAILABLE:
                    raise
                response = error_response(error)
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.errorhandler(PKIError)
    def _error(error: PKIError) -> Response:
        ident: AdminIdentity | None = g.get("admin_identity")
        admin_refusal(refusals, error, ident.actor if ident else None, proxies)
        response = error_response(error)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="pki-admin"'
        return response

    @bp.get("/openapi.yaml")
    def openapi() -> Response:
        if not OPENAPI.exists():
            raise not_found("openapi.yaml is not installed")
        return Response(OPENAPI.read_bytes(), 200, mimetype="application/yaml")

    @bp.get("/certificates/<serial>")
    def certificate(serial: str) -> Response:
        identity(READERS)
        wanted = _serial(serial)
        with session_scope(runtime.db) as session:
            record = CertificateRepository(session).by_serial(wanted, request.args.get("issuer"))
            return jsonify(certificate_summary(record))

    @bp.post("/certificates/<serial>/revoke")
    def revoke(serial: str) -> Response:
        ident = identity(REVOKERS)
        wanted = _serial(serial)
        body = _json_body()
        reason = parse_reason(body.get("reason", "unspecified"))
        result = revocations.revoke(
            wanted,
            reason,
            actor=ident.actor,
            issuer_id=_optional_str(body, "issuer"),
            allow_guarded=ident.role is Role.ADMIN,
        )
        return jsonify({**_revoked(result), "changed": result.changed})

    @bp.post("/certificates/<serial>/release")
    def release(serial: str) -> Response:
        ident = identity(REVOKERS)
        wanted = _serial(serial)
        body = _json_body() if request.content_length else {}
        result = revocations.release(
            wanted,
            actor=ident.actor,
            issuer_id=_optional_str(body, "issuer"),
            allow_guarded=ident.role is Role.ADMIN,
        )
        return jsonify({"issuer": result.issuer_id, "serial": result.serial_hex, "released": True})

    @bp.post("/revocations")
    def bulk_revoke() -> Response:
        ident = identity(REVOKERS)
        body = _json_body()
        reason = parse_reason(body.get("reason", "unspecified"))
        devices = body.get("devices", [])
        batch = _optional_str(body, "batch")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise bad_request("devices must be a list of device ids")
        if len(devices) > MAX_BULK:
            raise bad_request(f"at most {MAX_BULK} devices per call")
        result = revocations.revoke_devices(
            device_ids=devices, batch=batch, reason=reason, actor=ident.actor
        )
        return jsonify(
            {"devices": list(result.devices), "revoked": [_revoked(r) for r in result.revoked]}
        )

    add_device_routes(bp, runtime, identity, _json_body)
    return bp


def register(app: Flask, runtime: Runtime) -> None:
    """Mounts the admin API on an app."""
    app.register_blueprint(create_blueprint(runtime))
