"""The CLI names its actor by the effective OS account, whatever $USER says."""

from __future__ import annotations

import os
import pwd

import pytest

from api.cli_actor import actor


def test_cli_actor_is_the_effective_account_not_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "someone-else")
    assert actor() == f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
    assert "someone-else" not in actor()
