"""`pki` commands for devices, enrollment and the CA front."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""
    del group
