"""``make serve`` passes --models/--port only when MODELS/PORT are given, so the documented
FLUXSERVE_* variables are not overridden by flags (``make -n``: the commands, none run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def serve_command(tmp_path: Path, *args: str, **env: str) -> str:
    """The fluxserve command ``make serve`` would run (with a venv path that does not exist, so
    ``-n`` lists the setup too, but runs nothing)."""
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith("FLUXSERVE_") and name not in ("MODELS", "PORT")}
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "serve", f"VENV={tmp_path / 'venv'}", *args],
                          capture_output=True, text=True, env={**clean, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "/bin/fluxserve serve" in line]
    assert len(lines) == 1, done.stdout
    return lines[0]


def test_make_serve_leaves_the_environment_in_charge(tmp_path):
    command = serve_command(tmp_path, FLUXSERVE_PORT="9123", FLUXSERVE_MODELS="tiny")
    assert "--port" not in command and "--models" not in command, command


def test_make_serve_without_anything_passes_no_flag_so_the_settings_defaults_apply(tmp_path):
    command = serve_command(tmp_path)
    assert command.split()[-1] == "serve", command


def test_make_variables_still_become_flags(tmp_path):
    command = serve_command(tmp_path, "MODELS=tiny", "PORT=8001", FLUXSERVE_PORT="9123")
    assert command.split()[-4:] == ["--models", "tiny", "--port", "8001"], command
