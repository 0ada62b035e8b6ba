"""The EST endpoints (RFC 7030) under /.well-known/est/ and /.well-known/est/<label>/.

Each view checks the label, the credentials' presence, the content type, the size and the
base64 of the body before the domain sees anything (DESIGN.md invariant 6); the domain
(`pki.enrollment.EnrollmentService`) gets bytes and a `ClientIdentity`, never the request.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, Response, request
from werkzeug.exceptions import ClientDisconnected

from api.auth import client_identity
from api.est import wire
from pki.enrollment import ApprovalPending, Enrolled, EnrollmentService, KeyGenerated
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig
from pki.identity import ClientIdentity
from pki.naming import expected_attributes
from pki.serverkeygen import pkcs8_der

PREFIX = "/.well-known/est"

# The base64 CTE header is gone in RFC 8951, but RFC 7030 clients may still look for it,
# and it says nothing false.
_CTE = {"Content-Transfer-Encoding": "base64"}


def _identity(est: ESTConfig) -> ClientIdentity:
    return client_identity(
        request.environ,
        proxies=est.proxy_networks(),
        proxy_cert_header=est.proxy_cert_header,
    )


def _body(est: ESTConfig) -> bytes:
    """Reads a base64 PKCS#10 body: right type, within the size limit, valid base64."""
    wire.check_content_type(request.headers.get("Content-Type"), wire.PKCS10_CONTENT_TYPE)
    limit = est.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PKIError(ErrorKind.TOO_LARGE, f"body is over the limit of {limit} bytes")
    try:
        raw = request.stream.read(limit + 1)
    except ClientDisconnected:
        raise PKIError(ErrorKind.BAD_REQUEST, "body ended early") from None
    return wire.decode_base64_body(raw, limit=limit)


def _require_credentials(identity: ClientIdentity) -> None:
    # RFC 7030 3.2.3: without any credentials, answer 401 with WWW-Authenticate at once.
    if identity.basic is None and not identity.has_certificate:
        raise PKIError(ErrorKind.UNAUTHORIZED, "authentication required")


def _base64(der: bytes) -> bytes:
    # LF line ends, not the CRLF of wire.encode_base64_body: `base64 -d` (coreutils) refuses
    # CR, and every EST client's decoder takes LF. The multipart body keeps MIME's CRLF.
    return wire.encode_base64_body(der).replace(b"\r\n", b"\n")


def _certs_response(certs_der: list[bytes]) -> Response:
    body = _base64(wire.certs_only(certs_der))
    return Response(body, status=200, content_type=wire.CERTS_ONLY_CONTENT_TYPE, headers=_CTE)


def _pending(result: ApprovalPending) -> Response:
    # RFC 7030 4.2.3: 202 with Retry-After; the client repeats the same request later.
    return Response(
        f"request {result.approval_id} for device {result.device_id} waits for approval\n",
        status=202,
        mimetype="text/plain",
        headers={"Retry-After": str(result.retry_after)},
    )


def _enrolled(result: Enrolled) -> Response:
    # RFC 7030 4.2.3: a certs-only response "containing only the certificate that was issued".
    return _certs_response([result.cert_der])


def _keygen(result: KeyGenerated) -> Response:
    if result.encrypted_key_der is not None:
        key_part = (wire.SERVER_GENERATED_KEY_CONTENT_TYPE, result.encrypted_key_der)
    else:
        key_part = (wire.PKCS8_CONTENT_TYPE, pkcs8_der(result.key))
    cert_part = (wire.CERTS_ONLY_CONTENT_TYPE, wire.certs_only([result.enrolled.cert_der]))
    content_type, body = wire.multipart_mixed([key_part, cert_part])
    return Response(body, status=200, content_type=content_type)


def create_blueprint(service: EnrollmentService, est: ESTConfig) -> Blueprint:
    """Builds the EST blueprint over an enrollment service. See RFC 7030 3.2.2."""
    bp = Blueprint("est", __name__, url_prefix=PREFIX)

    @bp.after_request
    def _close_after_oversize(response: Response) -> Response:
        # The rest of an oversize body is not worth reading: end the connection instead.
        if response.status_code == 413:
            response.headers["Connection"] = "close"
        return response

    def route(path: str, methods: list[str], view: Callable[[str | None], Response]) -> None:
        name = path.strip("/")

        def unlabelled() -> Response:
            return view(None)

        def labelled(label: str) -> Response:
            return view(label)

        bp.add_url_rule(path, f"{name}", unlabelled, methods=methods)
        bp.add_url_rule(f"/<label>{path}", f"{name}_label", labelled, methods=methods)

    def cacerts(label: str | None) -> Response:
        """Distribution of CA certificates. See RFC 7030 4.1."""
        chain = service.cacerts(label)
        return _certs_response([c.public_bytes(Encoding.DER) for c in chain])

    def simpleenroll(label: str | None) -> Response:
        """Enrollment of clients. See RFC 7030 4.2.1."""
        service.label(label)
        identity = _identity(est)
        _require_credentials(identity)
        result = service.enroll(_body(est), label, identity)
        if isinstance(result, ApprovalPending):
            return _pending(result)
        return _enrolled(result)

    def simplereenroll(label: str | None) -> Response:
        """Re-enrollment of clients. See RFC 7030 4.2.2."""
        service.label(label)
        identity = _identity(est)
        if not identity.has_certificate:
            raise PKIError(
                ErrorKind.UNAUTHORIZED, "re-enrollment needs the current certificate over TLS"
            )
        return _enrolled(service.reenroll(_body(est), label, identity))

    def csrattrs(label: str | None) -> Response:
        """CSR attributes the label's profile wants. See RFC 7030 4.5."""
        profile = service.profile(label)
        items: list[str | wire.CsrAttribute] = []
        preferred = profile.key_types[0]
        if preferred.startswith("ec-"):
            curve = wire.OID_SECP384R1 if preferred == "ec-p384" else wire.OID_SECP256R1
            items.append(wire.ec_public_key_attribute(curve))
            hash_oid = (
                wire.OID_ECDSA_WITH_SHA384 if preferred == "ec-p384" else wire.OID_ECDSA_WITH_SHA256
            )
            items.append(hash_oid)
        else:
            items.append(wire.rsa_key_size_attribute(int(preferred.split("-")[1])))
        # The subject attribute types the CA writes for the device (their values come from
        # the registry), and subjectAltName when it writes SAN entries too.
        items.extend(oid.dotted_string for oid in expected_attributes(profile))
        if profile.identity is not None and profile.identity.san:
            items.append(wire.OID_SUBJECT_ALT_NAME)
        body = _base64(wire.csr_attrs(items))
        return Response(body, status=200, content_type=wire.CSRATTRS_CONTENT_TYPE, headers=_CTE)

    def serverkeygen(label: str | None) -> Response:
        """Server-side key generation. See RFC 7030 4.4."""
        service.label(label)
        identity = _identity(est)
        _require_credentials(identity)
        result = service.serverkeygen(_body(est), label, identity)
        if isinstance(result, ApprovalPending):
            return _pending(result)
        return _keygen(result)

    route("/cacerts", ["GET"], cacerts)
    route("/simpleenroll", ["POST"], simpleenroll)
    route("/simplereenroll", ["POST"], simplereenroll)
    route("/csrattrs", ["GET"], csrattrs)
    route("/serverkeygen", ["POST"], serverkeygen)
    return bp
