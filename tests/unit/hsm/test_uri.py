"""Tests for RFC 7512 pkcs11: URIs."""

from __future__ import annotations

import pytest

from hsm import PKCS11URI, HSMError
from hsm.errors import HSMErrorKind


class TestParseRFCExamples:
    """The examples of RFC 7512 §3 (all but the pin-value one, which we refuse)."""

    def test_parse_empty_uri_matches_everything(self) -> None:
        assert PKCS11URI.parse("pkcs11:") == PKCS11URI()

    def test_parse_object_and_type(self) -> None:
        uri = PKCS11URI.parse("pkcs11:object=my-pubkey;type=public")
        assert (uri.object, uri.type, uri.token, uri.id) == ("my-pubkey", "public", None, None)

    def test_parse_pin_source_kept_as_data(self) -> None:
        uri = PKCS11URI.parse("pkcs11:object=my-key;type=private?pin-source=file:/etc/token")
        assert uri.object == "my-key"
        assert uri.type == "private"
        assert uri.pin_source == "file:/etc/token"
        assert uri.pin_file == "/etc/token"

    def test_parse_full_certificate_example(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
            "manufacturer=Snake%20Oil,%20Inc.;"
            "model=1.0;"
            "object=my-certificate;"
            "type=cert;"
            "id=%69%95%3E%5C%F4%BD%EC%91;"
            "serial="
            "?pin-source=file:/etc/token_pin"
        )
        assert uri.token == "The Software PKCS#11 Softtoken"
        assert uri.object == "my-certificate"
        assert uri.type == "cert"
        assert uri.id == bytes.fromhex("69953e5cf4bdec91")
        assert uri.path_extra == (
            ("manufacturer", "Snake Oil, Inc."),
            ("model", "1.0"),
            ("serial", ""),
        )
        assert uri.pin_source == "file:/etc/token_pin"

    def test_parse_module_name(self) -> None:
        uri = PKCS11URI.parse("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11")
        assert uri.module_name == "mypkcs11"

    def test_parse_module_path(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1"
        )
        assert uri.module_path == "/mnt/libmypkcs11.so.1"
        assert str(uri) == (
            "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1"
        )

    def test_parse_slot_description(self) -> None:
        uri = PKCS11URI.parse("pkcs11:slot-description=Sun%20Metaslot")
        assert uri.path_extra == (("slot-description", "Sun Metaslot"),)

    def test_parse_library_attributes(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
            "library-description=Soft%20Token%20Library;"
            "library-version=1.23"
        )
        assert dict(uri.path_extra) == {
            "library-manufacturer": "Snake Oil, Inc.",
            "library-description": "Soft Token Library",
            "library-version": "1.23",
        }

    def test_parse_percent_and_semicolon_in_token(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert"
        )
        assert uri.token == "A name with a substring %;"

    def test_parse_utf8_token(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
            "object=my-certificate;type=cert"
        )
        assert uri.token == "Name with a small A with acute: \u00e1"

    def test_parse_vendor_attributes_kept(self) -> None:
        uri = PKCS11URI.parse(
            "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
            "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
        )
        assert uri.path_extra == (("vendor-aaa", "value-a"),)
        assert uri.query_extra == (("vendor-bbb", "value-b"),)
        assert PKCS11URI.parse(str(uri)) == uri

    def test_parse_mixed_case_hex_in_id(self) -> None:
        uri = PKCS11URI.parse("pkcs11:id=%01%02%03%Ba%dd%Ef%08")
        assert uri.id == bytes.fromhex("010203baddef08")


class TestFormat:
    def test_str_round_trips_the_common_case(self) -> None:
        text = "pkcs11:token=pki-dev;object=root-ca;type=private"
        uri = PKCS11URI.parse(text)
        assert (uri.token, uri.object, uri.type) == ("pki-dev", "root-ca", "private")
        assert str(uri) == text

    def test_str_percent_encodes_every_id_octet(self) -> None:
        uri = PKCS11URI(token="t", object="k", id=b"\x00ab\xff", type="private")
        assert str(uri) == "pkcs11:token=t;object=k;type=private;id=%00%61%62%FF"
        assert PKCS11URI.parse(str(uri)) == uri

    def test_str_encodes_reserved_characters(self) -> None:
        uri = PKCS11URI(token="a;b?c d%e/f", object="x&y=z")
        text = str(uri)
        assert text == "pkcs11:token=a%3Bb%3Fc%20d%25e%2Ff;object=x&y=z"
        assert PKCS11URI.parse(text) == uri

    def test_str_query_keeps_slash_and_question_mark(self) -> None:
        uri = PKCS11URI(object="k", module_path="/usr/lib/a b.so", pin_source="file:/x?y")
        text = str(uri)
        assert text == "pkcs11:object=k?module-path=/usr/lib/a%20b.so&pin-source=file:/x?y"
        assert PKCS11URI.parse(text) == uri

    def test_str_non_ascii_is_utf8_percent_encoded(self) -> None:
        uri = PKCS11URI(token="\u00e1")
        assert str(uri) == "pkcs11:token=%C3%A1"

    def test_scheme_is_case_insensitive(self) -> None:
        assert PKCS11URI.parse("PKCS11:object=k").object == "k"


class TestRefusals:
    def test_parse_pin_value_refused_without_echoing_it(self) -> None:
        with pytest.raises(HSMError) as caught:
            PKCS11URI.parse(
                "pkcs11:token=Software%20PKCS%2311%20softtoken;"
                "manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin"
            )
        assert caught.value.kind is HSMErrorKind.INVALID
        assert "pin-value" in str(caught.value)
        assert "the-pin" not in str(caught.value)
        assert "the-pin" not in repr(caught.value)

    def test_construct_with_pin_value_refused(self) -> None:
        with pytest.raises(HSMError, match="pin-value"):
            PKCS11URI(query_extra=(("pin-value", "1234"),))

    @pytest.mark.parametrize(
        "text",
        [
            "pkcs11x:object=k",
            "http://example.com",
            "pkcs11:object",
            "pkcs11:object=a;object=b",
            "pkcs11:object=k?module-path=/a&module-path=/b",
            "pkcs11:object=a%2",
            "pkcs11:object=a%zz",
            "pkcs11:object=a b",
            "pkcs11:object=a/b",
            "pkcs11:object=k?module-path=/a;b",
            "pkcs11:type=secret",
            "pkcs11:slot-id=abc",
            "pkcs11:library-version=1.x",
            "pkcs11:object=%FF",
            "pkcs11:module-path=/lib.so",
            "pkcs11:?object=k",
            "pkcs11:ob;ject=k",
        ],
    )
    def test_parse_malformed_refused(self, text: str) -> None:
        with pytest.raises(HSMError) as caught:
            PKCS11URI.parse(text)
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_bad_type_refused_on_construction(self) -> None:
        with pytest.raises(HSMError, match="type must be one of"):
            PKCS11URI(type="secret")


class TestPinFile:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("file:/etc/pin", "/etc/pin"),
            ("file:///etc/pin", "/etc/pin"),
            ("/etc/pin", "/etc/pin"),
            ("|/usr/bin/get-pin", None),
        ],
    )
    def test_pin_file(self, source: str, expected: str | None) -> None:
        assert PKCS11URI(pin_source=source).pin_file == expected

    def test_pin_file_absent(self) -> None:
        assert PKCS11URI(object="k").pin_file is None
