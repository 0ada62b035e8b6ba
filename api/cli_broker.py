"""`pki broker` commands: CRL sync for brokers and broker server certificates."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""
    del group
