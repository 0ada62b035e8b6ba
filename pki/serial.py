"""Certificate serial numbers: random, positive, at most 20 octets."""

from __future__ import annotations

import secrets

from pki.errors import bad_request

# RFC 5280 4.1.2.2: "The serial number MUST be a positive integer assigned by the CA to
# each certificate. ... Conforming CAs MUST NOT use serialNumber values longer than 20
# octets." CA/B Forum asks for at least 64 bits from a CSPRNG; 127 random bits keep the
# DER encoding at 16 octets (no leading zero octet is ever needed) and make collisions
# negligible, while the unique index in the store still catches one.
SERIAL_BITS = 127


def new_serial() -> int:
    """Returns a fresh serial number with SERIAL_BITS bits from the CSPRNG."""
    while True:
        value = secrets.randbits(SERIAL_BITS)
        if value > 0:
            return value


def serial_hex(serial: int) -> str:
    """Formats a serial as the lower-case hex used at the edges and in the store."""
    if serial <= 0:
        raise ValueError("serial numbers are positive")
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Parses a hex serial (colons and a 0x prefix allowed) as given by an operator."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise bad_request(f"not a hex serial number: {text[:64]!r}") from None
    if value <= 0 or value.bit_length() > 159:
        raise bad_request("serial number out of range")
    return value
