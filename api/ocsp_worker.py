"""The VA's gunicorn worker: OCSP answered on an event loop, everything else through WSGI.

An OCSP answer is a lookup of a few microseconds and at most one signature; in a sync
worker with Flask, parsing, routing, the response object and a new connection per request
cost ten times that. This worker keeps connections alive, parses HTTP/1.1 with httptools
on a uvloop event loop (asyncio's own loop when uvloop is missing), and hands an OCSP
request (RFC 6960 Appendix A.1: POST, or GET of the base64 DER) straight to the VA's
responder. Every other request -- CRLs, CA certificates, /healthz, conditional GETs,
anything unexpected -- goes to the same process's Flask app through WSGI, so the VA's
behaviour is defined once, in api/va.py.

gunicorn still owns the process model: binding, pre-fork, the heartbeat, signals,
graceful stop. Set `worker_class = "api.ocsp_worker.OCSPWorker"` (scripts/gunicorn_va.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, cast

import httptools
from cryptography.x509 import ocsp as x509_ocsp
from gunicorn.workers.base import Worker

from api.escape import escape
from api.va import (
    MAX_OCSP_REQUEST,
    OCSP_REQUEST_TYPE,
    VA,
    answer_ocsp,
    decode_get,
    ocsp_headers,
)
from pki.ocsp_responder import OCSPAnswer, error_answer

OCSP_POST_PATHS = frozenset({b"/", b"/ocsp", b"/ocsp/"})
OCSP_GET_PREFIX = b"/ocsp/"
# Requests with these headers need the full HTTP semantics of the Flask app.
CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"range"})
REASONS = {
    200: "OK",
    400: "Bad Request",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}
MAX_BODY = 16 * 1024 * 1024  # requests for the WSGI app; OCSP requests are capped lower
TICK = 0.5  # seconds between heartbeats, access-log writes and liveness checks


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (uvloop is a dependency on Linux)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class HTTPError(Exception):
    """HTTPError ends a connection with a status and a message, before any WSGI call."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Server:
    """_Server is one worker's state shared by its connections."""

    def __init__(self, worker: OCSPWorker, va: VA, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.va = va
        self.loop = loop
        cfg = worker.cfg
        self.keepalive = float(cfg.keepalive or 2)
        self.request_timeout = float(max(worker.timeout, 10))
        self.limit_line = int(cfg.limit_request_line or 8190)
        self.limit_fields = int(cfg.limit_request_fields or 100)
        self.limit_field_size = int(cfg.limit_request_field_size or 8190)
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.access: list[str] | None = [] if cfg.accesslog else None
        self._now = 0
        self._stamp = ""
        self._date = ""

    def _tick(self) -> None:
        now = int(time.time())
        if now != self._now:
            self._now = now
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))
            self._date = email.utils.formatdate(now, usegmt=True)

    def timestamp(self) -> str:
        self._tick()
        return self._stamp

    def date(self) -> str:
        """The Date header; RFC 9110 §6.6.1: an origin server with a clock MUST send it."""
        self._tick()
        return self._date

    def log_access(self, peer: str, request_line: str, status: int, size: int, agent: str) -> None:
        if self.access is not None:
            # The fields of gunicorn's default access-log format.
            self.access.append(
                f'{peer} - - {self.timestamp()} "{escape(request_line)}" {status} {size} "-" '
                f'"{escape(agent)}"'
            )

    def sweep(self) -> None:
        """Closes connections idle past keepalive or stuck in a request past the timeout."""
        now = self.loop.time()
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn._close()

    def flush_access(self) -> None:
        if self.access:
            lines, self.access[:] = "\n".join(self.access), []
            self.worker.log.access_log.info(lines)


class _Connection(asyncio.Protocol):
    """_Connection is one HTTP/1.1 connection: parse, answer in order, keep alive."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.peer_port = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.keep_alive = True
        self.deadline = 0.0  # loop time after which the sweep closes this connection
        self.closing = False
        self.in_message = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer, self.peer_port = str(peer[0]), str(peer[1])
        self.server.connections.add(self)
        self._arm(self.server.keepalive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._arm(self.server.request_timeout)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            # A callback raised: httptools keeps the original exception as the context.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, HTTPError):
                self._fail(cause.status, cause.message)
            else:
                self.server.worker.log.error("VA connection failed: %r", cause)
                self._fail(500, "internal error")
        except HTTPError as e:
            self._fail(e.status, e.message)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._fail(400, "malformed HTTP request")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.server.limit_line:
            raise HTTPError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.server.limit_fields:
            raise HTTPError(400, "too many header fields")
        if len(name) + len(value) > self.server.limit_field_size:
            raise HTTPError(400, "header field too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        expect = self._header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.transport:
            # RFC 9110 §10.1.1: the client waits for this before sending the body.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            raise HTTPError(413, "request body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.closing:
            return
        if self.server.stopping:
            self.keep_alive = False
        method = self.parser.get_method()
        body = b"".join(self.body)
        try:
            status, headers, payload = self._dispatch(method, body)
        except Exception:  # the app failed: never take the worker down with it
            self.server.worker.log.exception("VA request failed")
            status, headers, payload = _text(500, "internal error")
            self.keep_alive = False
        self._send(method, status, headers, payload)
        if not self.keep_alive:
            self._close()
        else:
            self._arm(self.server.keepalive)

    # requests

    def _header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def _dispatch(
        self, method: bytes, body: bytes
    ) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        parsed = httptools.parse_url(self.url)
        path = parsed.path or b"/"
        conditional = any(k in CONDITIONAL for k, _ in self.headers)
        if method == b"POST" and path in OCSP_POST_PATHS and parsed.query is None:
            content_type = (self._header(b"content-type") or b"").split(b";")[0].strip().lower()
            if content_type and content_type != OCSP_REQUEST_TYPE.encode():
                return _text(415, "expected application/ocsp-request")
            if len(body) > MAX_OCSP_REQUEST:
                return _text(413, "OCSP request too large")
            return self._ocsp(answer_ocsp(self.server.va, body))
        if method == b"GET" and path.startswith(OCSP_GET_PREFIX) and not conditional:
            encoded = urllib.parse.unquote(path[len(OCSP_GET_PREFIX) :].decode("latin-1"))
            der = decode_get(encoded)
            if der is None:
                return self._ocsp(error_answer(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST))
            return self._ocsp(answer_ocsp(self.server.va, der))
        return self._wsgi(method, parsed, body)

    def _ocsp(self, answer: OCSPAnswer) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        va = self.server.va
        return (
            200,
            ocsp_headers(answer, va.runtime.clock.now(), va.config.max_age_seconds),
            [answer.der],
        )

    def _wsgi(
        self, method: bytes, parsed: Any, body: bytes
    ) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        """Calls the Flask app with a PEP 3333 environ; the response is read whole."""
        sockname = self.transport.get_extra_info("sockname") if self.transport else None
        host, port = (sockname[0], sockname[1]) if isinstance(sockname, tuple) else ("", 0)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method.decode("latin-1"),
            "SCRIPT_NAME": "",
            # PEP 3333: PATH_INFO is the decoded path, its bytes as latin-1 characters.
            "PATH_INFO": urllib.parse.unquote_to_bytes(parsed.path or b"/").decode("latin-1"),
            "QUERY_STRING": (parsed.query or b"").decode("latin-1"),
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": f"HTTP/{self.parser.get_http_version()}",
            "REMOTE_ADDR": self.peer,
            "REMOTE_PORT": self.peer_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        for name, value in self.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = text
            else:
                key = "HTTP_" + key
                environ[key] = f"{environ[key]},{text}" if key in environ else text
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda _data: None  # the legacy write() is not used by Flask

        result = self.server.worker.wsgi(environ, start_response)
        try:
            payload = [bytes(chunk) for chunk in result]
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status_text, headers = started
        return int(status_text.split(" ", 1)[0]), headers, payload

    # responses

    def _send(
        self, method: bytes, status: int, headers: list[tuple[str, str]], payload: Iterable[bytes]
    ) -> None:
        if self.transport is None:
            return
        body = b"".join(payload)
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
            f"Date: {self.server.date()}",
        ]
        has_length = False
        for name, value in headers:
            lower = name.lower()
            if lower in ("connection", "date"):
                continue
            if lower == "content-length":
                has_length = True
            lines.append(f"{name}: {value}")
        if not has_length:
            lines.append(f"Content-Length: {len(body)}")
        if not self.keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.transport.write(head if method == b"HEAD" else head + body)
        request_line = (
            f"{method.decode('latin-1')} {self.url.decode('latin-1')} "
            f"HTTP/{self.parser.get_http_version()}"
        )
        agent = (self._header(b"user-agent") or b"-").decode("latin-1")
        self.server.log_access(self.peer, request_line, status, len(body), agent)

    def _fail(self, status: int, message: str) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closing:
            body = f"{message}\n".encode()
            head = (
                f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            self.transport.write(head + body)
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # An idle keep-alive connection or a request that never completes is closed by the
    # worker's periodic sweep (_Server.sweep): a timer per request cost more than the lookup.

    def _arm(self, seconds: float) -> None:
        self.deadline = self.server.loop.time() + seconds


def _text(status: int, message: str) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
    return status, [("Content-Type", "text/plain; charset=utf-8")], [f"{message}\n".encode()]


class OCSPWorker(Worker):  # type: ignore[misc]
    """OCSPWorker serves the VA app with an event loop and a direct OCSP path."""

    def run(self) -> None:
        va = self.wsgi.extensions.get("pki_va")
        if not isinstance(va, VA):
            raise RuntimeError("OCSPWorker serves the VA app (api.va) only")
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(loop, _Server(self, va, loop)))
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop, server: _Server) -> None:
        stop = asyncio.Event()

        def graceful() -> None:
            self.alive = False
            stop.set()

        def quick() -> None:
            self.alive = False
            server.worker.cfg.worker_int(self)
            for conn in list(server.connections):
                conn._close()
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, graceful)
        loop.add_signal_handler(signal.SIGINT, quick)
        loop.add_signal_handler(signal.SIGQUIT, quick)
        loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        listeners = []
        for listener in self.sockets:
            sock = listener.sock
            sock.setblocking(False)
            listeners.append(
                await loop.create_server(lambda: _Connection(server), sock=sock, backlog=2048)
            )
        while self.alive and not stop.is_set():
            self.notify()
            server.flush_access()
            server.sweep()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
        for listening in listeners:
            listening.close()
        # Idle keep-alive connections close now; a request still arriving is answered
        # (with Connection: close) until graceful_timeout.
        server.stopping = True
        deadline = loop.time() + float(self.cfg.graceful_timeout)
        for conn in list(server.connections):
            if not conn.in_message:
                conn._close()
        while server.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        server.flush_access()
