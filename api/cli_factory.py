"""`pki factory run`: provision a batch of devices through the CA front."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from api.factory import FactoryConfig, Progress, read_token, run
from pki.manifest import parse_manifest


@click.group("factory")
def factory() -> None:
    """Factory provisioning: register a batch and enroll every device."""


@factory.command("run")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--batch",
    required=True,
    help="The batch this run provisions; rows naming another batch are refused.",
)
@click.option(
    "--ca-url",
    default="https://127.0.0.1:8443",
    show_default=True,
    help="The CA front (EST and admin API).",
)
@click.option(
    "--cacert",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trust anchor for the CA front's TLS certificate.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File with a factory-role admin token (else PKI_ADMIN_TOKEN).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder; each batch gets OUT/BATCH/ with one folder per device.",
)
@click.option(
    "--mode",
    type=click.Choice(["station", "bundle"]),
    default="station",
    show_default=True,
    help="station: key and CSR made here, enrolled over EST; "
    "bundle: first-boot bundles with one-time secrets for devices to enroll themselves.",
)
@click.option("--label", default=None, help="EST label (default: the unlabelled endpoint).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json"]),
    default=None,
    help="Manifest format (default: by file extension).",
)
def factory_run(
    manifest: Path,
    batch: str,
    ca_url: str,
    cacert: Path,
    token_file: Path | None,
    out_dir: Path,
    mode: str,
    label: str | None,
    workers: int,
    fmt: str | None,
) -> None:
    """Register the devices of MANIFEST and enroll each; run again to resume."""
    fmt = fmt or ("json" if manifest.suffix.lower() == ".json" else "csv")
    rows = parse_manifest(manifest.read_text(), batch=batch, fmt=fmt)
    config = FactoryConfig(
        ca_url=ca_url,
        admin_token=read_token(token_file, os.environ),
        cacert=cacert,
        out_dir=out_dir,
        batch=batch,
        mode="bundle" if mode == "bundle" else "station",
        label=label,
        workers=workers,
    )
    try:
        summary = run(rows, config, progress=Progress(len(rows)))
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    done = sum(1 for r in summary.results if not r.skipped)
    skipped = sum(1 for r in summary.results if r.skipped)
    click.echo(
        f"batch {batch}: {done} provisioned, {skipped} already done, "
        f"{len(summary.failures)} failed; output in {config.batch_dir}",
        err=True,
    )
    if summary.failures:
        for device_id, reason in sorted(summary.failures.items()):
            click.echo(f"  {device_id}: {reason}", err=True)
        sys.exit(1)


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""
    group.add_command(factory)
