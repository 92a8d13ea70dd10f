"""Residency on the GPU: under a memory budget that holds one tiny model but not two, serving a
second model moves the first one's weights to host memory, and the first comes back (bit for
bit the same images) when it is asked for again. On the CPU rehearsal eviction drops the
pipeline instead (there is nowhere to move it) and it is loaded again."""

from __future__ import annotations

import pytest
import torch
from bench.workloads import data_uri, reference_image

from fluxserve.engine.residency import module_bytes
from tests.gpu.test_service_gpu import KLEIN, KONTEXT, SYSTEM_DETAILS, pixels
from tests.support.servers import live_server
from tests.support.waiting import wait_until

pytestmark = pytest.mark.gpu


def _weights_devices(class_name: str, data_dir) -> set[str]:
    """Where the transformer weights are of the server's pipelines of ``class_name`` (the worker
    runs in this process: its pipelines, loaded from under ``data_dir``, are live objects here)."""
    import gc

    gc.collect()
    found = set()
    for obj in gc.get_objects():
        if (type(obj).__name__ == class_name and str(getattr(obj, "name_or_path", "")).startswith(str(data_dir))
                and getattr(obj, "transformer", None) is not None):
            found.update(p.device.type for p in obj.transformer.parameters())
    return found


def _bytes_in_bf16(folder, class_name: str) -> int:
    import diffusers

    return module_bytes(getattr(diffusers, class_name).from_pretrained(folder, dtype=torch.bfloat16))


def test_a_second_model_evicts_the_first_under_a_small_budget(tmp_path, tiny_root, device, gpu_report):
    dtype_note = "bf16" if device == "cuda" else "fp32 on the CPU: the budget is set from bf16 sizes x 2"
    klein = _bytes_in_bf16(tiny_root / "flux2-klein", "Flux2KleinPipeline")
    kontext = _bytes_in_bf16(tiny_root / "flux-kontext", "FluxKontextPipeline")
    scale = 1 if device == "cuda" else 2  # the CPU keeps fp32: twice the bytes
    budget = scale * (max(klein, kontext) + min(klein, kontext) // 2)  # one fits, both do not
    gpu_report["sizes_bytes"] = {"klein": scale * klein, "kontext": scale * kontext, "budget": budget,
                                 "dtype": dtype_note}
    klein_body = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 5,
                  "safety_checker": False}
    kontext_body = {"model_id": "flux-kontext-dev", "prompt": "at night", "init_image": data_uri(reference_image(256, 1)),
                    "strength": 1, "width": 256, "height": 256, "num_inference_steps": 2, "seed": 6,
                    "safety_checker": False}
    steps = []
    with live_server(tmp_path, tiny_root, device=device, gpu_memory_budget=str(budget), sync_wait_seconds=120) as live:
        with live.client() as client:

            def run(path, body):
                answer = client.post(path, json={"key": live.key, **body}).json()
                assert answer["status"] == "success", answer
                return pixels(client, answer["output"][0])

            def details_when(predicate, what):
                def check():
                    details = client.post(SYSTEM_DETAILS, json={"key": live.admin_key}).json()
                    residency = details.get("residency") or {}
                    return details if residency and predicate(residency) else None
                return wait_until(check, timeout=30, what=what)

            def note(label, details):
                residency = details["residency"]
                steps.append({"after": label, "resident": [k.split(":")[0] for k in residency["pipelines"]],
                              "resident_bytes": residency["resident_bytes"], "evictions": residency["evictions"],
                              "gpu_memory": details["gpu_memory"]})
                gpu_report["steps"] = steps
                return residency

            first = run(KLEIN, klein_body)
            residency = note("klein", details_when(lambda r: len(r["pipelines"]) == 1, "klein to be resident"))
            assert residency["budget_bytes"] == budget and residency["evictions"] == 0

            run(KONTEXT, kontext_body)
            residency = note("kontext", details_when(lambda r: r["evictions"] >= 1, "klein to be evicted"))
            assert list(residency["pipelines"]) and all(k.startswith("FluxKontext") for k in residency["pipelines"])
            assert residency["resident_bytes"] <= budget
            if device == "cuda":  # klein's weights went to host memory, kontext's are on the GPU
                placed = {"klein": _weights_devices("Flux2KleinPipeline", tmp_path),
                          "kontext": _weights_devices("FluxKontextPipeline", tmp_path)}
                gpu_report["weights_after_eviction"] = placed
                assert placed == {"klein": {"cpu"}, "kontext": {"cuda"}}, placed

            again = run(KLEIN, klein_body)  # back on the device (CPU: loaded again)
            residency = note("klein again", details_when(lambda r: r["evictions"] >= 2, "kontext to be evicted"))
            assert all(k.startswith("Flux2Klein") for k in residency["pipelines"])
            assert residency["resident_bytes"] <= budget
    gpu_report["identical_after_round_trip"] = bool((first == again).all())
    assert (first == again).all(), "klein's image changed after its weights went to host memory and back"
