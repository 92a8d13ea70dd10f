"""FLUX.1 [dev] and [schnell] (``FluxPipeline``): text-to-image (batched across compatible jobs),
image-to-image and inpainting, the three sharing one copy of the weights. Guidance-distilled (``guidance_scale`` is an input of
the transformer); ``negative_prompt`` is applied with true classifier-free guidance when
``true_cfg_scale`` > 1, at twice the cost.

With a list of generators, ``FluxImg2ImgPipeline`` draws its encode noise from the first one
only, so the engine's one-call-per-seed is what makes each seed reproduce its image alone.
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
    resized,
    text2img_batch_key,
)
from fluxserve.params import JobParams

PIPELINE = "FluxPipeline"
IMG2IMG = "FluxImg2ImgPipeline"
INPAINT = "FluxInpaintPipeline"


class Flux1(Family):
    name = "flux1-dev"
    pipeline = PIPELINE
    variants = {Task.TEXT2IMG: PIPELINE, Task.IMG2IMG: IMG2IMG, Task.INPAINT: INPAINT}
    limits = Limits(max_init_images=1, negative_prompt=True)
    tiny_seed = 2000
    takes_loras = True

    def call(self, params: JobParams, inputs: Inputs, width: int, height: int) -> PipelineCall:
        common = flux1_arguments(params, width, height)
        if params.task == Task.TEXT2IMG:
            return PipelineCall(PIPELINE, common)
        start = resized(inputs.references[0], width, height)
        if params.task == Task.INPAINT:
            return PipelineCall(INPAINT, dict(common, image=start, mask_image=resized(inputs.inpaint_mask(), width, height),
                                              strength=params.strength))
        return PipelineCall(IMG2IMG, dict(common, image=start, strength=params.strength))

    def batch_key(self, params: JobParams) -> str | None:
        """Text-to-image without true CFG (a negative prompt doubles the batch; not worth the
        complexity) batches; each image equals its solo run (CPU, tested)."""
        if params.negative_prompt and params.true_cfg_scale > 1:
            return None
        return text2img_batch_key(params, params.true_cfg_scale)

    def batch_call(self, jobs: list[JobParams], width: int, height: int) -> PipelineCall:
        return PipelineCall(PIPELINE, dict(flux1_arguments(jobs[0], width, height), prompt=batch_prompts(jobs),
                                           negative_prompt=None, num_images_per_prompt=1))

    def warm_calls(self, width: int, height: int, batch: int = 1) -> list[PipelineCall]:
        base = {"prompt": "warm-up", "width": width, "height": height}
        calls = [PipelineCall(PIPELINE, base)]
        if batch > 1:  # as klein: a second batch size makes the compiled blocks batch-dynamic
            calls.append(PipelineCall(PIPELINE, dict(base, prompt=["warm-up", "warm-up, batched"])))
        return calls

    def build_tiny(self, seed: int) -> Any:
        from diffusers import FluxPipeline

        from fluxserve.engine import tiny

        return FluxPipeline(**tiny.flux1_components(seed))


def flux1_arguments(params: JobParams, width: int, height: int) -> dict[str, Any]:
    """The arguments every FLUX.1-architecture call takes (Kontext's too)."""
    return dict(prompt=params.prompt, height=height, width=width, num_inference_steps=params.steps,
                guidance_scale=params.guidance, negative_prompt=params.negative_prompt,
                true_cfg_scale=params.true_cfg_scale)


FAMILY = Flux1()
