"""The README's first command works as written: it builds the demo CA, issues a device and
serves EST and OCSP; the enrollment it prints works."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.conftest import REPO
from tests.integration.conftest import free_port


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(REPO / "scripts" / "demo")],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, verify: str | bool) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(requests.RequestException, OSError):
            if requests.get(f"{url}/healthz", verify=verify, timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)


def test_demo_command_serves_and_prints_a_working_enrollment(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0].strip()
    assert first_block == "./scripts/demo"
    data = tmp_path / "data"
    ca_port, va_port = free_port(), free_port()
    env = dict(
        os.environ,
        PKI_DATA_DIR=str(data),
        PKI_DEMO_CA_PORT=str(ca_port),
        PKI_DEMO_VA_PORT=str(va_port),
    )
    env.pop("PKI_DATABASE_URL", None)
    env.pop("SOFTHSM2_CONF", None)
    log = tmp_path / "demo.log"
    proc = _start(env, log)
    try:
        chain = str(data / "certs" / "chain.pem")
        _wait_healthy(proc, f"https://127.0.0.1:{ca_port}", log, chain)
        _wait_healthy(proc, f"http://127.0.0.1:{va_port}", log, False)
        text = log.read_text()
        assert "demo hierarchy ready" in text
        assert f"{data / 'demo-device' / 'device.pem'}: OK" in text
        # Run the printed enrollment commands as a user would paste them.
        block = text.split("Enroll the demo device", 1)[1]
        commands = "\n".join(line for line in block.splitlines()[1:] if line.startswith("  "))
        script = re.sub(r"/tmp/demo", str(tmp_path / "demo"), commands)
        pasted = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert f"{tmp_path / 'demo.pem'}: OK" in pasted.stdout
        assert f"{tmp_path / 'demo.pem'}: good" in pasted.stdout
    finally:
        _stop(proc)
    # Running it again finds the hierarchy in place and serves again (on other ports, so
    # that a server of the first run still shutting down cannot answer for it).
    env["PKI_DEMO_CA_PORT"], env["PKI_DEMO_VA_PORT"] = str(free_port()), str(free_port())
    ca_port = int(env["PKI_DEMO_CA_PORT"])
    log2 = tmp_path / "demo2.log"
    proc = _start(env, log2)
    try:
        _wait_healthy(proc, f"https://127.0.0.1:{ca_port}", log2, str(data / "certs" / "chain.pem"))
        assert "already initialised" in log2.read_text()
    finally:
        _stop(proc)
