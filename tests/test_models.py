"""The model registry and its overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxserve.config import Settings
from fluxserve.models import FLUX1, KLEIN, KONTEXT, REALTIME, Registry, UnknownModel


def test_default_registry_maps_every_family():
    registry = Registry.build()
    assert registry.names() == sorted([KLEIN, REALTIME, FLUX1, KONTEXT])
    assert registry.get(KLEIN).pipeline == "Flux2KleinPipeline"
    assert registry.get(KONTEXT).source == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (registry.get(KONTEXT).steps, registry.get(KONTEXT).guidance, registry.get(KONTEXT).strength) == (28, 2.5, 0.5)
    assert (registry.get(FLUX1).steps, registry.get(FLUX1).guidance) == (10, 3.5)
    with pytest.raises(UnknownModel):
        registry.get("sdxl")


def test_overrides_and_tiny_sources(tmp_path):
    registry = Registry.build({KONTEXT: {"source": "/models/kontext", "steps": 24}})
    assert registry.get(KONTEXT).source == "/models/kontext" and registry.get(KONTEXT).steps == 24
    tiny = Registry.build(tiny_root=tmp_path)
    assert tiny.get(FLUX1).source == str(tmp_path / "flux1-dev")
    with pytest.raises(ValueError, match="unknown fields"):
        Registry.build({KLEIN: {"colour": "red"}})
    with pytest.raises(ValueError, match="unknown model 'sdxl'; known: flux, flux-klein"):
        Registry.build({"sdxl": {"steps": 3}})
    for fields, message in (({"steps": 2.5}, "steps must be a whole number"), ({"guidance": "4"}, "guidance must be a number"),
                            ({"source": 7}, "source must be a string"), ({"steps": True}, "whole number")):
        with pytest.raises(ValueError, match=message):
            Registry.build({FLUX1: fields})
    assert Registry.build({FLUX1: {"guidance": 4}}).get(FLUX1).guidance == 4


def test_overrides_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_MODEL_OVERRIDES", '{"flux": {"source": "/srv/flux1", "guidance": 4}}')
    monkeypatch.setenv("FLUXSERVE_MODELS", "tiny")
    settings = Settings()
    assert settings.models == "tiny"
    assert Registry.build(settings.model_overrides).get(FLUX1).source == "/srv/flux1"
    assert settings.resolved_database_url.endswith(str(Path("data") / "fluxserve.db"))
