"""A real Mosquitto for tests: a TLS listener configured as docs/brokers.md says, and a client.

`mosquitto_broker(...)` starts `mosquitto -c CONF` on 127.0.0.1 and a free port, waits until the
listener answers TLS, and stops it afterwards. `Mosquitto.connect(cert, key)` tries a TLS
handshake with the device certificate, then an MQTT CONNECT and a QoS 1 publish (paho-mqtt),
all with bounded timeouts, and says whether the broker accepted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.integration.conftest import free_port

HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
RELOAD_TIMEOUT = 10.0


def listener_config(
    port: int, cafile: Path, certfile: Path, keyfile: Path, crlfile: Path | None
) -> str:
    """Returns the TLS listener block exactly as docs/brokers.md documents it."""
    lines = [
        f"listener {port} {HOST}",
        f"cafile {cafile}",
        f"certfile {certfile}",
        f"keyfile {keyfile}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if crlfile is not None:
        lines.append(f"crlfile {crlfile}")
    lines.append("tls_version tlsv1.2")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Attempt:
    """Attempt is the outcome of one client connection: where it stopped and why."""

    accepted: bool
    stage: str  # "tls" (handshake refused), "connack" (MQTT refused), "publish", "ok"
    detail: str = ""


class Mosquitto:
    """Mosquitto is a running broker process and what a test needs to talk to it."""

    def __init__(self, directory: Path, port: int, cafile: Path, conf: Path, log: Path) -> None:
        self.directory = directory
        self.port = port
        self.cafile = cafile
        self.conf = conf
        self.log_path = log
        self.pid_file = directory / "mosquitto.pid"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers_tls():
            if self.process.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not answer TLS on {self.port}:\n{self.log()}")
            time.sleep(0.1)

    def _answers_tls(self) -> bool:
        """True once the listener speaks TLS (a handshake without a client certificate is
        refused by require_certificate, with a TLS alert: that is the answer we wait for)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with (
                socket.create_connection((HOST, self.port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                tls.recv(1)
        except ssl.SSLError:
            return True
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def reloads(self) -> int:
        return self.log().count("Reloading config.")

    def wait_for_reload(self, before: int) -> None:
        """Waits until the broker logged one more reload than before."""
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while self.reloads() <= before:
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not reload:\n{self.log()}")
            time.sleep(0.05)

    def sighup(self) -> None:
        """Sends SIGHUP and waits until the broker has reloaded its configuration and files."""
        before = self.reloads()
        os.kill(self.pid, signal.SIGHUP)
        self.wait_for_reload(before)

    def handshake(self, cert: Path, key: Path, timeout: float = CONNECT_TIMEOUT) -> str | None:
        """Runs a TLS handshake with a client certificate; returns the error, or None."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.cafile))
        context.load_cert_chain(str(cert), str(key))
        # The listener says tlsv1.2: there the server checks the client certificate before
        # its Finished, so a refusal fails the client's handshake itself (with TLS 1.3 the
        # client would learn only at its first read).
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            with (
                socket.create_connection((HOST, self.port), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as tls,
            ):
                tls.do_handshake()
        except (ssl.SSLError, OSError) as e:
            return str(e)
        return None

    def attempt(
        self, cert: Path, key: Path, *, topic: str = "test/hello", timeout: float = CONNECT_TIMEOUT
    ) -> Attempt:
        """Tries handshake, MQTT CONNECT and a QoS 1 publish; says where it stopped."""
        refused = self.handshake(cert, key, timeout)
        if refused is not None:
            return Attempt(False, "tls", refused)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
        )
        client.connect_timeout = timeout
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.cafile))
        context.load_cert_chain(str(cert), str(key))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        client.tls_set_context(context)
        connack: list[mqtt.ReasonCode] = []
        client.on_connect = lambda _c, _u, _f, rc, _p: connack.append(rc)
        deadline = time.monotonic() + timeout
        try:
            try:
                client.connect(HOST, self.port, keepalive=30)
            except (ssl.SSLError, OSError) as e:
                return Attempt(False, "tls", str(e))
            while not connack and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS and not connack:
                    return Attempt(False, "connack", "connection lost before CONNACK")
            if not connack:
                return Attempt(False, "connack", "no CONNACK in time")
            if connack[0].is_failure:
                return Attempt(False, "connack", str(connack[0]))
            info = client.publish(topic, b"hello", qos=1)
            while not info.is_published() and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if not info.is_published():
                return Attempt(False, "publish", "no PUBACK in time")
            return Attempt(True, "ok")
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop(timeout=0.1)
            sock = client.socket()
            if sock is not None:
                sock.close()

    def connect(self, client_cert: Path, client_key: Path) -> bool:
        """Says whether the broker accepts the device: TLS, CONNECT and a publish."""
        return self.attempt(client_cert, client_key).accepted


def write_config(
    directory: Path,
    *,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    crlfile: Path | None,
    port: int | None = None,
    acl_file: Path | None = None,
) -> tuple[Path, int]:
    """Writes mosquitto.conf into directory; returns its path and the port."""
    port = port or free_port()
    harness = [
        "# Test harness settings; the listener block below is the documented one.",
        "persistence false",
        "log_dest stderr",
        "log_type all",
        "connection_messages true",
        f"pid_file {directory / 'mosquitto.pid'}",
    ]
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to user `mosquitto`, which cannot read tmp_path.
        harness.append("user root")
    if acl_file is not None:
        harness.append(f"acl_file {acl_file}")
    conf = directory / "mosquitto.conf"
    conf.write_text(
        "\n".join(harness) + "\n\n" + listener_config(port, cafile, certfile, keyfile, crlfile)
    )
    return conf, port


@contextlib.contextmanager
def mosquitto_broker(
    directory: Path,
    *,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    crlfile: Path | None,
    acl_file: Path | None = None,
) -> Iterator[Mosquitto]:
    """Starts Mosquitto with a TLS listener on a free loopback port; stops it afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    conf, port = write_config(
        directory,
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
        crlfile=crlfile,
        acl_file=acl_file,
    )
    broker = Mosquitto(directory, port, cafile, conf, directory / "mosquitto.log")
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
