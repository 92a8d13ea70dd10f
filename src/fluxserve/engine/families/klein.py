"""FLUX.2 klein (``Flux2KleinPipeline``): text-to-image, editing with 1-4 reference images,
inpainting. Step-distilled: no classifier-free guidance, so ``negative_prompt`` is not applied.
Its text encoder is a Qwen3 causal LM, which also rewrites prompts (``enhance_prompt``).

* text2img: the plain pipeline; compatible jobs (same model, size, steps, guidance) batch.
* img2img: every init image is a reference. With ``strength`` < 1 the first one is also the
  starting point: the inpaint variant with an all-white mask (noise at ``strength``).
* inpaint: the inpaint variant with the client's mask; further init images are references.
"""

from __future__ import annotations

from typing import Any

from fluxserve.engine.families.base import (
    Family,
    Inputs,
    Limits,
    PipelineCall,
    Task,
    batch_prompts,
    blank_mask,
    fit_area,
    resized,
    text2img_batch_key,
)
from fluxserve.params import JobParams

PIPELINE = "Flux2KleinPipeline"
INPAINT = "Flux2KleinInpaintPipeline"


class Klein(Family):
    name = "flux2-klein"
    pipeline = PIPELINE
    variants = {Task.TEXT2IMG: PIPELINE, Task.IMG2IMG: PIPELINE, Task.INPAINT: INPAINT}
    limits = Limits(max_init_images=4)
    tiny_seed = 1000
    takes_loras = True
    writes_prompts = True

    def call(self, params: JobParams, inputs: Inputs, width: int, height: int) -> PipelineCall:
        common = _common(params, width, height)
        if params.task == Task.TEXT2IMG:
            return PipelineCall(PIPELINE, common)
        references = [fit_area(image) for image in inputs.references]
        start = resized(references[0], width, height)
        if params.task == Task.INPAINT:
            return PipelineCall(INPAINT, dict(
                common, image=start, image_reference=references[1:] or None,
                mask_image=resized(inputs.inpaint_mask(), width, height), strength=params.strength,
            ))
        if params.strength is None or params.strength >= 1:
            return PipelineCall(PIPELINE, dict(common, image=references))
        return PipelineCall(INPAINT, dict(
            common, image=start, image_reference=references, mask_image=blank_mask(width, height),
            strength=params.strength,
        ))

    def batch_key(self, params: JobParams) -> str | None:
        return text2img_batch_key(params)

    def batch_call(self, jobs: list[JobParams], width: int, height: int) -> PipelineCall:
        return PipelineCall(PIPELINE, dict(_common(jobs[0], width, height), prompt=batch_prompts(jobs),
                                           num_images_per_prompt=1))

    def warm_calls(self, width: int, height: int, batch: int = 1) -> list[PipelineCall]:
        base = {"prompt": "warm-up", "width": width, "height": height}
        calls = [PipelineCall(PIPELINE, base)]
        if batch > 1:
            # a second batch size makes dynamo compile the blocks once more with the batch dimension
            # dynamic; every later batch size (3, 4, ...) reuses that graph: no request compiles
            calls.append(PipelineCall(PIPELINE, dict(base, prompt=["warm-up", "warm-up, batched"])))
        return calls

    def build_tiny(self, seed: int) -> Any:
        from diffusers import Flux2KleinPipeline

        from fluxserve.engine import tiny

        tokenizer = tiny.build_qwen_tokenizer()
        text_encoder = tiny.build_qwen3_text_encoder(len(tokenizer), seed + 1)
        vae = tiny.build_flux2_vae(seed + 2)
        transformer = tiny.build_flux2_transformer(vae.config.latent_channels, text_encoder.config.hidden_size, seed + 3)
        return Flux2KleinPipeline(
            scheduler=tiny.flow_match_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            transformer=transformer, is_distilled=True,
        )


def _common(params: JobParams, width: int, height: int) -> dict[str, Any]:
    return dict(prompt=params.prompt, height=height, width=width, num_inference_steps=params.steps,
                guidance_scale=params.guidance)


FAMILY = Klein()
