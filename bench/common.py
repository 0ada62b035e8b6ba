"""Shared bench helpers: servers on 127.0.0.1, wrk runs, timing of subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PKI = str(VENV_BIN / "pki")
PYTHON = str(VENV_BIN / "python")
GUNICORN_CA = REPO / "scripts" / "gunicorn_ca.py"

WRK_DONE = """
done = function(summary, latency, requests)
  local s = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,'
    .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
    .. '"timeouts":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, s.connect, s.read, s.write, s.status, s.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    """Waits until a URL answers (any HTTP status), or fails if the process died."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2, context=ctx)  # noqa: S310 (127.0.0.1 only)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout} s")


@contextlib.contextmanager
def server(
    args: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_url: str | None = None,
    ready_port: int | None = None,
    ready_log: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs a server process until the block ends; stops it by its own process id."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(args), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if ready_url is not None:
            wait_http(ready_url, process)
        elif ready_port is not None:
            wait_port(ready_port, process)
        elif ready_log is not None:
            # Some servers (openssl ocsp) stall on a probe connection: wait for their log line.
            deadline = time.monotonic() + 20
            while ready_log not in log_path.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args!r} did not start; see {log_path}")
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def lua_string(data: bytes) -> str:
    """Encodes bytes as a Lua string literal with decimal escapes."""
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def write_lua(path: Path, method: str, items: Sequence[tuple[str, bytes]], headers: str) -> Path:
    """Writes a wrk script that cycles through (path, body) pairs, and reports JSON at the end."""
    lines = ["local items = {"]
    for p, body in items:
        lines.append(f"  {{{lua_string(p.encode())}, {lua_string(body)}}},")
    lines.append("}")
    lines.append("local n = #items")
    lines.append("local i = 0")
    lines.append("request = function()")
    lines.append("  i = i + 1")
    lines.append("  local it = items[(i % n) + 1]")
    lines.append(f'  return wrk.format("{method}", it[1], {headers}, it[2])')
    lines.append("end")
    path.write_text("\n".join(lines) + WRK_DONE)
    return path


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    """Runs wrk against a URL; returns req/s, p50/p99 in ms and error counts."""
    threads = max(1, min(2, connections))
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            secs = raw["duration_us"] / 1e6
            errors = sum(
                raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            return {
                "rps": raw["requests"] / secs if secs else 0.0,
                "requests": raw["requests"],
                "p50_ms": raw["p50_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "socket_errors": errors,
                "non_2xx": raw["status_errors"],
                "timeouts": raw["timeouts"],
            }
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


def pki_env(data_dir: Path, database_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PKI_CONFIG_DIR"] = str(REPO / "ca-config")
    env["PKI_DATA_DIR"] = str(data_dir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if database_url:
        env["PKI_DATABASE_URL"] = database_url
    else:
        env.pop("PKI_DATABASE_URL", None)
    return env


def run(
    args: Sequence[str | Path], env: dict[str, str] | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """Runs a command and fails loudly with its output when it fails."""
    out = subprocess.run(
        [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def timed_rusage(
    args: Sequence[str | Path], env: dict[str, str] | None = None, timeout: float = 1800
) -> tuple[float, float, str]:
    """Runs a command; returns wall seconds, its own peak RSS in MiB (wait4), and its stdout."""
    import tempfile

    del timeout  # the commands here end by themselves; wait4 has no timeout
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        process = subprocess.Popen(
            [str(a) for a in args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        _pid, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - t0
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{args!r} failed ({process.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text
