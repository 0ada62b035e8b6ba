"""Who runs a `pki` command: the OS account of the effective user, as the audit log names it."""

from __future__ import annotations

import os
import pwd


def actor() -> str:
    """Names the effective OS account; `$USER` is whatever the caller's environment says."""
    uid = os.geteuid()
    try:
        return f"cli:{pwd.getpwuid(uid).pw_name}"
    except KeyError:  # an account without a passwd entry (containers): its number is all
        return f"cli:uid={uid}"
