"""Control characters made visible, so a log line or a CLI table row stays one honest line.

A device ID in a Basic header, a User-Agent or a certificate subject from before the
character rules may hold ESC, CR, LF or a bidi override; printed raw they forge log lines or
rewrite the operator's terminal. They are shown as \\xNN, \\uNNNN escapes instead.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from gunicorn.glogging import Logger

# Controls, format characters (bidi overrides, zero-width), surrogates, line separators.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _visible(c: str) -> str:
    if unicodedata.category(c) not in _UNSAFE:
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(value: object) -> str:
    """Returns a value as text with every control, format or bidi character escaped."""
    text = str(value)
    if all(unicodedata.category(c) not in _UNSAFE for c in text):
        return text
    return "".join(_visible(c) for c in text)


class EscapingLogger(Logger):  # type: ignore[misc]
    """EscapingLogger is gunicorn's logger with every access-log field escaped."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        return {k: escape(v) if isinstance(v, str) else v for k, v in atoms.items()}
