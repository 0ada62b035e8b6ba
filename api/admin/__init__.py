"""The admin API (bearer tokens with roles), mounted on the CA front."""

from __future__ import annotations

from flask import Flask

from api.runtime import Runtime


def register(app: Flask, runtime: Runtime) -> None:
    """Mounts the admin API on an app."""
    del app, runtime
