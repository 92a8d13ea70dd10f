"""What a model family is: everything the service knows about one kind of diffusers pipeline, in
one place, so that adding a family is one file (plus one registry entry in ``fluxserve.models``).

A family says:

* which diffusers class is loaded with ``from_pretrained`` (``pipeline``) and which class serves
  each task (``variants``); variants are built over the loaded weights with ``from_pipe``, so a
  family's tasks share one copy of the weights;
* its limits (how many init images, a second reference image, a negative prompt), which the
  registry checks requests against before a job is queued;
* how a job's parameters become the keyword arguments of one pipeline call (``call``), and
  whether and how several jobs share one call (``batch_key`` / ``batch_call``);
* the calls that warm a compiled pipeline at load (``warm_calls``);
* whether jobs may bring LoRA adapters (``takes_loras``);
* its tiny offline build (``build_tiny``: random weights, same classes and structure).

Importing a family module must not import torch, diffusers or transformers: the HTTP layer
reads limits through the registry and never loads torch. Only ``build_tiny`` imports them, when
it runs (in the engine). Everything else here works on plain values and PIL images; the engine
(``engine.generate``) adds the seeded generators and runs the calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from PIL import Image

from fluxserve.loras import describe as describe_loras
from fluxserve.params import JobParams

#: Reference images larger than this are scaled down before they reach a pipeline (diffusers
#: does the same for klein; Kontext's own limit is 1024² too).
MAX_REFERENCE_AREA = 1024 * 1024


class Task(str, Enum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


@dataclass(frozen=True)
class Limits:
    max_init_images: int = 1  # reference images an image-to-image job may bring (all used)
    second_image: bool = False  # takes ``init_image_2`` (Kontext: pasted beside the first)
    negative_prompt: bool = False  # applies ``negative_prompt`` (with true_cfg_scale > 1)


@dataclass
class Inputs:
    """The decoded images a job brings, in the order they were sent."""

    references: list[Image.Image] = field(default_factory=list)
    second: Image.Image | None = None
    mask: Image.Image | None = None  # mode "L", the size of references[0]; white = repaint

    def inpaint_mask(self) -> Image.Image:
        """The mask of an inpaint job (``Registry.check_inputs`` refuses inpainting without one)."""
        assert self.mask is not None, "an inpaint job brings a mask"
        return self.mask


@dataclass(frozen=True)
class PipelineCall:
    """One pipeline call without its generator: ``variant`` is the diffusers class to run (the
    loaded one or a ``from_pipe`` variant of it), ``kwargs`` everything else."""

    variant: str
    kwargs: Mapping[str, Any]


class Family:
    """Base class of the model families. Subclasses set the class attributes and ``call``."""

    name: ClassVar[str]  # e.g. "flux2-klein": also the tiny build's folder name
    pipeline: ClassVar[str]  # diffusers class loaded with from_pretrained
    variants: ClassVar[Mapping[Task, str]]  # task -> diffusers class serving it; absent: unsupported
    limits: ClassVar[Limits] = Limits()
    tiny_seed: ClassVar[int]  # base torch seed of the tiny build (builds are reproducible)
    size_multiple: ClassVar[int] = 16  # FLUX latents: 8x VAE downsampling, then 2x2 packing
    min_generation_side: ClassVar[int] = 256  # smaller requests (realtime allows 64) are generated larger
    max_generation_side: ClassVar[int] = 1024
    writes_prompts: ClassVar[bool] = False  # its text encoder is a causal LM that can rewrite prompts
    # its loaded class has diffusers' LoRA loader (``load_lora_weights``): jobs may name adapters
    # (``lora_model``), loaded on that pipeline and shared with its variants (``engine.lora``)
    takes_loras: ClassVar[bool] = False

    @property
    def tasks(self) -> frozenset[Task]:
        return frozenset(self.variants)

    # -- how a job becomes a pipeline call -----------------------------------------------------
    def generation_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the pipeline generates at: each side rounded up to the family's multiple (the
        engine then crops the few extra pixels); a request under ``min_generation_side`` is
        generated scaled up, as far as ``max_generation_side`` allows (the engine scales the image
        down). Either way the answer has exactly the size asked."""
        scale = max(1.0, self.min_generation_side / min(width, height))
        if max(width, height) * scale > self.max_generation_side:
            scale = max(1.0, self.max_generation_side / max(width, height))
        step = self.size_multiple
        return (-(-round(width * scale) // step) * step, -(-round(height * scale) // step) * step)

    def call(self, params: JobParams, inputs: Inputs, width: int, height: int) -> PipelineCall:
        """The call generating one image of ``params`` at ``width`` x ``height``."""
        raise NotImplementedError

    def batch_key(self, params: JobParams) -> str | None:
        """Jobs with equal keys may share one pipeline call (None: never batched)."""
        return None

    def batch_call(self, jobs: list[JobParams], width: int, height: int) -> PipelineCall:
        """One call generating every seed of ``jobs`` (which share a ``batch_key``), in order."""
        raise NotImplementedError(f"{self.name} does not batch")

    def warm_calls(self, width: int, height: int, batch: int = 1) -> list[PipelineCall]:
        """Calls that compile a pipeline for this size at load (one short step each), shaped like
        the calls ``call`` makes; with ``batch`` > 1 also a batched call, if the family batches."""
        return [PipelineCall(self.pipeline, {"prompt": "warm-up", "width": width, "height": height})]

    # -- the tiny offline build ----------------------------------------------------------------
    def build_tiny(self, seed: int) -> Any:
        """A pipeline object with random weights and the real classes and structure."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# -- helpers the families share -------------------------------------------------------------------
def text2img_batch_key(params: JobParams, *more: object) -> str | None:
    """Text-to-image jobs of one model with the same size, steps and guidance (and ``more``) may
    share a call; other tasks never batch (their init images differ). Jobs with LoRA adapters
    share a call only with jobs applying the same adapters at the same strengths."""
    if params.task != Task.TEXT2IMG:
        return None
    adapters = ("lora=" + describe_loras(params.loras, params.lora_strengths),) if params.loras else ()
    return "|".join(str(part) for part in (params.model, f"{params.width}x{params.height}", params.steps,
                                           params.guidance, *more, *adapters))


def batch_prompts(jobs: list[JobParams]) -> list[str]:
    """One prompt per image of a batch, job after job (the engine passes one generator per image)."""
    if any(p.task != Task.TEXT2IMG for p in jobs):
        raise ValueError("only text-to-image jobs are batched")
    return [p.prompt for p in jobs for _ in p.seeds]


def fit_area(image: Image.Image, max_area: int = MAX_REFERENCE_AREA) -> Image.Image:
    """Scale ``image`` down (keeping its aspect) until it has at most ``max_area`` pixels."""
    if image.width * image.height <= max_area:
        return image
    scale = (max_area / (image.width * image.height)) ** 0.5
    return image.resize((max(16, int(image.width * scale)), max(16, int(image.height * scale))), Image.Resampling.LANCZOS)


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def blank_mask(width: int, height: int) -> Image.Image:
    """A mask repainting everything: an inpaint pipeline with it is img2img with ``strength``."""
    return Image.new("L", (width, height), 255)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two references for a one-image pipeline: pasted next to each other at the same height."""
    height = max(left.height, right.height)
    left = left.resize((round(left.width * height / left.height), height), Image.Resampling.LANCZOS)
    right = right.resize((round(right.width * height / right.height), height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (left.width + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas
