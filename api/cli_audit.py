"""`pki audit` (verify, export, checkpoint, flush, list) and `pki ceremony audit-signer`."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from api.cli_actor import actor as _actor
from api.cli_revoke import _runtime
from api.escape import escape
from api.runtime import Runtime
from pki.ceremony import CeremonyService
from pki.errors import config_error, not_found
from pki.refusal import RefusalRecorder
from pki.serial import serial_hex
from pki.store import audit, audit_checkpoint, session_scope
from pki.store.audit import Verification


def _report(result: Verification) -> None:
    if result.ok:
        click.echo(
            f"audit log intact: {result.events} events, {result.checkpoints} signed checkpoints"
        )
        return
    click.echo(
        f"error: audit log broken at event {result.broken_seq}: {result.problem} "
        f"({result.events} events verified before it)",
        err=True,
    )
    sys.exit(1)


def _read_export(
    path: Path,
) -> tuple[list[audit_checkpoint.Event], list[audit_checkpoint.Checkpoint]]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise not_found(f"{path}: cannot read the audit export ({type(e).__name__})") from None
    return audit_checkpoint.parse_lines(text.split("\n"))


def _public_key(path: Path) -> audit_checkpoint.AuditPublicKey:
    if not path.is_file():
        raise config_error(
            f"audit certificate {path} not found; create the audit key and its certificate "
            "with `pki ceremony audit-signer`"
        )
    return audit_checkpoint.audit_public_key(path.read_bytes())


def audit_signer(rt: Runtime) -> None:
    """Generates the audit key in the token (or reuses it) and certifies it."""
    cfg = rt.config.ca.audit
    key = rt.reuse_or_generate_key(
        cfg.key_label, cfg.key_type, token=rt.config.ca.audit_token(), actor=_actor()
    )
    issuer = rt.issuer(rt.issuer_for_profile("audit"))
    issued = CeremonyService(rt.issuance()).audit_signer(
        issuer,
        rt.config.profile("audit"),
        key,
        key_uri=key.uri,
        actor=_actor(),
    )
    out = rt.path(cfg.certificate)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    click.echo(f"audit signer: serial {serial_hex(issued.serial)} -> {out}")


def checkpoint(rt: Runtime, *, if_due: bool = False) -> None:
    """Signs the audit chain's head with the audit key, when due or always."""
    cfg = rt.config.ca.audit
    now = rt.clock.now()
    with session_scope(rt.db) as session:
        if if_due and not audit_checkpoint.due(
            session,
            now,
            every_events=cfg.checkpoint_events,
            every_seconds=cfg.checkpoint_seconds,
        ):
            return
        # The key is opened only when a checkpoint is due: most rounds need no token.
        signed = audit_checkpoint.write(session, rt.audit_token().load_key(cfg.key_label), now)
    click.echo(f"audit checkpoint at event {signed.seq} ({signed.event_hash[:16]}...)")


def register(group: click.Group, ceremony: click.Group) -> None:
    """Adds this module's commands to the pki group and its ceremony group."""

    @ceremony.command("audit-signer")
    @click.pass_context
    def ceremony_audit_signer(ctx: click.Context) -> None:
        """Generate the audit key in the token (or reuse it) and certify it."""
        rt = _runtime(ctx)
        audit_signer(rt)
        checkpoint(rt)

    @group.group("audit")
    def audit_group() -> None:
        """The hash-chained audit log and its signed checkpoints."""

    @audit_group.command("verify")
    @click.option(
        "--file",
        "export_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Verify this export offline (needs --cert; no database, no token).",
    )
    @click.option(
        "--cert",
        "cert_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Audit certificate (PEM); default: [audit] certificate of ca.toml.",
    )
    @click.option(
        "--checkpoints",
        "known_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="An earlier export whose signed checkpoints the database must still hold.",
    )
    @click.option(
        "--max-age",
        type=click.IntRange(1, None),
        default=None,
        help="Seconds the newest checkpoint may be old (default: ca.toml; --file: unchecked).",
    )
    @click.pass_context
    def audit_verify(
        ctx: click.Context,
        export_file: Path | None,
        cert_file: Path | None,
        known_file: Path | None,
        max_age: int | None,
    ) -> None:
        """Check the chain and every checkpoint signature; name the first bad event."""
        if export_file is not None:
            if cert_file is None:
                raise click.UsageError("--file needs --cert (the audit certificate)")
            events, checkpoints = _read_export(export_file)
            now = datetime.datetime.now(datetime.UTC)
            _report(
                audit_checkpoint.verify_export(
                    events,
                    checkpoints,
                    _public_key(cert_file),
                    now=now,
                    max_age=datetime.timedelta(seconds=max_age) if max_age else None,
                )
            )
            return
        rt = _runtime(ctx)
        cfg = rt.config.ca.audit
        public_key = _public_key(cert_file or rt.path(cfg.certificate))
        known = _read_export(known_file)[1] if known_file is not None else []
        with session_scope(rt.db) as session:
            result = audit_checkpoint.verify_stored(
                session,
                public_key,
                now=rt.clock.now(),
                max_age=datetime.timedelta(seconds=max_age or cfg.max_checkpoint_age_seconds),
                known=known,
            )
        _report(result)

    @audit_group.command("export")
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write here instead of standard output.",
    )
    @click.pass_context
    def audit_export(ctx: click.Context, out: Path | None) -> None:
        """Write events and checkpoints, up to the newest checkpoint, as JSON lines."""
        rt = _runtime(ctx)
        with session_scope(rt.db) as session:
            lines = list(audit_checkpoint.export_lines(session))
        text = "".join(line + "\n" for line in lines)
        if out is None:
            click.echo(text, nl=False)
        else:
            out.write_text(text, encoding="ascii")
        click.echo(f"exported {len(lines)} lines", err=True)

    @audit_group.command("checkpoint")
    @click.option("--if-due", is_flag=True, help="Only when N events or T seconds have passed.")
    @click.pass_context
    def audit_checkpoint_command(ctx: click.Context, if_due: bool) -> None:
        """Sign the chain's head with the audit key now."""
        checkpoint(_runtime(ctx), if_due=if_due)

    @audit_group.command("flush")
    @click.pass_context
    def audit_flush(ctx: click.Context) -> None:
        """Write the counts of refused requests of finished minutes to the audit log."""
        rt = _runtime(ctx)
        written = RefusalRecorder(rt.db, rt.clock).flush()
        click.echo(f"{written} refusal counts written")

    @audit_group.command("list")
    @click.option("--last", default=20, show_default=True, type=click.IntRange(1, 100000))
    @click.pass_context
    def audit_list(ctx: click.Context, last: int) -> None:
        """Show the newest audit events."""
        rt = _runtime(ctx)
        with session_scope(rt.db) as session:
            for ev in audit.recent(session, last):
                click.echo(
                    f"{ev.seq:>6} {ev.at:%Y-%m-%dT%H:%M:%SZ} {escape(ev.actor):<20} "
                    f"{ev.action:<22} {escape(ev.target)} {escape(ev.details)}"
                )
