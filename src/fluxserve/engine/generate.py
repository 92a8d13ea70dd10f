"""Running one job's generation on its pipeline. Each image gets its own seeded CPU generator
(CPU so that a seed means the same noise on every device)."""

from __future__ import annotations

import math

import torch
from PIL import Image

from fluxserve.engine.loading import PipelineCache
from fluxserve.models import ModelSpec
from fluxserve.params import JobParams

MAX_REFERENCE_AREA = 1024 * 1024


class JobAborted(RuntimeError):
    """Raised from the step callback to stop a generation whose job is no longer ours."""


def _step_callback(progress, image_index: int, n_images: int):
    """A diffusers ``callback_on_step_end`` reporting (step done, steps in all) across images."""

    def callback(pipeline, step, _timestep, callback_kwargs):
        per_image = max(1, int(getattr(pipeline, "num_timesteps", 0) or step + 1))
        progress(image_index * per_image + step + 1, n_images * per_image)
        return callback_kwargs

    return callback


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _latent_size(value: int) -> int:
    """FLUX latents are 2x2-packed after 8x VAE downsampling: sides must be multiples of 16."""
    return math.ceil(value / 16) * 16


def _crop_to(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _fit_area(image: Image.Image, max_area: int) -> Image.Image:
    if image.width * image.height <= max_area:
        return image
    scale = math.sqrt(max_area / (image.width * image.height))
    return image.resize((max(16, int(image.width * scale)), max(16, int(image.height * scale))), Image.LANCZOS)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Kontext takes one image: two references are pasted next to each other, same height."""
    height = max(left.height, right.height)
    left = left.resize((round(left.width * height / left.height), height), Image.LANCZOS)
    right = right.resize((round(right.width * height / right.height), height), Image.LANCZOS)
    canvas = Image.new("RGB", (left.width + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


class Generator:
    """One call per seed, so that every seed in ``meta.seeds`` reproduces its image on its own
    whatever the device's kernels do with a batch (and FLUX.1 img2img draws its encode noise from
    the first generator only). Dynamic batching across jobs is ``run_batch``."""

    def __init__(self, pipelines: PipelineCache):
        self.pipelines = pipelines

    def run(
        self, spec: ModelSpec, params: JobParams, references: list[Image.Image], second: Image.Image | None = None,
        progress=None,
    ) -> list[Image.Image]:
        """One image per seed. ``progress(step, total)`` is called after each denoising step and
        may raise ``JobAborted`` to stop."""
        if params.task == "img2img" and params.strength == 0:
            # strength 0 means "identical to the input": no denoising step would run
            same = references[0].resize((params.width, params.height), Image.LANCZOS)
            return [same.copy() for _ in params.seeds]
        call = self._call_for(spec, params, references, second)
        images = []
        for index, seed in enumerate(params.seeds):
            extra = {"callback_on_step_end": _step_callback(progress, index, len(params.seeds))} if progress else {}
            image = call(_generator(seed), **extra).images[0]
            images.append(_crop_to(image.convert("RGB"), params.width, params.height))
        return images

    def run_batch(self, spec: ModelSpec, jobs: list[JobParams], progress=None) -> list[list[Image.Image]]:
        """Several compatible text-to-image jobs (same model, size, steps, guidance) in one
        pipeline call: one prompt and one seeded generator per image. Returns each job's images.
        Each image equals its solo run bit for bit where the kernels allow: the cache made the
        pipeline batch-invariant at load (``engine.batch_invariance``; equal on CPU, tested)."""
        first = jobs[0]
        if spec.pipeline != "Flux2KleinPipeline" or any(p.task != "text2img" for p in jobs):
            raise ValueError("only FLUX.2 klein text-to-image jobs are batched")
        prompts = [p.prompt for p in jobs for _ in p.seeds]
        generators = [_generator(seed) for p in jobs for seed in p.seeds]
        extra = {"callback_on_step_end": _step_callback(progress, 0, 1)} if progress else {}
        images = self.pipelines.get(spec)(
            prompt=prompts, height=_latent_size(first.height), width=_latent_size(first.width),
            num_inference_steps=first.steps, guidance_scale=first.guidance, generator=generators,
            num_images_per_prompt=1, output_type="pil", **extra,
        ).images
        out, start = [], 0
        for p in jobs:
            out.append([_crop_to(image.convert("RGB"), p.width, p.height) for image in images[start:start + len(p.seeds)]])
            start += len(p.seeds)
        return out

    def _call_for(self, spec, params, references, second):
        """A function of one generator that runs the right pipeline with everything else bound."""
        width, height = _latent_size(params.width), _latent_size(params.height)
        common = dict(
            prompt=params.prompt, height=height, width=width, num_inference_steps=params.steps,
            guidance_scale=params.guidance, output_type="pil",
        )
        partial_denoise = params.task == "img2img" and params.strength is not None and params.strength < 1
        blank_mask = Image.new("L", (width, height), 255)
        if spec.pipeline == "Flux2KleinPipeline":
            if params.task == "text2img":
                return lambda g, **kw: self.pipelines.get(spec)(generator=g, **common, **kw)
            references = [_fit_area(ref, MAX_REFERENCE_AREA) for ref in references]
            if not partial_denoise:
                return lambda g, **kw: self.pipelines.get(spec)(image=references, generator=g, **common, **kw)
            start = references[0].resize((width, height), Image.LANCZOS)
            inpaint = self.pipelines.get(spec, "Flux2KleinInpaintPipeline")
            return lambda g, **kw: inpaint(image=start, image_reference=references, mask_image=blank_mask,
                                     strength=params.strength, generator=g, **common, **kw)
        flux1 = dict(common, negative_prompt=params.negative_prompt, true_cfg_scale=params.true_cfg_scale)
        if spec.pipeline == "FluxImg2ImgPipeline":
            start = references[0].resize((width, height), Image.LANCZOS)
            return lambda g, **kw: self.pipelines.get(spec)(image=start, strength=params.strength, generator=g, **flux1, **kw)
        if spec.pipeline == "FluxKontextPipeline":
            reference = side_by_side(references[0], second) if second is not None else references[0]
            reference = _fit_area(reference, MAX_REFERENCE_AREA)
            kontext = dict(flux1, max_area=height * width, _auto_resize=False)
            if not partial_denoise:
                return lambda g, **kw: self.pipelines.get(spec)(image=reference, generator=g, **kontext, **kw)
            start = references[0].resize((width, height), Image.LANCZOS)
            inpaint = self.pipelines.get(spec, "FluxKontextInpaintPipeline")
            return lambda g, **kw: inpaint(image=start, image_reference=reference, mask_image=blank_mask,
                                     strength=params.strength, generator=g, **kontext, **kw)
        raise ValueError(f"no generation code for pipeline {spec.pipeline}")
