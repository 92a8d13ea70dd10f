"""The LoRA catalog (torch-free): which names a request may use, where their weights are, and the
settings that configure it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fluxserve.config import Settings, settings_problems
from fluxserve.loras import LoraCatalog, UnknownLora, describe, parse_names, parse_strengths, resolve_strengths


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "v1.2_anime-x.safetensors").write_bytes(b"x")
    (tmp_path / "hubcopy").mkdir()
    (tmp_path / "hubcopy" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "my_lora.safetensors").write_bytes(b"x")
    (tmp_path / "ambiguous").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "ambiguous" / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    return tmp_path


def test_local_adapters_are_files_or_folders_holding_one(folder):
    catalog = LoraCatalog([folder], ["org/repo", "org/other:w.safetensors"])
    assert catalog.resolve("style").location == str(folder / "style.safetensors")
    assert catalog.resolve("v1.2_anime-x").location == str(folder / "v1.2_anime-x.safetensors")
    assert catalog.resolve("hubcopy").location == str(folder / "hubcopy" / "pytorch_lora_weights.safetensors")
    assert catalog.resolve("single").location == str(folder / "single" / "my_lora.safetensors")
    assert catalog.available() == ["hubcopy", "single", "style", "v1.2_anime-x", "org/repo", "org/other:w.safetensors"]
    for unknown in ("ambiguous", "notes", "nope", ".hidden", "Style"):
        with pytest.raises(UnknownLora, match=f"Unknown LoRA adapter: {unknown}"):
            catalog.resolve(unknown)


@pytest.mark.parametrize("name", ["../style", "..", "style/../style", "/etc/passwd", "./style", "a\\b", "style.safetensors/..",
                                  "http://example.com/x.safetensors", "hf://org/repo", "org/repo/sub", "~/x", "", " "])
def test_path_like_names_never_reach_the_file_system(folder, name):
    (folder.parent / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(UnknownLora, match="Unknown LoRA adapter"):
        LoraCatalog([folder], ["org/repo"]).resolve(name)


def test_hub_ids_only_when_allowed(folder):
    catalog = LoraCatalog([folder], ["org/repo", "org/other:w.safetensors"])
    whole = catalog.resolve("org/repo")
    assert (whole.hub, whole.location, whole.weight_name) == (True, "org/repo", None)
    assert catalog.resolve("org/repo:any.safetensors").weight_name == "any.safetensors"  # the repo is allowed
    assert catalog.resolve("org/other:w.safetensors").location == "org/other"
    for refused in ("org/other", "org/other:x.safetensors", "someone/else", "org/repo:../x.safetensors", "org/repo:x.bin"):
        with pytest.raises(UnknownLora, match=f"Unknown LoRA adapter: {refused}"):
            catalog.resolve(refused)
    with pytest.raises(ValueError, match="not a hub id"):
        LoraCatalog([folder], ["https://huggingface.co/org/repo"])


def test_missing_folder_and_listing_bound(tmp_path):
    assert LoraCatalog([tmp_path / "none"]).available() == []
    with pytest.raises(UnknownLora, match=r"available: none\)"):
        LoraCatalog([tmp_path / "none"]).resolve("x")
    for i in range(25):
        (tmp_path / f"l{i:02d}.safetensors").write_bytes(b"x")
    with pytest.raises(UnknownLora, match=r"l19, \.\.\. \(5 more\)\)"):
        LoraCatalog([tmp_path]).resolve("x")


def test_request_values():
    assert parse_names("a, b,,c ") == ["a", "b", "c"] and parse_names(["a", "b,c"]) == ["a", "b", "c"]
    assert parse_names("") is None and parse_names(None) is None and parse_names([]) is None
    with pytest.raises(ValueError):
        parse_names(3)
    from fluxserve.api.lenient import to_float

    assert parse_strengths("0.5, 1", to_float) == [0.5, 1.0] and parse_strengths(0.7, to_float) == [0.7]
    assert parse_strengths(["1", 2], to_float) == [1.0, 2.0] and parse_strengths("", to_float) is None
    with pytest.raises(ValueError):
        parse_strengths("1,,2", to_float)
    assert resolve_strengths(["a", "b"], None) == [1.0, 1.0] and resolve_strengths(["a", "b"], [0.3]) == [0.3, 0.3]
    with pytest.raises(ValueError, match="lora_strength has 3 values for 2 adapters"):
        resolve_strengths(["a", "b"], [1, 2, 3])
    assert describe(["a", "b"], [0.5, 1.0]) == "a@0.5+b@1"


def test_settings(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    assert settings.lora_folder == tmp_path / "loras" and settings.lora_hub_ids == [] and settings.lora_max_loaded == 8
    assert settings.tiny_loras_dir == tmp_path / "tiny-models" / "loras"
    monkeypatch.setenv("FLUXSERVE_LORA_HUB_IDS", '["org/repo", "org/b:c.safetensors"]')
    monkeypatch.setenv("FLUXSERVE_LORA_DIR", str(tmp_path / "mine"))
    settings = Settings(data_dir=tmp_path)
    assert settings.lora_hub_ids == ["org/repo", "org/b:c.safetensors"] and settings.lora_folder == tmp_path / "mine"
    for value, problem in (('["https://example.com/x.safetensors"]', "not a hub id"), ("org/repo", "not valid JSON")):
        monkeypatch.setenv("FLUXSERVE_LORA_HUB_IDS", value)
        with pytest.raises(ValidationError) as error:
            Settings(data_dir=tmp_path)
        lines = settings_problems(error.value)
        assert len(lines) == 1 and lines[0].startswith("FLUXSERVE_LORA_HUB_IDS") and problem in lines[0], lines
