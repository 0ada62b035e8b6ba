"""The edges' part of auditing refusals: which refusal an error is, whom it named, from where.

The domain raises PKIError; the CA front turns a refused EST request or admin call into one
`pki.refusal.RefusalRecorder.refused` call here, so every refusal is audited in one place
whatever part of the domain refused it. A first EST request without credentials is the
protocol's challenge (RFC 7030 3.2.3), not a refusal, and is not audited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography import x509
from cryptography.x509.oid import NameOID
from flask import request

from api.auth import ProxyNetworks, client_address, client_identity
from api.errors import status_for
from pki.errors import PKIError
from pki.identity import ClientIdentity
from pki.naming import NAME_MISMATCH
from pki.refusal import RefusalKind, RefusalRecorder

log = logging.getLogger(__name__)

REENROLL_ENDPOINTS = frozenset({"est.simplereenroll", "est.simplereenroll_label"})


def _named(identity: ClientIdentity) -> str | None:
    """Returns whom a request claimed to be: the Basic user, else the certificate's name."""
    if identity.basic is not None:
        return identity.basic.username
    if not identity.has_certificate:
        return None
    try:
        subject = x509.load_der_x509_certificate(identity.tls_chain_der[0]).subject
    except ValueError:
        return None
    for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
        values = subject.get_attributes_for_oid(oid)
        if values:
            return str(values[0].value)
    return None


THROTTLED = "throttled"  # the detail pki.device gives a login refused by its throttle


def est_kind(
    status: int, reenroll: bool, identity: ClientIdentity, detail: str | None = None
) -> RefusalKind | None:
    """Says which refusal an EST error status is, or None when it is not one."""
    # A throttled login answers the same 401 as any failed one; only its detail tells.
    if status == 429 or detail == THROTTLED:
        return RefusalKind.THROTTLE
    if reenroll and status in (401, 403, 409):
        return RefusalKind.REENROLL
    if status == 401:
        has_credentials = identity.basic is not None or identity.has_certificate
        return RefusalKind.LOGIN if has_credentials else None
    if status == 403:
        return RefusalKind.IDENTITY
    if status == 400 and detail is not None and detail.startswith(NAME_MISMATCH):
        return RefusalKind.IDENTITY  # a CSR naming what the CA does not write for the device
    return None


def _record(
    recorder: RefusalRecorder, kind: RefusalKind, error: PKIError, source: str, subject: str | None
) -> None:
    try:
        recorder.refused(kind, error.detail or error.message, source=source, subject=subject)
    except Exception as e:  # the refusal stands even when its audit cannot be written
        log.error("refusal not audited (%s from %s): %s", kind.value, source, e)


def est_refusal_hook(
    recorder: RefusalRecorder, proxies: ProxyNetworks, proxy_cert_header: str
) -> Callable[[PKIError], None]:
    """Returns the error hook that audits refused EST requests of the current request."""

    def hook(error: PKIError) -> None:
        if request.blueprint != "est":
            return
        try:
            identity = client_identity(
                request.environ, proxies=proxies, proxy_cert_header=proxy_cert_header
            )
        except PKIError:  # credentials that do not even parse: the address is all we have
            identity = ClientIdentity(address=client_address(request.environ, proxies))
        reenroll = request.endpoint in REENROLL_ENDPOINTS
        kind = est_kind(status_for(error), reenroll, identity, error.detail)
        if kind is not None:
            _record(recorder, kind, error, identity.address, _named(identity))

    return hook


def admin_refusal(
    recorder: RefusalRecorder, error: PKIError, subject: str | None, proxies: ProxyNetworks = ()
) -> None:
    """Audits a refused admin call: a bad bearer token (401) or a role that may not (403)."""
    status = status_for(error)
    kinds = {401: RefusalKind.LOGIN, 403: RefusalKind.ROLE}
    if status not in kinds:
        return
    reason = f"{request.method} {request.path}: {error.message}"[:200]
    _record(
        recorder,
        kinds[status],
        PKIError(error.kind, reason),
        client_address(request.environ, proxies),
        subject,
    )
