"""TLS for the CA front under gunicorn: the server context and the verified peer certificate.

gunicorn wraps each client socket with `ssl` but leaves the peer certificate out of the WSGI
environ. The worker classes here wrap the application so that every request carries:

- ``SSL_CLIENT_CERT``: DER of the client's leaf certificate, present only when the client sent
  one and it verified against the client CA files;
- ``SSL_CLIENT_CERT_CHAIN``: tuple of DER certificates as the client sent them, leaf first
  (leaf and intermediates). The application builds and checks the path to the anchors it
  trusts for the request itself (pki/idevid.py); the handshake only proved that some path
  to some client CA exists and that the client holds the leaf's key;
- ``SSL_PROTOCOL``: the negotiated version, e.g. ``"TLSv1.3"``.

gunicorn config file (``-c``)::

    from api.tls import ssl_context_hook
    worker_class = "api.tls.PeerCertThreadWorker"
    certfile = "/etc/pki/ca-front/tls.crt"
    keyfile = "/etc/pki/ca-front/tls.key"
    ssl_context = ssl_context_hook(["/etc/pki/ca-front/device-ca.pem"])
    # gunicorn 27 opens a control socket at $HOME/.gunicorn/gunicorn.ctl by default: give each
    # process (CA front, VA) its own, or set control_socket_disable = True.
    control_socket = "/run/pki/ca-front.ctl"
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker

from pki.errors import config_error

SSL_CLIENT_CERT = "SSL_CLIENT_CERT"
SSL_CLIENT_CERT_CHAIN = "SSL_CLIENT_CERT_CHAIN"
SSL_PROTOCOL = "SSL_PROTOCOL"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
SSLContextHook = Callable[[Any, Callable[[], ssl.SSLContext]], ssl.SSLContext]


def server_ssl_context(
    certfile: str,
    keyfile: str,
    client_ca_files: Sequence[str],
    *,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """Builds the server context: TLS 1.2 or later, optional client certificates, verified."""
    # RFC 8996 (which updates RFC 7030): "TLS 1.1 MUST NOT be used", nor TLS 1.0.
    if minimum_version < ssl.TLSVersion.TLSv1_2:
        raise config_error("TLS below 1.2 is not offered")
    if not client_ca_files:
        raise config_error("client certificate verification needs at least one CA file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum_version
    context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    # CERT_OPTIONAL: a client may come without a certificate (first enrollment with a password),
    # but a certificate that is presented must verify, or the handshake fails.
    context.verify_mode = ssl.CERT_OPTIONAL
    for ca_file in client_ca_files:
        context.load_verify_locations(cafile=ca_file)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def ssl_context_hook(
    client_ca_files: Sequence[str],
    *,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> SSLContextHook:
    """Returns a gunicorn `ssl_context` server hook that serves `server_ssl_context`."""
    ca_files = tuple(client_ca_files)
    cache: dict[tuple[str, str], ssl.SSLContext] = {}
    lock = threading.Lock()

    def ssl_context(
        config: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        # gunicorn asks for a context on every accepted connection; build one per worker
        # process (after the fork) and reuse it. A HUP replaces the workers, reloading files.
        key = (str(config.certfile), str(config.keyfile))
        with lock:
            context = cache.get(key)
            if context is None:
                context = server_ssl_context(
                    key[0], key[1], ca_files, minimum_version=minimum_version
                )
                cache[key] = context
        return context

    return ssl_context


def peer_environ(sock: object) -> dict[str, Any]:
    """Reads the verified peer certificate and protocol from a TLS socket as environ entries."""
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    entries: dict[str, Any] = {}
    version = sock.version()
    if version is not None:
        entries[SSL_PROTOCOL] = version
    leaf = sock.getpeercert(binary_form=True)
    if leaf:
        sent = tuple(_der(cert) for cert in _unverified_chain(sock))
        # OpenSSL keeps the leaf first in what the client sent; fall back to it alone.
        entries[SSL_CLIENT_CERT] = leaf
        entries[SSL_CLIENT_CERT_CHAIN] = sent if sent and sent[0] == leaf else (leaf,)
    return entries


def _unverified_chain(sock: ssl.SSLSocket) -> list[object]:
    """Returns the certificates the peer sent (SSL_get_peer_cert_chain), leaf first."""
    # Python 3.13 made it public as SSLSocket.get_unverified_chain(); 3.10 to 3.12 have the
    # same C function on the private _ssl._SSLSocket object behind the SSLSocket. An
    # interpreter without either gives the leaf alone, and a label can then list the
    # manufacturer intermediates in est.toml (manufacturer_intermediates).
    public = getattr(sock, "get_unverified_chain", None)
    if public is None:
        public = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if public is None:
        return []
    chain = public()
    return list(chain) if chain else []


def _der(cert: object) -> bytes:
    if isinstance(cert, bytes):
        return cert
    public_bytes = getattr(cert, "public_bytes", None)
    if public_bytes is None:
        raise TypeError("verified chain entry is neither bytes nor a certificate")
    encoding = getattr(ssl, "ENCODING_DER", 2)
    der: bytes = public_bytes(encoding)
    return der


class PeerCertMiddleware:
    """PeerCertMiddleware adds the TLS peer certificate from gunicorn's socket to the environ."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # Only this middleware may set these keys; nothing a client sends can pre-fill them
        # (headers arrive as HTTP_*), but clear them so no other layer can either.
        for name in (SSL_CLIENT_CERT, SSL_CLIENT_CERT_CHAIN, SSL_PROTOCOL):
            environ.pop(name, None)
        environ.update(peer_environ(environ.get("gunicorn.socket")))
        return self.app(environ, start_response)


class PeerCertThreadWorker(ThreadWorker):  # type: ignore[misc]
    """PeerCertThreadWorker is gunicorn's gthread worker with the peer certificate in environ."""

    wsgi: WSGIApp

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = PeerCertMiddleware(self.wsgi)


class PeerCertSyncWorker(SyncWorker):  # type: ignore[misc]
    """PeerCertSyncWorker is gunicorn's sync worker with the peer certificate in environ."""

    wsgi: WSGIApp

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = PeerCertMiddleware(self.wsgi)
