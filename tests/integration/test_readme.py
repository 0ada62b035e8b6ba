"""The README's first command works as written: it builds the demo CA and issues a device."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO


def test_demo_command_builds_hierarchy_and_issues(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0].strip()
    assert first_block == "./scripts/demo"
    env = dict(os.environ, PKI_DATA_DIR=str(tmp_path / "data"))
    env.pop("PKI_DATABASE_URL", None)
    env.pop("SOFTHSM2_CONF", None)
    result = subprocess.run(
        [str(REPO / "scripts" / "demo")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo hierarchy ready" in result.stdout
    device = tmp_path / "data" / "demo-device" / "device.pem"
    assert f"{device}: OK" in result.stdout
    # Running it again finds the hierarchy in place and does not fail.
    again = subprocess.run(
        [str(REPO / "scripts" / "demo")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "already initialised" in again.stdout
