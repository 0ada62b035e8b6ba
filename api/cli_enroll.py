"""`pki` commands for devices, enrollment and the CA front."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from api.cli_actor import actor as _actor
from api.escape import escape
from api.runtime import Runtime
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig, anchor_paths, load_est_config
from pki.store import DeviceState
from pki.store.repository import IssuerRepository

GUNICORN_CONFIG = Path(__file__).resolve().parent.parent / "scripts" / "gunicorn_ca.py"


def _runtime(ctx: click.Context) -> Runtime:
    obj = ctx.find_root().obj
    rt: Runtime | None = obj.get("runtime")
    if rt is None:
        rt = Runtime.open(obj["config_dir"], obj["data_dir"])
        obj["runtime"] = rt
    return rt


def _est(rt: Runtime) -> ESTConfig:
    return load_est_config(rt.config)


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (0600), replacing any earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""
    group.add_command(device)
    group.add_command(enrollment)
    existing = group.commands.get("serve")
    if isinstance(existing, click.Group):
        existing.add_command(serve_ca)  # another module made `pki serve` first (va)
    else:
        group.add_command(serve)


# --- devices --------------------------------------------------------------------------


@click.group()
def device() -> None:
    """The device registry and one-time enrollment secrets."""


@device.command("add")
@click.argument("device_id")
@click.option("--model", default=None, help="Device model.")
@click.option("--batch", default=None, help="Production batch.")
@click.option(
    "--manufacturer",
    default=None,
    metavar="SHA256",
    help="Enrolls with an IDevID of this manufacturer: its anchor's SHA-256 fingerprint.",
)
@click.pass_context
def device_add(
    ctx: click.Context,
    device_id: str,
    model: str | None,
    batch: str | None,
    manufacturer: str | None,
) -> None:
    """Register one device (state: registered), for a one-time secret or an IDevID."""
    from api.app_ca import device_service

    rt = _runtime(ctx)
    info = device_service(rt, _est(rt)).add(
        device_id, model=model, batch=batch, manufacturer=manufacturer, actor=_actor()
    )
    how = "IDevID" if info.enroll_method == "idevid" else "one-time secret"
    click.echo(f"device {info.device_id} registered (enrolls with a {how})")


@device.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def device_import(ctx: click.Context, csv_file: Path) -> None:
    """Register devices from CSV (header: id[,model][,batch]); all or nothing, idempotent."""
    from api.app_ca import device_service

    rt = _runtime(ctx)
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PKIError(ErrorKind.BAD_REQUEST, f"{csv_file}: not UTF-8 text") from None
    result = device_service(rt, _est(rt)).import_csv(text, actor=_actor(), source=str(csv_file))
    click.echo(f"{result.added} devices added, {result.unchanged} already registered")


@device.command("secret")
@click.argument("device_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the secret to this file (mode 0600).",
)
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the secret on standard output.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="EST label the secret is valid on (repeatable; default: the default label).",
)
@click.option(
    "--reason",
    default=None,
    help="Why a device that has enrolled gets a new secret (required for one; audited).",
)
@click.pass_context
def device_secret(
    ctx: click.Context,
    device_id: str,
    out: Path | None,
    to_stdout: bool,
    labels: tuple[str, ...],
    reason: str | None,
) -> None:
    """Draw a new one-time enrollment secret; an unused older one stops working."""
    from api.app_ca import device_service

    if (out is None) == (not to_stdout):
        raise click.UsageError("say where the secret goes: --out FILE or --stdout (one of them)")
    rt = _runtime(ctx)
    est = _est(rt)
    valid_on = est.secret_labels(labels)
    new = device_service(rt, est).new_secret(
        device_id, actor=_actor(), labels=valid_on, may_redraw=True, reason=reason
    )
    if out is not None:
        _write_private(out, new.secret + "\n")
        click.echo(
            f"secret for {device_id} written to {out}, valid on label(s) {', '.join(valid_on)} "
            f"until {new.expires_at}"
        )
    else:
        click.echo(new.secret)
        click.echo(f"valid until {new.expires_at.isoformat()}", err=True)


@device.command("show")
@click.argument("device_id")
@click.pass_context
def device_show(ctx: click.Context, device_id: str) -> None:
    """Show a device: state, secret expiry, failed logins (never the secret)."""
    from api.app_ca import device_service

    rt = _runtime(ctx)
    click.echo(json.dumps(device_service(rt, _est(rt)).show(device_id).as_dict(), indent=2))


@device.command("list")
@click.option("--state", type=click.Choice([s.value for s in DeviceState]), default=None)
@click.option("--batch", default=None)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def device_list(
    ctx: click.Context, state: str | None, batch: str | None, limit: int, as_json: bool
) -> None:
    """List devices by ID."""
    from api.app_ca import device_service

    rt = _runtime(ctx)
    rows = device_service(rt, _est(rt)).list(
        state=DeviceState(state) if state else None, batch=batch, limit=limit
    )
    for info in rows:
        if as_json:
            click.echo(json.dumps(info.as_dict()))
        else:
            click.echo(
                f"{info.device_id:<24} {info.state.value:<14} {escape(info.model or '-'):<16} "
                f"{escape(info.batch or '-')}"
            )


@device.command("decommission")
@click.argument("device_id")
@click.pass_context
def device_decommission(ctx: click.Context, device_id: str) -> None:
    """Retire a device: revoke its certificates (cessationOfOperation), erase its data."""
    from api.app_ca import device_service

    rt = _runtime(ctx)
    done = device_service(rt, _est(rt)).decommission(device_id, actor=_actor())
    click.echo(f"device {device_id} decommissioned")
    for serial in done.revoked:
        click.echo(f"revoked {serial} (cessationOfOperation)")
    click.echo("erased: " + (", ".join(done.erased) if done.erased else "nothing (already erased)"))


# --- enrollment -----------------------------------------------------------------------


@click.group()
def enrollment() -> None:
    """EST requests waiting for approval; superseded certificates."""


@enrollment.command("approve")
@click.argument("request_id", type=int)
@click.pass_context
def enrollment_approve(ctx: click.Context, request_id: int) -> None:
    """Approve one waiting request (ID from `pending`); its next retry gets the certificate."""
    from api.app_ca import enrollment_service

    rt = _runtime(ctx)
    done = enrollment_service(rt, _est(rt)).approve(request_id, actor=_actor())
    click.echo(
        f"approved request {done.approval_id} of device {done.device_id}: "
        f"{escape(done.subject)}, key sha256 {done.key_sha256}"
    )


@enrollment.command("pending")
@click.pass_context
def enrollment_pending(ctx: click.Context) -> None:
    """List requests waiting for approval: ID, device, label, requested subject, key."""
    from api.app_ca import enrollment_service

    rt = _runtime(ctx)
    for r in enrollment_service(rt, _est(rt)).pending_approvals():
        click.echo(
            f"{r.approval_id:>6} {r.device_id:<24} {r.label:<12} {r.operation:<13} "
            f"{r.since:%FT%TZ} key-sha256:{r.key_sha256} {escape(r.subject)}"
        )


@enrollment.command("sweep")
@click.pass_context
def enrollment_sweep(ctx: click.Context) -> None:
    """Revoke superseded certificates past their grace period; abandon stale pending rows;
    forget stale failed logins."""
    from api.app_ca import enrollment_service

    rt = _runtime(ctx)
    service = enrollment_service(rt, _est(rt))
    revoked = service.sweep_superseded()
    abandoned = service.sweep_pending()
    click.echo(f"{len(revoked)} superseded certificate(s) revoked")
    click.echo(f"{len(abandoned)} stale pending certificate row(s) abandoned")
    pruned = service.devices.throttle.prune(rt.clock.now())
    click.echo(f"{pruned} idle login-throttle counter(s) removed")


# --- servers --------------------------------------------------------------------------


@click.group()
def serve() -> None:
    """Run the servers."""


def _own_client_cas(rt: Runtime) -> Path:
    """Writes certs/client-cas.pem: the store's issuer certificates that are still valid."""
    now = rt.clock.now()
    with rt.db.read_session() as session:
        ders = [r.cert_der for r in IssuerRepository(session).all() if r.cert_der is not None]
    certificates = [x509.load_der_x509_certificate(d) for d in ders]
    valid = [c for c in certificates if c.not_valid_after_utc > now]
    if not valid:
        raise PKIError(ErrorKind.CONFIG, "no issuer certificate in the store: run a ceremony")
    path = rt.data_dir / "certs" / "client-cas.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in valid))
    return path


@serve.command("ca")
@click.option("--bind", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to listen on.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256))
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option(
    "--certfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TLS server certificate chain (default: est.toml tls_certfile).",
)
@click.option(
    "--keyfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TLS server key (default: est.toml tls_keyfile).",
)
@click.pass_context
def serve_ca(
    ctx: click.Context,
    bind: str,
    workers: int,
    threads: int,
    certfile: Path | None,
    keyfile: Path | None,
) -> None:
    """Run the CA front (EST, admin API, /healthz) under gunicorn over HTTPS."""
    rt = _runtime(ctx).use_process("ca")
    est = _est(rt)
    cert = certfile or rt.path(est.tls_certfile)
    key = keyfile or rt.path(est.tls_keyfile)
    anchors = anchor_paths(est, rt.data_dir)
    for path in (cert, key, *anchors):
        if not path.is_file():
            raise PKIError(ErrorKind.CONFIG, f"{path}: file not found")
    if not rt.db.has_schema():
        raise PKIError(ErrorKind.CONFIG, "the database has no schema: run 'pki db upgrade'")
    rt.db.upgrade()  # adds tables of newer migrations (idempotent)
    # Client certificates verify against our own CAs (re-enrollment) and the manufacturers'
    # anchors (IDevID); the app then checks which one a label accepts. Our own are every
    # issuer in the store whose certificate is still valid, retired ones too: after a
    # rollover, devices holding a certificate of the old issuer re-enroll onto the new one.
    client_cas = [_own_client_cas(rt), *anchors]
    env = dict(os.environ)
    env.update(
        {
            "PKI_CONFIG_DIR": str(rt.config.directory.resolve()),
            "PKI_DATA_DIR": str(rt.data_dir),
            "PKI_CA_BIND": bind,
            "PKI_CA_WORKERS": str(workers),
            "PKI_CA_THREADS": str(threads),
            "PKI_CA_CERTFILE": str(cert.resolve()),
            "PKI_CA_KEYFILE": str(key.resolve()),
            "PKI_CA_CLIENT_CAS": os.pathsep.join(str(p.resolve()) for p in client_cas),
        }
    )
    rt.close()
    click.echo(f"CA front on https://{bind}/ (EST at /.well-known/est/)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG)]
    os.execve(sys.executable, argv, env)  # noqa: S606 (no shell: argv is a list)
