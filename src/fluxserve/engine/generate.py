"""Running one job's generation: the job's family turns its parameters into a pipeline call
(``engine/families``), this module runs it once per seed with a seeded CPU generator (CPU so that
a seed means the same noise on every device), and returns images of exactly the size asked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from fluxserve.engine.errors import JobAborted  # noqa: F401 - raised by progress callbacks, re-exported
from fluxserve.engine.families.base import Inputs, Task
from fluxserve.engine.loading import PipelineCache
from fluxserve.models import ModelSpec
from fluxserve.params import JobParams

Progress = Callable[[int, int], None]


def _step_callback(progress: Progress, image_index: int, n_images: int):
    """A diffusers ``callback_on_step_end`` reporting (step done, steps in all) across images."""

    def callback(pipeline, step, _timestep, callback_kwargs):
        per_image = max(1, int(getattr(pipeline, "num_timesteps", 0) or step + 1))
        progress(image_index * per_image + step + 1, n_images * per_image)
        return callback_kwargs

    return callback


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def crop_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Exactly ``width`` x ``height``: the centre of an image generated at the family's size
    multiple (a few pixels more), or the whole image scaled, when it was generated larger."""
    if image.size == (width, height):
        return image
    if width <= image.width < width + 16 and height <= image.height < height + 16:
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def keep_unmasked(image: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting changes only what the mask covers: the init image's pixels where the mask is
    black, the generated ones where it is white (grey blends). The pipelines blend in latent
    space only, so without this the VAE's round trip would alter the kept area too."""
    size = image.size
    init = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
    mask = mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)
    return Image.composite(image, init.convert("RGB"), mask.convert("L"))


class Generator:
    """One call per seed, so that every seed in ``meta.seeds`` reproduces its image on its own
    whatever the device's kernels do with a batch. Dynamic batching across jobs is ``run_batch``."""

    def __init__(self, pipelines: PipelineCache):
        self.pipelines = pipelines

    def run(self, spec: ModelSpec, params: JobParams, inputs: Inputs, progress: Progress | None = None) -> list[Image.Image]:
        """One image per seed. ``progress(step, total)`` is called after each denoising step and
        may raise ``JobAborted`` to stop."""
        task = Task(params.task)
        if task is not Task.TEXT2IMG and params.strength == 0:
            # strength 0 means "identical to the input": no denoising step would run
            same = inputs.references[0].resize((params.width, params.height), Image.Resampling.LANCZOS)
            return [same.copy() for _ in params.seeds]
        width, height = spec.family.generation_size(params.width, params.height)
        call = spec.family.call(params, inputs, width, height)
        pipeline = self.pipelines.get(spec, call.variant)
        images = []
        with self.pipelines.loras(spec, params.loras, params.lora_strengths):  # none: every adapter off
            for index, seed in enumerate(params.seeds):
                extra: dict[str, Any] = {}
                if progress:
                    extra["callback_on_step_end"] = _step_callback(progress, index, len(params.seeds))
                image = pipeline(generator=seeded_generator(seed), output_type="pil", **call.kwargs, **extra).images[0]
                image = crop_to(image.convert("RGB"), params.width, params.height)
                if task is Task.INPAINT:
                    image = keep_unmasked(image, inputs.references[0], inputs.inpaint_mask())
                images.append(image)
        return images

    def run_batch(self, spec: ModelSpec, jobs: list[JobParams], progress: Progress | None = None) -> list[list[Image.Image]]:
        """Several compatible jobs (equal ``family.batch_key``) in one pipeline call: one seeded
        generator per image. Returns each job's images. Each image equals its solo run bit for bit
        where the kernels allow: the cache made the pipeline batch-invariant at load
        (``engine.batch_invariance``; equal on CPU, tested)."""
        first = jobs[0]
        width, height = spec.family.generation_size(first.width, first.height)
        call = spec.family.batch_call(jobs, width, height)
        generators = [seeded_generator(seed) for p in jobs for seed in p.seeds]
        extra: dict[str, Any] = {"callback_on_step_end": _step_callback(progress, 0, 1)} if progress else {}
        pipeline = self.pipelines.get(spec, call.variant)
        with self.pipelines.loras(spec, first.loras, first.lora_strengths):  # equal in a batch (its key says so)
            images = pipeline(generator=generators, output_type="pil", **call.kwargs, **extra).images
        out, start = [], 0
        for p in jobs:
            out.append([crop_to(image.convert("RGB"), p.width, p.height) for image in images[start:start + len(p.seeds)]])
            start += len(p.seeds)
        return out
