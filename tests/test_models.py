"""The model registry and its overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxserve.config import Settings
from fluxserve.engine.families.base import Task
from fluxserve.models import Registry, UnknownModel, UnsuitableRequest

KLEIN, REALTIME, FLUX1, KONTEXT, FILL = "flux-klein", "realtime", "flux", "flux-kontext-dev", "flux-fill"


def test_default_registry_maps_every_family():
    registry = Registry.build()
    assert registry.names() == sorted([KLEIN, REALTIME, FLUX1, KONTEXT, FILL])
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
    with pytest.raises(ValueError, match="unknown model 'sdxl'; known: flux, flux-fill, flux-klein"):
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


def test_model_ids_resolve_with_aliases_and_tasks():
    registry = Registry.build()
    assert registry.get("FLUX-2-klein").name == KLEIN and registry.get(" flux-kontext ").name == KONTEXT
    assert registry.resolve("flux", Task.TEXT2IMG).name == FLUX1
    assert registry.for_task(Task.TEXT2IMG) == [FLUX1, KLEIN, KONTEXT, REALTIME]
    assert registry.for_task("inpaint") == [FLUX1, FILL, KLEIN, KONTEXT, REALTIME]
    with pytest.raises(UnsuitableRequest) as unknown:
        registry.resolve("sdxl", Task.TEXT2IMG)
    assert (unknown.value.status, str(unknown.value)) == (404, "Model not found: sdxl")
    with pytest.raises(UnsuitableRequest, match=r"^Model not found: flux-fill \(text-to-image models here: flux, "):
        registry.resolve("flux-fill", Task.TEXT2IMG)
    assert registry.prompt_writer().name == KLEIN  # klein's Qwen3 encoder writes prompts


@pytest.mark.parametrize("model,task,inputs,message", [
    (FLUX1, "img2img", dict(init_images=2, second_image=False, mask=False), "init_image accepts at most 1 image URL(s) for flux"),
    (KLEIN, "img2img", dict(init_images=5, second_image=False, mask=False), "init_image accepts at most 4 image URL(s) for flux-klein"),
    (REALTIME, "img2img", dict(init_images=1, second_image=True, mask=False), "init_image_2 is only supported by flux-kontext-dev"),
    (FLUX1, "inpaint", dict(init_images=1, second_image=False, mask=False), "mask_image is required"),
    (FLUX1, "img2img", dict(init_images=0, second_image=False, mask=False), "init_image is required"),
])
def test_inputs_beyond_a_familys_limits_are_refused(model, task, inputs, message):
    registry = Registry.build()
    with pytest.raises(UnsuitableRequest) as refused:
        registry.check_inputs(registry.get(model), task, **inputs)
    assert (refused.value.status, str(refused.value)) == (400, message)
    registry.check_inputs(registry.get(KONTEXT), "img2img", init_images=1, second_image=True, mask=False)
