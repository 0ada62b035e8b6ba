"""Configuration: ca.toml, profiles/*.toml and ceremonies/*.toml, validated at load."""

from __future__ import annotations

import string
import tomllib
import unicodedata
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pki.errors import config_error, not_found

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
SubjectAttribute = Literal["CN", "O", "OU", "C", "ST", "L", "serialNumber", "emailAddress"]
SANType = Literal["dns", "ip", "uri", "email"]
KeyUsageName = Literal[
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
]
ExtendedKeyUsageName = Literal["server_auth", "client_auth", "ocsp_signing", "code_signing"]


M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenConfig(_Strict):
    """TokenConfig names one PKCS#11 token: module, label (or RFC 7512 URI) and PIN source."""

    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    # The token's label, or an RFC 7512 URI that names it (pkcs11:token=...).
    token: str | None = None
    uri: str | None = None
    pin_file: str | None = None
    pin_env: str | None = None
    softhsm_conf: str | None = None

    @model_validator(mode="after")
    def _one_name_one_pin_source(self) -> TokenConfig:
        if (self.token is None) == (self.uri is None):
            raise ValueError("set exactly one of token and uri")
        if (self.pin_file is None) == (self.pin_env is None):
            raise ValueError("set exactly one of pin_file and pin_env")
        return self


# One [hsm] section, the older form of a configuration with one token, still reads.
HSMConfig = TokenConfig

PROCESSES = ("ca", "va", "scheduler")


class ProcessesConfig(_Strict):
    """ProcessesConfig lists the tokens each long-running process may open ([processes])."""

    ca: list[str] | None = None
    va: list[str] | None = None
    scheduler: list[str] | None = None


class URLConfig(_Strict):
    """URLConfig holds the base URLs embedded in certificates (OCSP, CRL, caIssuers)."""

    ocsp: str = "http://127.0.0.1:8080/ocsp"
    crl: str = "http://127.0.0.1:8080/crl"
    ca_issuers: str = "http://127.0.0.1:8080/ca"

    @field_validator("ocsp", "crl", "ca_issuers")
    @classmethod
    def _http(cls, v: str) -> str:
        # RFC 5280 4.2.1.13 / 4.2.2.1: relying parties fetch these over HTTP; HTTPS
        # would need revocation checking of its own server certificate.
        if not v.startswith("http://"):
            raise ValueError("must be an http:// URL")
        return v.rstrip("/")


class IssuerConfig(_Strict):
    """IssuerConfig is one CA of the hierarchy: its key, the tokens that hold it and its signer."""

    key_label: str
    # Names in [tokens]; may be left out when there is one token.
    token: str | None = None
    parent: str | None = None
    ocsp_signer_key_label: str | None = None
    ocsp_signer_token: str | None = None
    issues: list[str] = Field(default_factory=list)  # profile names it may sign with


class RevocationConfig(_Strict):
    """RevocationConfig holds the OCSP and CRL time windows (ca.toml [revocation])."""

    # nextUpdate of OCSP responses, live or pre-signed; pre-signed ones are refreshed
    # before half of it has passed.
    ocsp_validity_hours: Annotated[int, Field(gt=0, le=24 * 14)] = 24
    # HTTP caches may keep an OCSP response this long (never beyond its nextUpdate).
    ocsp_max_age_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 3600
    # RFC 6960 2.2: answer never-issued serials "revoked" with the extended-revoke
    # extension instead of "unknown".
    extended_revoke: bool = False
    # nextUpdate = thisUpdate + this, for full and delta CRLs (RFC 5280 5.1.2.5).
    crl_validity_hours: Annotated[int, Field(gt=0, le=24 * 366)] = 168
    delta_crl_validity_hours: Annotated[int, Field(gt=0, le=24 * 31)] = 24
    # The intermediates publish a delta CRL with every full CRL, and the full CRL points at
    # it (Freshest CRL), when true; when false no CRL carries a Freshest CRL.
    delta_crls: bool = True
    # The scheduler renews a CRL once this fraction of its validity has passed (at the
    # latest; revocations and the period make it due earlier).
    crl_renew_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5


class AuditConfig(_Strict):
    """AuditConfig names the audit key and how often checkpoints are signed (ca.toml [audit])."""

    # The key lives in a token under its own label and signs checkpoints only.
    key_label: str = "audit"
    token: str | None = None
    key_type: KeyType = "ec-p256"
    # The audit certificate: the verifier's trust anchor, relative to the data directory.
    certificate: str = "certs/audit.pem"
    # A checkpoint is due after this many events or this many seconds, whichever comes first.
    checkpoint_events: Annotated[int, Field(gt=0, le=1_000_000)] = 1000
    checkpoint_seconds: Annotated[int, Field(gt=0, le=86400)] = 300
    # `pki audit verify` refuses a log whose newest checkpoint is older than this.
    max_checkpoint_age_seconds: Annotated[int, Field(gt=0, le=30 * 86400)] = 3600

    @model_validator(mode="after")
    def _age_covers_interval(self) -> AuditConfig:
        if self.max_checkpoint_age_seconds < self.checkpoint_seconds:
            raise ValueError("max_checkpoint_age_seconds must be at least checkpoint_seconds")
        return self


class DatabaseConfig(_Strict):
    url: str = "sqlite:///pki.db"


class CAConfig(_Strict):
    """CAConfig is ca.toml: tokens, database, URLs and the issuers."""

    tokens: dict[str, TokenConfig]
    processes: ProcessesConfig = ProcessesConfig()
    database: DatabaseConfig = DatabaseConfig()
    urls: URLConfig = URLConfig()
    revocation: RevocationConfig = RevocationConfig()
    audit: AuditConfig = AuditConfig()
    issuers: dict[str, IssuerConfig]

    @model_validator(mode="before")
    @classmethod
    def _single_hsm(cls, data: object) -> object:
        if isinstance(data, dict) and "hsm" in data:
            if "tokens" in data:
                raise ValueError("set [tokens.NAME] sections or one [hsm] section, not both")
            data = {k: v for k, v in data.items() if k != "hsm"} | {"tokens": {"hsm": data["hsm"]}}
        return data

    @field_validator("issuers")
    @classmethod
    def _parents_known(cls, v: dict[str, IssuerConfig]) -> dict[str, IssuerConfig]:
        for name, issuer in v.items():
            if issuer.parent is not None and issuer.parent not in v:
                raise ValueError(f"issuer {name!r} names unknown parent {issuer.parent!r}")
        return v

    @model_validator(mode="after")
    def _tokens_known(self) -> CAConfig:
        if not self.tokens:
            raise ValueError("tokens: name at least one token")
        # (where, token name, whether a name is needed when there are several tokens)
        named: list[tuple[str, str | None, bool]] = [("audit.token", self.audit.token, True)]
        for issuer_id, issuer in self.issuers.items():
            named.append((f"issuers.{issuer_id}.token", issuer.token, True))
            named.append(
                (
                    f"issuers.{issuer_id}.ocsp_signer_token",
                    issuer.ocsp_signer_token,
                    issuer.ocsp_signer_key_label is not None,
                )
            )
        for process in PROCESSES:
            for token in getattr(self.processes, process) or []:
                named.append((f"processes.{process}", token, True))
        for where, token, needed in named:
            if token is None and needed and len(self.tokens) > 1:
                raise ValueError(f"{where}: name one of the tokens {sorted(self.tokens)}")
            if token is not None and token not in self.tokens:
                raise ValueError(f"{where}: unknown token {token!r}")
        return self

    def token_of(self, name: str | None, what: str) -> str:
        """Returns the token name a key setting names, or the only token when it names none."""
        if name is not None:
            return name
        if len(self.tokens) == 1:
            return next(iter(self.tokens))
        raise config_error(f"ca.toml: {what}: name the token that holds the key")

    def issuer_token(self, issuer_id: str) -> str:
        """Returns the name of the token that holds an issuer's key."""
        return self.token_of(self.issuers[issuer_id].token, f"issuers.{issuer_id}.token")

    def signer_token(self, issuer_id: str) -> str:
        """Returns the name of the token that holds an issuer's OCSP-signer keys."""
        issuer = self.issuers[issuer_id]
        return self.token_of(issuer.ocsp_signer_token, f"issuers.{issuer_id}.ocsp_signer_token")

    def audit_token(self) -> str:
        """Returns the name of the token that holds the audit key."""
        return self.token_of(self.audit.token, "audit.token")

    def tokens_needed(self, process: str) -> tuple[set[str], set[str]]:
        """Returns the tokens a process needs, and those it may open besides (an online root)."""
        issuing = {self.issuer_token(i) for i, c in self.issuers.items() if c.parent is not None}
        signing = {self.signer_token(i) for i, c in self.issuers.items() if c.ocsp_signer_key_label}
        roots = {self.issuer_token(i) for i, c in self.issuers.items() if c.parent is None}
        if process == "ca":
            return issuing, set()
        if process == "va":
            return signing, set()
        if process == "scheduler":
            needed = issuing | signing | {self.audit_token()}
            return needed, roots - needed
        raise ValueError(f"unknown process {process!r}")

    def process_tokens(self, process: str) -> set[str]:
        """Returns the tokens a process opens; refuses a list that names one it does not need."""
        needed, optional = self.tokens_needed(process)
        listed = getattr(self.processes, process)
        if listed is None:
            return needed
        extra = sorted(set(listed) - needed - optional)
        if extra:
            raise config_error(
                f"ca.toml: processes.{process}: token(s) {', '.join(extra)} hold no key that "
                f"'pki {_COMMAND[process]}' uses; it opens only {', '.join(sorted(needed))}: "
                "remove them from the list (and their PINs from this host)"
            )
        missing = sorted(needed - set(listed))
        if missing:
            raise config_error(
                f"ca.toml: processes.{process}: 'pki {_COMMAND[process]}' needs token(s) "
                f"{', '.join(missing)}"
            )
        return set(listed)


_COMMAND = {"ca": "serve ca", "va": "serve va", "scheduler": "scheduler run"}


class SubjectPolicy(_Strict):
    required: list[SubjectAttribute] = Field(default_factory=list)
    allowed: list[SubjectAttribute] = Field(default_factory=lambda: list[SubjectAttribute](["CN"]))


# Registry fields a device name template may use: `{device_id}`, `{model}`, `{batch}`.
TEMPLATE_FIELDS = ("device_id", "model", "batch")

# Unicode categories no certificate name may hold: controls (NUL, ESC, DEL ...), format
# characters (bidi overrides such as U+202E, zero-width joiners), surrogates, line and
# paragraph separators. They make a name print as something it is not.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def forbidden_character(value: str) -> str | None:
    """Returns the first character of a name that must not appear in one, as U+XXXX."""
    for c in value:
        if unicodedata.category(c) in FORBIDDEN_CATEGORIES:
            return f"U+{ord(c):04X}"
    return None


def template_fields(template: str) -> list[str]:
    """Lists the registry fields a name template uses, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _check_template(template: str) -> str:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    for literal, field, spec, conversion in parts:
        bad = forbidden_character(literal)
        if bad is not None:
            raise ValueError(f"holds the control, format or bidi character {bad}")
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"unknown field {{{field}}}: use {{device_id}}, {{model}} or {{batch}}"
            )
    if not template.strip():
        raise ValueError("must not be empty")
    return template


NameTemplate = Annotated[str, AfterValidator(_check_template)]


def _check_name(value: str) -> str:
    bad = forbidden_character(value)
    if bad is not None:
        raise ValueError(f"holds the control, format or bidi character {bad}")
    return value


# A name an operator writes (ceremony subjects): the character rules of every name.
NameValue = Annotated[str, AfterValidator(_check_name)]


class SANTemplate(_Strict):
    """SANTemplate is one subjectAltName entry the CA writes, e.g. a URI from the device ID."""

    type: Literal["dns", "uri", "email"]
    value: NameTemplate


class IdentityConfig(_Strict):
    """IdentityConfig says where each name of a device certificate comes from.

    Values are templates over the authenticated device's registry record (`{device_id}`,
    `{model}`, `{batch}`) or fixed strings. An attribute whose template uses a field the
    device does not have (no model, say) is left out.
    """

    subject: dict[SubjectAttribute, NameTemplate]
    san: list[SANTemplate] = Field(default_factory=list)


class NameConstraintsConfig(_Strict):
    permitted_dns: list[str] = Field(default_factory=list)
    excluded_dns: list[str] = Field(default_factory=list)


class ProfileConfig(_Strict):
    """ProfileConfig is one certificate profile (profiles/NAME.toml)."""

    name: str
    kind: Literal["root", "intermediate", "end-entity", "ocsp-signer"]
    validity_days: Annotated[int, Field(gt=0, le=36500)]
    key_types: list[KeyType]
    subject: SubjectPolicy = SubjectPolicy()
    san_types: list[SANType] = Field(default_factory=list)
    san_required: bool = False
    key_usage: list[KeyUsageName]
    extended_key_usage: list[ExtendedKeyUsageName] = Field(default_factory=list)
    path_length: int | None = None
    name_constraints: NameConstraintsConfig | None = None
    device_id_attribute: Literal["serialNumber", "CN"] | None = None
    # The names the CA writes into certificates of this profile issued over EST.
    identity: IdentityConfig | None = None
    ocsp_no_check: bool = False
    crl_distribution_point: bool = True
    authority_info_access: bool = True
    backdate_seconds: Annotated[int, Field(ge=0, le=3600)] = 60

    @field_validator("key_types")
    @classmethod
    def _some_key_types(cls, v: list[KeyType]) -> list[KeyType]:
        if not v:
            raise ValueError("must name at least one key type")
        return v

    @model_validator(mode="after")
    def _identity_fits(self) -> ProfileConfig:
        if self.identity is None:
            return self
        if self.device_id_attribute is None:
            raise ValueError("identity needs device_id_attribute")
        for attr in self.identity.subject:
            if attr not in self.subject.allowed:
                raise ValueError(f"identity.subject.{attr}: not in subject.allowed")
        written = self.identity.subject.get(self.device_id_attribute)
        if written != "{device_id}":
            raise ValueError(
                f'identity.subject.{self.device_id_attribute}: must be "{{device_id}}" '
                f"(device_id_attribute)"
            )
        for i, san in enumerate(self.identity.san):
            if san.type not in self.san_types:
                raise ValueError(f"identity.san.{i}.type: {san.type} is not in san_types")
        return self


class CeremonyConfig(_Strict):
    """CeremonyConfig is one reviewed key ceremony (ceremonies/NAME.toml)."""

    issuer: str
    profile: str
    key_type: KeyType
    subject: dict[SubjectAttribute, NameValue]
    validity_days: Annotated[int, Field(gt=0, le=36500)] | None = None


def _load_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise config_error(f"{path}: file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise config_error(f"{path}: not valid TOML: {e}") from e


def _explain(path: Path, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        problems.append(f"{field}: {item['msg']}")
    return f"{path}: " + "; ".join(problems)


def _model(cls: type[M], path: Path, data: dict[str, object]) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise config_error(_explain(path, e)) from e


class ConfigSet:
    """ConfigSet is a whole configuration directory: ca.toml plus profiles and ceremonies."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = _model(CAConfig, directory / "ca.toml", _load_toml(directory / "ca.toml"))
        self.profiles: dict[str, ProfileConfig] = {}
        for path in sorted((directory / "profiles").glob("*.toml")):
            profile = _model(ProfileConfig, path, _load_toml(path))
            if profile.name != path.stem:
                raise config_error(f"{path}: name: must equal the file name {path.stem!r}")
            self.profiles[profile.name] = profile
        for name, issuer in self.ca.issuers.items():
            for p in issuer.issues:
                if p not in self.profiles:
                    raise config_error(
                        f"{directory / 'ca.toml'}: issuers.{name}.issues: unknown profile {p!r}"
                    )

    def profile(self, name: str) -> ProfileConfig:
        try:
            return self.profiles[name]
        except KeyError:
            raise not_found(f"no such profile: {name!r}") from None

    def ceremony(self, path: Path) -> CeremonyConfig:
        ceremony = _model(CeremonyConfig, path, _load_toml(path))
        if ceremony.profile not in self.profiles:
            raise config_error(f"{path}: profile: unknown profile {ceremony.profile!r}")
        if ceremony.issuer not in self.ca.issuers:
            raise config_error(f"{path}: issuer: {ceremony.issuer!r} is not in ca.toml")
        return ceremony
