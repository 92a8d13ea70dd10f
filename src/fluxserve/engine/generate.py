"""Running one job's generation on its pipeline. Each image gets its own seeded CPU generator,
so a seed reproduces its image bit for bit whatever the batch around it."""

from __future__ import annotations

import math

import torch
from PIL import Image

from fluxserve.engine.loading import PipelineCache
from fluxserve.models import ModelSpec
from fluxserve.params import JobParams

MAX_REFERENCE_AREA = 1024 * 1024


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


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
    def __init__(self, pipelines: PipelineCache):
        self.pipelines = pipelines

    def run(
        self, spec: ModelSpec, params: JobParams, references: list[Image.Image], second: Image.Image | None = None
    ) -> list[Image.Image]:
        width, height = _latent_size(params.width), _latent_size(params.height)
        if params.task == "img2img" and params.strength == 0:
            # strength 0 means "identical to the input": no denoising step would run
            same = references[0].resize((params.width, params.height), Image.LANCZOS)
            return [same.copy() for _ in params.seeds]
        if spec.pipeline == "Flux2KleinPipeline":
            images = self._klein(spec, params, references, width, height)
        elif spec.pipeline == "FluxImg2ImgPipeline":
            images = self._flux1_img2img(spec, params, references, width, height)
        elif spec.pipeline == "FluxKontextPipeline":
            images = self._kontext(spec, params, references, second, width, height)
        else:
            raise ValueError(f"no generation code for pipeline {spec.pipeline}")
        return [_crop_to(image.convert("RGB"), params.width, params.height) for image in images]

    def _klein(self, spec, params, references, width, height):
        common = dict(
            prompt=params.prompt, height=height, width=width, num_inference_steps=params.steps,
            guidance_scale=params.guidance, num_images_per_prompt=len(params.seeds),
            generator=_generators(params.seeds), output_type="pil",
        )
        if params.task == "text2img":
            return self.pipelines.get(spec)(**common).images
        references = [_fit_area(ref, MAX_REFERENCE_AREA) for ref in references]
        if params.strength is None or params.strength >= 1:
            return self.pipelines.get(spec)(image=references, **common).images
        inpaint = self.pipelines.get(spec, "Flux2KleinInpaintPipeline")
        start = references[0].resize((width, height), Image.LANCZOS)
        return inpaint(
            image=start, image_reference=references, mask_image=Image.new("L", (width, height), 255),
            strength=params.strength, **common,
        ).images

    def _flux1_img2img(self, spec, params, references, width, height):
        # FluxImg2ImgPipeline draws VAE-encode noise from generator[0] only, so a batch would
        # not reproduce per-seed; one call per seed keeps every image reproducible on its own.
        pipeline = self.pipelines.get(spec)
        start = references[0].resize((width, height), Image.LANCZOS)
        images = []
        for generator in _generators(params.seeds):
            images += pipeline(
                prompt=params.prompt, negative_prompt=params.negative_prompt, true_cfg_scale=params.true_cfg_scale,
                image=start, height=height, width=width, strength=params.strength,
                num_inference_steps=params.steps, guidance_scale=params.guidance,
                generator=generator, output_type="pil",
            ).images
        return images

    def _kontext(self, spec, params, references, second, width, height):
        reference = side_by_side(references[0], second) if second is not None else references[0]
        reference = _fit_area(reference, MAX_REFERENCE_AREA)
        common = dict(
            prompt=params.prompt, negative_prompt=params.negative_prompt, true_cfg_scale=params.true_cfg_scale,
            height=height, width=width, max_area=height * width, _auto_resize=False,
            num_inference_steps=params.steps, guidance_scale=params.guidance,
            num_images_per_prompt=len(params.seeds), generator=_generators(params.seeds), output_type="pil",
        )
        if params.strength is None or params.strength >= 1:
            return self.pipelines.get(spec)(image=reference, **common).images
        inpaint = self.pipelines.get(spec, "FluxKontextInpaintPipeline")
        start = references[0].resize((width, height), Image.LANCZOS)
        return inpaint(
            image=start, image_reference=reference, mask_image=Image.new("L", (width, height), 255),
            strength=params.strength, **common,
        ).images
