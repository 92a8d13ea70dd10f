"""The paths added through the path-family table: FLUX.1 text-to-image, model_id-chosen models on
v6 and the SDK's enterprise ``images`` server, Kontext's own enterprise server, and inpainting
everywhere, each with the same semantics as the other endpoints (seeds, samples, sizes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fluxserve.api.paths import PATH_FAMILIES
from tests.support.waiting import wait_for_job

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


def png(client, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200, url
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return image.convert("RGB")


@pytest.mark.parametrize("path,body,model", [
    ("/api/v6/images/text2img", {"model_id": "flux"}, "flux"),
    ("/api/v6/images/text2img", {}, "flux"),  # the default model of v6 text2img
    ("/api/v6/images/text2img", {"model_id": "flux-2-klein"}, "flux-klein"),  # an alias
    ("/api/v6/images/text2img", {"model_id": "flux-kontext-dev"}, "flux-kontext-dev"),
    ("/api/v1/enterprise/flux/text2img", {"model_id": "ignored-here"}, "flux"),
    ("/api/v1/enterprise/images/text2img", {"model_id": "realtime"}, "realtime"),
    ("/api/v1/enterprise/images/img2img", {"model_id": "flux", "init_image": "{host}/a.png"}, "flux"),
    ("/api/v6/images/img2img", {"model_id": "flux", "init_image": "{host}/a.png"}, "flux"),
    ("/api/v1/enterprise/flux_kontext_dev/img2img", {"init_image": "{host}/a.png"}, "flux-kontext-dev"),
])
def test_new_generation_paths(server, client, image_host, path, body, model):
    body = {k: v.replace("{host}", image_host) if isinstance(v, str) else v for k, v in body.items()}
    result = client.post(path, json={"key": server.key, "prompt": "a red fox", "seed": 40, "samples": 2,
                                     **SMALL, **body}).json()
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == model and result["meta"]["seeds"] == [40, 41]
    images = [png(client, url) for url in result["output"]]
    assert [image.size for image in images] == [(256, 256)] * 2
    assert images[0].tobytes() != images[1].tobytes()
    family = next(f for f in PATH_FAMILIES if path.startswith(f.prefix + "/"))
    fetched = client.post(family.fetch_path.format(id=result["id"]), json={"key": server.key}).json()
    assert fetched["status"] == "success" and fetched["output"] == result["output"]


def test_flux_text2img_is_reproducible_and_honours_the_size(server, client):
    body = {"key": server.key, "prompt": "a lighthouse", "model_id": "flux", "seed": 5, "width": 264,
            "height": 320, "num_inference_steps": 2}
    first, second = (client.post("/api/v6/images/text2img", json=body).json() for _ in range(2))
    a, b = png(client, first["output"][0]), png(client, second["output"][0])
    assert a.size == (264, 320) and a.tobytes() == b.tobytes()
    assert first["meta"]["guidance_scale"] == 3.5 and first["meta"]["num_inference_steps"] == 2


INPAINT_PATHS = [
    ("/api/v1/enterprise/realtime/inpaint", {}, "realtime"),
    ("/api/v6/realtime/inpaint", {}, "realtime"),
    ("/api/v6/images/inpaint", {"model_id": "flux"}, "flux"),
    ("/api/v1/enterprise/images/inpaint", {"model_id": "flux-fill"}, "flux-fill"),
    ("/api/v6/images/inpaint", {"model_id": "flux-klein"}, "flux-klein"),
    ("/api/v6/images/inpaint", {"model_id": "flux-kontext-dev"}, "flux-kontext-dev"),
    ("/api/v7/images/inpaint", {}, "flux-klein"),
]


@pytest.mark.parametrize("path,extra,model", INPAINT_PATHS)
def test_inpainting_keeps_the_unmasked_pixels(server, client, image_host, path, extra, model):
    """White repaints, black keeps: outside the mask the output is the init image; inside it is new."""
    body = {"key": server.key, "prompt": "a cat", "init_image": f"{image_host}/a.png",
            "mask_image": f"{image_host}/mask-small.png", "seed": 3, **SMALL, **extra}  # a 64² mask: resized
    result = client.post(path, json=body).json()
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == model and result["meta"]["mask_image"].endswith("mask-small.png")
    out = np.asarray(png(client, result["output"][0]), dtype=np.int16)
    init = np.asarray(png(client, f"{image_host}/a.png"), dtype=np.int16)
    mask = np.asarray(Image.open(io.BytesIO(client.get(f"{image_host}/mask.png").content)).convert("L")) > 0
    ring = np.zeros_like(mask)  # the resized mask's soft edge: neither kept nor repainted for sure
    ring[60:196, 60:196] = True
    ring[68:188, 68:188] = False
    outside, inside = ~mask & ~ring, mask & ~ring
    assert np.abs(out - init)[outside].max() <= 2, "pixels outside the mask changed"
    assert np.abs(out - init)[inside].mean() > 10, "nothing was repainted inside the mask"


def test_inpainting_strength_zero_returns_the_init_image(server, client, image_host):
    body = {"key": server.key, "prompt": "a cat", "init_image": f"{image_host}/a.png",
            "mask_image": f"{image_host}/mask.png", "strength": 0, **SMALL}
    result = client.post("/api/v6/realtime/inpaint", json=body).json()
    assert png(client, result["output"][0]).tobytes() == png(client, f"{image_host}/a.png").tobytes()


def test_inpainting_same_seed_same_image_and_samples(server, client, image_host):
    body = {"key": server.key, "prompt": "a cat", "init_image": f"{image_host}/a.png", "model_id": "flux",
            "mask_image": f"{image_host}/mask.png", "seed": 8, "samples": 2, **SMALL}
    first = client.post("/api/v6/images/inpaint", json=body).json()
    again = client.post("/api/v6/images/inpaint", json={**body, "samples": 1, "seed": 9}).json()
    assert first["meta"]["seeds"] == [8, 9]
    assert png(client, first["output"][1]).tobytes() == png(client, again["output"][0]).tobytes()


def test_inpaint_queued_then_fetched_with_the_mask_kept_for_retries(server, client, image_host):
    body = {"key": server.key, "prompt": "a cat", "init_image": f"{image_host}/a.png",
            "mask_image": f"{image_host}/mask.png", "instant_response": True, **SMALL}
    queued = client.post("/api/v1/enterprise/realtime/inpaint", json=body).json()
    assert queued["status"] in ("processing", "success")
    job = server.jobs.get(queued["id"])
    assert job.task == "inpaint" and job.params["mask"] and job.params["mask"] != job.params["inputs"][0]
    done = wait_for_job(client, server.key, queued["id"]).json()
    assert done["status"] == "success" and done["output"] == queued.get("future_links", done["output"])
