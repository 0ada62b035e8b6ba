"""The GET form of OCSP requests (RFC 6960 Appendix A.1): base64 in the URL path."""

from __future__ import annotations

import base64

import pytest

from api.va import decode_get


@pytest.mark.parametrize(
    "der",
    [b"\x30\x01\xff", b"\x30\x03\x01\xff\xff", b"\x30\x02\x01\x00", b"\x30\x00"],
    ids=["ends-with-slash", "slashes-inside", "padded", "short"],
)
def test_base64_decodes_whole(der: bytes) -> None:
    encoded = base64.b64encode(der).decode()
    assert decode_get(encoded) == der
    assert decode_get("/" + encoded) == der  # "/ocsp//<base64>"


def test_a_slash_after_the_base64_is_dropped() -> None:
    encoded = base64.b64encode(b"\x30\x02\x01\x00").decode()
    assert encoded.endswith("=")
    assert decode_get(encoded + "/") == b"\x30\x02\x01\x00"
    unpadded = base64.b64encode(b"\x30\x01\x00").decode()
    assert decode_get(unpadded + "/") == b"\x30\x01\x00"


def test_plus_turned_into_space_is_restored() -> None:
    der = b"\x30\x01\x3e"
    encoded = base64.b64encode(der).decode()
    assert "+" in encoded
    assert decode_get(encoded.replace("+", " ")) == der
