"""FLUX.1 Kontext [dev] (``FluxKontextPipeline``): editing one reference image by instruction.

* img2img: the reference (``init_image``; with ``init_image_2`` both pasted side by side, since
  the pipeline takes one image) conditions the generation. The output has the size asked
  (``max_area`` = width x height and ``_auto_resize=False``; the pipeline's own default resizes to
  1024² whatever was asked). With ``strength`` < 1, the inpaint variant with an all-white mask
  starts from the init image.
* inpaint: the inpaint variant with the client's mask (``init_image_2``, if sent, is the
  reference for the masked area).
* text2img: the plain pipeline without a reference.
"""

from __future__ import annotations

from typing import Any

from fluxserve.engine.families.base import (
    Family,
    Inputs,
    Limits,
    PipelineCall,
    Task,
    blank_mask,
    fit_area,
    resized,
    side_by_side,
)
from fluxserve.engine.families.flux1 import flux1_arguments
from fluxserve.params import JobParams

PIPELINE = "FluxKontextPipeline"
INPAINT = "FluxKontextInpaintPipeline"


class Kontext(Family):
    name = "flux-kontext"
    pipeline = PIPELINE
    variants = {Task.TEXT2IMG: PIPELINE, Task.IMG2IMG: PIPELINE, Task.INPAINT: INPAINT}
    limits = Limits(max_init_images=1, second_image=True, negative_prompt=True)
    tiny_seed = 3000
    takes_loras = True

    def call(self, params: JobParams, inputs: Inputs, width: int, height: int) -> PipelineCall:
        common = dict(flux1_arguments(params, width, height), max_area=width * height, _auto_resize=False)
        if params.task == Task.TEXT2IMG:
            return PipelineCall(PIPELINE, common)
        first, second = inputs.references[0], inputs.second
        start = resized(first, width, height)
        if params.task == Task.INPAINT:
            return PipelineCall(INPAINT, dict(
                common, image=start, image_reference=fit_area(second) if second is not None else None,
                mask_image=resized(inputs.inpaint_mask(), width, height), strength=params.strength,
            ))
        reference = fit_area(side_by_side(first, second) if second is not None else first)
        if params.strength is None or params.strength >= 1:
            return PipelineCall(PIPELINE, dict(common, image=reference))
        return PipelineCall(INPAINT, dict(common, image=start, image_reference=reference,
                                          mask_image=blank_mask(width, height), strength=params.strength))

    def warm_calls(self, width: int, height: int, batch: int = 1) -> list[PipelineCall]:
        from PIL import Image

        image = Image.new("RGB", (width, height), (127, 127, 127))
        return [PipelineCall(PIPELINE, {"prompt": "warm-up", "width": width, "height": height, "image": image,
                                        "max_area": width * height, "_auto_resize": False})]

    def build_tiny(self, seed: int) -> Any:
        from diffusers import FluxKontextPipeline

        from fluxserve.engine import tiny

        return FluxKontextPipeline(**tiny.flux1_components(seed))


FAMILY = Kontext()
