"""Authentication extraction: Basic credentials and the TLS client chain into a ClientIdentity.

The client certificate comes from the TLS layer (api/tls.py puts the verified chain into the
WSGI environ) or, behind a TLS-terminating reverse proxy, from a header that is believed only
when the connection comes from one of the configured proxy addresses.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from api.est.wire import parse_forwarded_cert
from api.tls import SSL_CLIENT_CERT, SSL_CLIENT_CERT_CHAIN
from pki.errors import bad_request
from pki.identity import BasicCredentials, ClientIdentity

log = logging.getLogger(__name__)

ProxyNetworks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]

MAX_AUTHORIZATION = 1024


def basic_credentials(header: str | None) -> BasicCredentials | None:
    """Parses an `Authorization: Basic` header (RFC 7617); None when there is none."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    if len(value) > MAX_AUTHORIZATION:
        raise bad_request("Authorization header is too long")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise bad_request("Authorization: Basic is not base64 of UTF-8 text") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise bad_request("Authorization: Basic has no ':' between user and password")
    return BasicCredentials(username, password)


def _from_proxy(remote_addr: str | None, proxies: ProxyNetworks) -> bool:
    if not remote_addr or not proxies:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    return any(address in network for network in proxies)


def client_address(environ: Mapping[str, Any], proxies: ProxyNetworks = ()) -> str:
    """Returns the client's address: the peer's, or the one a trusted proxy forwarded."""
    remote = str(environ.get("REMOTE_ADDR") or "unknown")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if forwarded and _from_proxy(remote, proxies):
        # The rightmost entry is the one our proxy appended; those left of it are the
        # client's own claims.
        last = str(forwarded).rsplit(",", 1)[-1].strip()
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            return remote
    return remote


def client_identity(
    environ: Mapping[str, Any],
    *,
    proxies: ProxyNetworks = (),
    proxy_cert_header: str = "X-SSL-Client-Cert",
) -> ClientIdentity:
    """Builds the ClientIdentity of a WSGI request from its headers and TLS peer chain."""
    basic = basic_credentials(environ.get("HTTP_AUTHORIZATION"))
    address = client_address(environ, proxies)
    header_key = "HTTP_" + proxy_cert_header.upper().replace("-", "_")
    forwarded = environ.get(header_key)
    if _from_proxy(environ.get("REMOTE_ADDR"), proxies):
        # The proxy terminated TLS; its own connection's certificate means nothing here.
        if forwarded:
            der = parse_forwarded_cert(str(forwarded))
            return ClientIdentity(
                basic=basic, tls_chain_der=(der,), source="proxy", address=address
            )
        return ClientIdentity(basic=basic, address=address)
    if forwarded:
        log.warning(
            "ignored %s header from %s: not a trusted proxy",
            proxy_cert_header,
            environ.get("REMOTE_ADDR"),
        )
    chain = environ.get(SSL_CLIENT_CERT_CHAIN) or ()
    leaf = environ.get(SSL_CLIENT_CERT)
    if leaf:
        ders = tuple(c for c in chain if isinstance(c, bytes)) or (leaf,)
        return ClientIdentity(basic=basic, tls_chain_der=ders, source="tls", address=address)
    return ClientIdentity(basic=basic, address=address)
