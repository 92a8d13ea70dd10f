"""``fluxserve models list`` and ``models pull``: the registry in effect with the Hugging Face cache
state read from a temporary HF_HOME (a fake cached snapshot in huggingface_hub's own layout), and
pulls with the hub mocked (the disk-space check and the download call) or really offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2  # huggingface_hub's HTTP errors carry one of its responses
import pytest
from huggingface_hub.errors import GatedRepoError
from typer.testing import CliRunner

from fluxserve import weights
from fluxserve.cli import app

MODEL_NAMES = ["flux", "flux-fill", "flux-klein", "flux-kontext-dev", "realtime"]
HUB_IDS = {
    "flux-fill": "black-forest-labs/FLUX.1-Fill-dev",
    "flux-klein": "black-forest-labs/FLUX.2-klein-4B",
    "realtime": "black-forest-labs/FLUX.2-klein-4B",
    "flux": "black-forest-labs/FLUX.1-dev",
    "flux-kontext-dev": "black-forest-labs/FLUX.1-Kontext-dev",
}
TINY_DIRS = {"flux-klein": "flux2-klein", "realtime": "flux2-klein", "flux": "flux1-dev", "flux-kontext-dev": "flux-kontext",
             "flux-fill": "flux1-fill"}
NON_COMMERCIAL = "FLUX.1 [dev] Non-Commercial License"
KLEIN = "black-forest-labs/FLUX.2-klein-4B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KLEIN_INDEX = {"_class_name": "Flux2KleinPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
               "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("FLUXSERVE_", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def fake_cached_repo(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A repo in huggingface_hub's cache layout: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for index, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{index:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def klein_files(*, without: str | None = None) -> dict[str, bytes]:
    files = {"model_index.json": json.dumps(KLEIN_INDEX).encode()}
    for component in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        if component != without:
            files[f"{component}/config.json"] = b"{}"
            files[f"{component}/weights.safetensors"] = b"\0" * 4096
    return files


def listed(tmp_path, *args: str) -> dict[str, dict]:
    result = CliRunner().invoke(app, ["models", "list", "--json", "--data-dir", str(tmp_path / "data"), *args])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.stdout)}


# -- models list -----------------------------------------------------------------------------------
def test_list_real_registry_with_nothing_cached(tmp_path):
    rows = listed(tmp_path)
    assert sorted(rows) == MODEL_NAMES
    for name, row in rows.items():
        assert row["source"] == HUB_IDS[name] and row["kind"] == "hub"
        assert row["cached"] == "no" and row["size_bytes"] is None
    assert rows["flux-klein"]["licence"] == "Apache-2.0" and rows["flux-klein"]["gated"] is False
    for name in ("flux", "flux-fill", "flux-kontext-dev"):
        assert rows[name]["licence"] == NON_COMMERCIAL and rows[name]["gated"] is True
    assert (rows["flux-fill"]["family"], rows["flux-fill"]["pipeline"]) == ("flux1-fill", "FluxFillPipeline")
    assert (rows["flux"]["steps"], rows["flux"]["guidance"], rows["flux"]["strength"]) == (10, 3.5, 0.7)


def test_list_reads_the_cache_a_complete_snapshot_is_cached_with_its_size(tmp_path):
    files = klein_files()
    fake_cached_repo(tmp_path / "hf", KLEIN, files)
    rows = listed(tmp_path)
    for name in ("flux-klein", "realtime"):  # same weights
        assert rows[name]["cached"] == "yes"
        assert rows[name]["size_bytes"] == sum(len(data) for data in files.values())
    assert rows["flux"]["cached"] == "no"


def test_list_a_snapshot_missing_a_component_is_partial(tmp_path):
    fake_cached_repo(tmp_path / "hf", KLEIN, klein_files(without="transformer"))
    assert listed(tmp_path)["flux-klein"]["cached"] == "partial"


def test_list_tiny_registry_points_at_the_tiny_folders_and_builds_nothing(tmp_path, tiny_root):
    rows = listed(tmp_path, "--models", "tiny")
    assert sorted(rows) == MODEL_NAMES
    for name, row in rows.items():
        assert Path(row["source"]) == tmp_path / "data" / "tiny-models" / TINY_DIRS[name]
        assert (row["kind"], row["cached"], row["gated"]) == ("local", "no", False)
    assert not (tmp_path / "data" / "tiny-models").exists()  # listing builds nothing
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny-models").symlink_to(tiny_root, target_is_directory=True)
    built = listed(tmp_path, "--models", "tiny")
    assert all(row["cached"] == "yes" and 0 < row["size_bytes"] < 5_000_000 for row in built.values())


def test_list_as_a_table_names_every_model_licence_and_gate(tmp_path):
    fake_cached_repo(tmp_path / "hf", KLEIN, klein_files())
    result = CliRunner().invoke(app, ["models", "list", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in MODEL_NAMES:
        row = next(line for line in lines if line.startswith(f"│ {name} "))
        assert HUB_IDS[name] in row
    klein = next(line for line in lines if line.startswith("│ flux-klein "))
    assert "Apache-2.0" in klein and "│ yes " in klein and "KiB" in klein
    flux = next(line for line in lines if line.startswith("│ flux "))
    assert NON_COMMERCIAL in flux and "│ no " in flux


def test_list_follows_model_overrides_to_a_local_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my-flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "w.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setenv("FLUXSERVE_MODEL_OVERRIDES", json.dumps({"flux": {"source": str(folder)}}))
    row = listed(tmp_path)["flux"]
    assert (row["kind"], row["cached"], row["size_bytes"], row["gated"]) == ("local", "yes", 1000, None)


# -- models pull -----------------------------------------------------------------------------------
class FakeHub:
    """HfApi().model_info(files_metadata=True) and snapshot_download, recorded."""

    def __init__(self, sizes: dict[str, int], download_error: Exception | None = None, info_error: Exception | None = None):
        self.sizes = sizes
        self.download_error = download_error
        self.info_error = info_error
        self.info_calls: list[tuple] = []
        self.downloads: list[tuple] = []

    def install(self, monkeypatch) -> None:
        hub = self

        class Api:
            def model_info(self, repo_id, *, files_metadata=False, **kwargs):
                hub.info_calls.append((repo_id, files_metadata))
                if hub.info_error:
                    raise hub.info_error
                return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in hub.sizes.items()])

        def snapshot_download(repo_id, *, cache_dir, allow_patterns, **kwargs):
            hub.downloads.append((repo_id, Path(cache_dir), allow_patterns))
            if hub.download_error:
                raise hub.download_error
            return str(fake_cached_repo(Path(cache_dir).parent, repo_id, klein_files()))

        monkeypatch.setattr(weights, "HfApi", Api)
        monkeypatch.setattr(weights, "snapshot_download", snapshot_download)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def pull(tmp_path, name: str, *args: str):
    return CliRunner().invoke(app, ["models", "pull", name, "--data-dir", str(tmp_path / "data"), *args])


def test_pull_refuses_when_the_cache_disk_is_too_small(tmp_path, monkeypatch):
    hub = FakeHub({"model_index.json": 500, "transformer/model.safetensors": 1 << 60})  # 1 EiB: no disk has that
    hub.install(monkeypatch)
    result = pull(tmp_path, "flux-klein")
    assert result.exit_code == 1
    assert "not enough disk space for black-forest-labs/FLUX.2-klein-4B" in result.stderr
    assert str(tmp_path / "hf" / "hub") in result.stderr and "HF_HOME" in result.stderr
    assert hub.info_calls == [(KLEIN, True)] and hub.downloads == []


def test_pull_downloads_the_pipeline_files_into_the_hf_cache(tmp_path, monkeypatch):
    # 10 500 bytes to fetch; a huge single-file checkpoint at the top is not in the estimate: pull never fetches it
    hub = FakeHub({"model_index.json": 500, "transformer/model.safetensors": 10_000, "flux-2-klein-4b.safetensors": 1 << 60})
    hub.install(monkeypatch)
    result = pull(tmp_path, "realtime")
    assert result.exit_code == 0, result.output
    assert hub.downloads == [(KLEIN, tmp_path / "hf" / "hub", weights.PULL_PATTERNS)]
    assert "to download: about 10.3 KiB" in result.stderr
    assert f"{KLEIN} is cached at {tmp_path / 'hf' / 'hub'}" in result.stdout
    assert listed(tmp_path)["flux-klein"]["cached"] == "yes"


@pytest.mark.parametrize("where", ["model_info", "snapshot_download"])
def test_pull_of_a_gated_repo_says_a_token_with_the_accepted_licence_is_needed(tmp_path, monkeypatch, where):
    refusal = GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted.",
                             response=httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api")))
    hub = FakeHub({"model_index.json": 10}, **({"info_error": refusal} if where == "model_info" else {"download_error": refusal}))
    hub.install(monkeypatch)
    result = pull(tmp_path, "flux-dev")  # an alias
    assert result.exit_code == 1
    assert "black-forest-labs/FLUX.1-dev is gated" in result.stderr and "HF_TOKEN" in result.stderr
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in result.stderr


def test_pull_says_there_is_nothing_to_pull_for_tiny_models_and_local_folders(tmp_path, monkeypatch):
    hub = FakeHub({})
    hub.install(monkeypatch)
    tiny = pull(tmp_path, "flux-klein", "--models", "tiny")
    assert tiny.exit_code == 0 and "nothing to pull" in tiny.stdout and "build-tiny" in tiny.stdout
    monkeypatch.setenv("FLUXSERVE_MODEL_OVERRIDES", json.dumps({"flux": {"source": str(tmp_path)}}))
    local = pull(tmp_path, "flux")
    assert local.exit_code == 0 and f"local weights from {tmp_path}" in local.stdout
    unknown = pull(tmp_path, "sdxl")
    assert unknown.exit_code == 1 and "unknown model 'sdxl'" in unknown.stderr
    assert hub.info_calls == [] and hub.downloads == []


def test_pull_offline_for_real_says_so(tmp_path):
    """The installed command with HF_HUB_OFFLINE=1: huggingface_hub's real snapshot_download refuses."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([str(Path(sys.executable).parent / "fluxserve"), "models", "pull", "flux-klein", "--data-dir",
                           str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "HF_HUB_OFFLINE is set, so black-forest-labs/FLUX.2-klein-4B can't be downloaded" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
