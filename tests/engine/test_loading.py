"""Real loading code paths: local folders, hub ids that can't be had, and clear errors."""

from __future__ import annotations

import pytest
import torch

from fluxserve.engine.loading import ModelLoadError, PipelineCache, pick_device, pick_dtype
from fluxserve.models import Registry
from tests.support.servers import live_server

KLEIN, REALTIME, FLUX1 = "flux-klein", "realtime", "flux"


def test_device_and_dtype_choice():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("cuda:0") is torch.bfloat16
    assert pick_dtype("cpu") is torch.float32


def test_tiny_models_load_through_the_from_pretrained_path(tiny_root):
    registry = Registry.build(tiny_root=tiny_root)
    cache = PipelineCache("cpu", torch.float32)
    klein = cache.get(registry.get(KLEIN))
    assert type(klein).__name__ == "Flux2KleinPipeline"
    assert cache.get(registry.get(REALTIME)) is klein  # same class + weights: loaded once
    inpaint = cache.get(registry.get(KLEIN), "Flux2KleinInpaintPipeline")
    assert inpaint.transformer is klein.transformer  # variants share the loaded weights
    assert len(cache.loaded()) == 2
    cache.clear()
    assert cache.loaded() == []


def test_missing_local_folder_gives_an_actionable_error(tmp_path):
    registry = Registry.build({FLUX1: {"source": str(tmp_path / "nowhere")}})
    with pytest.raises(ModelLoadError) as error:
        PipelineCache("cpu", torch.float32).get(registry.get(FLUX1))
    message = str(error.value)
    assert message.startswith(f"Model flux could not be loaded from {tmp_path / 'nowhere'}")
    assert "FLUXSERVE_MODEL_OVERRIDES" in message and "Traceback" not in message


def test_hub_model_without_weights_gives_an_actionable_error():
    """No weights are cached here and the hub is unreachable (offline): a message, not a traceback."""
    spec = Registry.build().get(KLEIN)
    with pytest.raises(ModelLoadError) as error:
        PipelineCache("cpu", torch.float32).get(spec)
    assert "black-forest-labs/FLUX.2-klein-4B" in str(error.value)
    assert "not available locally" in str(error.value)


def test_a_job_on_a_missing_model_fails_cleanly_and_the_server_goes_on(tmp_path, tiny_root):
    missing = str(tmp_path / "no-weights-here")
    with live_server(tmp_path / "data", tiny_root, model_overrides={FLUX1: {"source": missing}}) as live:
        with live.client() as client:
            body = {"key": live.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
            import base64
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.new("RGB", (256, 256), (10, 200, 30)).save(buffer, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            failed = client.post("/api/v1/enterprise/flux/img2img", json={**body, "init_image": uri})
            assert failed.status_code == 200  # the request was served; its job failed
            result = failed.json()
            assert result["status"] == "failed" and isinstance(result["id"], int)
            assert result["message"].startswith("Model flux could not be loaded")
            again = client.post(f"/api/v1/enterprise/flux/fetch/{result['id']}", json={"key": live.key})
            assert again.json()["message"] == result["message"]
            ok = client.post("/api/v1/enterprise/flux_klein/text2img", json=body).json()
            assert ok["status"] == "success"


def test_variants_keep_the_base_pipelines_dtype(tiny_root):
    """diffusers' from_pipe without a dtype casts shared modules to fp32 in place (2x VRAM on CUDA)."""
    spec = Registry.build(tiny_root=tiny_root).get(KLEIN)
    cache = PipelineCache("cpu", torch.bfloat16)
    base = cache.get(spec)
    inpaint = cache.get(spec, "Flux2KleinInpaintPipeline")
    assert base.transformer.dtype == torch.bfloat16 and inpaint.transformer is base.transformer
    assert base.vae.dtype == torch.bfloat16 and base.text_encoder.dtype == torch.bfloat16
