"""`pki` commands for revocation, CRLs, OCSP, admin tokens and the validation authority."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""
    del group
