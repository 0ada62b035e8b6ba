"""EST configuration (ca-config/est.toml): labels, their issuer, profile and allowed logins."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pki.config import ConfigSet, _load_toml, _model
from pki.errors import bad_request, config_error, not_found

EST_FILE = "est.toml"

AuthMethod = Literal["basic", "idevid", "reenroll"]
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelConfig(_Strict):
    """LabelConfig is one EST label: which CA signs, with which profile, after which login."""

    issuer: str
    profile: str
    auth: list[AuthMethod]
    manual_approval: bool = False
    serverkeygen: bool = False
    manufacturer_anchors: list[str] = Field(default_factory=list)
    # Intermediates of those manufacturers, for clients (or a proxy) that send the leaf only.
    manufacturer_intermediates: list[str] = Field(default_factory=list)
    idevid_device_id: Literal["serialNumber", "CN"] = "serialNumber"
    # An IDevID of a trusted manufacturer may register a device the registry does not hold.
    idevid_auto_register: bool = False

    @field_validator("auth")
    @classmethod
    def _some_auth(cls, v: list[AuthMethod]) -> list[AuthMethod]:
        if not v:
            raise ValueError("must name at least one of basic, idevid, reenroll")
        if len(set(v)) != len(v):
            raise ValueError("names a method twice")
        return v

    @model_validator(mode="after")
    def _anchors_for_idevid(self) -> LabelConfig:
        if "idevid" in self.auth and not self.manufacturer_anchors:
            raise ValueError("auth idevid needs manufacturer_anchors")
        if self.manufacturer_anchors and "idevid" not in self.auth:
            raise ValueError("manufacturer_anchors are only used with auth idevid")
        if self.manufacturer_intermediates and "idevid" not in self.auth:
            raise ValueError("manufacturer_intermediates are only used with auth idevid")
        return self


class ESTConfig(_Strict):
    """ESTConfig is est.toml: labels, secret lifetime, lock-out, size limit and proxies."""

    default_label: str | None = None
    secret_lifetime_hours: Annotated[int, Field(gt=0, le=24 * 365)] = 72
    max_failures: Annotated[int, Field(gt=0, le=1000)] = 5
    max_address_failures: Annotated[int, Field(gt=0, le=100000)] = 50
    lockout_minutes: Annotated[int, Field(ge=1, le=24 * 60)] = 15
    max_body_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 16384
    supersede_grace_seconds: Annotated[int, Field(ge=0, le=90 * 86400)] = 0
    retry_after_seconds: Annotated[int, Field(ge=1, le=86400)] = 60
    # A pending certificate row older than this was left by a request that failed and was
    # never retried: the sweep marks it abandoned. Far above any request's duration.
    pending_max_age_seconds: Annotated[int, Field(ge=300, le=30 * 86400)] = 86400
    trusted_proxies: list[str] = Field(default_factory=list)
    proxy_cert_header: str = "X-SSL-Client-Cert"
    # The CA front's TLS server certificate (chain) and key, relative to the data directory.
    tls_certfile: str = "tls/server.pem"
    tls_keyfile: str = "tls/server.key"
    labels: dict[str, LabelConfig]

    @field_validator("labels")
    @classmethod
    def _label_names(cls, v: dict[str, LabelConfig]) -> dict[str, LabelConfig]:
        if not v:
            raise ValueError("must define at least one label")
        for name in v:
            if not _LABEL_RE.match(name):
                raise ValueError(f"label {name!r} is not a valid URL path segment")
            # RFC 7030 3.2.2: the label must not collide with an operation path.
            if name in ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen"):
                raise ValueError(f"label {name!r} is an EST operation name")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return v

    @field_validator("proxy_cert_header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", v):
            raise ValueError("must be an HTTP header name")
        return v

    @model_validator(mode="after")
    def _default_known(self) -> ESTConfig:
        if self.default_label is not None and self.default_label not in self.labels:
            raise ValueError(f"default_label {self.default_label!r} is not a label")
        return self

    @property
    def secret_lifetime(self) -> datetime.timedelta:
        return datetime.timedelta(hours=self.secret_lifetime_hours)

    @property
    def lockout(self) -> datetime.timedelta:
        return datetime.timedelta(minutes=self.lockout_minutes)

    @property
    def pending_max_age(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.pending_max_age_seconds)

    @property
    def supersede_grace(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.supersede_grace_seconds)

    def label(self, name: str | None) -> tuple[str, LabelConfig]:
        """Returns a label by name; None asks for the default label."""
        if name is None:
            if self.default_label is None:
                raise not_found("this server has no default EST label: name one in the path")
            name = self.default_label
        try:
            return name, self.labels[name]
        except KeyError:
            raise not_found(f"no EST label {name!r}") from None

    def secret_labels(self, names: Sequence[str]) -> tuple[str, ...]:
        """Resolves the labels a new one-time secret is for (none given: the default label)."""
        if not names:
            if self.default_label is None:
                raise bad_request("this server has no default EST label: name one with --label")
            names = [self.default_label]
        out: list[str] = []
        for name in names:
            label, cfg = self.label(name)
            if "basic" not in cfg.auth:
                raise bad_request(f"label {label} does not accept one-time secrets (auth basic)")
            if label not in out:
                out.append(label)
        return tuple(out)

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]


def load_est_config(config: ConfigSet, path: Path | None = None) -> ESTConfig:
    """Loads and checks est.toml against the issuers and profiles of the configuration."""
    path = path or config.directory / EST_FILE
    est = _model(ESTConfig, path, _load_toml(path))
    for name, label in est.labels.items():
        issuer = config.ca.issuers.get(label.issuer)
        if issuer is None:
            raise config_error(f"{path}: labels.{name}.issuer: {label.issuer!r} is not in ca.toml")
        if label.profile not in config.profiles:
            raise config_error(f"{path}: labels.{name}.profile: unknown profile {label.profile!r}")
        if label.profile not in issuer.issues:
            raise config_error(
                f"{path}: labels.{name}.profile: issuer {label.issuer} does not issue "
                f"{label.profile!r}"
            )
        profile = config.profiles[label.profile]
        if profile.kind != "end-entity":
            raise config_error(f"{path}: labels.{name}.profile: {label.profile} is not end-entity")
        if profile.device_id_attribute is None:
            raise config_error(
                f"{path}: labels.{name}.profile: {label.profile} names no device_id_attribute"
            )
        if profile.identity is None:
            # DESIGN.md invariant 3: a device certificate's names come from the registry;
            # without [identity] they would be the ones the CSR chose.
            raise config_error(
                f"{path}: labels.{name}.profile: {label.profile} has no [identity] section "
                "(the subject and SAN the CA writes for a device)"
            )
    return est


def load_anchors(est: ESTConfig, label: str, data_dir: Path) -> list[x509.Certificate]:
    """Reads a label's manufacturer trust anchors (PEM files, relative to the data directory)."""
    names = est.labels[label].manufacturer_anchors
    return _load_pems(label, "manufacturer_anchors", names, data_dir)


def load_intermediates(est: ESTConfig, label: str, data_dir: Path) -> list[x509.Certificate]:
    """Reads a label's manufacturer intermediates (PEM files, relative to the data directory)."""
    names = est.labels[label].manufacturer_intermediates
    return _load_pems(label, "manufacturer_intermediates", names, data_dir)


def _load_pems(label: str, key: str, names: list[str], data_dir: Path) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for name in names:
        path = Path(name) if Path(name).is_absolute() else data_dir / name
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            raise config_error(f"{EST_FILE}: labels.{label}.{key}: {path} not found") from None
        except ValueError:
            raise config_error(
                f"{EST_FILE}: labels.{label}.{key}: {path} holds no PEM certificate"
            ) from None
        out.extend(certs)
    return out


def anchor_paths(est: ESTConfig, data_dir: Path) -> list[Path]:
    """Lists every manufacturer anchor and intermediate file, for the TLS client CA list."""
    # OpenSSL builds client paths up to a self-signed certificate of this list (no partial
    # chains), so an intermediate here helps a leaf-only client without becoming an anchor.
    seen: list[Path] = []
    for label in est.labels.values():
        for name in (*label.manufacturer_anchors, *label.manufacturer_intermediates):
            path = Path(name) if Path(name).is_absolute() else data_dir / name
            if path not in seen:
                seen.append(path)
    return seen
