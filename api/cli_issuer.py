"""`pki issuer retire`: stop an issuer's issuance after a rollover; the VA keeps serving it."""

from __future__ import annotations

import click

from api.cli_actor import actor as _actor
from api.cli_revoke import _runtime
from pki import issuer_standing
from pki.est_config import load_est_config


def register(issuer_group: click.Group) -> None:
    """Adds the retire command to the issuer group."""

    @issuer_group.command("retire")
    @click.argument("issuer_id")
    @click.pass_context
    def issuer_retire(ctx: click.Context, issuer_id: str) -> None:
        """Stop issuance from an issuer; its CRLs and OCSP answers stay served."""
        rt = _runtime(ctx)
        issuer_standing.retire(rt.db, rt.clock.now(), issuer_id, actor=_actor())
        click.echo(
            f"{issuer_id}: retired; it issues nothing more, its CRLs and OCSP answers stay "
            "served until its last certificate expires"
        )
        still = sorted(
            name
            for name, label in load_est_config(rt.config).labels.items()
            if label.issuer == issuer_id
        )
        if still:
            click.echo(
                f"warning: est.toml label(s) {', '.join(still)} still name {issuer_id}: "
                "they answer 503 until moved to another issuer",
                err=True,
            )
