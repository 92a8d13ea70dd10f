"""FLUX.1 Fill [dev] (``FluxFillPipeline``): inpainting with a model trained for it. Its
transformer reads the masked image and the mask beside the latents (384 input channels instead
of 64), so it has weights of its own (``black-forest-labs/FLUX.1-Fill-dev``); guidance 30 as
in its model card. No negative prompt.
"""

from __future__ import annotations

from typing import Any

from fluxserve.engine.families.base import Family, Inputs, PipelineCall, Task, resized
from fluxserve.params import JobParams

PIPELINE = "FluxFillPipeline"


class Fill(Family):
    name = "flux1-fill"
    pipeline = PIPELINE
    variants = {Task.INPAINT: PIPELINE}
    tiny_seed = 4000
    takes_loras = True

    def call(self, params: JobParams, inputs: Inputs, width: int, height: int) -> PipelineCall:
        return PipelineCall(PIPELINE, dict(
            prompt=params.prompt, height=height, width=width, num_inference_steps=params.steps,
            guidance_scale=params.guidance, image=resized(inputs.references[0], width, height),
            mask_image=resized(inputs.inpaint_mask(), width, height), strength=params.strength,
        ))

    def warm_calls(self, width: int, height: int, batch: int = 1) -> list[PipelineCall]:
        from PIL import Image

        return [PipelineCall(PIPELINE, {"prompt": "warm-up", "width": width, "height": height,
                                        "image": Image.new("RGB", (width, height), (127, 127, 127)),
                                        "mask_image": Image.new("L", (width, height), 255)})]

    def build_tiny(self, seed: int) -> Any:
        from diffusers import FluxFillPipeline

        from fluxserve.engine import tiny

        components = tiny.flux1_components(seed, masked_inputs=True)
        for unused in ("image_encoder", "feature_extractor"):
            components.pop(unused)
        return FluxFillPipeline(**components)


FAMILY = Fill()
