"""Key access through PKCS#11: tokens, keys that sign in the token, pkcs11: URIs, SoftHSM set-up."""

from hsm.errors import HSMError, HSMErrorKind
from hsm.keys import HSMECPrivateKey, HSMPrivateKey, HSMRSAPrivateKey
from hsm.pin import read_pin, write_pin_file
from hsm.softhsm import (
    SoftHSMStore,
    SoftHSMToken,
    find_softhsm_module,
    init_softhsm_token,
    shared_softhsm_store,
)
from hsm.token import KEY_TYPES, Token
from hsm.uri import PKCS11URI

__all__ = [
    "KEY_TYPES",
    "PKCS11URI",
    "HSMECPrivateKey",
    "HSMError",
    "HSMErrorKind",
    "HSMPrivateKey",
    "HSMRSAPrivateKey",
    "SoftHSMStore",
    "SoftHSMToken",
    "Token",
    "find_softhsm_module",
    "init_softhsm_token",
    "read_pin",
    "shared_softhsm_store",
    "write_pin_file",
]
