"""ClientIdentity: who is asking, as the HTTP edge saw it, without the HTTP request itself."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cryptography import x509

from pki.errors import bad_request


@dataclasses.dataclass(frozen=True)
class BasicCredentials:
    """BasicCredentials is an HTTP Basic user name and password; the password never prints."""

    username: str
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class ClientIdentity:
    """ClientIdentity is what a client proved: Basic credentials, a TLS chain, its address.

    `tls_chain_der` is the chain as the client sent it, leaf first. It is filled only when
    the TLS layer (our gunicorn worker, against the configured client CAs) or a trusted
    reverse proxy verified the leaf; the domain still builds and checks the path to the
    anchors of the label itself. `address` is the client's IP address, for throttling.
    """

    basic: BasicCredentials | None = None
    tls_chain_der: tuple[bytes, ...] = ()
    source: Literal["none", "tls", "proxy"] = "none"
    # The client's network address, for throttling and the audit of refusals only.
    address: str = "unknown"

    @property
    def has_certificate(self) -> bool:
        return bool(self.tls_chain_der)

    def leaf(self) -> x509.Certificate:
        """Parses the client's own certificate."""
        if not self.tls_chain_der:
            raise bad_request("no client certificate")
        try:
            return x509.load_der_x509_certificate(self.tls_chain_der[0])
        except ValueError:
            raise bad_request("client certificate does not parse") from None

    def intermediates(self) -> list[x509.Certificate]:
        """Parses the other certificates the client sent; ones that do not parse are left out."""
        out = []
        for der in self.tls_chain_der[1:]:
            try:
                out.append(x509.load_der_x509_certificate(der))
            except ValueError:
                continue
        return out
