"""Fixtures for tests against a real SoftHSM2: one store per session, a fresh token per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from hsm import SoftHSMStore, Token, shared_softhsm_store

# Why one store for the whole session: SoftHSM reads SOFTHSM2_CONF once, in C_Initialize,
# and python-pkcs11 loads a module once per process (pkcs11.lib caches it by path), so tokens
# under several configuration directories cannot be opened in one pytest process. Instead,
# every test gets a new token *label* in one shared token directory. SoftHSM 2.6.1 lists only
# the tokens it found at C_Initialize, so Token re-initialises the module (python-pkcs11's
# lib.reinitialize(): C_Finalize + C_Initialize) when its label is missing; that closes every
# session of the process, and each Token reopens its own on next use (see hsm/token.py).


def _softhsm_missing() -> bool:
    return shutil.which("softhsm2-util") is None


@pytest.fixture(scope="session")
def softhsm_store(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMStore:
    """Returns the process's SoftHSM store (configuration and token directory)."""
    if _softhsm_missing():
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")
    return shared_softhsm_store(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture
def softhsm_token(softhsm_store: SoftHSMStore) -> Iterator[Token]:
    """Yields an opened Token on a fresh SoftHSM token with random PINs."""
    token = softhsm_store.open_token()
    token.ping()
    try:
        yield token
    finally:
        token.close()


@pytest.fixture(scope="module")
def module_token(softhsm_store: SoftHSMStore) -> Iterator[Token]:
    """Yields a Token shared by one test module, for keys that are slow to generate."""
    token = softhsm_store.open_token()
    try:
        yield token
    finally:
        token.close()
