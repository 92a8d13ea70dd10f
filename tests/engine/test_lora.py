"""LoRA adapters in the engine, on the tiny pipelines with tiny random adapters built offline
(peft): an adapter changes the image, turning it off gives the base image back bit for bit,
strengths and combinations work, adapters are loaded once and shared with the variants, the
prompt cache never serves an embedding computed without a text-encoder adapter, batches equal
solo runs, and a compiled transformer hot-swaps without recompiling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from fluxserve.engine import optimize
from fluxserve.engine.batch_invariance import make_batch_invariant
from fluxserve.engine.families.base import Inputs
from fluxserve.engine.generate import Generator
from fluxserve.engine.loading import PipelineCache
from fluxserve.engine.lora import SLOT, Adapters, LoraLoadError, state_of
from fluxserve.engine.optimize import Optimizations, warm_up
from fluxserve.engine.tiny import build_tiny_lora, load_tiny_transformer
from fluxserve.loras import LoraCatalog
from fluxserve.models import Registry
from fluxserve.params import JobParams
from tests.conftest import make_mask, make_test_image

KLEIN, FLUX1, KONTEXT, FILL = "flux2-klein", "flux1-dev", "flux-kontext", "flux1-fill"


@pytest.fixture(scope="module")
def lora_dir(tiny_root, tmp_path_factory) -> Path:
    """Adapters for the tiny pipelines: two for klein, two for FLUX.1 (one also adapting the CLIP
    text encoder), one for Kontext, one in a folder of its own (as the hub ships them)."""
    folder = tmp_path_factory.mktemp("loras")
    klein = load_tiny_transformer(tiny_root / KLEIN)
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "klein-a.safetensors", seed=1)
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "klein-b.safetensors", seed=2, rank=8)
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "klein-wide.safetensors", seed=3,
                    targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj"))
    build_tiny_lora(diffusers.Flux2KleinPipeline, klein, folder / "klein-dir" / "pytorch_lora_weights.safetensors", seed=4)
    flux1 = diffusers.FluxPipeline.from_pretrained(tiny_root / FLUX1)
    build_tiny_lora(diffusers.FluxPipeline, flux1.transformer, folder / "flux-a.safetensors", seed=5)
    build_tiny_lora(diffusers.FluxPipeline, flux1.transformer, folder / "flux-te.safetensors", seed=6,
                    text_encoder=flux1.text_encoder)
    return folder


def engine(tiny_root, lora_dir, opts: Optimizations | None = None, max_loaded: int = 8):
    registry = Registry.build(tiny_root=tiny_root)
    cache = PipelineCache("cpu", torch.float32, optimizations=opts or Optimizations.none(),
                          adapters=Adapters(LoraCatalog([lora_dir]), max_loaded))
    return registry, cache, Generator(cache)


def params(model: str, loras=(), strengths=(), task="text2img", seeds=(3,), prompt="a cat on a bench", **extra) -> JobParams:
    return JobParams(model=model, task=task, prompt=prompt, negative_prompt=None, width=256, height=256,
                     seeds=list(seeds), steps=2, guidance=extra.pop("guidance", 1.0), strength=extra.pop("strength", None),
                     true_cfg_scale=1.0, inputs=[], input_2=None, safety_checker=False, base64=False,
                     loras=list(loras), lora_strengths=list(strengths) or [1.0] * len(loras), **extra)


def pixels(generator: Generator, registry: Registry, job: JobParams, inputs: Inputs | None = None) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in generator.run(registry.get(job.model), job, inputs or Inputs())]


def test_an_adapter_changes_the_image_and_turning_it_off_restores_the_base_bit_for_bit(tiny_root, lora_dir):
    registry, cache, generator = engine(tiny_root, lora_dir)
    base = pixels(generator, registry, params("flux-klein", seeds=(3, 4)))
    styled = pixels(generator, registry, params("flux-klein", ["klein-a"], seeds=(3, 4)))
    for plain, adapted in zip(base, styled):
        assert np.abs(plain - adapted).mean() > 1, "the adapter changed nothing"
    after = pixels(generator, registry, params("flux-klein", seeds=(3, 4)))
    assert all(np.array_equal(a, b) for a, b in zip(after, base)), "the base model did not come back bit for bit"
    # the same adapter again: the same image (deterministic), and it was read from disk once
    assert all(np.array_equal(a, b) for a, b in zip(pixels(generator, registry, params("flux-klein", ["klein-a"], seeds=(3, 4))), styled))
    klein = cache.get(registry.get("flux-klein"))
    assert state_of(klein).loads == {"klein-a": 1}
    assert cache.adapters.loaded(klein) == ["klein-a"]
    # realtime is the same pipeline (same class and weights): the adapter is already there
    assert all(np.array_equal(a, b) for a, b in zip(pixels(generator, registry, params("realtime", ["klein-a"], seeds=(3, 4))), styled))
    assert state_of(klein).loads == {"klein-a": 1}


def test_strengths_and_combinations(tiny_root, lora_dir):
    registry, _, generator = engine(tiny_root, lora_dir)

    def run(loras=(), strengths=()):
        return pixels(generator, registry, params("flux-klein", loras, strengths))[0]

    base, a, b = run(), run(["klein-a"]), run(["klein-b"])
    assert np.array_equal(run(["klein-a"], [0.0]), base), "strength 0 is the base model"
    half = run(["klein-a"], [0.5])
    assert not np.array_equal(half, a) and not np.array_equal(half, base)
    both = run(["klein-a", "klein-b"], [1.0, 0.7])
    assert not np.array_equal(both, a) and not np.array_equal(both, b)
    assert np.array_equal(run(["klein-a", "klein-b"], [1.0, 0.0]), a), "a zero-strength companion changes nothing"
    assert np.array_equal(run(["klein-b", "klein-a"], [0.7, 1.0]), both) or np.abs(run(["klein-b", "klein-a"], [0.7, 1.0]) - both).max() <= 1
    assert np.array_equal(run(), base)
    assert np.array_equal(run(["klein-dir"]), run(["klein-dir"])) and not np.array_equal(run(["klein-dir"]), base)


def test_adapters_on_the_base_pipeline_work_in_its_variants(tiny_root, lora_dir):
    """img2img and inpaint run from_pipe variants sharing the base pipeline's modules."""
    registry, cache, generator = engine(tiny_root, lora_dir)
    inputs = Inputs(references=[make_test_image()], mask=make_mask(256))
    for model, task, adapter in (("flux", "img2img", "flux-a"), ("flux", "inpaint", "flux-a"),
                                 ("flux-klein", "inpaint", "klein-a"), ("flux-klein", "img2img", "klein-a")):
        job = dict(task=task, strength=0.8, guidance=3.5 if model == "flux" else 1.0)
        base = pixels(generator, registry, params(model, **job), inputs)[0]
        styled = pixels(generator, registry, params(model, [adapter], **job), inputs)[0]
        assert np.abs(base - styled).mean() > 0.5, (model, task)
        assert np.array_equal(pixels(generator, registry, params(model, **job), inputs)[0], base), (model, task)
    assert "FluxImg2ImgPipeline:" in " ".join(cache.loaded()) and "FluxInpaintPipeline:" in " ".join(cache.loaded())
    assert state_of(cache.get(registry.get("flux"))).loads == {"flux-a": 1}  # loaded once, for every variant


def test_least_recently_used_adapters_are_unloaded_beyond_the_bound(tiny_root, lora_dir):
    registry, cache, generator = engine(tiny_root, lora_dir, max_loaded=2)
    base = pixels(generator, registry, params("flux-klein"))[0]
    first = pixels(generator, registry, params("flux-klein", ["klein-a"]))[0]
    for name in ("klein-b", "klein-dir", "klein-a"):
        pixels(generator, registry, params("flux-klein", [name]))
    klein = cache.get(registry.get("flux-klein"))
    assert cache.adapters.loaded(klein) == ["klein-dir", "klein-a"]
    assert state_of(klein).loads["klein-a"] == 2  # dropped, then read again
    assert len(klein.get_list_adapters()["transformer"]) == 2
    assert np.array_equal(pixels(generator, registry, params("flux-klein", ["klein-a"]))[0], first)
    assert np.array_equal(pixels(generator, registry, params("flux-klein"))[0], base)
    # a job may bring more adapters than the bound keeps: all of its own stay loaded for it
    pixels(generator, registry, params("flux-klein", ["klein-a", "klein-b", "klein-dir"]))
    assert np.array_equal(pixels(generator, registry, params("flux-klein"))[0], base)


def test_failures_are_messages_and_leave_the_pipeline_working(tiny_root, lora_dir, tmp_path):
    registry, cache, generator = engine(tiny_root, lora_dir)
    base = pixels(generator, registry, params("flux-klein"))[0]
    with pytest.raises(LoraLoadError, match=r"Unknown LoRA adapter: gone .*it was offered when the request was queued"):
        pixels(generator, registry, params("flux-klein", ["gone"]))
    # a FLUX.1 adapter on FLUX.2 klein: another architecture
    with pytest.raises(LoraLoadError, match=r"LoRA adapter flux-a could not be loaded into flux-klein: it has weights for layers flux-klein does not have .*another model"):
        pixels(generator, registry, params("flux-klein", ["flux-a"]))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    registry2, cache2, generator2 = engine(tiny_root, tmp_path)
    with pytest.raises(LoraLoadError, match="LoRA adapter broken could not be loaded into flux-klein"):
        pixels(generator2, registry2, params("flux-klein", ["broken"]))
    assert np.array_equal(pixels(generator, registry, params("flux-klein"))[0], base)
    assert cache.get(registry.get("flux-klein")).get_list_adapters().get("transformer", []) == []  # nothing half-loaded


def test_an_uncached_hub_adapter_fails_with_what_to_do(tiny_root, lora_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = Registry.build(tiny_root=tiny_root)
    cache = PipelineCache("cpu", torch.float32, adapters=Adapters(LoraCatalog([lora_dir], ["fluxserve-test/no-such-lora"])))
    with pytest.raises(LoraLoadError) as error:
        Generator(cache).run(registry.get("flux-klein"), params("flux-klein", ["fluxserve-test/no-such-lora:x.safetensors"]), Inputs())
    message = str(error.value)
    assert message.startswith("LoRA adapter fluxserve-test/no-such-lora:x.safetensors could not be loaded into flux-klein")
    assert "hf download fluxserve-test/no-such-lora x.safetensors" in message and "FLUXSERVE_LORA_DIR" in message


def test_a_text_encoder_adapter_is_never_served_a_cached_embedding_computed_without_it(tiny_root, lora_dir):
    """flux-te also adapts CLIP: with the prompt cache on, the same prompt with and without the
    adapter must be encoded separately; and the base image is still restored bit for bit."""
    opts = dataclasses.replace(Optimizations.none(), prompt_cache_size=16)
    registry, cache, generator = engine(tiny_root, lora_dir, opts)
    base = pixels(generator, registry, params("flux", guidance=3.5))[0]
    adapted = pixels(generator, registry, params("flux", ["flux-te"], guidance=3.5))[0]
    pipeline = cache.get(registry.get("flux"))
    assert pipeline.get_list_adapters()["text_encoder"]  # the adapter reached the text encoder
    stats = optimize.prompt_cache_stats(pipeline)
    assert stats["misses"] == 2 and stats["hits"] == 0  # not served the base embedding

    uncached = PipelineCache("cpu", torch.float32, adapters=Adapters(LoraCatalog([lora_dir])))
    expected = pixels(Generator(uncached), registry, params("flux", ["flux-te"], guidance=3.5))[0]
    assert np.array_equal(adapted, expected), "the cache changed the adapted image"

    with torch.no_grad():  # as inside a pipeline call
        pooled_without = pipeline.encode_prompt("a cat on a bench", prompt_2=None)[1]
        with cache.loras(registry.get("flux"), ["flux-te"], [1.0]):
            pooled_with = pipeline.encode_prompt("a cat on a bench", prompt_2=None)[1]
    assert not torch.equal(pooled_with, pooled_without)
    assert np.array_equal(pixels(generator, registry, params("flux", guidance=3.5))[0], base)
    assert optimize.prompt_cache_stats(pipeline)["hits"] >= 2  # the entries are used (keyed, not bypassed)  # the base entry served the base jobs


def test_batched_jobs_with_an_adapter_equal_their_solo_runs(tiny_root, lora_dir):
    registry, cache, generator = engine(tiny_root, lora_dir)
    make_batch_invariant(cache.get(registry.get("flux-klein")))
    jobs = [params("flux-klein", ["klein-a"], [0.8], seeds=(seed,), prompt=f"prompt {seed}") for seed in (1, 2, 3)]
    batched = generator.run_batch(registry.get("flux-klein"), jobs)
    for job, images in zip(jobs, batched):
        solo = pixels(generator, registry, job)[0]
        assert np.array_equal(np.asarray(images[0], dtype=np.int16), solo)
    base = pixels(generator, registry, params("flux-klein", seeds=(1,), prompt="prompt 1"))[0]
    assert not np.array_equal(base, np.asarray(batched[0][0], dtype=np.int16))


def test_a_compiled_transformer_hot_swaps_single_adapters_without_recompiling(tiny_root, lora_dir):
    """The first adapter job builds the slot (recompiles), a job without adapters and a first new
    strength compile once each; after that, other adapters, strengths and plain jobs recompile
    nothing, and the images are the eager ones (within fused-kernel rounding)."""
    reason = optimize._inductor_unavailable("cpu")
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    import torch._dynamo

    opts = dataclasses.replace(Optimizations.none(), compile=True)
    registry, cache, generator = engine(tiny_root, lora_dir, opts)
    spec = registry.get("flux-klein")
    pipeline = cache.get(spec)
    assert pipeline._fluxserve_optimizations["compile"].startswith("on")
    warm_up(pipeline, sizes=[(256, 256)], steps=1)

    _, _, eager = engine(tiny_root, lora_dir)

    def both(*args):
        return pixels(generator, registry, params("flux-klein", *args))[0], pixels(eager, registry, params("flux-klein", *args))[0]

    for args in ((["klein-a"],), (), (["klein-a"], [0.6])):  # the compiles the slot needs
        compiled, plain = both(*args)
        assert np.abs(compiled - plain).max() <= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for args in ((["klein-b"],), (["klein-a"], [0.3]), (), (["klein-dir"], [1.2]), (["klein-b"], [0.9])):
            compiled, plain = both(*args)
            assert np.abs(compiled - plain).max() <= 2, args
    state = state_of(pipeline)
    assert state.slot == "klein-b" and not state.loaded and not state.hotswap_failed
    assert pipeline.get_list_adapters()["transformer"] == [SLOT]

    # an adapter the slot can't take (layers it lacks) replaces the slot (one recompile, same images);
    # combinations use named adapters as without compile (each new combination recompiles: not run here)
    compiled, plain = both(["klein-wide"])
    assert np.abs(compiled - plain).max() <= 2 and state.slot == "klein-wide"
