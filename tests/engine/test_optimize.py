"""Engine speed-ups (issue 6): every switch gives a valid image on the tiny pipelines, the lossless
ones (Qwen3 truncation, prompt cache) give bit-identical images, and what cannot run on this
machine (fp8 without a GPU) is reported, not raised.  No timings are asserted."""

from __future__ import annotations

import dataclasses
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fluxserve.engine import optimize
from fluxserve.engine.families import klein
from fluxserve.engine.optimize import SWITCHES, Optimizations, apply, compute_dtype, prompt_cache_stats, warm_up
from fluxserve.engine.tiny import tiny_families

TINY_MODEL_DIRS = {name: family.pipeline for name, family in tiny_families().items()}

OFF = Optimizations.none()
SIZE = 256


def load(tiny_root, name: str = "flux2-klein"):
    """A fresh pipeline (apply() changes it in place, so tests never share one)."""
    import diffusers

    pipeline = getattr(diffusers, TINY_MODEL_DIRS[name]).from_pretrained(tiny_root / name)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, prompt: str = "a cat on a red chair", seed: int = 0, steps: int = 2, size: int = SIZE):
    kwargs = dict(prompt=prompt, height=size, width=size, num_inference_steps=steps, output_type="pil",
                  generator=torch.Generator("cpu").manual_seed(seed))
    name = type(pipeline).__name__
    if name == "Flux2KleinPipeline":
        kwargs["guidance_scale"] = 1.0
    # whatever else a call of this pipeline's family needs (Kontext: an image; Fill: an image and a mask)
    family = next(f for f in tiny_families().values() if f.pipeline == name)
    kwargs.update((k, v) for k, v in family.warm_calls(size, size)[0].kwargs.items() if k not in ("prompt", "width", "height"))
    return pipeline(**kwargs).images[0]


def assert_valid(image: Image.Image, size: int = SIZE) -> np.ndarray:
    assert image.size == (size, size)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 0, "all pixels are equal"
    return pixels


def only(**switches) -> Optimizations:
    return dataclasses.replace(OFF, **switches)


# ---------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------


def test_defaults_and_parsing():
    opts = Optimizations()
    assert (opts.bf16_everywhere, opts.truncate_text_encoder, opts.prompt_cache_size) == (True, True, 256)
    assert (opts.compile, opts.fp8, opts.attention_backend, opts.channels_last_vae) == (False, False, "auto", True)

    parsed = Optimizations.from_strings("compile, fp8, -truncate, attention=_native_cudnn, prompt_cache=64")
    assert parsed.compile and parsed.fp8 and not parsed.truncate_text_encoder
    assert parsed.attention_backend == "_native_cudnn" and parsed.prompt_cache_size == 64
    assert Optimizations.from_strings("none") == OFF
    assert Optimizations.from_strings("none,compile") == dataclasses.replace(OFF, compile=True)
    assert Optimizations.from_strings("all").fp8
    assert Optimizations.from_strings({"prompt_cache": "off", "channels_last_vae": False}).prompt_cache_size == 0
    assert Optimizations.from_strings("cache=on").prompt_cache_size == 256
    custom = Optimizations(compile=True, attention_backend="native", prompt_cache_size=3, compile_dynamic=True)
    assert Optimizations.from_strings(custom.describe()) == custom
    for bad in ("warp_drive", "compile=maybe", "attention=no-such-kernel", "prompt_cache=-1"):
        with pytest.raises(ValueError):
            Optimizations.from_strings(bad)


def test_dtype_decision():
    assert compute_dtype("cpu", Optimizations()) is torch.float32  # bf16 is slow on CPU
    assert compute_dtype("cpu", Optimizations(force_bf16=True)) is torch.bfloat16
    assert compute_dtype("cuda", Optimizations()) is torch.bfloat16
    assert compute_dtype("cuda:0", Optimizations(bf16_everywhere=False)) is torch.float32
    assert compute_dtype("cuda", Optimizations()) is torch.bfloat16


# ---------------------------------------------------------------------------------------
# every switch, every pipeline
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_MODEL_DIRS))
def test_all_switches_on_give_valid_images_and_a_full_report(tiny_root, name):
    pipeline = load(tiny_root, name)
    report = apply(pipeline, Optimizations(fp8=True), device="cpu")
    assert list(report) == list(SWITCHES)
    assert all(v.split(":")[0] in ("on", "off", "unavailable") for v in report.values()), report
    assert report["bf16"].startswith("off: cpu keeps fp32")
    assert report["channels_last_vae"] == "on"
    assert report["attention_backend"].startswith("on: native")
    assert report["fp8"].startswith("unavailable:") and "8.9" in report["fp8"]
    assert report["compile"] == "off"
    assert report["prompt_cache"] == "on: 256 prompts"
    if name == "flux2-klein":
        assert report["truncate_text_encoder"] == "on: 27 of 28 layers (hidden states 9, 18, 27)"
    else:
        assert report["truncate_text_encoder"].startswith("unavailable:")  # CLIP + T5: nothing to cut
    assert pipeline._fluxserve_optimizations is report
    assert_valid(generate(pipeline))


def test_every_switch_off_leaves_the_pipeline_alone(tiny_root):
    pipeline = load(tiny_root)
    baseline = np.asarray(generate(load(tiny_root)))
    report = apply(pipeline, OFF, device="cpu")
    assert set(report.values()) == {"off"}
    assert "encode_prompt" not in pipeline.__dict__ and "_get_qwen3_prompt_embeds" not in pipeline.__dict__
    assert np.array_equal(np.asarray(generate(pipeline)), baseline)


# ---------------------------------------------------------------------------------------
# lossless switches: bit-identical
# ---------------------------------------------------------------------------------------


def test_truncated_qwen3_gives_bit_identical_embeddings_and_images(tiny_root):
    plain, truncated = load(tiny_root), load(tiny_root)
    report = apply(truncated, only(truncate_text_encoder=True), device="cpu")
    assert report["truncate_text_encoder"].startswith("on: 27 of 28")

    for prompt in ("a cat on a red chair", ["two prompts", "in one batch"]):
        expected, expected_ids = plain.encode_prompt(prompt)
        got, got_ids = truncated.encode_prompt(prompt)
        assert torch.equal(got, expected) and torch.equal(got_ids, expected_ids)
    # a later layer than the view holds (28 = the final-normed output): the full encoder answers
    layers = (9, 18, 28)
    assert torch.equal(truncated.encode_prompt("x", text_encoder_out_layers=layers)[0],
                       plain.encode_prompt("x", text_encoder_out_layers=layers)[0])
    assert np.array_equal(np.asarray(generate(truncated)), np.asarray(generate(plain)))

    # the encoder itself keeps every layer, its config and LM head (the prompt enhancer needs them)
    encoder = truncated.text_encoder
    assert len(encoder.model.layers) == 28 and encoder.config.num_hidden_layers == 28
    assert encoder.get_output_embeddings() is not None

    # the causal LM the local prompt enhancer generates with is unchanged: same logits
    ids = plain.tokenizer("a cat on a red chair", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(encoder(input_ids=ids).logits, plain.text_encoder(input_ids=ids).logits)

    # and the view really runs fewer layers
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in encoder.model.layers]
    try:
        truncated.encode_prompt("count the layers")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 27

    # under CPU offload (an accelerate hook on the encoder) the view would skip the hook that
    # brings the weights to the GPU: the full encoder runs instead
    calls.clear()
    encoder._hf_hook = types.SimpleNamespace(execution_device=None)
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in encoder.model.layers]
    try:
        assert torch.equal(truncated.encode_prompt("offloaded")[0], plain.encode_prompt("offloaded")[0])
    finally:
        del encoder._hf_hook
        for hook in hooks:
            hook.remove()
    assert len(calls) == 28

    # the view holds the encoder's own parameters: moving or casting the pipeline (residency,
    # eviction) carries it along
    truncated.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    got = truncated.encode_prompt("cast after truncation")[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, plain.encode_prompt("cast after truncation")[0])


def test_prompt_cache_gives_identical_images_and_counts_hits(tiny_root):
    plain, cached = load(tiny_root), load(tiny_root)
    apply(cached, only(prompt_cache_size=2), device="cpu")
    assert prompt_cache_stats(cached) == {"hits": 0, "misses": 0, "bypassed": 0, "size": 0, "maxsize": 2}

    expected = np.asarray(generate(plain, "a dog in the rain", seed=3))
    first = np.asarray(generate(cached, "a dog in the rain", seed=3))
    assert cached._fluxserve_prompt_cache.stats()["misses"] == 1
    second = np.asarray(generate(cached, "a dog in the rain", seed=3))
    assert prompt_cache_stats(cached)["hits"] == 1
    assert np.array_equal(first, expected) and np.array_equal(second, expected)

    # hits hand out clones: changing one in place does not spoil the cache
    embeds, _ = cached.encode_prompt("a dog in the rain")
    embeds.zero_()
    again, _ = cached.encode_prompt("a dog in the rain")
    assert torch.equal(again, plain.encode_prompt("a dog in the rain")[0])

    # every argument that changes the result is in the key; precomputed embeddings bypass it
    short, _ = cached.encode_prompt("a dog in the rain", max_sequence_length=32)
    assert short.shape[1] == 32
    assert cached.encode_prompt("x", prompt_embeds=again)[0].shape == again.shape
    stats = prompt_cache_stats(cached)
    assert stats["bypassed"] == 1 and stats["size"] == 2  # LRU bound
    entries = list(cached._fluxserve_prompt_cache._entries.values())
    assert all(stored.tensor.device.type == "cpu" for entry in entries for stored in entry)  # host memory
    cached._fluxserve_prompt_cache.clear()
    assert prompt_cache_stats(cached)["size"] == 0


def test_prompt_cache_is_thread_safe(tiny_root):
    pipeline = load(tiny_root)
    apply(pipeline, only(prompt_cache_size=8), device="cpu")
    expected = {p: pipeline.encode_prompt(p)[0] for p in ("one", "two", "three")}
    errors = []

    def worker(index):
        try:
            for i in range(6):
                prompt = ("one", "two", "three")[(index + i) % 3]
                assert torch.equal(pipeline.encode_prompt(prompt)[0], expected[prompt])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = prompt_cache_stats(pipeline)
    assert stats["hits"] + stats["misses"] == 3 + 24 and stats["misses"] == 3


@pytest.mark.parametrize("name", ["flux1-dev", "flux-kontext"])
def test_prompt_cache_on_flux1_pipelines(tiny_root, name):
    plain, cached = load(tiny_root, name), load(tiny_root, name)
    apply(cached, only(prompt_cache_size=4), device="cpu")
    expected = np.asarray(generate(plain, "a red chair", seed=1))
    assert np.array_equal(np.asarray(generate(cached, "a red chair", seed=1)), expected)
    assert np.array_equal(np.asarray(generate(cached, "a red chair", seed=1)), expected)
    assert prompt_cache_stats(cached)["hits"] == 1


# ---------------------------------------------------------------------------------------
# the other switches, one at a time
# ---------------------------------------------------------------------------------------


def test_channels_last_vae(tiny_root):
    pipeline = load(tiny_root)
    assert apply(pipeline, only(channels_last_vae=True), device="cpu")["channels_last_vae"] == "on"
    convs = [m for m in pipeline.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert_valid(generate(pipeline))


def test_bf16_everywhere_when_forced_on_cpu(tiny_root):
    pipeline = load(tiny_root)
    report = apply(pipeline, only(bf16_everywhere=True, force_bf16=True), device="cpu")
    assert report["bf16"].startswith("on: cast ") and "vae" in report["bf16"]
    for module in (pipeline.transformer, pipeline.text_encoder, pipeline.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert_valid(generate(pipeline))


def test_attention_backend_on_cpu(tiny_root):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry.get_active_backend()[0]
    pipeline = load(tiny_root)
    assert apply(pipeline, only(attention_backend="auto"), device="cpu")["attention_backend"] == "on: native (auto)"
    processors = [m.processor for m in pipeline.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(str(getattr(p._attention_backend, "value", "")) == "native" for p in processors)
    # a backend this machine lacks is reported, and the pipeline keeps working
    report = apply(pipeline, only(attention_backend="flash"), device="cpu")
    assert report["attention_backend"].startswith("unavailable: flash")
    # a well-formed name diffusers does not know passes the (torch-free) settings and is reported here
    unknown = apply(pipeline, Optimizations.from_strings("none,attention=flsh"), device="cpu")["attention_backend"]
    assert unknown.startswith("unavailable: unknown attention backend 'flsh'") and "_native_cudnn" in unknown
    assert_valid(generate(pipeline))
    assert _AttentionBackendRegistry.get_active_backend()[0] == before  # no process-wide change


def test_fp8_is_reported_unavailable_without_a_gpu(tiny_root):
    pipeline = load(tiny_root)
    report = apply(pipeline, only(fp8=True), device="cpu")
    assert report["fp8"].startswith("unavailable: fp8 needs a CUDA GPU")
    assert not any(type(p).__name__ != "Parameter" for p in pipeline.transformer.parameters())
    assert_valid(generate(pipeline))


def test_applying_again_and_to_a_from_pipe_variant(tiny_root):
    import diffusers

    pipeline = load(tiny_root)
    opts = Optimizations()
    apply(pipeline, opts, device="cpu")
    again = apply(pipeline, opts, device="cpu")
    assert again["truncate_text_encoder"].endswith("(already applied)")
    assert again["prompt_cache"].endswith("(already applied)")

    inpaint = diffusers.Flux2KleinInpaintPipeline.from_pipe(pipeline)
    inpaint.set_progress_bar_config(disable=True)
    report = apply(inpaint, opts, device="cpu")
    assert report["truncate_text_encoder"].startswith("on: 27 of 28")
    assert report["prompt_cache"] == "on: 256 prompts"
    assert len(pipeline.text_encoder.model.layers) == 28
    plain = load(tiny_root)
    assert torch.equal(inpaint.encode_prompt("shared weights")[0], plain.encode_prompt("shared weights")[0])


# ---------------------------------------------------------------------------------------
# torch.compile, warmed at load
# ---------------------------------------------------------------------------------------


def test_compile_and_warm_up(tiny_root):
    reason = optimize._inductor_unavailable("cpu")
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    import torch._dynamo

    eager = np.asarray(generate(load(tiny_root), "a compiled cat", seed=5, steps=1), dtype=np.float32)
    pipeline = load(tiny_root)
    report = apply(pipeline, only(compile=True, prompt_cache_size=4), device="cpu")
    assert report["compile"].startswith("on: regional")
    assert optimize._compiled_blocks(pipeline.transformer)

    timings = warm_up(pipeline, sizes=[(SIZE, SIZE)], steps=1)
    assert list(timings) == [f"{SIZE}x{SIZE}"]
    assert prompt_cache_stats(pipeline)["size"] == 0  # the warm-up prompt is not kept
    assert pipeline._fluxserve_optimizations["compile"].startswith("on")

    # a request at a warmed size compiles nothing more (another prompt, seed, step count)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = np.asarray(generate(pipeline, "a compiled cat", seed=5, steps=1), dtype=np.float32)
        assert_valid(generate(pipeline, "something else", seed=9, steps=2))
    assert_valid(Image.fromarray(compiled.astype(np.uint8)))
    assert np.abs(compiled - eager).max() <= 2  # fused kernels may differ in the last bits


def test_compiled_batches_are_warmed_at_load_and_keep_solo_bits(tiny_root):
    """With dynamic batching on, the warm-up also runs a batch of two: later batches of any size
    reuse that (batch-dynamic) graph, and each batched image is still its solo run's."""
    reason = optimize._inductor_unavailable("cpu")
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    import torch._dynamo

    from fluxserve.engine.batch_invariance import make_batch_invariant

    pipeline = load(tiny_root)
    make_batch_invariant(pipeline)
    apply(pipeline, only(compile=True), device="cpu")
    warm_up(pipeline, sizes=[(SIZE, SIZE)], steps=1, calls=lambda w, h: klein.FAMILY.warm_calls(w, h, batch=3))
    prompts, seeds = ["a cat", "a dog", "a cow"], [1, 2, 3]
    with torch._dynamo.config.patch(error_on_recompile=True):
        batched = pipeline(prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=1.0,
                           generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
        solo = [pipeline(prompt=p, height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=1.0,
                         generator=torch.Generator("cpu").manual_seed(s), output_type="np").images[0]
                for p, s in zip(prompts, seeds)]
    for one, alone in zip(batched, solo):
        assert np.array_equal(one, alone)


def test_a_failing_compile_falls_back_to_eager_at_warm_up(tiny_root):
    pipeline = load(tiny_root)
    apply(pipeline, only(compile=False), device="cpu")
    block = pipeline.transformer.transformer_blocks[0]

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    block._compiled_call_impl = broken  # what a compile failure at the first call looks like
    pipeline.transformer._fluxserve_compiled = True
    warm_up(pipeline, sizes=[(SIZE, SIZE)])
    assert pipeline._fluxserve_optimizations["compile"].startswith("unavailable: failed at warm-up")
    assert not optimize._compiled_blocks(pipeline.transformer)
    assert_valid(generate(pipeline))
