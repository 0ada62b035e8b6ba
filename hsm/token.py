"""PKCS#11 module loading, one shared logged-in session per token, the lock, fork safety."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hsm.errors import (
    NO_RETRY_LOGIN_ERRORS,
    STALE_SESSION_ERRORS,
    HSMError,
    HSMErrorKind,
    from_pkcs11,
    is_outage,
)
from hsm.keys import HSMECPrivateKey, HSMPrivateKey, HSMRSAPrivateKey
from hsm.uri import PKCS11URI

T = TypeVar("T")

# Two processes logging in to one SoftHSM token at the same instant failed now and then
# (docs: DESIGN.md, "Processes and the HSM"); gunicorn starts its workers together, so a
# failed open/login is retried after a short, growing pause: 50, 100, 200, 400 ms.
LOGIN_ATTEMPTS = 5
LOGIN_FIRST_PAUSE = 0.05
# After a token error other than a PIN error the module is re-initialised on the next use
# (SoftHSM and most modules rescan their tokens only in C_Initialize). Until then, and
# between failed attempts, calls fail at once: 0.25 s after the first failure, doubling to 4 s.
RECOVERY_FIRST_PAUSE = 0.25
RECOVERY_MAX_PAUSE = 4.0


@dataclass(frozen=True)
class _KeySpec:
    key_type: KeyType
    curve: str | None = None
    bits: int | None = None


KEY_TYPES: dict[str, _KeySpec] = {
    "ec-p256": _KeySpec(KeyType.EC, curve="secp256r1"),
    "ec-p384": _KeySpec(KeyType.EC, curve="secp384r1"),
    "rsa-2048": _KeySpec(KeyType.RSA, bits=2048),
    "rsa-3072": _KeySpec(KeyType.RSA, bits=3072),
    "rsa-4096": _KeySpec(KeyType.RSA, bits=4096),
}


@dataclass
class _TokenState:
    """Holds the shared logged-in session of one token and the key handles found through it."""

    session: pkcs11.Session
    generation: int
    # Object handles belong to the session that found them (python-pkcs11 binds each object
    # to its session), so the cache lives and dies with the session.
    handles: dict[tuple[str, bytes], Any] = field(default_factory=dict)


_UNCHECKED = object()


class _Library:
    """Holds one PKCS#11 module per process: its lock, its sessions and its generation."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Under python-pkcs11, SoftHSM runs without its own locking (no CKF_OS_LOCKING_OK in
        # C_Initialize): two threads calling it at once failed. Every call into the module,
        # for every token on it, takes this one lock; processes give the parallelism.
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.lib: Any = None
        self.softhsm_conf: str | None = None
        self.needs_child_init = False
        # Bumped at every C_Initialize; a session opened under an older generation is dead.
        self.generation = 0
        # Set by a token error that left the module's view of its tokens in doubt.
        self.broken = False
        self.states: dict[str, _TokenState] = {}
        # The SOFTHSM2_CONF argument last found consistent with the loaded module: checking it
        # again resolves paths on disk (four lstat calls), on every signature otherwise.
        self._checked_conf: object = _UNCHECKED

    def forked(self) -> None:
        """Forgets what the parent held; the module is re-initialised on first use."""
        # The parent's lock may have been held by another thread at fork time and would
        # never be released here; the parent's session handles must not be used or closed
        # by the child (PKCS#11, applications and processes: a child process starts afresh
        # with C_Initialize and cannot use what its parent initialised).
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.states.clear()
        self.generation += 1
        self.needs_child_init = self.lib is not None

    def load(self, softhsm_conf: str | None) -> Any:
        """Returns the initialised module, loading it on first use (call with the lock held)."""
        if (
            softhsm_conf == self._checked_conf
            and self.lib is not None
            and not self.needs_child_init
            and not self.broken
            and self.pid == os.getpid()
        ):
            return self.lib
        self._checked_conf = _UNCHECKED
        if self.pid != os.getpid():
            # Belt and braces for a fork the at-fork hook did not see.
            self.pid = os.getpid()
            self.states.clear()
            self.generation += 1
            self.needs_child_init = self.lib is not None
        wanted = os.path.realpath(softhsm_conf) if softhsm_conf is not None else None
        if self.lib is None:
            if wanted is not None:
                # SoftHSM reads SOFTHSM2_CONF in C_Initialize, so it must be set before the
                # first load (and it stays set for later re-initialisations).
                os.environ["SOFTHSM2_CONF"] = wanted
            current = os.environ.get("SOFTHSM2_CONF")
            self.softhsm_conf = os.path.realpath(current) if current else None
            try:
                self.lib = pkcs11.lib(self.path)
            except p11.PKCS11Error as exc:
                raise HSMError(
                    HSMErrorKind.UNAVAILABLE,
                    f"PKCS#11 module {self.path} cannot be loaded: {exc}",
                    token_error=type(exc).__name__,
                ) from exc
            self.generation += 1
            return self.lib
        if wanted is not None and wanted != self.softhsm_conf:
            raise HSMError(
                HSMErrorKind.INVALID,
                f"module {self.path} was loaded in this process with SOFTHSM2_CONF="
                f"{self.softhsm_conf}; SoftHSM reads its configuration once per process, so a "
                f"token under {wanted} needs its own process (or one shared SoftHSMStore)",
            )
        if self.needs_child_init:
            self._child_init()
        elif self.broken:
            self.reinitialize()
        self._checked_conf = softhsm_conf
        return self.lib

    def _child_init(self) -> None:
        # SoftHSM notices the new PID and starts from scratch, so C_Finalize may answer
        # CKR_CRYPTOKI_NOT_INITIALIZED; other modules want C_Finalize first. python-pkcs11
        # marks the library uninitialised either way, so C_Initialize follows.
        with contextlib.suppress(p11.PKCS11Error):
            self.lib.finalize()
        try:
            self.lib.initialize()
        except p11.PKCS11Error as exc:
            raise from_pkcs11(exc, f"re-initialise {self.path} after fork") from exc
        self.needs_child_init = False
        self.generation += 1

    def reinitialize(self) -> None:
        """Runs C_Finalize and C_Initialize so the module sees tokens created since it loaded."""
        # SoftHSM 2.6.1 reads its token directory in C_Initialize: a token initialised
        # afterwards (softhsm2-util --init-token, another process) is missing from
        # C_GetSlotList until the module is finalised and initialised again. python-pkcs11's
        # lib.reinitialize() does exactly that (lib.finalize(); lib.initialize()). C_Finalize
        # closes every session of the process on this module (seen: SessionHandleInvalid on
        # the old session afterwards), hence the generation counter.
        if self.softhsm_conf is not None:
            os.environ["SOFTHSM2_CONF"] = self.softhsm_conf
        self.states.clear()
        self.generation += 1
        # A module whose token vanished may refuse C_Finalize; C_Initialize follows anyway.
        with contextlib.suppress(p11.PKCS11Error):
            self.lib.finalize()
        try:
            self.lib.initialize()
        except p11.PKCS11Error as exc:
            self.broken = True
            raise from_pkcs11(exc, f"re-initialise {self.path}") from exc
        self.broken = False

    def find_token(self, label: str) -> Any:
        """Returns the pkcs11 Token labelled `label`, re-scanning slots once if it is missing."""
        for attempt in range(2):
            found = list(self.lib.get_tokens(token_label=label))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise HSMError(
                    HSMErrorKind.INVALID, f"several tokens are labelled {label!r} in {self.path}"
                )
            if attempt == 0:
                self.reinitialize()
        raise HSMError(
            HSMErrorKind.UNAVAILABLE, f"no token labelled {label!r} in PKCS#11 module {self.path}"
        )


_registry: dict[str, _Library] = {}
_registry_lock = threading.Lock()


def _library_for(module_path: str) -> _Library:
    # Two spellings of one file would load it twice and the second C_Initialize would fail
    # with CKR_CRYPTOKI_ALREADY_INITIALIZED, so the registry key is the real path.
    key = os.path.realpath(module_path) if os.path.exists(module_path) else module_path
    with _registry_lock:
        library = _registry.get(key)
        if library is None:
            library = _registry[key] = _Library(key)
        return library


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for library in _registry.values():
        library.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Token:
    """Opens one token of a PKCS#11 module lazily and gives its keys out as cryptography keys."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        softhsm_conf: str | os.PathLike[str] | None = None,
    ) -> None:
        if not token_label:
            raise HSMError(HSMErrorKind.INVALID, "token label is empty")
        if not pin:
            raise HSMError(HSMErrorKind.INVALID, f"PIN for token {token_label!r} is empty")
        self.module_path = module_path
        self.label = token_label
        self._pin = pin
        self._softhsm_conf = os.fspath(softhsm_conf) if softhsm_conf is not None else None
        # Nothing is loaded here: a gunicorn master may build Tokens before it forks, and the
        # module must be opened in each worker, after the fork.
        self._library = _library_for(module_path)
        self._keys: dict[str, HSMPrivateKey] = {}
        # A PIN error is final for this object: every wrong PIN counts towards the token's
        # lock-out (CKF_USER_PIN_LOCKED), so the PIN is not tried again until the process is
        # restarted (or a reload builds a new Token).
        self._login_error: HSMError | None = None
        # Back-off after an "unavailable" error: no call reaches the module before _retry_at.
        self._last_error: HSMError | None = None
        self._pause = 0.0
        self._retry_at = 0.0
        self._destroyable_supported = True

    def __repr__(self) -> str:
        return f"Token(module_path={self.module_path!r}, token_label={self.label!r})"

    # -- keys ---------------------------------------------------------------------------

    def generate_key(self, label: str, key_type: str) -> HSMPrivateKey:
        """Returns a new key pair generated in the token, sensitive and not extractable."""
        spec = KEY_TYPES.get(key_type)
        if spec is None:
            raise HSMError(
                HSMErrorKind.UNSUPPORTED,
                f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}",
            )
        if not label:
            raise HSMError(HSMErrorKind.INVALID, "key label is empty")
        key_id = secrets.token_bytes(16)

        def generate(state: _TokenState) -> HSMPrivateKey:
            existing = list(state.session.get_objects({Attribute.LABEL: label}))
            if existing:
                raise HSMError(
                    HSMErrorKind.EXISTS, f"token {self.label!r} already holds a key {label!r}"
                )
            common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
            # PKCS#11 3.0 common storage attributes: "CKA_MODIFIABLE ... CK_FALSE if object is
            # read-only" and "CKA_DESTROYABLE ... CK_FALSE if the object cannot be destroyed".
            # With both false a stolen user PIN can neither relabel a CA key nor destroy it;
            # a module that does not know CKA_DESTROYABLE gets the template without it.
            protection: dict[Attribute, Any] = {Attribute.MODIFIABLE: False}
            if self._destroyable_supported:
                protection[Attribute.DESTROYABLE] = False
            public_template: dict[Attribute, Any] = {
                **common,
                **protection,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            # PKCS#11 private key objects: with CKA_SENSITIVE true and CKA_EXTRACTABLE false the
            # private value cannot be read or wrapped out, and the token then reports
            # CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE true for the key's life.
            private_template: dict[Attribute, Any] = {
                **common,
                **protection,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            if spec.key_type is KeyType.EC:
                assert spec.curve is not None
                public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(spec.curve)
                mechanism = Mechanism.EC_KEY_PAIR_GEN
            else:
                mechanism = Mechanism.RSA_PKCS_KEY_PAIR_GEN
            while True:
                try:
                    public, private = state.session.generate_keypair(
                        spec.key_type,
                        spec.bits,
                        store=True,
                        label=label,
                        id=key_id,
                        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        mechanism=mechanism,
                        public_template=public_template,
                        private_template=private_template,
                    )
                    break
                except p11.AttributeTypeInvalid:
                    # CKA_DESTROYABLE is PKCS#11 2.40 and later; an older module refuses it.
                    if Attribute.DESTROYABLE not in private_template:
                        raise
                    self._destroyable_supported = False
                    public_template.pop(Attribute.DESTROYABLE)
                    private_template.pop(Attribute.DESTROYABLE)
            state.handles[(label, key_id)] = private
            return self._wrap(label, key_id, spec.key_type, public)

        key = self._run(f"generate {key_type} key {label!r}", generate)
        self._keys[label] = key
        return key

    def load_key(self, label_or_uri: str) -> HSMPrivateKey:
        """Returns the private key named by a label or a pkcs11: URI (object= and/or id=)."""
        label, key_id = self._key_name(label_or_uri)
        if label is not None:
            cached = self._keys.get(label)
            if cached is not None and (key_id is None or cached.key_id == key_id):
                return cached
        key = self._run(
            f"load key {label_or_uri!r}", lambda state: self._find_key(state, label, key_id)
        )
        self._keys[key.label] = key
        return key

    def key_uri(self, label: str) -> str:
        """Returns the pkcs11: URI of the key labelled `label`."""
        return self.load_key(label).uri

    def key_attributes(self, label: str) -> dict[str, bool]:
        """Returns the protection attributes of the private key labelled `label`."""
        key = self.load_key(label)
        names = {
            "sensitive": Attribute.SENSITIVE,
            "extractable": Attribute.EXTRACTABLE,
            "token": Attribute.TOKEN,
            "private": Attribute.PRIVATE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
            "sign": Attribute.SIGN,
            "decrypt": Attribute.DECRYPT,
            "modifiable": Attribute.MODIFIABLE,
        }

        def read(state: _TokenState) -> dict[str, bool]:
            handle = self._private_handle(state, key.label, key.key_id)
            values = handle.get_attributes(list(names.values()))
            found = {name: bool(values[attribute]) for name, attribute in names.items()}
            try:
                found["destroyable"] = bool(handle[Attribute.DESTROYABLE])
            except p11.AttributeTypeInvalid:
                # A module older than PKCS#11 2.40 has no CKA_DESTROYABLE: every object is.
                found["destroyable"] = True
            return found

        return self._run(f"read attributes of key {label!r}", read)

    def read_private_value(self, label: str) -> bytes:
        """Asks the token for the private value of `label`; raises what the token answers."""
        key = self.load_key(label)
        # CKA_VALUE holds the private scalar of an EC key; an RSA key has no CKA_VALUE, its
        # secret is CKA_PRIVATE_EXPONENT.
        attribute = (
            Attribute.VALUE if isinstance(key, HSMECPrivateKey) else Attribute.PRIVATE_EXPONENT
        )

        def read(state: _TokenState) -> bytes:
            value = self._private_handle(state, key.label, key.key_id)[attribute]
            return bytes(value)

        return self._run(f"read the private value of key {label!r}", read)

    # -- token ----------------------------------------------------------------------------

    def ping(self) -> None:
        """Checks that the module answers and the token is present and logged in."""

        def check(state: _TokenState) -> None:
            # C_GetTokenInfo through the live session's slot: cheap, and it fails when the
            # token or the module is gone.
            info = state.session.token.slot.get_token()
            if info.label != self.label:
                raise HSMError(
                    HSMErrorKind.UNAVAILABLE, f"token {self.label!r} is no longer in its slot"
                )

        self._run(f"ping token {self.label!r}", check)

    def close(self) -> None:
        """Logs out and closes the shared session; the next call opens a new one."""
        library = self._library
        with library.lock:
            state = library.states.pop(self.label, None)
            if state is not None and state.generation == library.generation:
                # Closing is best effort: a dead session is as closed as it gets.
                with contextlib.suppress(p11.PKCS11Error):
                    state.session.close()
        self._keys.clear()

    # -- internals used by the key objects -----------------------------------------------

    def _sign(
        self,
        label: str,
        key_id: bytes,
        mechanism: Mechanism,
        data: bytes,
        mechanism_param: Any = None,
    ) -> bytes:
        """Returns the raw signature the token makes over `data` with `mechanism`."""

        def sign(state: _TokenState) -> bytes:
            handle = state.handles.get((label, key_id))
            if handle is None:
                handle = self._private_handle(state, label, key_id)
            signature: bytes = handle.sign(
                data, mechanism=mechanism, mechanism_param=mechanism_param
            )
            return signature

        return self._run(f"sign with key {label!r}", sign)

    def _run(self, action: str, operation: Callable[[_TokenState], T]) -> T:
        library = self._library
        with library.lock:
            self._check_ready(action)
            try:
                state = self._open_locked()
                try:
                    result = operation(state)
                except STALE_SESSION_ERRORS:
                    # The session or a cached handle went stale (token re-inserted, module
                    # re-initialised by someone else): reopen once and try again.
                    library.states.pop(self.label, None)
                    result = operation(self._open_locked())
            except p11.PKCS11Error as exc:
                error = from_pkcs11(exc, action)
                self._failed(error)
                raise error from exc
            except HSMError as error:
                self._failed(error)
                raise
            self._pause = 0.0
            self._last_error = None
            return result

    def _check_ready(self, action: str) -> None:
        """Raises at once after a PIN error, or while the back-off after an outage runs."""
        if self._login_error is not None:
            raise HSMError(
                HSMErrorKind.LOGIN,
                f"{action}: {self._login_error.message}; the PIN is not tried again before "
                "a restart or reload",
                token_error=self._login_error.token_error,
            )
        wait = self._retry_at - time.monotonic()
        if self._last_error is not None and wait > 0:
            raise HSMError(
                HSMErrorKind.UNAVAILABLE,
                f"{action}: token {self.label!r} unavailable ({self._last_error.message}); "
                f"next attempt in {wait:.1f} s",
                token_error=self._last_error.token_error,
            )

    def _failed(self, error: HSMError) -> None:
        """Drops the session pool after an outage, so the next use re-initialises the module."""
        if not is_outage(error):
            return  # a wrong key name or a refused attribute says nothing about the token
        library = self._library
        library.states.pop(self.label, None)
        library.broken = True
        self._pause = min(max(self._pause * 2, RECOVERY_FIRST_PAUSE), RECOVERY_MAX_PAUSE)
        self._retry_at = time.monotonic() + self._pause
        self._last_error = error

    def _open_locked(self) -> _TokenState:
        library = self._library
        library.load(self._softhsm_conf)
        state = library.states.get(self.label)
        if state is not None and state.generation == library.generation:
            return state
        library.states.pop(self.label, None)
        p11_token = library.find_token(self.label)
        session = self._login(p11_token)
        # find_token may have re-initialised the module; the session belongs to the
        # generation in force now.
        state = _TokenState(session=session, generation=library.generation)
        library.states[self.label] = state
        return state

    def _login(self, p11_token: Any) -> pkcs11.Session:
        pause = LOGIN_FIRST_PAUSE
        last: p11.PKCS11Error | None = None
        for attempt in range(LOGIN_ATTEMPTS):
            try:
                session: pkcs11.Session = p11_token.open(rw=True, user_pin=self._pin)
                return session
            except p11.UserAlreadyLoggedIn:
                # PKCS#11 C_Login: login state belongs to the application, so
                # when another session of this process is logged in a new one is as well.
                opened: pkcs11.Session = p11_token.open(rw=True)
                return opened
            except NO_RETRY_LOGIN_ERRORS as exc:
                # Never retried, not even by a later call: each wrong PIN counts towards the
                # token's lock-out.
                self._login_error = from_pkcs11(exc, f"log in to token {self.label!r}")
                raise self._login_error from exc
            except p11.PKCS11Error as exc:
                last = exc
                if attempt + 1 < LOGIN_ATTEMPTS:
                    time.sleep(pause)
                    pause *= 2
        assert last is not None
        raise from_pkcs11(
            last, f"log in to token {self.label!r} ({LOGIN_ATTEMPTS} attempts)"
        ) from last

    def _key_name(self, label_or_uri: str) -> tuple[str | None, bytes | None]:
        if not label_or_uri:
            raise HSMError(HSMErrorKind.INVALID, "key label is empty")
        if label_or_uri[:7].lower() != "pkcs11:":
            return label_or_uri, None
        uri = PKCS11URI.parse(label_or_uri)
        if uri.token is not None and uri.token != self.label:
            raise HSMError(
                HSMErrorKind.NOT_FOUND,
                f"key URI names token {uri.token!r}, this is token {self.label!r}",
            )
        if uri.type not in (None, "private"):
            raise HSMError(
                HSMErrorKind.INVALID, f"key URI has type={uri.type}; a signing key is private"
            )
        if uri.object is None and uri.id is None:
            raise HSMError(HSMErrorKind.INVALID, "key URI needs object= or id=")
        return uri.object, uri.id

    def _find_key(
        self, state: _TokenState, label: str | None, key_id: bytes | None
    ) -> HSMPrivateKey:
        private = self._private_handle(state, label, key_id)
        values = private.get_attributes([Attribute.LABEL, Attribute.ID, Attribute.KEY_TYPE])
        found_label = str(values[Attribute.LABEL])
        found_id = bytes(values[Attribute.ID])
        key_type = values[Attribute.KEY_TYPE]
        state.handles[(found_label, found_id)] = private
        # The public object is found by CKA_ID, which PKCS#11 intends "as a means of
        # distinguishing multiple public-key/private-key pairs held by the same subject"; a
        # key without an id falls back to its label.
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
        if found_id:
            template[Attribute.ID] = found_id
        else:
            template[Attribute.LABEL] = found_label
        publics = list(state.session.get_objects(template))
        if len(publics) != 1:
            raise HSMError(
                HSMErrorKind.NOT_FOUND,
                f"key {found_label!r} in token {self.label!r} has "
                f"{len(publics)} matching public key objects, expected 1",
            )
        return self._wrap(found_label, found_id, key_type, publics[0])

    def _private_handle(self, state: _TokenState, label: str | None, key_id: bytes | None) -> Any:
        if label is not None and key_id is not None:
            cached = state.handles.get((label, key_id))
            if cached is not None:
                return cached
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if label is not None:
            template[Attribute.LABEL] = label
        if key_id is not None:
            template[Attribute.ID] = key_id
        found = list(state.session.get_objects(template))
        name = label if label is not None else f"id={(key_id or b'').hex()}"
        if not found:
            raise HSMError(
                HSMErrorKind.NOT_FOUND, f"no private key {name!r} in token {self.label!r}"
            )
        if len(found) > 1:
            raise HSMError(
                HSMErrorKind.INVALID,
                f"{len(found)} private keys match {name!r} in token {self.label!r}",
            )
        handle = found[0]
        if label is not None and key_id is not None:
            state.handles[(label, key_id)] = handle
        return handle

    def _wrap(self, label: str, key_id: bytes, key_type: Any, public: Any) -> HSMPrivateKey:
        if key_type == KeyType.EC:
            loaded = serialization.load_der_public_key(encode_ec_public_key(public))
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise HSMError(HSMErrorKind.INVALID, f"public key of {label!r} is not EC")
            return HSMECPrivateKey(self, label, key_id, loaded)
        if key_type == KeyType.RSA:
            values = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(values[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(values[Attribute.MODULUS], "big"),
            )
            return HSMRSAPrivateKey(self, label, key_id, numbers.public_key())
        raise HSMError(
            HSMErrorKind.UNSUPPORTED,
            f"key {label!r} has PKCS#11 key type {key_type!r}; only EC and RSA sign here",
        )
