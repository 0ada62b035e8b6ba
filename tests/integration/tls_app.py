"""A WSGI app for the TLS tests: answers the subject of SSL_CLIENT_CERT, or "none"."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cryptography import x509


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers the verified client certificate's subject and the TLS version."""
    cert_der = environ.get("SSL_CLIENT_CERT")
    subject = (
        "none"
        if cert_der is None
        else x509.load_der_x509_certificate(cert_der).subject.rfc4514_string()
    )
    chain = environ.get("SSL_CLIENT_CERT_CHAIN", ())
    body = f"{subject}\n{environ.get('SSL_PROTOCOL', '')}\n{len(chain)}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
