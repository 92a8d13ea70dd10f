"""lora_model / lora_strength over HTTP: checked before queueing (unknown adapters, hub ids not
allowed, path-like names and bad strengths are 400s with no job row), applied and recorded in
meta, removed again for the next job, on text-to-image and image-to-image, through the official
SDK's own schema fields, and batched only with jobs applying the same adapters."""

from __future__ import annotations

import io
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
from modelslab_py.core.apis.community import Community
from modelslab_py.schemas.community import Text2Image
from PIL import Image

from fluxserve.engine.tiny import build_tiny_lora, load_tiny_transformer
from fluxserve.loras import LoraCatalog
from fluxserve.models import DEFAULT_REGISTRY, ModelSpec, Registry, UnsuitableRequest
from tests.support.servers import live_server
from tests.support.waiting import wait_for_job
from tests.test_sdk import sdk_client

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FLUX_IMG2IMG = "/api/v1/enterprise/flux/img2img"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2, "safety_checker": False}
HUB_ALLOWED = "fluxserve-test/not-cached"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, tiny_root):
    folder = tmp_path_factory.mktemp("loras")
    klein = load_tiny_transformer(tiny_root / "flux2-klein")
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "style.safetensors", seed=11)
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "detail" / "pytorch_lora_weights.safetensors", seed=12)
    flux1 = load_tiny_transformer(tiny_root / "flux1-dev")
    build_tiny_lora(diffusers.FluxPipeline, flux1, folder / "flux-style.safetensors", seed=13)
    with live_server(tmp_path_factory.mktemp("lora-server"), tiny_root, lora_dir=folder, lora_hub_ids=[HUB_ALLOWED]) as live:
        yield live


@pytest.fixture
def http(lora_server):
    with lora_server.client() as client:
        yield client


def _pixels(client, url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB"), dtype=np.int16)


def test_klein_text2img_with_adapters_records_them_and_the_next_job_is_the_base_again(lora_server, http):
    body = {"key": lora_server.key, "prompt": "a lighthouse", "seed": 9, **SMALL}
    base = http.post(KLEIN, json=body).json()
    styled = http.post(KLEIN, json={**body, "lora_model": "style"}).json()
    assert styled["status"] == "success", styled
    assert styled["meta"]["lora_model"] == ["style"] and styled["meta"]["lora_strength"] == [1.0]
    assert "lora_model" not in base["meta"] and "lora_strength" not in base["meta"]
    both = http.post(KLEIN, json={**body, "lora_model": "style, detail", "lora_strength": "0.8,0.5"}).json()
    assert both["meta"]["lora_model"] == ["style", "detail"] and both["meta"]["lora_strength"] == [0.8, 0.5]
    listed = http.post(KLEIN, json={**body, "lora_model": ["style", "detail"], "lora_strength": 0.5}).json()
    assert listed["meta"]["lora_strength"] == [0.5, 0.5]  # one value for all
    again = http.post(KLEIN, json=body).json()
    plain, adapted, combined = (_pixels(http, r["output"][0]) for r in (base, styled, both))
    assert np.abs(plain - adapted).mean() > 1 and not np.array_equal(adapted, combined)
    assert np.array_equal(_pixels(http, again["output"][0]), plain), "the base image did not come back bit for bit"
    fetched = http.post(f"/api/v1/enterprise/flux_klein/fetch/{styled['id']}", json={"key": lora_server.key}).json()
    assert fetched["meta"]["lora_model"] == ["style"]


def test_flux1_img2img_with_an_adapter(lora_server, http, image_host):
    body = {"key": lora_server.key, "prompt": "a cat", "init_image": f"{image_host}/a.png", "strength": 0.8, "seed": 2, **SMALL}
    base = http.post(FLUX_IMG2IMG, json=body).json()
    styled = http.post(FLUX_IMG2IMG, json={**body, "lora_model": "flux-style", "lora_strength": 1.5}).json()
    assert styled["status"] == "success", styled
    assert styled["meta"]["lora_model"] == ["flux-style"] and styled["meta"]["lora_strength"] == [1.5]
    assert np.abs(_pixels(http, base["output"][0]) - _pixels(http, styled["output"][0])).mean() > 0.5
    again = http.post(FLUX_IMG2IMG, json=body).json()
    assert np.array_equal(_pixels(http, again["output"][0]), _pixels(http, base["output"][0]))


@pytest.mark.parametrize("extra,message", [
    ({"lora_model": "nope"}, "Unknown LoRA adapter: nope (available: detail, flux-style, style, tiny-"),  # tiny demos too
    ({"lora_model": "style,nope"}, "Unknown LoRA adapter: nope"),
    ({"lora_model": "../style"}, "Unknown LoRA adapter: ../style (names are letters, digits"),
    ({"lora_model": "/etc/passwd"}, "Unknown LoRA adapter: /etc/passwd"),
    ({"lora_model": "detail/pytorch_lora_weights.safetensors"}, "Unknown LoRA adapter: detail/pytorch_lora_weights.safetensors"),
    ({"lora_model": "https://example.com/x.safetensors"}, "Unknown LoRA adapter: https://example.com/x.safetensors"),
    ({"lora_model": "someone/else"}, "Unknown LoRA adapter: someone/else (hub adapters must be allowed by this server"),
    ({"lora_model": "style", "lora_strength": 2.5}, "lora_strength must be between 0 and 2"),
    ({"lora_model": "style", "lora_strength": "-1"}, "lora_strength must be between 0 and 2"),
    ({"lora_model": "style", "lora_strength": "lots"}, "lora_strength"),
    ({"lora_model": "style,detail", "lora_strength": "1,0.5,0.2"}, "lora_strength has 3 values for 2 adapters"),
    ({"lora_model": "style,style"}, "lora_model names style more than once"),
    ({"lora_model": "a,b,c,d,e"}, "lora_model names at most 4 adapters"),
    ({"lora_model": 5}, "lora_model"),
])
def test_refusals_come_before_queueing(lora_server, http, extra, message):
    before = lora_server.job_count()
    response = http.post(KLEIN, json={"key": lora_server.key, "prompt": "x", **SMALL, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["status"] == "error" and message in response.json()["message"], response.json()
    assert lora_server.job_count() == before, "a refused request left a job row"


def test_an_allowed_hub_adapter_not_in_the_cache_fails_the_job_saying_what_to_do(lora_server, http):
    result = http.post(KLEIN, json={"key": lora_server.key, "prompt": "x", "lora_model": HUB_ALLOWED, **SMALL}).json()
    assert result["status"] == "failed" and isinstance(result["id"], int)  # served: the job failed
    assert result["message"].startswith(f"LoRA adapter {HUB_ALLOWED} could not be loaded into flux-klein")
    assert f"hf download {HUB_ALLOWED}" in result["message"]
    assert http.post(KLEIN, json={"key": lora_server.key, "prompt": "x", **SMALL}).json()["status"] == "success"


def test_the_sdk_schema_fields_reach_the_engine(lora_server):
    """modelslab-py's Community Text2Image has lora_model (str) and lora_strength (float)."""
    api = Community(sdk_client(lora_server))
    result = api.text_to_image(Text2Image(model_id="flux-klein", prompt="a red fox", width=256, height=256,
                                          num_inference_steps=2, seed=4, lora_model="style,detail", lora_strength=0.7))
    assert result["status"] == "success", result
    assert result["meta"]["lora_model"] == ["style", "detail"] and result["meta"]["lora_strength"] == [0.7, 0.7]
    with pytest.raises(Exception, match="Unknown LoRA adapter: missing"):
        api.text_to_image(Text2Image(model_id="flux-klein", prompt="x", width=256, height=256, lora_model="missing"))


def test_a_family_without_a_lora_loader_is_refused_by_the_registry():
    """No served family lacks one today; the check is the family's data, not a name."""
    from fluxserve.engine.families.base import Family, Task

    class Plain(Family):
        name, pipeline, variants, tiny_seed = "plain-test", "PlainPipeline", {Task.TEXT2IMG: "PlainPipeline"}, 1

    registry = Registry({**DEFAULT_REGISTRY, "plain": ModelSpec("plain", Plain(), "nowhere", steps=1, guidance=1.0, strength=1.0)})
    with pytest.raises(UnsuitableRequest, match=r"plain does not take LoRA adapters \(lora_model\); models that do: flux, "):
        registry.check_inputs(registry.get("plain"), "text2img", init_images=0, second_image=False, mask=False, loras=True)
    registry.check_inputs(registry.get("plain"), "text2img", init_images=0, second_image=False, mask=False)


def test_the_tiny_server_offers_a_demo_adapter_per_family(server):
    names = LoraCatalog.from_settings(server.settings).available()
    assert {"tiny-flux2-klein", "tiny-flux1-dev", "tiny-flux-kontext", "tiny-flux1-fill"} <= set(names)


def _submit_and_wait(live, client, bodies):
    ids = [client.post(KLEIN, json=body).json()["id"] for body in bodies]
    deadline = time.monotonic() + 120
    return [wait_for_job(client, live.key, job_id, timeout=deadline - time.monotonic()).json() for job_id in ids]


def test_jobs_batch_only_with_the_same_adapters_and_equal_their_solo_runs(tmp_path, tiny_root, lora_server):
    lora_dir: Path = lora_server.settings.lora_folder
    with live_server(tmp_path, tiny_root, lora_dir=lora_dir, max_batch_size=4, batch_wait_seconds=0.5,
                     sync_wait_seconds=0) as live:
        with live.client() as client:
            base = {"key": live.key, "prompt": "a boat", **SMALL}
            bodies = [{**base, "seed": 1, "lora_model": "style"}, {**base, "seed": 2, "lora_model": "style"},
                      {**base, "seed": 3, "lora_model": "style", "lora_strength": 0.5}, {**base, "seed": 4, "lora_model": "detail"},
                      {**base, "seed": 5}]
            results = _submit_and_wait(live, client, bodies)
            assert all(r["status"] == "success" for r in results), results
            sizes = [r["meta"].get("batch_size") for r in results]
            assert sizes[:2] == [2, 2] and sizes[2:] == [None, None, None], sizes
            solo = [_submit_and_wait(live, client, [body])[0] for body in bodies[:2]]
            for batched, alone in zip(results[:2], solo):
                assert "batch_size" not in alone["meta"]
                assert np.array_equal(_pixels(client, batched["output"][0]), _pixels(client, alone["output"][0]))
