"""The models the speed benchmarks measure (``--model``), one entry each: the service's route and
request body, the pipeline call the service's ``Generator`` makes (the bare side), the builder,
tiny folder and stages of the pipeline. The benchmarks read everything model-specific from here.

- ``klein``: FLUX.2 klein text2img, ``POST /api/v1/enterprise/flux_klein/text2img``.
- ``kontext``: Flux Kontext editing, ``POST /api/v6/images/img2img`` with ``model_id``
  ``flux-kontext-dev``, one init image (a base64 ``data:`` URI: no network) of the output's size
  and ``strength`` 1, so the service runs the plain ``FluxKontextPipeline`` (the registry's
  default strength 0.5 would run ``FluxKontextInpaintPipeline`` over the same weights instead).
  The init image is a seeded gradient with noise (``reference_image``), the same for every
  request of a run.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxserve.models import ModelSpec, Registry
from fluxserve.params import JobParams

KLEIN, KONTEXT = "flux-klein", "flux-kontext-dev"


def _service_call(task: str, strength: float | None):
    """The pipeline call the service makes for one request (everything but the generator), from
    the model's own family (``Family.call``): the bare side runs exactly what the worker runs.
    Kontext with ``strength`` 1 is the plain ``FluxKontextPipeline`` with one reference (fit to
    1024²), ``max_area`` = the requested area and ``_auto_resize=False``."""

    def call(spec: ModelSpec, prompt: str, size: int, steps: int, reference: Any) -> dict[str, Any]:
        from fluxserve.engine.families.base import Inputs

        params = JobParams(model=spec.name, task=task, prompt=prompt, negative_prompt=None, width=size, height=size,
                           seeds=[0], steps=steps, guidance=spec.guidance, strength=strength,
                           true_cfg_scale=spec.true_cfg_scale, inputs=[], input_2=None, safety_checker=False,
                           base64=False)
        width, height = spec.family.generation_size(size, size)
        made = spec.family.call(params, Inputs(references=[reference] if reference is not None else []), width, height)
        assert made.variant == spec.pipeline, f"the benchmark runs {spec.pipeline}, not {made.variant}"
        return dict(made.kwargs, output_type="pil")

    return call


def _kontext_body(reference_uri: str | None) -> dict[str, Any]:
    return {"model_id": KONTEXT, "init_image": reference_uri, "strength": 1}


@dataclass(frozen=True)
class Workload:
    name: str  # the --model value
    title: str  # what one generation is, in the reports
    model_id: str  # the service's registry name (the model_overrides key)
    endpoint: str  # the service's route
    true_size: str  # what --scale true builds, and the GPU it needs
    call: Callable[..., dict[str, Any]]  # (spec, prompt, size, steps, reference) -> pipeline kwargs
    body: Callable[[str | None], dict[str, Any]]  # (reference data: URI) -> request keys beyond the common ones
    stages: tuple[str, ...]  # timed stages of one call, in order ("steps": each denoising step)
    uses_reference: bool = False

    @property
    def spec(self) -> ModelSpec:
        """The service's defaults for this model (guidance, steps, ...)."""
        return Registry.build().get(self.model_id)

    @property
    def pipeline_class(self) -> str:
        return self.spec.pipeline

    def build(self, scale: str, device: str, dtype: torch.dtype, seed: int) -> Any:
        """The random-weight pipeline of ``bench.models`` at scale small or true."""
        from bench.models import MODELS

        return MODELS[self.name][1](scale, device, dtype, seed=seed)

    def tiny_folder(self, root: Path) -> Path:
        """The tiny offline build the service uses with ``models="tiny"`` (built under ``root`` once)."""
        from fluxserve.engine.tiny import build_tiny_models

        return build_tiny_models(root)[self.spec.family.name]

    def reference(self, size: int, seed: int) -> Any:
        """The init image every request of a run edits (None: the model takes none)."""
        return reference_image(size, seed) if self.uses_reference else None


WORKLOADS = {
    "klein": Workload(
        name="klein", title="FLUX.2 klein text2img", model_id=KLEIN, endpoint="/api/v1/enterprise/flux_klein/text2img",
        true_size="FLUX.2 klein-4B pipeline (3.88 B transformer + 4.02 B Qwen3 encoder + VAE: ~16 GB of bf16 "
                  "weights, built on the GPU) and needs a CUDA GPU with >= 24 GB",
        call=_service_call("text2img", None), body=lambda _uri: {}, stages=("text_encoding", "steps", "vae_decode", "to_pil"),
    ),
    "kontext": Workload(
        name="kontext", title="Flux Kontext img2img (one reference)", model_id=KONTEXT,
        endpoint="/api/v6/images/img2img",
        true_size="Flux Kontext dev pipeline (11.9 B transformer + 4.76 B T5-XXL + CLIP-L + VAE: ~34 GB of bf16 "
                  "weights, built on the GPU) and needs a CUDA GPU with >= 48 GB",
        call=_service_call("img2img", 1.0), body=_kontext_body,
        stages=("text_encoding", "reference_encode", "steps", "vae_decode", "to_pil"), uses_reference=True,
    ),
}


def reference_image(size: int, seed: int) -> Any:
    """A deterministic ``size`` x ``size`` RGB picture: a colour gradient with seeded noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    gradient = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 255
    pixels = np.clip(gradient + rng.normal(0, 16, gradient.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def data_uri(image: Any) -> str:
    """``image`` as a base64 PNG ``data:`` URI (what a client sends instead of a URL)."""
    from fluxserve.png_encoding import encode_png

    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")
