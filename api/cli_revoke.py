"""`pki` commands for revocation, CRLs, OCSP, admin tokens and the validation authority."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from api.cli_actor import actor as _actor
from api.runtime import Runtime
from pki.admin_token import AdminTokenService, parse_role
from pki.ceremony import CeremonyService
from pki.crl_publisher import PERIOD_ELAPSED, CRLPublisher
from pki.errors import ErrorKind, PKIError
from pki.jobs import BUSY, Jobs
from pki.ocsp_responder import OCSPPresigner, SignerSet
from pki.offline import stored_ocsp_responses
from pki.refusal import RefusalKind, RefusalRecorder
from pki.revocation import RevocationService, parse_reason
from pki.serial import parse_serial, serial_hex
from pki.store import session_scope
from pki.store.revocation_models import CertificateStateReader

GUNICORN_CONFIG = Path(__file__).resolve().parent.parent / "scripts" / "gunicorn_va.py"


def _runtime(ctx: click.Context) -> Runtime:
    obj = ctx.find_root().obj
    rt: Runtime | None = obj.get("runtime")
    if rt is None:
        rt = Runtime.open(obj["config_dir"], obj["data_dir"])
        obj["runtime"] = rt
    return rt


@contextlib.contextmanager
def _confirmation_audited(rt: Runtime) -> Iterator[None]:
    """Audits a command refused for want of its confirmation flag (exit code 2)."""
    try:
        yield
    except PKIError as e:
        if e.kind is not ErrorKind.FORBIDDEN:
            raise
        RefusalRecorder(rt.db, rt.clock).refused(
            RefusalKind.CONFIRMATION, e.message, source="cli", subject=_actor()
        )
        raise


def _is_root(rt: Runtime, issuer_id: str) -> bool:
    """Says whether ca.toml names the issuer as a root (no parent)."""
    cfg = rt.config.ca.issuers.get(issuer_id)
    return cfg is not None and cfg.parent is None


def _presigner(rt: Runtime) -> OCSPPresigner:
    return OCSPPresigner(rt.db, rt.clock, SignerSet(rt.db, rt.clock, rt.load_key), rt.ocsp_config())


def revocation_service(rt: Runtime, *, resign: bool = True) -> RevocationService:
    """Builds the revocation service; with resign, it re-signs the OCSP response at once."""
    service = RevocationService(rt.db, rt.clock)
    if resign:
        service.listeners.append(_presigner(rt).on_revoked)
    return service


def _serve_group(group: click.Group) -> click.Group:
    # The CA front's module may have made `pki serve` already: add to it, do not replace it.
    existing = group.commands.get("serve")
    if isinstance(existing, click.Group):
        return existing

    @group.group("serve")
    def serve() -> None:
        """Run the servers under gunicorn."""

    return serve


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""

    @group.command("revoke")
    @click.argument("serial", required=False)
    @click.option("--reason", required=True, help="RFC 5280 reason: keyCompromise, superseded, ...")
    @click.option("--issuer", "issuer_id", default=None, help="Issuer, if the serial is ambiguous.")
    @click.option(
        "--device", "devices", multiple=True, help="Revoke all of a device's certificates."
    )
    @click.option("--batch", default=None, help="Revoke the certificates of a device batch.")
    @click.option("--no-resign", is_flag=True, help="Do not re-sign the OCSP response here.")
    @click.option(
        "--ca",
        "confirm_ca",
        is_flag=True,
        help="Confirm revoking a CA, OCSP-signer, TLS-server or token-key certificate.",
    )
    @click.pass_context
    def revoke(
        ctx: click.Context,
        serial: str | None,
        reason: str,
        issuer_id: str | None,
        devices: tuple[str, ...],
        batch: str | None,
        no_resign: bool,
        confirm_ca: bool,
    ) -> None:
        """Revoke a certificate by serial (hex), or every certificate of devices or a batch."""
        flag = parse_reason(reason)
        if sum([serial is not None, bool(devices), batch is not None]) != 1:
            raise PKIError(ErrorKind.BAD_REQUEST, "give a SERIAL, --device ... or --batch")
        rt = _runtime(ctx)
        service = revocation_service(rt, resign=not no_resign)
        if serial is not None:
            with _confirmation_audited(rt):
                result = service.revoke(
                    serial_hex(parse_serial(serial)),
                    flag,
                    actor=_actor(),
                    issuer_id=issuer_id,
                    allow_guarded=confirm_ca,
                )
            state = "revoked" if result.changed else "already revoked"
            click.echo(f"{state}: {result.issuer_id}/{result.serial_hex} ({result.reason.value})")
            return
        bulk = service.revoke_devices(device_ids=devices, batch=batch, reason=flag, actor=_actor())
        for r in bulk.revoked:
            click.echo(f"revoked: {r.issuer_id}/{r.serial_hex} ({r.reason.value})")
        click.echo(f"{len(bulk.revoked)} certificates of {len(bulk.devices)} devices revoked")

    @group.command("release")
    @click.argument("serial")
    @click.option("--issuer", "issuer_id", default=None, help="Issuer, if the serial is ambiguous.")
    @click.option(
        "--ca",
        "confirm_ca",
        is_flag=True,
        help="Confirm releasing a CA, OCSP-signer, TLS-server or token-key certificate.",
    )
    @click.pass_context
    def release(ctx: click.Context, serial: str, issuer_id: str | None, confirm_ca: bool) -> None:
        """Release a certificate from certificateHold (removeFromCRL in the next delta CRL)."""
        rt = _runtime(ctx)
        with _confirmation_audited(rt):
            result = revocation_service(rt).release(
                serial_hex(parse_serial(serial)),
                actor=_actor(),
                issuer_id=issuer_id,
                allow_guarded=confirm_ca,
            )
        click.echo(f"released: {result.issuer_id}/{result.serial_hex}")

    @group.group("crl")
    def crl() -> None:
        """Certificate revocation lists."""

    @crl.command("publish")
    @click.option(
        "--issuer",
        "issuer_ids",
        multiple=True,
        help="Issuer (repeatable; default: every intermediate; a root only when named).",
    )
    @click.option(
        "--all",
        "all_issuers",
        is_flag=True,
        help="Every issuer in ca.toml, the root included (a root whose key is not in this "
        "token is left to `pki crl import`).",
    )
    @click.option(
        "--delta",
        is_flag=True,
        help="Publish a delta CRL against the latest full CRL (a full CRL brings its own).",
    )
    @click.option(
        "--out-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Also write the DER files here (ISSUER.crl, ISSUER-delta.crl).",
    )
    @click.option(
        "--if-due",
        is_flag=True,
        help="Only when due: none yet, --period elapsed, renewal before nextUpdate, or "
        "revocations --delay old (for cron).",
    )
    @click.option(
        "--period",
        "period_minutes",
        default=1440,
        show_default=True,
        type=click.IntRange(1, 60 * 24 * 30),
        help="With --if-due: minutes between CRLs without revocations.",
    )
    @click.option(
        "--delay",
        "delay_seconds",
        default=60,
        show_default=True,
        type=click.IntRange(0, 86400),
        help="With --if-due: seconds to wait after a revocation, to publish a burst at once.",
    )
    @click.option(
        "--next-update",
        "next_update_days",
        default=None,
        type=click.IntRange(1, 366),
        help="Days until nextUpdate (default: ca.toml); an offline root publishes for long.",
    )
    @click.pass_context
    def crl_publish(
        ctx: click.Context,
        issuer_ids: tuple[str, ...],
        all_issuers: bool,
        delta: bool,
        out_dir: Path | None,
        if_due: bool,
        period_minutes: int,
        delay_seconds: int,
        next_update_days: int | None = None,
    ) -> None:
        """Sign and store the next CRL of each issuer with the issuer's key."""
        rt = _runtime(ctx)
        issuers = rt.config.ca.issuers
        if all_issuers:
            targets = list(issuers)
        else:
            targets = list(issuer_ids) or [i for i, c in issuers.items() if c.parent is not None]
        config = rt.crl_config()
        if next_update_days is not None:
            # An offline root publishes rarely, so its CRL says so in nextUpdate.
            config = dataclasses.replace(
                config, full_validity=datetime.timedelta(days=next_update_days)
            )
        publisher = CRLPublisher(rt.db, rt.clock, rt.config.ca.urls, config)
        jobs = Jobs(rt.db, rt.clock)
        when_due = (
            (datetime.timedelta(minutes=period_minutes), datetime.timedelta(seconds=delay_seconds))
            if if_due
            else None
        )
        for issuer_id in targets:
            if delta and (not config.deltas or _is_root(rt, issuer_id)):
                if if_due:
                    continue  # the root's CRL, and every CRL with deltas off, has no delta
                if not config.deltas:
                    raise PKIError(
                        ErrorKind.CONFIG, "delta CRLs are off (ca.toml [revocation] delta_crls)"
                    )
                raise PKIError(ErrorKind.CONFLICT, f"{issuer_id} is a root: its CRL has no delta")
            job = jobs.crl(
                publisher,
                issuer_id,
                functools.partial(rt.online_issuer, issuer_id),
                delta=delta,
                when_due=when_due,
            )
            published = job.published
            if job.offline:
                # An offline root signs its CRL in a ceremony, and the file is imported here.
                hint = "the issuer key is not in this token: sign it where the key is and import it"
                if job.why is None:  # asked for by hand
                    raise PKIError(ErrorKind.NOT_FOUND, f"{issuer_id}: {hint} (pki crl import)")
                if job.why == PERIOD_ELAPSED:
                    # The period paces CRLs signed here; an imported one is due only before
                    # its nextUpdate or after a revocation.
                    click.echo(f"{issuer_id}: not due (key offline, CRL imported)")
                    continue
                click.echo(
                    f"{issuer_id}: CRL due ({job.why}) but {hint} (pki crl import)", err=True
                )
                continue
            if published is None:
                click.echo(f"{issuer_id}: {job.why}")  # not due, or another scheduler's job
                continue
            if job.why is not None:
                click.echo(f"{issuer_id}: due ({job.why})", err=True)
            for crl in (published, published.delta):
                if crl is None:
                    continue
                kind = f"delta CRL (base {crl.base_number})" if crl.is_delta else "CRL"
                click.echo(
                    f"{issuer_id}: {kind} number {crl.crl_number}, "
                    f"{crl.entries} entries, next update {crl.next_update.isoformat()}"
                )
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{issuer_id}-delta.crl" if crl.is_delta else f"{issuer_id}.crl"
                    (out_dir / name).write_bytes(crl.crl_der)

    @group.group("ocsp")
    def ocsp() -> None:
        """OCSP pre-signing and responder certificates."""

    @ocsp.command("presign")
    @click.option("--issuer", "issuer_id", default=None, help="Only this issuer.")
    @click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="With --issuer: also write its stored responses here (SERIAL.ocsp), to carry.",
    )
    @click.pass_context
    def ocsp_presign(ctx: click.Context, issuer_id: str | None, out_dir: Path | None) -> None:
        """Sign a response for every issued, unexpired certificate that lacks a fresh one."""
        rt = _runtime(ctx)
        if out_dir is not None and issuer_id is None:
            raise click.UsageError("--out needs --issuer")
        result = Jobs(rt.db, rt.clock).presign(_presigner(rt), issuer_id)
        if out_dir is not None and issuer_id is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for serial, der in stored_ocsp_responses(rt.db, issuer_id):
                (out_dir / f"{serial}.ocsp").write_bytes(der)
                click.echo(f"{issuer_id}/{serial} -> {out_dir / f'{serial}.ocsp'}")
        for iid, count in sorted(result.signed.items()):
            click.echo(f"{iid}: {count} responses signed")
        for iid, why in sorted(result.skipped.items()):
            click.echo(f"{iid}: skipped: {why}", err=True)

    @ocsp.command("renew-signers")
    @click.option("--issuer", "issuer_ids", multiple=True, help="Only these issuers.")
    @click.option(
        "--before-days",
        type=click.IntRange(0, 3650),
        default=None,
        help="Renew when the signer expires within this many days (default: a third of the "
        "ocsp-signer profile's validity).",
    )
    @click.option(
        "--key-type",
        default="ec-p256",
        show_default=True,
        type=click.Choice(["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"]),
    )
    @click.option("--force", is_flag=True, help="Renew even when the signer is fresh.")
    @click.pass_context
    def ocsp_renew_signers(
        ctx: click.Context,
        issuer_ids: tuple[str, ...],
        before_days: int | None,
        key_type: str,
        force: bool,
    ) -> None:
        """Issue a new OCSP-signer certificate (fresh key in the token) where one is due."""
        rt = _runtime(ctx)
        profile = rt.config.profile("ocsp-signer")
        margin = datetime.timedelta(
            days=before_days if before_days is not None else profile.validity_days / 3
        )
        targets = list(issuer_ids) or [
            i for i, c in rt.config.ca.issuers.items() if c.ocsp_signer_key_label
        ]
        jobs = Jobs(rt.db, rt.clock)
        for issuer_id in targets:
            if not issuer_ids and not rt.may_open(rt.config.ca.issuer_token(issuer_id)):
                # An offline issuer (the root) certifies its signers in a root ceremony.
                click.echo(f"{issuer_id}: its token is offline here, not renewed")
                continue
            cfg = rt.config.ca.issuers.get(issuer_id)
            if cfg is None or not cfg.ocsp_signer_key_label:
                raise PKIError(
                    ErrorKind.CONFIG,
                    f"ca.toml: issuers.{issuer_id}.ocsp_signer_key_label is not set",
                )
            # Checked under the job's lock: a second scheduler sees the first one's signer.
            with jobs.exclusive(f"renew-signer:{issuer_id}") as held:
                if not held:
                    click.echo(f"{issuer_id}: {BUSY}")
                    continue
                now = rt.clock.now()
                with session_scope(rt.db) as session:
                    not_after = CertificateStateReader(session).signer_not_after(issuer_id)
                if not force and not_after is not None and not_after - now > margin:
                    click.echo(f"{issuer_id}: signer valid until {not_after.isoformat()}, not due")
                    continue
                label = f"{cfg.ocsp_signer_key_label}-{now.strftime('%Y%m%d%H%M%S')}"
                token = rt.config.ca.signer_token(issuer_id)
                key = rt.generate_key(label, key_type, token=token, actor=_actor())
                issuer = rt.issuer(issuer_id)
                issued = CeremonyService(rt.issuance()).ocsp_signer(
                    issuer, profile, key, key_uri=key.uri, actor=_actor()
                )
            out = rt.data_dir / "certs" / f"{issuer_id}-ocsp.pem"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
            click.echo(f"{issuer_id}: new OCSP signer serial {serial_hex(issued.serial)} -> {out}")

    @group.group("admin")
    def admin() -> None:
        """The admin API."""

    @admin.group("token")
    def token() -> None:
        """Bearer tokens of the admin API."""

    @token.command("create")
    @click.option(
        "--role",
        required=True,
        type=click.Choice(["admin", "operator", "factory", "auditor"]),
        help="What the token may do.",
    )
    @click.option("--label", default="", help="A note on who or what holds the token.")
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the token to this file (mode 0600) instead of printing it.",
    )
    @click.pass_context
    def token_create(ctx: click.Context, role: str, label: str, out: Path | None) -> None:
        """Create a token; it is shown once and stored only as its SHA-256 hash."""
        rt = _runtime(ctx)
        token_id, secret = AdminTokenService(rt.db, rt.clock).create(
            parse_role(role), actor=_actor(), label=label
        )
        if out is None:
            click.echo(secret)
        else:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
        click.echo(f"admin token {token_id} ({role}) created", err=True)

    serve = _serve_group(group)

    @serve.command("va")
    @click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
    @click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256))
    @click.option("--timeout", default=30, show_default=True, type=click.IntRange(1, 3600))
    @click.pass_context
    def serve_va(ctx: click.Context, bind: str, workers: int, timeout: int) -> None:
        """Run the validation authority (OCSP, CRLs, CA certificates) under gunicorn."""
        rt = _runtime(ctx).use_process("va")
        if not rt.db.has_schema():
            raise PKIError(ErrorKind.CONFIG, "the database has no schema: run 'pki db upgrade'")
        env = dict(os.environ)
        env.update(
            {
                "PKI_CONFIG_DIR": str(rt.config.directory.resolve()),
                "PKI_DATA_DIR": str(rt.data_dir),
                "PKI_VA_BIND": bind,
                "PKI_VA_WORKERS": str(workers),
                "PKI_VA_TIMEOUT": str(timeout),
            }
        )
        rt.close()
        click.echo(f"validation authority on http://{bind}/ (OCSP at /ocsp)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG)]
        os.execve(sys.executable, argv, env)  # noqa: S606 (no shell: argv is a list)
