"""worker.prepare: a claimed job's params and meta, prompt enhancement, and its stored input
images (references, second image, inpainting mask)."""

from __future__ import annotations

from PIL import Image

from fluxserve.params import JobParams
from fluxserve.worker.prepare import Preparer
from tests.worker.conftest import FakeEnhanced, FakeEnhancer


def _prepare(registry, inputs, engine, store, job, enhancer=None):
    claimed = store.claim_next()
    assert claimed.id == job.id
    return Preparer(registry, inputs, engine, enhancer).prepare(claimed)


# -- params, spec, meta ---------------------------------------------------------------------------
def test_params_spec_and_a_copy_of_the_meta(registry, inputs, engine, store, make_job):
    job = make_job("a cat", model="flux-2-klein", seeds=[7, 8], meta={"prompt": "a cat", "seed": 7})
    prepared = _prepare(registry, inputs, engine, store, job)
    assert prepared.job.id == job.id
    assert prepared.params == JobParams.from_dict(job.params)
    assert prepared.spec is registry.get("flux-klein")  # aliases resolve to the registry's spec
    assert prepared.meta == {"prompt": "a cat", "seed": 7}
    prepared.meta["batch_size"] = 2
    assert "batch_size" not in prepared.job.meta  # the job row's meta is not written through
    assert prepared.inputs.references == [] and prepared.inputs.second is None and prepared.inputs.mask is None


# -- enhance_prompt -------------------------------------------------------------------------------
def test_enhanced_prompt_replaces_the_prompt_and_is_recorded_in_meta(registry, inputs, engine, store, make_job):
    enhancer = FakeEnhancer(lambda prompt: FakeEnhanced(prompt=f"{prompt}, golden hour, 35mm", ok=True))
    job = make_job("a cat", enhance_prompt=True)
    prepared = _prepare(registry, inputs, engine, store, job, enhancer)
    assert enhancer.calls == ["a cat"]
    assert prepared.params.prompt == "a cat, golden hour, 35mm"
    meta = prepared.meta
    assert meta["original_prompt"] == "a cat"
    assert meta["enhanced_prompt"] == meta["prompt"] == "a cat, golden hour, 35mm"
    assert meta["enhance_prompt_status"] == "ok"
    assert meta["enhance_prompt_source"] == "fake-enhancer"
    assert meta["enhance_prompt_seconds"] == 0.123
    # the enhancer was handed the prompt-writing model's pipeline, from the engine
    writer = registry.prompt_writer()
    assert writer is not None and enhancer.pipelines == [f"pipeline:{writer.name}"]
    assert engine.pipelines_requested == [writer.name]


def test_a_failed_enhancement_keeps_the_original_prompt_and_says_why(registry, inputs, engine, store, make_job):
    enhancer = FakeEnhancer(lambda prompt: FakeEnhanced(prompt=prompt, ok=False, error="timed out after 10 s"))
    job = make_job("a cat", enhance_prompt=True)
    prepared = _prepare(registry, inputs, engine, store, job, enhancer)
    assert prepared.params.prompt == "a cat" and prepared.meta["prompt"] == "a cat"
    assert prepared.meta["original_prompt"] == "a cat"
    assert prepared.meta["enhance_prompt_status"] == "failed, original prompt used: timed out after 10 s"
    assert "enhanced_prompt" not in prepared.meta


def test_no_enhancer_keeps_the_prompt(registry, inputs, engine, store, make_job):
    job = make_job("a cat", enhance_prompt=True)
    prepared = _prepare(registry, inputs, engine, store, job, enhancer=None)
    assert prepared.params.prompt == "a cat"
    assert prepared.meta["enhance_prompt_status"] == "failed, original prompt used: no enhancer"
    assert prepared.meta["original_prompt"] == "a cat"
    assert engine.pipelines_requested == []  # nothing was loaded for it


def test_the_enhancer_is_not_asked_unless_the_job_wants_it(registry, inputs, engine, store, make_job):
    enhancer = FakeEnhancer(lambda prompt: FakeEnhanced(prompt="rewritten", ok=True))
    job = make_job("a cat")
    prepared = _prepare(registry, inputs, engine, store, job, enhancer)
    assert enhancer.calls == [] and prepared.params.prompt == "a cat"
    assert not any(key.startswith("enhance") or key == "original_prompt" for key in prepared.meta)


# -- stored input images --------------------------------------------------------------------------
def _half_mask(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """White (repaint) left half, black right half."""
    mask = Image.new(mode, size, 0)
    mask.paste(Image.new(mode, (size[0] // 2, size[1]), "white"), (0, 0))
    return mask


def test_references_load_as_rgb_in_order(registry, inputs, engine, store, make_job):
    Image.new("RGBA", (24, 16), (200, 10, 10, 128)).save(inputs.path_for("ref-a.png"))
    Image.new("P", (8, 8), 3).save(inputs.path_for("ref-b.png"))
    Image.new("L", (12, 12), 99).save(inputs.path_for("second.png"))
    job = make_job("two refs", task="img2img", inputs=["ref-a.png", "ref-b.png"], input_2="second.png")
    refs = _prepare(registry, inputs, engine, store, job).inputs
    assert [(image.mode, image.size) for image in refs.references] == [("RGB", (24, 16)), ("RGB", (8, 8))]
    assert refs.references[0].getpixel((0, 0)) == (200, 10, 10)
    assert refs.second.mode == "RGB" and refs.second.size == (12, 12) and refs.second.getpixel((5, 5)) == (99, 99, 99)
    assert refs.mask is None


def test_the_mask_loads_as_l_and_is_resized_to_the_first_reference(registry, inputs, engine, store, make_job):
    Image.new("RGB", (24, 16), (1, 2, 3)).save(inputs.path_for("image.png"))
    _half_mask((8, 8)).save(inputs.path_for("mask.png"))  # another size, and RGB
    job = make_job("repaint", task="inpaint", inputs=["image.png"], mask="mask.png")
    mask = _prepare(registry, inputs, engine, store, job).inputs.mask
    assert mask.mode == "L" and mask.size == (24, 16)
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((23, 15)) == 0  # still white left, black right


def test_a_mask_of_the_right_size_is_kept_as_it_is(registry, inputs, engine, store, make_job):
    Image.new("RGB", (16, 16)).save(inputs.path_for("image.png"))
    _half_mask((16, 16), "L").save(inputs.path_for("mask.png"))
    job = make_job("repaint", task="inpaint", inputs=["image.png"], mask="mask.png")
    mask = _prepare(registry, inputs, engine, store, job).inputs.mask
    assert mask.size == (16, 16) and mask.mode == "L"
    assert list(mask.getdata()) == list(_half_mask((16, 16), "L").getdata())  # not resampled
