"""`pki scheduler run`: the publishing jobs on a timer, off every request path.

Each round runs, per issuer (the root included), what is due: a full CRL with its delta
(none yet, period elapsed, renewal before nextUpdate, or revocations older than the debounce
delay), a delta CRL on its own schedule, OCSP-signer renewal (a third of the signer's
validity before it ends) and OCSP pre-signing (responses past half their validity, and new
certificates), the enrollment sweep (superseded certificates past their grace period,
pending rows past their age, est.toml) and a signed checkpoint of the audit log (after N
events or T seconds, ca.toml [audit]). A job that fails is reported and tried again next
round; the scheduler itself keeps going.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import click

from api.cli_revoke import _runtime


def _run(ctx: click.Context, group: click.Group, path: list[str], **params: Any) -> None:
    command: click.Command | None = group
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands.get(name)
    if command is None:
        raise click.ClickException(f"pki {' '.join(path)} is not installed")
    label = "pki " + " ".join(path)
    try:
        ctx.invoke(command, **params)
    except click.exceptions.Exit:
        pass
    except SystemExit as e:
        if e.code not in (0, None):
            click.echo(f"scheduler: {label} failed (exit {e.code}); retrying next round", err=True)
    except Exception as e:  # a failing job must not stop the others
        click.echo(f"scheduler: {label} failed: {e}; retrying next round", err=True)
        click.echo(traceback.format_exc(limit=3), err=True)


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""

    @group.group("scheduler")
    def scheduler() -> None:
        """Periodic publishing jobs: CRLs, delta CRLs, OCSP signers and pre-signing."""

    @scheduler.command("run")
    @click.option(
        "--interval",
        default=30,
        show_default=True,
        type=click.IntRange(1, 86400),
        help="Seconds between rounds.",
    )
    @click.option(
        "--rounds",
        default=0,
        show_default=True,
        type=click.IntRange(0, None),
        help="Stop after this many rounds (0: run until stopped).",
    )
    @click.option(
        "--crl-period",
        default=1440,
        show_default=True,
        type=click.IntRange(1, 43200),
        help="Minutes between full CRLs when nothing was revoked.",
    )
    @click.option(
        "--delta-period",
        default=60,
        show_default=True,
        type=click.IntRange(1, 43200),
        help="Minutes between delta CRLs when nothing was revoked.",
    )
    @click.option(
        "--revocation-delay",
        default=60,
        show_default=True,
        type=click.IntRange(0, 86400),
        help="Seconds after a revocation before CRLs are published (a burst goes out at once).",
    )
    @click.pass_context
    def scheduler_run(
        ctx: click.Context,
        interval: int,
        rounds: int,
        crl_period: int,
        delta_period: int,
        revocation_delay: int,
    ) -> None:
        """Run the publishing jobs every INTERVAL seconds."""
        # The scheduler opens the issuing CA's and the signers' tokens, never an offline root.
        _runtime(ctx).use_process("scheduler")
        done = 0
        while True:
            started = time.monotonic()
            _run(
                ctx,
                group,
                ["ocsp", "renew-signers"],
                issuer_ids=(),
                before_days=None,
                key_type="ec-p256",
                force=False,
            )
            _run(
                ctx,
                group,
                ["crl", "publish"],
                issuer_ids=(),
                all_issuers=True,
                delta=False,
                out_dir=None,
                if_due=True,
                period_minutes=crl_period,
                delay_seconds=revocation_delay,
            )
            _run(
                ctx,
                group,
                ["crl", "publish"],
                issuer_ids=(),
                all_issuers=True,
                delta=True,
                out_dir=None,
                if_due=True,
                period_minutes=delta_period,
                delay_seconds=revocation_delay,
            )
            _run(ctx, group, ["ocsp", "presign"], issuer_id=None)
            _run(ctx, group, ["enrollment", "sweep"])
            _run(ctx, group, ["audit", "checkpoint"], if_due=True)
            done += 1
            if rounds and done >= rounds:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
