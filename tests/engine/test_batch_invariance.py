"""A batch-invariant pipeline gives each image of a batched call exactly its solo bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

from fluxserve.engine.batch_invariance import make_batch_invariant

PROMPTS = ["a photo of a cat", "a dog on the moon", "x y z"]
SEEDS = [1, 2, 3]


def _images(pipeline, prompts, seeds, size=256):
    return pipeline(prompt=prompts, height=size, width=size, num_inference_steps=2, guidance_scale=1.0,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images


@pytest.fixture()
def klein(tiny_root):
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_root / "flux2-klein", dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("size", [256, 384])
def test_each_batched_image_equals_its_solo_run(klein, size):
    before = _images(klein, PROMPTS[1:2], SEEDS[1:2], size)
    make_batch_invariant(klein)
    make_batch_invariant(klein)  # idempotent
    batched = _images(klein, PROMPTS, SEEDS, size)
    for index, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        assert np.array_equal(batched[index], _images(klein, [prompt], [seed], size)[0])
    # a solo call takes the plain path: unchanged by the module
    assert np.array_equal(_images(klein, PROMPTS[1:2], SEEDS[1:2], size)[0], before[0])
