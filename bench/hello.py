"""A WSGI app that answers fixed bytes: the TLS "hello" ceiling of the CA front's gunicorn.

bench/est.py runs it under scripts/gunicorn_ca.py (same worker class, workers, threads and
TLS settings as `pki serve ca`), so the gap between this and enrollment is the CA's own work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"hello\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
