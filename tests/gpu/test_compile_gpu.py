"""torch.compile on the GPU: the service's regional compile, warmed at load, serves requests at
the warmed size without compiling again (torch._dynamo's error_on_recompile turns a recompile
into a failed job), batched requests included when dynamic batching is on; and a compiled
pipeline's images stay within a few levels of eager ones."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fluxserve.engine import optimize
from fluxserve.engine.optimize import Optimizations, apply, warm_up
from tests.gpu.test_service_gpu import KLEIN, SYSTEM_DETAILS, assert_image, pixels
from tests.support.servers import live_server
from tests.support.waiting import wait_for_job

pytestmark = pytest.mark.gpu

SIZE = 256


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """torch._dynamo's caches belong to the process: compiles by earlier tests in it (the engine's
    LoRA hot-swap test compiles the same transformer class) count toward the recompile limit
    here, and warm-up then fails with FailOnRecompileLimitHit. Each test starts with none."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _needs_inductor(device: str) -> None:
    reason = optimize._inductor_unavailable(device)
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")


def _klein(tiny_root, device: str):
    from diffusers import Flux2KleinPipeline

    from fluxserve.engine.loading import pick_dtype

    pipeline = Flux2KleinPipeline.from_pretrained(tiny_root / "flux2-klein", dtype=pick_dtype(device)).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _image(pipeline, prompt: str, seed: int, steps: int = 1) -> np.ndarray:
    return pipeline(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


def test_compiled_pipeline_warms_up_once_and_stays_close_to_eager(tiny_root, device, gpu_report):
    _needs_inductor(device)
    import torch._dynamo

    eager = _image(_klein(tiny_root, device), "a compiled cat", 5)
    pipeline = _klein(tiny_root, device)
    report = apply(pipeline, Optimizations.from_strings("none,compile"), device=device)
    gpu_report["compile_report"] = report["compile"]
    assert report["compile"].startswith("on: regional"), report
    timings = warm_up(pipeline, sizes=[(SIZE, SIZE)], steps=1)
    gpu_report["warm_up_s"] = timings
    assert pipeline._fluxserve_optimizations["compile"].startswith("on"), pipeline._fluxserve_optimizations
    with torch._dynamo.config.patch(error_on_recompile=True):
        started = time.perf_counter()
        compiled = _image(pipeline, "a compiled cat", 5)
        _image(pipeline, "something else entirely", 9, steps=2)  # other prompt, seed and step count
        gpu_report["two_calls_after_warm_up_s"] = time.perf_counter() - started
    difference = float(np.abs(compiled - eager).max()) * 255
    gpu_report["max_difference_vs_eager_levels"] = difference
    # fused kernels round differently (in bf16 on the GPU more than in fp32: each eager op rounds to
    # bf16, a fused kernel once); a broken graph is far off
    assert difference <= 8, difference


def _strict_worker(monkeypatch):
    """An event that, while set, runs the worker's generations under error_on_recompile. dynamo's
    config patches are per thread: the patch must be entered in the worker's own thread."""
    import threading

    import torch._dynamo

    from fluxserve.engine.generate import Generator

    strict = threading.Event()

    def guarded(method):
        def wrapper(*args, **kwargs):
            if not strict.is_set():
                return method(*args, **kwargs)
            with torch._dynamo.config.patch(error_on_recompile=True):
                return method(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Generator, "run", guarded(Generator.run))
    monkeypatch.setattr(Generator, "run_batch", guarded(Generator.run_batch))
    return strict


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_the_service_serves_compiled_without_recompiling(tmp_path, tiny_root, device, monkeypatch, gpu_report):
    """Compile + dynamic batching, as configured in production: the warm-up at load covers solo and
    batched calls, so neither recompiles. A request at a size that was not warmed must recompile:
    it proves that the check can fail."""
    _needs_inductor(device)
    strict = _strict_worker(monkeypatch)
    settings = dict(device=device, optimizations="compile", compile_warm_sizes=[SIZE], max_batch_size=4,
                    batch_wait_seconds=0.3, sync_wait_seconds=300)
    with live_server(tmp_path, tiny_root, **settings) as live:
        with live.client() as client:
            body = {"key": live.key, "width": SIZE, "height": SIZE, "num_inference_steps": 2, "safety_checker": False}
            started = time.perf_counter()
            queued = client.post(KLEIN, json={**body, "prompt": "load and warm up", "seed": 1, "instant_response": True})
            first = wait_for_job(client, live.key, queued.json()["id"], timeout=240).json()
            gpu_report["first_request_s"] = time.perf_counter() - started  # load + compile warm-up
            assert first["status"] == "success", first
            details = client.post(SYSTEM_DETAILS, json={"key": live.admin_key}).json()
            reports = list((details.get("optimizations") or {}).values())
            gpu_report["optimizations"] = reports
            assert reports and reports[0]["compile"].startswith("on"), reports
            graphs = _graphs()
            strict.set()
            started = time.perf_counter()
            solo = client.post(KLEIN, json={**body, "prompt": "solo, another prompt", "seed": 2}).json()
            ids = [client.post(KLEIN, json={**body, "prompt": f"batched {i}", "seed": 10 + i,
                                            "instant_response": True}).json()["id"] for i in range(3)]
            batched = [wait_for_job(client, live.key, job_id, timeout=120).json() for job_id in ids]
            gpu_report["after_warm_up_s"] = time.perf_counter() - started
            gpu_report["new_graphs_after_warm_up"] = _graphs() - graphs
            gpu_report["batch_sizes"] = [b.get("meta", {}).get("batch_size") for b in batched]
            for answer in [solo, *batched]:
                assert answer["status"] == "success", answer  # a recompile would have failed the job
                assert_image(pixels(client, answer["output"][0]), SIZE)
            assert _graphs() == graphs
            unwarmed = client.post(KLEIN, json={**body, "width": SIZE + 64, "height": SIZE + 64, "prompt": "new size",
                                                "seed": 3}).json()
            gpu_report["unwarmed_size"] = {k: unwarmed.get(k) for k in ("status", "message")}
            assert unwarmed["status"] == "failed" and "Recompil" in unwarmed["message"], unwarmed  # a failed job
