"""RFC 7512 pkcs11: URIs that name a token and a key, with the PIN kept out of them."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from hsm.errors import HSMError, HSMErrorKind

SCHEME = "pkcs11:"

# RFC 7512 §2.3: pk11-pchar = unreserved / pk11-path-res-avail / pct-encoded, where
#   pk11-res-avail = ":" / "[" / "]" / "@" / "!" / "$" / "'" / "(" / ")" / "*" / "+" / "," / "="
#   pk11-path-res-avail = pk11-res-avail / "&"
#   pk11-query-res-avail = pk11-res-avail / "/" / "?" / "|"
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
_PATH_SAFE = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_SAFE = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}

# Path attributes RFC 7512 §2.3 defines; `token`, `object`, `type` and `id` get fields of
# their own, the rest are kept in `path_extra` in the order they came.
_PATH_NAMES = frozenset(
    {
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "slot-description",
        "slot-manufacturer",
        "slot-id",
        "object",
        "type",
        "id",
    }
)
_QUERY_NAMES = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
# RFC 7512 §2.3: pk11-type = "type" "=" ( "public" / "private" / "cert" / "secret-key" / "data" )
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})
# Vendor attributes (RFC 7512 §2.3, pk11-v-attr-nm-char = ALPHA / DIGIT / "-" / "_").
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")


@dataclass(frozen=True)
class PKCS11URI:
    """Holds a parsed pkcs11: URI; str() gives its RFC 7512 form back."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    # Other standard and vendor attributes, percent-decoded, in their original order.
    path_extra: tuple[tuple[str, str], ...] = ()
    query_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise HSMError(
                HSMErrorKind.INVALID,
                f"pkcs11: URI type must be one of {', '.join(sorted(OBJECT_TYPES))}",
            )
        for name, _ in self.path_extra + self.query_extra:
            if name == "pin-value":
                raise _pin_value_refused()

    @classmethod
    def parse(cls, text: str) -> PKCS11URI:
        """Returns the URI parsed from `text`; refuses pin-value and malformed input."""
        # RFC 3986 §3.1: schemes are case-insensitive.
        if text[: len(SCHEME)].lower() != SCHEME:
            raise HSMError(HSMErrorKind.INVALID, "a PKCS#11 URI starts with 'pkcs11:'")
        rest = text[len(SCHEME) :]
        path, _, query = rest.partition("?")
        has_query = "?" in rest
        fields: dict[str, str | bytes] = {}
        path_extra: list[tuple[str, str]] = []
        query_extra: list[tuple[str, str]] = []
        seen: set[str] = set()

        for name, raw in _attributes(path, ";", _PATH_SAFE, "path"):
            # RFC 7512 §2.3 allows each attribute at most once; a repeat is ambiguous, so
            # the URI is refused rather than one of the values picked.
            if name in seen:
                raise HSMError(HSMErrorKind.INVALID, f"pkcs11: URI repeats attribute {name!r}")
            seen.add(name)
            if name == "id":
                fields["id"] = _decode_bytes(raw, name)
                continue
            value = _decode_text(raw, name)
            if name in ("token", "object", "type"):
                fields[name] = value
            else:
                _check_path_value(name, value)
                path_extra.append((name, value))

        if has_query:
            for name, raw in _attributes(query, "&", _QUERY_SAFE, "query"):
                if name == "pin-value":
                    raise _pin_value_refused()
                if name in seen:
                    raise HSMError(HSMErrorKind.INVALID, f"pkcs11: URI repeats attribute {name!r}")
                seen.add(name)
                value = _decode_text(raw, name)
                if name in ("module-path", "module-name", "pin-source"):
                    fields[name.replace("-", "_")] = value
                else:
                    query_extra.append((name, value))

        def text_field(key: str) -> str | None:
            value = fields.get(key)
            assert value is None or isinstance(value, str)
            return value

        key_id = fields.get("id")
        assert key_id is None or isinstance(key_id, bytes)
        return cls(
            token=text_field("token"),
            object=text_field("object"),
            id=key_id,
            type=text_field("type"),
            module_path=text_field("module_path"),
            module_name=text_field("module_name"),
            pin_source=text_field("pin_source"),
            path_extra=tuple(path_extra),
            query_extra=tuple(query_extra),
        )

    @property
    def pin_file(self) -> str | None:
        """Returns the local file pin-source names ("file:/p", "file:///p" or "/p"), if any."""
        source = self.pin_source
        if source is None:
            return None
        if source.startswith("file://"):
            return source[len("file://") :] or None
        if source.startswith("file:"):
            return source[len("file:") :] or None
        if source.startswith("/"):
            return source
        return None

    def __str__(self) -> str:
        path: list[str] = []
        if self.token is not None:
            path.append("token=" + _encode(self.token, _PATH_SAFE))
        path.extend(f"{name}={_encode(value, _PATH_SAFE)}" for name, value in self.path_extra)
        if self.object is not None:
            path.append("object=" + _encode(self.object, _PATH_SAFE))
        if self.type is not None:
            path.append("type=" + self.type)
        if self.id is not None:
            # An id is binary; encoding every octet keeps it unambiguous (the RFC's own
            # examples write id this way: id=%69%95%3E%5C%F4%BD%EC%91).
            path.append("id=" + "".join(f"%{octet:02X}" for octet in self.id))
        query: list[str] = []
        for name, value in (
            ("module-name", self.module_name),
            ("module-path", self.module_path),
            ("pin-source", self.pin_source),
        ):
            if value is not None:
                query.append(f"{name}={_encode(value, _QUERY_SAFE)}")
        query.extend(f"{name}={_encode(value, _QUERY_SAFE)}" for name, value in self.query_extra)
        text = SCHEME + ";".join(path)
        if query:
            text += "?" + "&".join(query)
        return text


def _pin_value_refused() -> HSMError:
    # The value itself is never echoed: the whole point is that it must not be logged.
    return HSMError(
        HSMErrorKind.INVALID,
        "pkcs11: URI carries pin-value; PINs come only from a PIN file or an environment "
        "variable (use pin-source or the PIN settings instead)",
    )


def _attributes(
    part: str, separator: str, safe: frozenset[str], where: str
) -> list[tuple[str, str]]:
    if part == "":
        return []
    result: list[tuple[str, str]] = []
    for item in part.split(separator):
        name, equals, raw = item.partition("=")
        if not equals or not _ATTRIBUTE_NAME.fullmatch(name):
            raise HSMError(HSMErrorKind.INVALID, f"pkcs11: URI {where} has a malformed attribute")
        if where == "path" and name not in _PATH_NAMES and name in _QUERY_NAMES:
            raise HSMError(
                HSMErrorKind.INVALID, f"pkcs11: URI attribute {name!r} belongs in the query"
            )
        if where == "query" and name in _PATH_NAMES:
            raise HSMError(
                HSMErrorKind.INVALID, f"pkcs11: URI attribute {name!r} belongs in the path"
            )
        _check_chars(raw, safe, name)
        result.append((name, raw))
    return result


def _check_chars(raw: str, safe: frozenset[str], name: str) -> None:
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "%":
            if not _PCT.match(raw, index):
                raise HSMError(
                    HSMErrorKind.INVALID, f"pkcs11: URI attribute {name!r} has a bad %-escape"
                )
            index += 3
            continue
        if char not in safe:
            raise HSMError(
                HSMErrorKind.INVALID,
                f"pkcs11: URI attribute {name!r} has a character that must be %-encoded",
            )
        index += 1


def _decode_bytes(raw: str, name: str) -> bytes:
    out = bytearray()
    index = 0
    while index < len(raw):
        if raw[index] == "%":
            out.append(int(raw[index + 1 : index + 3], 16))
            index += 3
        else:
            out.extend(raw[index].encode("ascii"))
            index += 1
    return bytes(out)


def _decode_text(raw: str, name: str) -> str:
    try:
        return _decode_bytes(raw, name).decode("utf-8")
    except UnicodeDecodeError:
        raise HSMError(
            HSMErrorKind.INVALID, f"pkcs11: URI attribute {name!r} is not UTF-8"
        ) from None


def _check_path_value(name: str, value: str) -> None:
    # RFC 7512 §2.3: pk11-slot-id = "slot-id" "=" 1*DIGIT and
    # pk11-lib-ver = "library-version" "=" 1*DIGIT [ "." 1*DIGIT ].
    if name == "slot-id" and not value.isdigit():
        raise HSMError(HSMErrorKind.INVALID, "pkcs11: URI slot-id must be decimal digits")
    if name == "library-version" and not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        raise HSMError(HSMErrorKind.INVALID, "pkcs11: URI library-version must be N or N.M")


def _encode(value: str, safe: frozenset[str]) -> str:
    return "".join(
        char if char in safe else "".join(f"%{octet:02X}" for octet in char.encode("utf-8"))
        for char in value
    )
