"""An in-memory-key CA hierarchy over a real database: pki accepts any key object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pki.ceremony import CeremonyService
from pki.clock import SystemClock
from pki.config import ConfigSet
from pki.issuer import IssuanceService, Issuer
from pki.store import Database
from tests.conftest import CONFIG_DIR


@dataclasses.dataclass
class Hierarchy:
    config: ConfigSet
    db: Database
    issuance: IssuanceService
    root: Issuer
    devices: Issuer


def build_hierarchy(db: Database, config_dir: Path = CONFIG_DIR) -> Hierarchy:
    config = ConfigSet(config_dir)
    issuance = IssuanceService(db, SystemClock(), config.ca.urls)
    ceremonies = CeremonyService(issuance)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = ceremonies.root(
        config.ceremony(config_dir / "ceremonies" / "root.toml"),
        config.profile("root"),
        root_key,
        key_uri="memory:root",
        actor="test",
    )
    root = Issuer(
        "root", root.certificate, root_key, profiles=tuple(config.ca.issuers["root"].issues)
    )
    dev_key = ec.generate_private_key(ec.SECP256R1())
    devices = ceremonies.intermediate(
        config.ceremony(config_dir / "ceremonies" / "devices.toml"),
        config.profile("intermediate"),
        dev_key,
        root,
        key_uri="memory:devices",
        actor="test",
    )
    devices = Issuer(
        "devices", devices.certificate, dev_key, profiles=tuple(config.ca.issuers["devices"].issues)
    )
    return Hierarchy(config, db, issuance, root, devices)


@pytest.fixture
def hierarchy(db: Database) -> Hierarchy:
    """A root and a device CA with in-memory keys, on each configured database backend."""
    return build_hierarchy(db)


@pytest.fixture
def sqlite_hierarchy(sqlite_db: Database) -> Hierarchy:
    """The same hierarchy on SQLite only, for tests of pure policy."""
    return build_hierarchy(sqlite_db)
