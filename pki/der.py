"""The DER encoding both hand-written encoders share (OCSP responses, CRL entries); X.690."""

from __future__ import annotations


def der_length(n: int) -> bytes:
    """Encodes a DER length: one octet below 128, else 0x80 | count and the count octets.

    X.690 §10.1: "The definite form of length encoding shall be used, encoded in the minimum
    number of octets."
    """
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """Encodes one DER value: a single-octet tag, the length, the contents."""
    return bytes((tag,)) + der_length(len(content)) + content
