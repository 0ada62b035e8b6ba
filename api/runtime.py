"""The composition root: reads configuration, opens the database and the token, builds issuers.

Only this module, the Flask app factories and api/cli.py open the token through `hsm` and
hand key objects to `pki`; environment variables are read here and nowhere deeper.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

import hsm
from pki.clock import Clock, SystemClock
from pki.config import ConfigSet
from pki.crl_publisher import CRLPublisherConfig
from pki.errors import ErrorKind, PKIError, config_error, not_found
from pki.issuer import IssuanceHook, IssuanceService, Issuer, _no_hook
from pki.ocsp_responder import OCSPResponderConfig
from pki.store import Database, audit, session_scope
from pki.store.repository import IssuerRepository

DEFAULT_CONFIG_DIR = "ca-config"
DEFAULT_DATA_DIR = "dev-data"


def domain_error(error: BaseException) -> PKIError | None:
    """Returns the domain error for a failure the web edge may answer, or None for a bug.

    Token errors reach the edge as hsm.HSMError from inside pki (a key object signs through
    the token); every one of them means the key cannot be used right now, HTTP 503 or OCSP
    tryLater. pki.store already raises database outages as PKIError.
    """
    if isinstance(error, PKIError):
        return error
    if isinstance(error, hsm.HSMError):
        return PKIError(ErrorKind.UNAVAILABLE, "the token is unavailable")
    return None


def resolve_database_url(url: str, data_dir: Path) -> str:
    """Makes a relative SQLite path relative to the data directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
        return prefix + str((data_dir / url[len(prefix) :]).resolve())
    if url.startswith("postgresql://"):
        # psycopg 3 is the driver we ship; plain postgresql:// would pick psycopg2.
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


@dataclasses.dataclass
class Runtime:
    """Runtime holds what a process opened: configuration, database, token, issuers."""

    config: ConfigSet
    data_dir: Path
    environ: Mapping[str, str]
    clock: Clock = dataclasses.field(default_factory=SystemClock)
    _db: Database | None = None
    _tokens: dict[str, hsm.Token] = dataclasses.field(default_factory=dict)
    _issuers: dict[str, Issuer] = dataclasses.field(default_factory=dict)
    # The long-running process this runtime serves ("ca", "va", "scheduler"), and the tokens
    # it may open; None: a command-line ceremony or tool, which may open any.
    process: str | None = None
    _allowed: frozenset[str] | None = None

    @classmethod
    def open(
        cls,
        config_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Runtime:
        env = os.environ if environ is None else environ
        cdir = Path(config_dir or env.get("PKI_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
        ddir = Path(data_dir or env.get("PKI_DATA_DIR") or DEFAULT_DATA_DIR)
        return cls(config=ConfigSet(cdir), data_dir=ddir.resolve(), environ=env)

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def database_url(self) -> str:
        url = self.environ.get("PKI_DATABASE_URL") or self.config.ca.database.url
        return resolve_database_url(url, self.data_dir)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.database_url)
        return self._db

    def use_process(self, process: str) -> Runtime:
        """Limits this runtime to the tokens `process` needs; refuses a list naming others."""
        self._allowed = frozenset(self.config.ca.process_tokens(process))
        self.process = process
        return self

    def may_open(self, name: str) -> bool:
        """Tells whether this process may open the token `name`."""
        return self._allowed is None or name in self._allowed

    def token_named(self, name: str) -> hsm.Token:
        """Returns the token configured as [tokens.NAME], opened lazily, if this process may."""
        cfg = self.config.ca.tokens.get(name)
        if cfg is None:
            raise config_error(f"ca.toml: no token {name!r} in [tokens]")
        if not self.may_open(name):
            raise config_error(
                f"this process ({self.process}) does not open token {name!r} "
                f"(ca.toml processes.{self.process})"
            )
        token = self._tokens.get(name)
        if token is None:
            pin = hsm.read_pin(
                pin_file=self.path(cfg.pin_file) if cfg.pin_file else None,
                pin_env=cfg.pin_env,
                environ=self.environ,
            )
            token = hsm.Token(
                cfg.module,
                self.token_label(name),
                pin,
                softhsm_conf=str(self.path(cfg.softhsm_conf)) if cfg.softhsm_conf else None,
            )
            self._tokens[name] = token
        return token

    def token_label(self, name: str) -> str:
        """Returns the PKCS#11 label of the token configured as [tokens.NAME]."""
        cfg = self.config.ca.tokens[name]
        if cfg.token is not None:
            return cfg.token
        label = hsm.PKCS11URI.parse(cfg.uri or "").token
        if label is None:
            raise config_error(f"ca.toml: tokens.{name}.uri: the URI names no token (token=...)")
        return label

    def issuer_token(self, issuer_id: str) -> hsm.Token:
        """Returns the token that holds an issuer's key."""
        return self.token_named(self.config.ca.issuer_token(issuer_id))

    def signer_token(self, issuer_id: str) -> hsm.Token:
        """Returns the token that holds an issuer's OCSP-signer keys."""
        return self.token_named(self.config.ca.signer_token(issuer_id))

    def audit_token(self) -> hsm.Token:
        """Returns the token that holds the audit key."""
        return self.token_named(self.config.ca.audit_token())

    def load_key(self, uri: str) -> hsm.HSMPrivateKey:
        """Loads a key named by its pkcs11: URI from the configured token the URI names."""
        label = hsm.PKCS11URI.parse(uri).token if uri[:7].lower() == "pkcs11:" else None
        for name in self.config.ca.tokens:
            if label is not None and self.token_label(name) == label:
                return self.token_named(name).load_key(uri)
        raise config_error(f"key {uri!r} is in no token of ca.toml [tokens]")

    def ping_tokens(self, process: str) -> None:
        """Checks every token that `process` opens."""
        names = (
            self._allowed if self._allowed is not None else self.config.ca.tokens_needed(process)[0]
        )
        for name in sorted(names):
            self.token_named(name).ping()

    def generate_key(
        self, label: str, key_type: str, *, token: str, actor: str
    ) -> hsm.HSMPrivateKey:
        """Generates a key inside a token and writes the key generation to the audit log."""
        key = self.token_named(token).generate_key(label, key_type)
        with session_scope(self.db) as session:
            audit.append(
                session,
                at=self.clock.now(),
                actor=actor,
                action="key.generated",
                target=key.uri,
                details={"label": label, "key_type": key_type, "token": self.token_label(token)},
            )
        return key

    def reuse_or_generate_key(
        self, label: str, key_type: str, *, token: str, actor: str
    ) -> hsm.HSMPrivateKey:
        """Returns the token's key `label`, generating it only if the token has none."""
        # A ceremony that stopped after making a key but before certifying it picks the key
        # up again instead of making a second one.
        try:
            return self.token_named(token).load_key(label)
        except hsm.HSMError as e:
            if e.kind is not hsm.HSMErrorKind.NOT_FOUND:
                raise
        return self.generate_key(label, key_type, token=token, actor=actor)

    def ocsp_config(self) -> OCSPResponderConfig:
        """Returns the OCSP windows from ca.toml [revocation]."""
        r = self.config.ca.revocation
        return OCSPResponderConfig(
            validity=datetime.timedelta(hours=r.ocsp_validity_hours),
            max_age_seconds=r.ocsp_max_age_seconds,
            extended_revoke=r.extended_revoke,
        )

    def crl_config(self) -> CRLPublisherConfig:
        """Returns the CRL windows from ca.toml [revocation]."""
        r = self.config.ca.revocation
        return CRLPublisherConfig(
            full_validity=datetime.timedelta(hours=r.crl_validity_hours),
            delta_validity=datetime.timedelta(hours=r.delta_crl_validity_hours),
            deltas=r.delta_crls,
            renew_fraction=r.crl_renew_fraction,
        )

    def issuance(self, hook: IssuanceHook = _no_hook) -> IssuanceService:
        return IssuanceService(self.db, self.clock, self.config.ca.urls, hook=hook)

    def issuer(self, issuer_id: str) -> Issuer:
        """Opens an issuer: its certificate from the store, its key from the token."""
        if issuer_id in self._issuers:
            return self._issuers[issuer_id]
        cfg = self.config.ca.issuers.get(issuer_id)
        if cfg is None:
            raise not_found(f"no issuer {issuer_id!r} in ca.toml")
        with session_scope(self.db) as session:
            record = IssuerRepository(session).get(issuer_id)
            cert_der = record.cert_der
        if cert_der is None:
            raise config_error(f"issuer {issuer_id} has no certificate yet: finish its ceremony")
        key = self.issuer_token(issuer_id).load_key(cfg.key_label)
        issuer = Issuer(
            issuer_id, x509.load_der_x509_certificate(cert_der), key, profiles=tuple(cfg.issues)
        )
        self._issuers[issuer_id] = issuer
        return issuer

    def online_issuer(self, issuer_id: str) -> Issuer | None:
        """Opens an issuer whose key is in this process's token; None when it is not there
        (an offline root, whose CRL is signed in a ceremony and imported)."""
        if not self.may_open(self.config.ca.issuer_token(issuer_id)):
            return None
        try:
            return self.issuer(issuer_id)
        except hsm.HSMError as e:
            if e.kind is hsm.HSMErrorKind.NOT_FOUND:
                return None
            raise

    def issuer_certificate(self, issuer_id: str) -> x509.Certificate:
        """Returns an issuer's certificate from the store, without opening its key."""
        with session_scope(self.db) as session:
            cert_der = IssuerRepository(session).get(issuer_id).cert_der
        if cert_der is None:
            raise config_error(f"issuer {issuer_id} has no certificate yet: finish its ceremony")
        return x509.load_der_x509_certificate(cert_der)

    def issuer_for_profile(self, profile: str) -> str:
        """Names the first issuer in ca.toml that issues a profile."""
        for issuer_id, cfg in self.config.ca.issuers.items():
            if profile in cfg.issues:
                return issuer_id
        raise not_found(f"no issuer in ca.toml issues profile {profile!r}")

    def close(self) -> None:
        for token in self._tokens.values():
            token.close()
        if self._db is not None:
            self._db.dispose()
