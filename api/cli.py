"""The `pki` command: ceremonies, issuance, inspection, audit and the servers."""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import hsm
from api import (
    cli_audit,
    cli_broker,
    cli_enroll,
    cli_factory,
    cli_issuer,
    cli_offline,
    cli_revoke,
    cli_scheduler,
)
from api.cli_actor import actor as _actor
from api.escape import escape
from api.runtime import Runtime
from pki.ceremony import CeremonyService
from pki.crl_publisher import CRLPublisher
from pki.csr import (
    CertificateRequest,
    check_request,
    check_text,
    key_type_of,
    load_csr,
    normalize_sans,
    normalize_subject,
)
from pki.errors import ErrorKind, PKIError, bad_request
from pki.issuer import IssuanceHook, Issued
from pki.offline import intermediate_csr
from pki.serial import parse_serial, serial_hex
from pki.store import CertificateStatus, session_scope
from pki.store.repository import CertificateRepository, IssuerRepository, certificate_summary
from pki.store.revocation_models import CRLRepository

EXIT_CODES = {
    ErrorKind.NOT_FOUND: 3,
    ErrorKind.CONFIG: 4,
    ErrorKind.UNAVAILABLE: 5,
}


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {escape(message)}", err=True)
    sys.exit(code)


def _runtime(ctx: click.Context) -> Runtime:
    rt: Runtime | None = ctx.obj.get("runtime")
    if rt is None:
        rt = Runtime.open(ctx.obj["config_dir"], ctx.obj["data_dir"])
        ctx.obj["runtime"] = rt
    return rt


def _pause_hook(environ: dict[str, str] | os._Environ[str]) -> IssuanceHook:
    # Fault injection for the crash tests: PKI_TEST_PAUSE_AT=pending makes the process
    # announce the step in PKI_TEST_PAUSE_MARKER and wait there to be killed.
    step_wanted = environ.get("PKI_TEST_PAUSE_AT")
    marker = environ.get("PKI_TEST_PAUSE_MARKER")

    def hook(step: str, record_id: int) -> None:
        if step_wanted and step == step_wanted:
            if marker:
                Path(marker).write_text(str(record_id))
            time.sleep(120)

    return hook


def _write_pem(path: Path, certs: list[x509.Certificate]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


class PKIGroup(click.Group):
    """PKIGroup turns domain and token errors into one readable line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PKIError as e:
            fail(e.message, EXIT_CODES.get(e.kind, 2))
        except hsm.HSMError as e:
            fail(f"HSM: {e}", 5)


@click.group(cls=PKIGroup)
@click.option(
    "--config-dir",
    envvar="PKI_CONFIG_DIR",
    default="ca-config",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory with ca.toml, profiles/, ceremonies/.",
)
@click.option(
    "--data-dir",
    envvar="PKI_DATA_DIR",
    default="dev-data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory with the database, token files, PIN files and exported certificates.",
)
@click.pass_context
def main(ctx: click.Context, config_dir: str, data_dir: str) -> None:
    """IoT device-identity CA: keys in an HSM, EST enrollment, OCSP and CRLs."""
    ctx.ensure_object(dict)
    ctx.obj["config_dir"] = config_dir
    ctx.obj["data_dir"] = data_dir


# --- database -------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the schema to the newest version."""
    _runtime(ctx).db.upgrade()
    click.echo("database schema is up to date")


# --- ceremonies -----------------------------------------------------------------------


def require_current_schema(rt: Runtime) -> None:
    """Refuses a ceremony before it makes a key when the database cannot record the result."""
    if not rt.db.has_schema() or not rt.db.schema_is_current():
        raise PKIError(
            ErrorKind.CONFIG,
            "the database schema is missing or not current: run 'pki db upgrade' first "
            "(no key was generated)",
        )


def _generate(rt: Runtime, token: str, label: str, key_type: str, *, reuse: bool = False) -> Any:
    require_current_schema(rt)
    if reuse:
        return rt.reuse_or_generate_key(label, key_type, token=token, actor=_actor())
    try:
        return rt.generate_key(label, key_type, token=token, actor=_actor())
    except hsm.HSMError as e:
        if e.kind is hsm.HSMErrorKind.EXISTS:
            # An interrupted ceremony left the key behind: reuse it knowingly, never a twin.
            raise PKIError(
                ErrorKind.CONFLICT,
                f"{e}: an earlier ceremony stopped after making it; check the ceremony log "
                "and run again with --resume to use that key",
            ) from None
        raise


def _issuer_done(rt: Runtime, issuer_id: str) -> bool:
    with session_scope(rt.db) as session:
        record = IssuerRepository(session).find(issuer_id)
        return record is not None and record.cert_der is not None


@main.group()
def ceremony() -> None:
    """Key ceremonies: keys are generated inside the token, never outside it."""


def _ceremony_root(rt: Runtime, path: Path, *, reuse: bool = False) -> None:
    cer = rt.config.ceremony(path)
    cfg = rt.config.ca.issuers[cer.issuer]
    if cfg.parent is not None:
        raise PKIError(
            ErrorKind.CONFIG,
            f"{path}: issuer {cer.issuer} has a parent; use 'pki ceremony intermediate'",
        )
    key = _generate(
        rt, rt.config.ca.issuer_token(cer.issuer), cfg.key_label, cer.key_type, reuse=reuse
    )
    service = CeremonyService(rt.issuance())
    issuer = service.root(
        cer,
        rt.config.profile(cer.profile),
        key,
        key_uri=key.uri,
        actor=_actor(),
    )
    out = rt.data_dir / "certs" / f"{issuer.issuer_id}.pem"
    _write_pem(out, [issuer.certificate])
    click.echo(f"root {issuer.issuer_id}: {issuer.certificate.subject.rfc4514_string()} -> {out}")


def _ceremony_intermediate(rt: Runtime, path: Path, *, reuse: bool = False) -> None:
    cer = rt.config.ceremony(path)
    cfg = rt.config.ca.issuers[cer.issuer]
    if cfg.parent is None:
        raise PKIError(
            ErrorKind.CONFIG,
            f"ca.toml: issuers.{cer.issuer}.parent: an intermediate needs a parent",
        )
    parent = rt.issuer(cfg.parent)
    key = _generate(
        rt, rt.config.ca.issuer_token(cer.issuer), cfg.key_label, cer.key_type, reuse=reuse
    )
    service = CeremonyService(rt.issuance())
    issuer = service.intermediate(
        cer,
        rt.config.profile(cer.profile),
        key,
        parent,
        key_uri=key.uri,
        actor=_actor(),
    )
    out = rt.data_dir / "certs" / f"{issuer.issuer_id}.pem"
    _write_pem(out, [issuer.certificate])
    click.echo(
        f"intermediate {issuer.issuer_id}: {issuer.certificate.subject.rfc4514_string()} -> {out}"
    )


def _ceremony_ocsp_signer(rt: Runtime, issuer_id: str, key_type: str) -> Issued:
    cfg = rt.config.ca.issuers.get(issuer_id)
    if cfg is None or cfg.ocsp_signer_key_label is None:
        raise PKIError(
            ErrorKind.CONFIG, f"ca.toml: issuers.{issuer_id}.ocsp_signer_key_label is not set"
        )
    issuer = rt.issuer(issuer_id)
    # Each signer certificate gets a fresh key: a renewed responder never reuses a key.
    label = f"{cfg.ocsp_signer_key_label}-{rt.clock.now().strftime('%Y%m%d%H%M%S')}"
    key = _generate(rt, rt.config.ca.signer_token(issuer_id), label, key_type)
    issued = CeremonyService(rt.issuance()).ocsp_signer(
        issuer,
        rt.config.profile("ocsp-signer"),
        key,
        key_uri=key.uri,
        actor=_actor(),
    )
    out = rt.data_dir / "certs" / f"{issuer_id}-ocsp.pem"
    _write_pem(out, [issued.certificate])
    click.echo(f"OCSP signer for {issuer_id}: serial {serial_hex(issued.serial)} -> {out}")
    return issued


RESUME = click.option(
    "--resume", is_flag=True, help="Reuse the key an interrupted ceremony left in the token."
)


@ceremony.command("root")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@RESUME
@click.pass_context
def ceremony_root(ctx: click.Context, config: Path, resume: bool) -> None:
    """Generate the root key in the token and self-sign the root certificate."""
    _ceremony_root(_runtime(ctx), config, reuse=resume)


@ceremony.command("intermediate")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--csr",
    "csr_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a CSR for an offline root to sign (pki ceremony sign) instead of signing here.",
)
@RESUME
@click.pass_context
def ceremony_intermediate(
    ctx: click.Context, config: Path, csr_out: Path | None, resume: bool
) -> None:
    """Generate an intermediate key in the token; certify it with its parent or write a CSR."""
    rt = _runtime(ctx)
    if csr_out is None:
        _ceremony_intermediate(rt, config, reuse=resume)
        return
    cer = rt.config.ceremony(config)
    cfg = rt.config.ca.issuers[cer.issuer]
    key = _generate(
        rt, rt.config.ca.issuer_token(cer.issuer), cfg.key_label, cer.key_type, reuse=resume
    )
    csr = intermediate_csr(cer, rt.config.profile(cer.profile), key)
    csr_out.parent.mkdir(parents=True, exist_ok=True)
    csr_out.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    click.echo(f"CSR for {cer.issuer} ({key.uri}) -> {csr_out}: carry it to the root")


@ceremony.command("ocsp-signer")
@click.option("--issuer", "issuer_id", required=True, help="Issuer the responder answers for.")
@click.option(
    "--key-type",
    default="ec-p256",
    show_default=True,
    type=click.Choice(["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"]),
)
@click.pass_context
def ceremony_ocsp_signer(ctx: click.Context, issuer_id: str, key_type: str) -> None:
    """Generate a delegated OCSP responder key in the token and certify it."""
    _ceremony_ocsp_signer(_runtime(ctx), issuer_id, key_type)


# --- dev bootstrap --------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    """Makes the data directory accessible to its owner only (token, PINs, database)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    # Never narrow a shared directory given by mistake (sticky: /tmp) or someone else's.
    if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:
        path.chmod(0o700)


def init_dev_token(rt: Runtime, name: str) -> None:
    """Initialises the SoftHSM token [tokens.NAME] with random PINs in the data directory."""
    cfg = rt.config.ca.tokens.get(name)
    if cfg is None:
        raise PKIError(ErrorKind.NOT_FOUND, f"ca.toml: no token {name!r} in [tokens]")
    if not cfg.softhsm_conf or not cfg.pin_file:
        raise PKIError(
            ErrorKind.CONFIG, f"ca.toml: tokens.{name}: a dev token needs softhsm_conf and pin_file"
        )
    pin_path = rt.path(cfg.pin_file)
    so_path = pin_path.with_name(pin_path.stem.removesuffix("-user") + "-so.pin")
    if not pin_path.exists():
        _write_secret(pin_path, secrets.token_hex(16))
        _write_secret(so_path, secrets.token_hex(16))
    tok = hsm.init_softhsm_token(
        rt.path(cfg.softhsm_conf).parent,
        rt.token_label(name),
        so_pin=so_path.read_text().strip(),
        user_pin=pin_path.read_text().strip(),
        module_path=cfg.module,
    )
    click.echo(f"SoftHSM token {tok.label!r} ({name}) in {tok.token_dir}")


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def issue_server_certificate(
    rt: Runtime, names: list[str], out_dir: Path, issuer_id: str | None = None
) -> Issued:
    """Issues a TLS server certificate for DNS names and IP addresses; the key stays in out_dir."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        check_text(f"server name {n[:80]!r}", n)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            continue
        except ValueError:
            pass
        if not n.isascii():
            raise bad_request(f"server name {n[:80]!r}: write international names as A-labels")
        sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])])
    profile = rt.config.profile("server")
    # Operator-given names pass the profile's checks (characters, length, syntax) too.
    request = CertificateRequest(
        subject=normalize_subject(subject, profile),
        sans=normalize_sans(sans, profile),
        public_key=key.public_key(),
        key_type=key_type_of(key.public_key()),
        device_id=None,
        challenge_password=None,
    )
    issuer = rt.issuer(issuer_id or rt.issuer_for_profile("server"))
    issued = rt.issuance().issue(issuer, profile, request, actor=_actor())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_secret(
        out_dir / "server.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
        .strip(),
    )
    _write_pem(out_dir / "server.pem", [issued.certificate, issuer.certificate])
    return issued


@main.command("init")
@click.option(
    "--dev",
    "dev_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory to create the demo hierarchy in.",
)
@click.pass_context
def init(ctx: click.Context, dev_dir: Path) -> None:
    """Build the whole demo hierarchy: SoftHSM token, root, intermediate, OCSP signers, TLS."""
    dev_dir = dev_dir.resolve()
    ctx.obj["data_dir"] = str(dev_dir)
    rt = _runtime(ctx)
    if (dev_dir / "certs" / "chain.pem").exists():
        click.echo(f"{dev_dir} is already initialised")
        return
    _private_dir(dev_dir)
    # One SoftHSM token per [tokens] entry (root, issuing CA, VA), each with its own random
    # user and SO PINs.
    for name in rt.config.ca.tokens:
        init_dev_token(rt, name)
    rt.db.upgrade()
    roots = [i for i, c in rt.config.ca.issuers.items() if c.parent is None]
    ceremonies = rt.config.directory / "ceremonies"
    # Each step is skipped when done, so an interrupted bootstrap can simply run again.
    for issuer_id in roots:
        if not _issuer_done(rt, issuer_id):
            _ceremony_root(rt, ceremonies / f"{issuer_id}.toml", reuse=True)
    for issuer_id, c in rt.config.ca.issuers.items():
        if c.parent is not None and not _issuer_done(rt, issuer_id):
            _ceremony_intermediate(rt, ceremonies / f"{issuer_id}.toml", reuse=True)
    for issuer_id, c in rt.config.ca.issuers.items():
        if c.ocsp_signer_key_label and not (dev_dir / "certs" / f"{issuer_id}-ocsp.pem").exists():
            _ceremony_ocsp_signer(rt, issuer_id, "ec-p256")
    for issuer_id in roots:
        _first_root_crl(rt, issuer_id)
    if not rt.path(rt.config.ca.audit.certificate).exists():
        cli_audit.audit_signer(rt)
    if not (dev_dir / "tls" / "server.pem").exists():
        server = issue_server_certificate(rt, ["127.0.0.1"], dev_dir / "tls")
        click.echo(f"TLS server certificate for 127.0.0.1: serial {serial_hex(server.serial)}")
    chain = [rt.issuer(i).certificate for i in _chain_order(rt)]
    _write_pem(dev_dir / "certs" / "chain.pem", chain)
    cli_audit.checkpoint(rt)
    click.echo(f"demo hierarchy ready in {dev_dir}")


def _first_root_crl(rt: Runtime, issuer_id: str) -> None:
    """Signs the root's first CRL while the root's token is open; later ones come by ceremony."""
    # The servers and the scheduler never open the root's token ([processes]); its CRL is
    # renewed in a root ceremony and imported (docs/ceremony.md).
    with session_scope(rt.db) as session:
        if CRLRepository(session).highest_number(issuer_id):
            return
    published = CRLPublisher(rt.db, rt.clock, rt.config.ca.urls, rt.crl_config()).publish(
        rt.issuer(issuer_id), delta=False
    )
    click.echo(f"{issuer_id}: CRL number {published.crl_number}")


def _chain_order(rt: Runtime) -> list[str]:
    """Orders issuers from the leaves' side up to the root (intermediates first)."""
    issuers = rt.config.ca.issuers
    return sorted(issuers, key=lambda i: issuers[i].parent is None)


# --- issuance and inspection ----------------------------------------------------------


@main.command("issue")
@click.option("--profile", required=True, help="Profile name from ca-config/profiles/.")
@click.option(
    "--csr",
    "csr_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PKCS#10 request, PEM or DER.",
)
@click.option(
    "--issuer",
    "issuer_id",
    default=None,
    help="Issuer (default: the first in ca.toml that issues the profile).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the certificate (PEM) here instead of standard output.",
)
@click.pass_context
def issue(
    ctx: click.Context, profile: str, csr_path: Path, issuer_id: str | None, out: Path | None
) -> None:
    """Issue a certificate for a CSR as an operator: validate, lint, record, then sign."""
    rt = _runtime(ctx)
    prof = rt.config.profile(profile)
    request = check_request(load_csr(csr_path.read_bytes()), prof)
    issuer = rt.issuer(issuer_id or rt.issuer_for_profile(profile))
    issued = rt.issuance(hook=_pause_hook(os.environ)).issue(issuer, prof, request, actor=_actor())
    pem = issued.certificate.public_bytes(serialization.Encoding.PEM)
    if out is None:
        click.echo(pem.decode(), nl=False)
    else:
        out.write_bytes(pem)
    click.echo(f"issued serial {serial_hex(issued.serial)} by {issuer.issuer_id}", err=True)


@main.group()
def cert() -> None:
    """Inspect issued certificates."""


@cert.command("show")
@click.argument("serial")
@click.option("--issuer", "issuer_id", default=None, help="Issuer, if the serial is ambiguous.")
@click.option("--pem", is_flag=True, help="Print the certificate itself as PEM.")
@click.pass_context
def cert_show(ctx: click.Context, serial: str, issuer_id: str | None, pem: bool) -> None:
    """Show one certificate by its serial number (hex)."""
    rt = _runtime(ctx)
    with session_scope(rt.db) as session:
        r = CertificateRepository(session).by_serial(serial_hex(parse_serial(serial)), issuer_id)
        if pem:
            if r.cert_der is None:
                raise PKIError(ErrorKind.CONFLICT, f"certificate {r.serial_hex} is still pending")
            click.echo(
                x509.load_der_x509_certificate(r.cert_der)
                .public_bytes(serialization.Encoding.PEM)
                .decode(),
                nl=False,
            )
            return
        click.echo(json.dumps(certificate_summary(r), indent=2))


@cert.command("list")
@click.option("--device", "device_id", default=None, help="Only this device's certificates.")
@click.option("--status", type=click.Choice([s.value for s in CertificateStatus]), default=None)
@click.option("--issuer", "issuer_id", default=None)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def cert_list(
    ctx: click.Context,
    device_id: str | None,
    status: str | None,
    issuer_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List certificates, optionally by device, status and issuer."""
    rt = _runtime(ctx)
    with session_scope(rt.db) as session:
        rows = CertificateRepository(session).list(
            device_id=device_id,
            status=CertificateStatus(status) if status else None,
            issuer_id=issuer_id,
            limit=limit,
        )
        for r in rows:
            if as_json:
                click.echo(json.dumps(certificate_summary(r)))
            else:
                click.echo(
                    f"{r.serial_hex:<34} {r.issuer_id:<12} {r.status.value:<8} "
                    f"{r.profile:<12} {r.not_after:%Y-%m-%d} {escape(r.subject)}"
                )


@main.group("issuer")
def issuer_group() -> None:
    """Inspect the CAs."""


@issuer_group.command("list")
@click.pass_context
def issuer_list(ctx: click.Context) -> None:
    """List the issuers and their certificates' fingerprints."""
    rt = _runtime(ctx)
    with session_scope(rt.db) as session:
        for r in IssuerRepository(session).all():
            retired = f" (retired {r.retired_at:%Y-%m-%dT%H:%M:%SZ})" if r.retired_at else ""
            click.echo(
                f"{r.id:<12} {r.kind:<13} {r.fingerprint_sha256 or 'pending'} "
                f"{escape(r.subject)}{retired}"
            )


@main.group("key")
def key_group() -> None:
    """Inspect keys in the tokens."""


def _token_holding(rt: Runtime, label: str, names: list[str]) -> hsm.Token:
    for name in names:
        token = rt.token_named(name)
        try:
            token.load_key(label)
        except hsm.HSMError as e:
            if e.kind is not hsm.HSMErrorKind.NOT_FOUND:
                raise
            continue
        return token
    raise PKIError(ErrorKind.NOT_FOUND, f"no key {label!r} in token(s) {', '.join(names)}")


@key_group.command("show")
@click.argument("label")
@click.option("--token", "token_name", default=None, help="Token name in ca.toml [tokens].")
@click.pass_context
def key_show(ctx: click.Context, label: str, token_name: str | None) -> None:
    """Show a key's URI and protection attributes, and whether its private value can be read."""
    rt = _runtime(ctx)
    token = _token_holding(rt, label, [token_name] if token_name else list(rt.config.ca.tokens))
    info: dict[str, Any] = {"label": label, "uri": token.key_uri(label)}
    info.update(token.key_attributes(label))
    try:
        token.read_private_value(label)
        info["private_value_readable"] = True
    except hsm.HSMError as e:
        info["private_value_readable"] = False
        info["token_says"] = str(e)
    click.echo(json.dumps(info, indent=2))


cli_audit.register(main, ceremony)
cli_enroll.register(main)
cli_revoke.register(main)
cli_broker.register(main)
cli_factory.register(main)
cli_scheduler.register(main)
cli_offline.register(main, ceremony, issuer_group, init_dev_token)
cli_issuer.register(issuer_group)

if __name__ == "__main__":
    main()
