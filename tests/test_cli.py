"""The ``fluxserve`` command: keys in-process through typer's CliRunner, and one run
of the real installed console script serving requests and shutting down cleanly."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxserve.cli import app
from tests.support.servers import free_port


@pytest.fixture(autouse=True)
def _no_fluxserve_env(monkeypatch):
    """Settings read FLUXSERVE_* variables; the tests pass everything as flags."""
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--data-dir", str(tmp_path)])

    return invoke


def listed_rows(cli) -> list[list[str]]:
    result = cli("keys", "list")
    assert result.exit_code == 0, result.output
    return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]


# -- keys ------------------------------------------------------------------------------------------
def test_keys_create_prints_only_the_key_on_stdout(cli):
    result = cli("keys", "create", "team-a")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("fs_") and len(key) > 30 and "\n" not in key
    assert "team-a" in result.stderr and key not in result.stderr
    second = cli("keys", "create", "team-a").stdout.strip()
    assert second.startswith("fs_") and second != key


def test_keys_list_shows_id_prefix_name_role_state_never_the_key(cli):
    user_key = cli("keys", "create", "team-a").stdout.strip()
    admin = cli("keys", "create", "ops", "--admin")
    assert admin.exit_code == 0, admin.output
    admin_key = admin.stdout.strip()
    assert admin_key.startswith("fs_") and "admin" in admin.stderr

    listing = cli("keys", "list").stdout
    assert user_key not in listing and admin_key not in listing
    rows = listed_rows(cli)
    assert len(rows) == 2
    (id_a, prefix_a, name_a, role_a, state_a, *_), (id_b, prefix_b, name_b, role_b, state_b, *_) = rows
    assert id_a.isdigit() and id_b.isdigit() and int(id_a) < int(id_b)
    assert (name_a, role_a, state_a) == ("team-a", "user", "active")
    assert (name_b, role_b, state_b) == ("ops", "admin", "active")
    assert user_key.startswith(prefix_a.rstrip("…")) and admin_key.startswith(prefix_b.rstrip("…"))
    assert len(prefix_a.rstrip("…")) < len(user_key)


def test_keys_revoke_by_id_and_by_prefix(cli):
    cli("keys", "create", "first")
    cli("keys", "create", "second")
    cli("keys", "create", "third")
    (id_1, *_), (_, prefix_2, *_), _ = listed_rows(cli)

    by_id = cli("keys", "revoke", id_1)
    assert by_id.exit_code == 0, by_id.output
    assert "first" in by_id.stdout

    by_prefix = cli("keys", "revoke", prefix_2.rstrip("…"))
    assert by_prefix.exit_code == 0, by_prefix.output
    assert "second" in by_prefix.stdout

    states = {row[2]: row[4] for row in listed_rows(cli)}
    assert states["first"].startswith("revoked") and states["second"].startswith("revoked")
    assert states["third"] == "active"


@pytest.mark.parametrize("shown", ["as listed", "with three dots", "the whole key"])
def test_keys_revoke_takes_what_keys_list_prints_or_the_whole_key(cli, shown):
    """``keys list`` prints ``fs_ab12cd3…``: pasting that (or with ``...``, or the key itself) revokes it."""
    key = cli("keys", "create", "pasted").stdout.strip()
    cli("keys", "create", "bystander")
    listed_prefix = listed_rows(cli)[0][1]
    assert listed_prefix.endswith("…")
    ident = {"as listed": listed_prefix, "with three dots": listed_prefix.removesuffix("…") + "...",
             "the whole key": key}[shown]
    result = cli("keys", "revoke", ident)
    assert result.exit_code == 0, result.output
    assert "pasted" in result.stdout
    states = {row[2]: row[4] for row in listed_rows(cli)}
    assert states["pasted"].startswith("revoked") and states["bystander"] == "active"


def test_keys_revoke_with_a_wrong_whole_key_revokes_nothing(cli):
    key = cli("keys", "create", "kept").stdout.strip()
    result = cli("keys", "revoke", key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert result.exit_code == 1
    assert listed_rows(cli)[0][4] == "active"


def test_keys_revoke_revoked_key_really_stops_working(cli, tmp_path):
    from fluxserve.config import Settings
    from fluxserve.jobs.database import open_database
    from fluxserve.keys import KeyStore

    key = cli("keys", "create", "gone").stdout.strip()
    store = KeyStore(open_database(Settings(data_dir=tmp_path).resolved_database_url))
    assert store.authenticate(key) is not None
    assert cli("keys", "revoke", "1").exit_code == 0
    assert store.authenticate(key) is None


@pytest.mark.parametrize("ident", ["999", "fs_nothing"])
def test_revoking_an_unknown_key_exits_1(cli, ident):
    cli("keys", "create", "only")
    result = cli("keys", "revoke", ident)
    assert result.exit_code == 1
    assert ident in result.stderr
    assert listed_rows(cli)[0][4] == "active"


# -- refused settings -------------------------------------------------------------------------------
def test_a_refused_setting_ends_keys_and_models_commands_with_one_line_per_problem(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXSERVE_DEVICE", "gpu")
    result = cli("keys", "create", "team-a")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "FLUXSERVE_DEVICE: unknown device 'gpu'; use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps"
    assert result.stdout == "" and not (tmp_path / "fluxserve.db").exists()
    monkeypatch.delenv("FLUXSERVE_DEVICE")
    listed = cli("models", "list", "--models", "tinny")
    assert listed.exit_code == 2, listed.output
    assert listed.stderr.strip() == "FLUXSERVE_MODELS (--models): Input should be 'real' or 'tiny'"


def test_fluxserve_serve_refuses_a_typo_before_starting_anything(tmp_path):
    """FLUXSERVE_OPTIMIZATIONS=compil used to pass the settings and fail only inside the spawned
    worker, which the supervisor restarted forever."""
    command = Path(sys.executable).parent / "fluxserve"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    env.update(FLUXSERVE_OPTIMIZATIONS="compil", FLUXSERVE_GPU_MEMORY_BUDGET="20GiB")
    started = time.monotonic()
    done = subprocess.run(
        [str(command), "serve", "--models", "tiny", "--port", str(free_port()), "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert time.monotonic() - started < 20  # no worker, no model build: just the settings
    assert done.stderr.splitlines() == [
        "FLUXSERVE_OPTIMIZATIONS: unknown optimization 'compil'; known: all, attention, attention_backend, bf16, "
        "bf16_everywhere, bf16_force, cache, channels_last, channels_last_vae, compile, compile_dynamic, default, "
        "force_bf16, fp8, none, prompt_cache, prompt_cache_size, truncate, truncate_text_encoder"]
    assert list(data_dir.iterdir()) == []  # no database, no secret key, no tiny models


# -- serve --help ----------------------------------------------------------------------------------
def serve_help() -> str:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "100", "TERMINAL_WIDTH": "100"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())  # wrapped lines joined again


def test_serve_help_lists_every_setting_with_its_default():
    from fluxserve.config import DERIVED_DEFAULTS, Settings, env_name

    shown = serve_help()
    defaults = Settings()  # no FLUXSERVE_* variables here (autouse fixture)
    for field in Settings.model_fields:
        value = getattr(defaults, field)
        if field in DERIVED_DEFAULTS:
            expected = DERIVED_DEFAULTS[field]
        elif isinstance(value, bool):
            expected = str(value).lower()
        elif isinstance(value, (list, dict)):
            expected = json.dumps(value)
        else:
            expected = '""' if value == "" else "unset" if value is None else str(value)
        assert f"{env_name(field)} (default {expected})" in shown, field
    for literal in ("FLUXSERVE_PORT (default 8000): Port", "FLUXSERVE_FETCH_ALLOW (default []): Hosts or CIDRs",
                    "FLUXSERVE_LORA_DIR (default <data_dir>/loras): LoRA adapters requests may name (lora_model): "
                    "<name>.safetensors", "FLUXSERVE_ENHANCE_OPENAI_API_KEY (default unset)"):
        assert literal in shown, literal


def test_serve_help_shows_which_variable_each_flag_sets():
    """Rich markup took "[env FLUXSERVE_HOST]" for a style tag and printed "Bind address ."."""
    shown = serve_help()
    for flag_help in ("Bind address [env FLUXSERVE_HOST]", "Port [env FLUXSERVE_PORT]", "[env FLUXSERVE_DATA_DIR]"):
        assert flag_help in shown, flag_help


# -- the real command --------------------------------------------------------------------------------
def test_fluxserve_serve_subprocess_end_to_end(tmp_path, tiny_root):
    command = Path(sys.executable).parent / "fluxserve"
    assert command.exists(), command
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tiny-models").symlink_to(tiny_root, target_is_directory=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(command), "serve", "--models", "tiny", "--port", str(port), "--data-dir", str(data_dir),
             "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer /health within 90 s:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        created = subprocess.run(
            [str(command), "keys", "create", "e2e", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("fs_")

        body = {"key": key, "prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 1}
        response = httpx.post(f"{base}/api/v1/enterprise/flux_klein/text2img", json=body, timeout=60)
        assert response.status_code == 200, (response.text, log_path.read_text())
        result = response.json()
        assert result["status"] == "success", result
        assert result["output"][0].startswith(base + "/")
        picture = httpx.get(result["output"][0], timeout=30)
        assert picture.status_code == 200
        image = Image.open(io.BytesIO(picture.content))
        assert image.format == "PNG" and image.size == (256, 256)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"server did not stop within 30 s of SIGTERM:\n{log_path.read_text()}")
    time.sleep(1.0)  # the resource tracker outlives the server a moment: it would warn then
    log_text = log_path.read_text()
    # A graceful stop: the lifespan shutdown (which stops the GPU worker) ran to completion, and
    # the exit status says so (uvicorn alone would raise the SIGTERM again: fluxserve.serving).
    assert returncode == 0, log_text
    assert "Application shutdown complete" in log_text and "Finished server process" in log_text, log_text
    assert "Traceback" not in log_text and " ERROR " not in log_text, log_text
    # Every line once: not uvicorn's handler and ours both, not a worker that configures logging
    # again; uvicorn's lines in our format (so FLUXSERVE_LOG_FORMAT=json covers them too).
    stamped = [line.split(" ", 2)[2] for line in log_text.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]
    repeated = {line for line in stamped if stamped.count(line) > 1 and '"GET /health ' not in line}
    assert not repeated, log_text
    assert len([line for line in stamped if "optimizations for" in line]) == 1, log_text  # one model loaded, once
    assert re.search(r"INFO MainProcess\[\d+\] uvicorn\.error: Application shutdown complete", log_text), log_text
    assert re.search(r'uvicorn\.access: 127\.0\.0\.1:\d+ - "POST /api/v1/enterprise/flux_klein/text2img', log_text), log_text
    assert "leaked semaphore" not in log_text and "resource_tracker" not in log_text, log_text
