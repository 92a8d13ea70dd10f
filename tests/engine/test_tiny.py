"""Tests for the tiny offline random-weight pipelines (fluxserve.engine.tiny)."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fluxserve.engine.tiny import MARKER_NAME, build_tiny_models, tiny_families  # noqa: E402

#: folder -> the diffusers class saved there (each family's own build)
TINY_MODEL_DIRS = {name: family.pipeline for name, family in tiny_families().items()}

SIZE = 256


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def _load(tiny_dirs: dict[str, pathlib.Path], name: str):
    pipe = getattr(diffusers, TINY_MODEL_DIRS[name]).from_pretrained(tiny_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_dirs: dict[str, pathlib.Path]) -> dict[str, object]:
    return {name: _load(tiny_dirs, name) for name in TINY_MODEL_DIRS}


@pytest.fixture(scope="module")
def init_image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")


def _sha256_safetensors(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


_MASK = PIL.Image.new("L", (SIZE, SIZE), 0)
_MASK.paste(255, (64, 64, 192, 192))

# name -> (pipeline folder, variant class built with from_pipe (None: the saved one), extra call kwargs given the init image)
CASES = {
    "klein-text2img": ("flux2-klein", None, lambda img: {"guidance_scale": 1.0}),
    "klein-reference": ("flux2-klein", None, lambda img: {"image": [img], "guidance_scale": 1.0}),
    "flux1-text2img": ("flux1-dev", None, lambda img: {}),
    "flux1-img2img": ("flux1-dev", "FluxImg2ImgPipeline", lambda img: {"image": img, "strength": 0.7}),
    "flux1-inpaint": ("flux1-dev", "FluxInpaintPipeline", lambda img: {"image": img, "mask_image": _MASK, "strength": 0.9}),
    "fill": ("flux1-fill", None, lambda img: {"image": img, "mask_image": _MASK}),
    "kontext": (
        "flux-kontext",
        None,
        lambda img: {"image": img, "max_area": SIZE * SIZE, "_auto_resize": False},
    ),
}


def _generate(pipe, seed: int, **kwargs) -> PIL.Image.Image:
    out = pipe(
        prompt="a photo of a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        output_type="pil",
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    )
    return out.images[0]


def test_folders_are_complete_and_small(tiny_dirs: dict[str, pathlib.Path]) -> None:
    assert set(tiny_dirs) == set(TINY_MODEL_DIRS)
    for name, folder in tiny_dirs.items():
        assert folder.name == name
        assert (folder / MARKER_NAME).is_file()
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == TINY_MODEL_DIRS[name]
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 4 * 1024 * 1024, f"{name} is {size} bytes"
    # no temporary build folders left behind
    assert sorted(p.name for p in next(iter(tiny_dirs.values())).parent.iterdir()) == sorted(TINY_MODEL_DIRS)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_256_deterministic(case: str, pipes, init_image) -> None:
    name, variant, extra = CASES[case]
    pipe = pipes[name]
    assert type(pipe).__name__ == TINY_MODEL_DIRS[name]
    if variant is not None:
        pipe = getattr(diffusers, variant).from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)

    first = _generate(pipe, 0, **extra(init_image))
    assert isinstance(first, PIL.Image.Image)
    assert first.size == (SIZE, SIZE)

    again = _generate(pipe, 0, **extra(init_image))
    assert np.array_equal(np.asarray(first), np.asarray(again)), "same seed must give identical pixels"

    other = _generate(pipe, 1, **extra(init_image))
    assert other.size == (SIZE, SIZE)
    assert not np.array_equal(np.asarray(first), np.asarray(other)), "different seeds must differ"


def test_klein_inpaint_from_pipe(pipes, init_image) -> None:
    inpaint = diffusers.Flux2KleinInpaintPipeline.from_pipe(pipes["flux2-klein"])
    inpaint.set_progress_bar_config(disable=True)
    image = _generate(
        inpaint,
        0,
        image=init_image,
        image_reference=[init_image],
        mask_image=PIL.Image.new("L", (SIZE, SIZE), 255),
        strength=0.7,
        guidance_scale=1.0,
    )
    assert isinstance(image, PIL.Image.Image)
    assert image.size == (SIZE, SIZE)


def test_build_is_reproducible_and_idempotent(
    tiny_dirs: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    other = build_tiny_models(tmp_path / "second")
    for name in TINY_MODEL_DIRS:
        ours, theirs = _sha256_safetensors(tiny_dirs[name]), _sha256_safetensors(other[name])
        assert ours, f"{name} has no safetensors files"
        assert ours == theirs, f"{name} differs between builds"

    root = next(iter(tiny_dirs.values())).parent
    before = {name: (folder / MARKER_NAME).stat().st_mtime_ns for name, folder in tiny_dirs.items()}
    assert build_tiny_models(root) == tiny_dirs
    after = {name: (folder / MARKER_NAME).stat().st_mtime_ns for name, folder in tiny_dirs.items()}
    assert before == after, "a complete build must be reused untouched"


def test_folder_without_marker_is_rebuilt(tmp_path: pathlib.Path) -> None:
    dirs = build_tiny_models(tmp_path)
    broken = dirs["flux1-dev"]
    (broken / MARKER_NAME).unlink()
    (broken / "half-written.tmp").write_text("junk")
    untouched = (dirs["flux2-klein"] / MARKER_NAME).stat().st_mtime_ns
    reference = _sha256_safetensors(dirs["flux-kontext"])

    rebuilt = build_tiny_models(tmp_path)

    assert rebuilt == dirs
    assert (broken / MARKER_NAME).is_file()
    assert not (broken / "half-written.tmp").exists()
    assert (dirs["flux2-klein"] / MARKER_NAME).stat().st_mtime_ns == untouched
    assert _sha256_safetensors(dirs["flux-kontext"]) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TINY_MODEL_DIRS)
    pipe = _load(rebuilt, "flux1-dev")
    assert type(pipe).__name__ == "FluxPipeline"
