"""A real CA for integration tests: `pki init --dev` with a SoftHSM token, run as a subprocess."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONFIG_DIR, drop_postgres_database, fresh_postgres_database

PKI = str(Path(sys.executable).with_name("pki"))
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclasses.dataclass
class DevCA:
    """DevCA is a data directory built by `pki init --dev`, and how to run `pki` on it."""

    data_dir: Path
    config_dir: Path
    database_url: str | None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PKI_DATA_DIR"] = str(self.data_dir)
        env["PKI_CONFIG_DIR"] = str(self.config_dir)
        env.pop("SOFTHSM2_CONF", None)
        if self.database_url:
            env["PKI_DATABASE_URL"] = self.database_url
        else:
            env.pop("PKI_DATABASE_URL", None)
        return env

    def pki(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the pki command against this CA and returns what it printed."""
        result = subprocess.run(
            [PKI, *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"pki {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def cert(self, name: str) -> Path:
        return self.data_dir / "certs" / name

    def pkcs11_tool(
        self, token: str, pin_file: str, *args: str
    ) -> subprocess.CompletedProcess[str]:
        """Runs OpenSC's pkcs11-tool on one of this CA's SoftHSM tokens, logged in with a PIN."""
        env = dict(os.environ, SOFTHSM2_CONF=str(self.data_dir / "softhsm2.conf"))
        pin = (self.data_dir / pin_file).read_text().strip()
        return subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                token,
                "--login",
                "--pin",
                pin,
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'pki.db'}"


def make_dev_ca(directory: Path, database_url: str | None = None) -> DevCA:
    ca = DevCA(directory, CONFIG_DIR, database_url)
    ca.pki("init", "--dev", str(directory), timeout=300)
    return ca


@pytest.fixture(scope="session")
def _dev_ca_template(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return make_dev_ca(tmp_path_factory.mktemp("dev-ca-template"))


def _copy_data_dir(template: DevCA, target: Path) -> None:
    shutil.copytree(template.data_dir, target)
    conf = target / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(template.data_dir), str(target)))


@pytest.fixture
def dev_ca(_dev_ca_template: DevCA, tmp_path: Path) -> DevCA:
    """A fresh copy of a demo CA on SQLite (token files and database copied per test)."""
    target = tmp_path / "ca"
    _copy_data_dir(_dev_ca_template, target)
    return DevCA(target, CONFIG_DIR, None)


@pytest.fixture(scope="session")
def _dev_ca_pg_template(
    postgres_server: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DevCA, str] | None]:
    """A demo CA on PostgreSQL built once; tests get copies (CREATE DATABASE ... TEMPLATE)."""
    if postgres_server is None:
        yield None
        return
    url, name = fresh_postgres_database(postgres_server)
    try:
        yield make_dev_ca(tmp_path_factory.mktemp("dev-ca-pg-template"), url), name
    finally:
        drop_postgres_database(postgres_server, name)


@pytest.fixture(params=["sqlite", "postgres"])
def dev_ca_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DevCA]:
    """A new demo CA on each configured database backend."""
    if request.param == "sqlite":
        yield request.getfixturevalue("dev_ca")
        return
    base = request.getfixturevalue("postgres_server")
    template = request.getfixturevalue("_dev_ca_pg_template")
    if base is None or template is None:
        pytest.skip("PostgreSQL not configured (set PKI_TEST_POSTGRES_URL)")
    template_ca, template_name = template
    url, name = fresh_postgres_database(base, template=template_name)
    try:
        _copy_data_dir(template_ca, tmp_path / "ca")
        yield DevCA(tmp_path / "ca", CONFIG_DIR, url)
    finally:
        drop_postgres_database(base, name)


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
