"""GPU residency: sizes with shared modules counted once, the LRU policy under a byte budget,
clear refusals, offload configuration, and pipelines that still generate after eviction.

There is no GPU here: the policy runs on the CPU (where eviction only drops pipelines from the
resident set and tells the owner) and, for the moving path, on a Residency whose device is
"cuda:0" with the moves recorded instead of performed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fluxserve.engine.residency import Residency, ResidencyError, module_bytes, parse_bytes  # noqa: E402

KLEIN, INPAINT = "Flux2KleinPipeline:klein", "Flux2KleinInpaintPipeline:klein"
FLUX1, KONTEXT = "FluxImg2ImgPipeline:flux1", "FluxKontextPipeline:kontext"


def _load(tiny_root, name: str):
    cls = {"flux2-klein": diffusers.Flux2KleinPipeline, "flux1-dev": diffusers.FluxImg2ImgPipeline,
           "flux-kontext": diffusers.FluxKontextPipeline}[name]
    pipeline = cls.from_pretrained(str(tiny_root / name))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipes(tiny_root):
    klein = _load(tiny_root, "flux2-klein")
    inpaint = diffusers.Flux2KleinInpaintPipeline.from_pipe(klein, dtype=torch.float32)
    inpaint.set_progress_bar_config(disable=True)
    return {KLEIN: klein, INPAINT: inpaint,
            FLUX1: _load(tiny_root, "flux1-dev"), KONTEXT: _load(tiny_root, "flux-kontext")}


class Recorded(Residency):
    """The accelerator path (device "cuda:0") with moves recorded, not performed."""

    def __init__(self, **kwargs):
        super().__init__(device="cuda:0", **kwargs)
        self.to_device: list[object] = []
        self.to_host: list[torch.nn.Module] = []

    def _to_device(self, pipeline):
        self.to_device.append(pipeline)

    def _to_host(self, modules):
        self.to_host.extend(modules)


class FakePipeline:
    """Just enough of a pipeline: module components, and offload calls recorded."""

    def __init__(self, **sizes: int):
        self.components = {name: torch.nn.Linear(n, 1, bias=False) for name, n in sizes.items()}  # n * 4 bytes
        self.offloaded: list[tuple[str, str]] = []

    def enable_model_cpu_offload(self, device=None):
        self.offloaded.append(("model", device))

    def enable_sequential_cpu_offload(self, device=None):
        self.offloaded.append(("sequential", device))


def test_module_bytes_counts_each_module_once(pipes):
    klein, inpaint = pipes[KLEIN], pipes[INPAINT]
    modules = {id(c): c for c in klein.components.values() if isinstance(c, torch.nn.Module)}
    expected = sum(t.numel() * t.element_size() for m in modules.values() for t in (*m.parameters(), *m.buffers()))
    assert module_bytes(klein) == expected > 0
    assert inpaint.transformer is klein.transformer
    assert module_bytes(inpaint) == module_bytes(klein)  # the variant owns nothing more
    twice = FakePipeline(a=10)
    twice.components["b"] = twice.components["a"]  # one module under two names
    assert module_bytes(twice) == 40

    residency = Residency(device="cpu", budget_bytes=None)
    residency.place(KLEIN, klein)
    residency.place(INPAINT, inpaint)
    report = residency.accounting()
    assert report["resident_bytes"] == module_bytes(klein)  # not twice
    assert report["pipelines"] == {INPAINT: module_bytes(klein), KLEIN: module_bytes(klein)}


def test_lru_order_and_accounting_without_a_limit(pipes):
    residency = Residency(device="cpu", budget_bytes=None)
    assert residency.budget_bytes is None  # auto on the CPU: no limit
    for key in (KLEIN, FLUX1, KONTEXT):
        residency.place(key, pipes[key])
    assert residency.resident() == [KONTEXT, FLUX1, KLEIN]
    residency.place(KLEIN, pipes[KLEIN])  # used again: most recent, nothing else changes
    assert residency.resident() == [KLEIN, KONTEXT, FLUX1]
    report = residency.accounting()
    assert report == {
        "device": "cpu", "offload": "none", "budget_bytes": None, "evictions": 0,
        "resident_bytes": sum(module_bytes(pipes[k]) for k in (KLEIN, FLUX1, KONTEXT)),
        "pipelines": {k: module_bytes(pipes[k]) for k in (KLEIN, KONTEXT, FLUX1)},
    }
    assert list(report["pipelines"]) == [KLEIN, KONTEXT, FLUX1]  # MRU first
    assert residency.evict_all() == [FLUX1, KONTEXT, KLEIN]  # LRU first
    assert residency.resident() == [] and residency.accounting()["resident_bytes"] == 0


def test_a_budget_for_two_of_three_evicts_the_least_recently_used(pipes):
    evicted = []
    budget = module_bytes(pipes[KLEIN]) + module_bytes(pipes[FLUX1]) + 1000
    residency = Residency(device="cpu", budget_bytes=budget, on_evict=lambda key, p: evicted.append((key, p)))
    residency.place(KLEIN, pipes[KLEIN])
    residency.place(FLUX1, pipes[FLUX1])
    residency.place(KLEIN, pipes[KLEIN])  # klein used last: flux1 is now the least recently used
    assert evicted == []
    residency.place(KONTEXT, pipes[KONTEXT])
    assert evicted == [(FLUX1, pipes[FLUX1])]
    assert residency.resident() == [KONTEXT, KLEIN]
    report = residency.accounting()
    assert report["pipelines"] == {KONTEXT: module_bytes(pipes[KONTEXT]), KLEIN: module_bytes(pipes[KLEIN])}
    assert report["resident_bytes"] == sum(report["pipelines"].values()) <= report["budget_bytes"] == budget
    assert report["evictions"] == 1


def test_a_pipeline_bigger_than_the_budget_is_refused_clearly(pipes):
    evicted = []
    budget = module_bytes(pipes[KLEIN]) - 1
    assert module_bytes(pipes[FLUX1]) <= budget
    residency = Residency(device="cpu", budget_bytes=budget, on_evict=lambda key, p: evicted.append(key))
    residency.place(FLUX1, pipes[FLUX1])
    with pytest.raises(ResidencyError) as error:
        residency.place(KLEIN, pipes[KLEIN])
    message = str(error.value)
    assert "FLUXSERVE_OFFLOAD=model" in message and KLEIN in message and "budget" in message
    assert evicted == [] and residency.resident() == [FLUX1]  # nothing was evicted for nothing


def test_offload_needs_an_accelerator_and_a_known_mode():
    for mode in ("model", "sequential"):
        with pytest.raises(ResidencyError, match=f"FLUXSERVE_OFFLOAD={mode} needs an accelerator"):
            Residency(device="cpu", budget_bytes=None, offload=mode)
    with pytest.raises(ResidencyError, match="one of none, model, sequential"):
        Residency(device="cuda", budget_bytes=10, offload="disk")
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("1.5G") == 3 * 2**29 and parse_bytes("123") == 123 and parse_bytes("auto") is None
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_offload_on_an_accelerator_applies_once_and_keeps_nothing_resident():
    small, big = FakePipeline(transformer=100, vae=50), FakePipeline(transformer=300)
    residency = Recorded(budget_bytes=1500, offload="model")  # pipelines of 600 and 1200 bytes
    residency.place("small", small)
    residency.place("small", small)
    residency.place("big", big)
    assert small.offloaded == [("model", "cuda:0")] and big.offloaded == [("model", "cuda:0")]
    assert residency.to_device == [] and residency.to_host == []  # offload moves, not us
    report = residency.accounting()
    assert report["resident_bytes"] == 0 and report["pipelines"] == {"big": 1200, "small": 600}
    assert residency.resident() == ["big", "small"]
    too_big = FakePipeline(transformer=400)  # one component of 1600 bytes > 1500
    with pytest.raises(ResidencyError, match="FLUXSERVE_OFFLOAD=sequential"):
        residency.place("too-big", too_big)
    sequential = Recorded(budget_bytes=1500, offload="sequential")
    sequential.place("too-big", too_big)
    assert too_big.offloaded == [("sequential", "cuda:0")]


def test_on_an_accelerator_eviction_moves_only_modules_no_resident_pipeline_uses(pipes):
    klein, inpaint, flux1, kontext = pipes[KLEIN], pipes[INPAINT], pipes[FLUX1], pipes[KONTEXT]
    evicted = []
    budget = module_bytes(klein) + module_bytes(flux1) + 1000
    residency = Recorded(budget_bytes=budget, on_evict=lambda key, p: evicted.append(key))
    residency.place(KLEIN, klein)
    residency.place(INPAINT, inpaint)  # shares every module with klein: costs nothing more
    residency.place(FLUX1, flux1)
    residency.place(KLEIN, klein)  # LRU order now: inpaint, flux1, klein
    assert residency.accounting()["resident_bytes"] == module_bytes(klein) + module_bytes(flux1)
    assert residency.to_device == [klein, inpaint, flux1]
    residency.place(KONTEXT, kontext)
    # inpaint went first (least recent) without moving klein's modules from under it; that freed
    # nothing, so flux1 went too, and only flux1's modules left the device
    assert evicted == [INPAINT, FLUX1]
    flux1_modules = {id(c) for c in flux1.components.values() if isinstance(c, torch.nn.Module)}
    assert {id(m) for m in residency.to_host} == flux1_modules
    assert residency.resident() == [KONTEXT, KLEIN]
    assert residency.to_device[-1] is kontext
    residency.to_host.clear()
    residency.place(INPAINT, inpaint)  # its modules are on the device already (klein's)
    assert evicted == [INPAINT, FLUX1] and residency.to_host == []
    assert residency.evict_all() == [KLEIN, KONTEXT, INPAINT]
    # klein first, but its modules stayed for inpaint; then kontext's; then klein's with inpaint
    klein_modules = [c for c in klein.components.values() if isinstance(c, torch.nn.Module)]
    kontext_modules = [c for c in kontext.components.values() if isinstance(c, torch.nn.Module)]
    assert [id(m) for m in residency.to_host] == [id(m) for m in kontext_modules + klein_modules]


def test_placing_is_thread_safe_and_never_exceeds_the_budget():
    fakes = {f"p{i}": FakePipeline(transformer=100 + 10 * i) for i in range(8)}
    budget = 1500  # about three of them
    residency = Recorded(budget_bytes=budget)
    over = []

    def churn(seed: int):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            key = f"p{rng.integers(8)}"
            residency.place(key, fakes[key])
            if residency.accounting()["resident_bytes"] > budget:
                over.append(key)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert over == []
    report = residency.accounting()
    assert 0 < report["resident_bytes"] == sum(report["pipelines"].values()) <= budget


def test_an_evicted_pipeline_can_be_placed_again_and_generates(tiny_root):
    """The owner drops what is evicted (as PipelineCache does on the CPU), loads it again on
    demand, and the reloaded pipeline is placed and generates a proper image."""
    cache: dict[str, object] = {}
    folders = {KLEIN: "flux2-klein", FLUX1: "flux1-dev"}

    def get(key):
        if key not in cache:
            cache[key] = _load(tiny_root, folders[key])
        residency.place(key, cache[key])
        return cache[key]

    residency = Residency(device="cpu", budget_bytes=800_000, on_evict=lambda key, p: cache.pop(key, None))
    first = get(KLEIN)
    assert module_bytes(first) <= 800_000 < module_bytes(first) + module_bytes(_load(tiny_root, "flux1-dev"))
    get(FLUX1)
    assert list(cache) == [FLUX1] and residency.resident() == [FLUX1]  # klein was evicted and dropped
    klein = get(KLEIN)
    assert klein is not first and list(cache) == [KLEIN] and residency.resident() == [KLEIN]
    image = klein(prompt="a photo of a cat", height=256, width=256, num_inference_steps=2, guidance_scale=1.0,
                  output_type="pil", generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (256, 256) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 0  # not a blank frame
