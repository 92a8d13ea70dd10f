"""Internal generation parameters: what the API hands to the job store and the worker.
Never an HTTP model; the request bodies in ``api.schemas`` translate themselves into these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Upload:
    """An image sent in the request itself (a multipart file), not by URL. It goes through the
    same decoding and storing as a fetched init image."""

    data: bytes = field(repr=False)
    filename: str = ""

    def __str__(self) -> str:  # what meta records in place of a URL
        return f"upload:{self.filename or 'image'}"


#: An input image as a request names it: a URL (http(s) or data:) or an uploaded file.
ImageSource = str | Upload


@dataclass
class GenerationRequest:
    """A validated request, before seeds are drawn and init images fetched."""

    server: str  # API family that took it (names the fetch URL): flux_klein, realtime, flux, v6, ...
    model: str  # registry name
    task: str  # text2img | img2img | inpaint (engine.families.base.Task)
    prompt: str
    negative_prompt: str | None = None
    width: int | None = 512  # None (both): the first init image's size, fitted to the limits
    height: int | None = 512
    samples: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    true_cfg_scale: float | None = None
    init_images: list[ImageSource] = field(default_factory=list)  # as sent; all used as references
    init_image_2: str | None = None  # Kontext's second reference
    mask_image: ImageSource | None = None  # inpainting: see mask_convention
    # how the mask marks what to repaint: "luminance" (ModelsLab: white repaints, black keeps, grey
    # blends) or "alpha" (OpenAI: fully transparent pixels are repainted, all others kept)
    mask_convention: Literal["luminance", "alpha"] = "luminance"
    safety_checker: bool = True
    base64: bool = False
    instant_response: bool = False
    temp: bool = False
    enhance_prompt: bool | None = None
    track_id: str | None = None
    webhook: str | None = None
    loras: list[str] = field(default_factory=list)  # lora_model: adapter names (``fluxserve.loras``)
    lora_strengths: list[float] = field(default_factory=list)  # one per adapter, resolved


@dataclass
class JobParams:
    """Everything the worker needs, fully resolved (seeds drawn, defaults filled, inputs stored),
    so a retried job produces exactly the same images."""

    model: str
    task: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance: float
    strength: float | None
    true_cfg_scale: float
    inputs: list[str]  # stored init image files (references, in order)
    input_2: str | None  # Kontext's second reference image file
    safety_checker: bool
    base64: bool
    # where the images go, fixed when queued so future_links are exact:
    # None = local disk (expires); {"config_id": N | None, "public_url": ...} = S3 (None: server default)
    remote: dict[str, Any] | None = None
    enhance_prompt: bool = False
    mask: str | None = None  # stored mask file (inpainting), the size of inputs[0]
    base64_inline: bool = False  # with base64: the images themselves in output (else .base64 files' URLs)
    # LoRA adapters applied to this job (names as in ``fluxserve.loras``) and their strengths, one
    # each; empty for none (and in rows stored before adapters existed)
    loras: list[str] = field(default_factory=list)
    lora_strengths: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobParams:
        return cls(**data)
