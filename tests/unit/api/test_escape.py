"""Control characters in access-log fields and CLI rows print escaped, on one line."""

from __future__ import annotations

import base64
import datetime
import logging
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from api.escape import EscapingLogger, escape


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("DEV-1", "DEV-1"),
        ("Gerät 1", "Gerät 1"),
        ("a\x00b", "a\\x00b"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("a\x7f", "a\\x7f"),
        ("a\u202eb", "a\\u202eb"),
        ("a\u200db", "a\\u200db"),
        ("a\u2028b", "a\\u2028b"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_access_log_fields_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config()
    cfg.set("accesslog", "-")
    logger = EscapingLogger(cfg)
    user = 'DEV-1\n127.0.0.1 - admin [01/Jan/2026] "POST /api HTTP/1.1" 200'
    environ = {
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/.well-known/est/simpleenroll",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{user}:secret".encode()).decode(),
        "HTTP_USER_AGENT": "curl\x1b]0;owned\x07\u202e",
    }
    resp = SimpleNamespace(status="200 OK", sent=10, headers=[])
    req = SimpleNamespace(headers=[("USER-AGENT", environ["HTTP_USER_AGENT"])])
    logger.access_log.propagate = True
    with caplog.at_level(logging.INFO, logger="gunicorn.access"):
        logger.access(resp, req, environ, datetime.timedelta(seconds=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "gunicorn.access"]
    assert len(lines) == 1
    (line,) = lines
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert "DEV-1\\x0a127.0.0.1" in line and "curl\\x1b]0;owned\\x07\\u202e" in line
    assert "secret" not in line
