"""Request bodies, one per task (text-to-image, image-to-image, inpainting), shared by every path
family. Lenient about types (see ``lenient``), strict about ranges, silent about unknown fields;
each translates itself into a ``GenerationRequest``. What a *model* can take (how many init
images, a second image, a mask) is its family's limit, checked by the registry afterwards."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fluxserve import loras
from fluxserve.api import lenient
from fluxserve.engine.families.base import Task
from fluxserve.images import is_inline_image
from fluxserve.params import SEED_MAX, GenerationRequest

Int = Annotated[int | None, BeforeValidator(lenient.to_int)]
Float = Annotated[float | None, BeforeValidator(lenient.to_float)]
Bool = Annotated[bool | None, BeforeValidator(lenient.to_bool)]
Text = Annotated[str | None, BeforeValidator(lenient.to_text)]
Urls = Annotated[list[str] | None, BeforeValidator(lenient.to_url_list)]
LoraNames = Annotated[list[str] | None, BeforeValidator(loras.parse_names)]
LoraStrengths = Annotated[list[float] | None, BeforeValidator(lambda value: loras.parse_strengths(value, lenient.to_float))]

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 1024, 8
REALTIME_MIN_SIDE = 64  # the realtime docs allow small sizes: generated at a size the model supports, then scaled
MAX_PROMPT_CHARS = 8000  # far beyond what the text encoders read (512 tokens); bounds storage
MAX_LENGTHS = {"track_id": 200, "webhook": 2048, "model_id": 64}  # as stored
MAX_URL_CHARS = 8192  # http(s) image URLs (data: URIs are bounded by the body size)

# The seed pages' own example bodies, shown in /docs (key and image URLs as on the pages).
_EXAMPLE_IMAGE = "https://raw.githubusercontent.com/CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo.png"
EXAMPLES: dict[Task, dict[str, Any]] = {
    Task.TEXT2IMG: {"key": "your_api_key", "prompt": "ultra realistic close up portrait of a cyberpunk woman",
                    "negative_prompt": "bad quality", "width": "512", "height": "512", "safety_checker": False,
                    "seed": None, "samples": 1, "base64": False, "webhook": None, "track_id": None},
    Task.IMG2IMG: {"key": "your_api_key", "prompt": "a cat sitting on a bench", "negative_prompt": "bad quality",
                   "init_image": _EXAMPLE_IMAGE, "width": "512", "height": "512", "samples": "1", "temp": False,
                   "safety_checker": False, "strength": 0.7, "seed": None, "webhook": None, "track_id": None},
    Task.INPAINT: {"key": "your_api_key", "prompt": "a cat sitting on a bench", "init_image": _EXAMPLE_IMAGE,
                   "mask_image": "https://raw.githubusercontent.com/CompVis/stable-diffusion/main/data/"
                                 "inpainting_examples/overture-creations-5sI6fQgYIuo_mask.png",
                   "width": "512", "height": "512", "samples": "1", "strength": 1, "seed": None},
}


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_parameter", message)


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise _refuse(f"{name} must be between {low:.12g} and {high:.12g}")


def _check_url_length(name: str, url: str | None) -> None:
    """URLs are bounded; images sent inline (data: URIs, bare base64) only by the body size."""
    if url and len(url) > MAX_URL_CHARS and not is_inline_image(url):
        raise _refuse(f"{name} URLs must be at most {MAX_URL_CHARS} characters")


class GenerationBody(BaseModel):
    """Fields every generation endpoint accepts."""

    model_config = ConfigDict(extra="ignore")
    task: ClassVar[Task] = Task.TEXT2IMG

    key: Text = Field(None, description="API key (or send it in a `Key` header).")
    model_id: Text = Field(None, description="The model, on paths that serve several (see each path's description).")
    prompt: Text = Field(None, description="Required. What to generate.")
    negative_prompt: Text = None
    width: Int = Field(None, description="256-1024, a multiple of 8 (realtime paths: 64-1024, any); default 512.")
    height: Int = Field(None, description="256-1024, a multiple of 8 (realtime paths: 64-1024, any); default 512.")
    samples: Int = Field(None, description="Images to generate, 1-4 (default 1).")
    seed: Int = Field(None, description="null for random; the seed used is in meta.seed.")
    num_inference_steps: Int = Field(None, description="1-50 (default per model).")
    guidance_scale: Float = Field(None, description="0-20 (default per model).")
    guidance: Float = Field(None, description="0-20; the same as guidance_scale (wins if both are sent).")
    true_cfg_scale: Float = Field(None, description="FLUX.1 family: > 1 applies negative_prompt (2x cost).")
    safety_checker: Bool = None
    base64: Bool = None
    instant_response: Bool = None
    temp: Bool = None
    enhance_prompt: Bool = None
    webhook: Text = None
    track_id: Text = None
    scheduler: Text = Field(None, description="Accepted and ignored (FLUX uses its own scheduler).")
    lora_model: LoraNames = Field(None, description="LoRA adapters to apply: a name, comma-separated names or an array "
                                                    f"(at most {loras.MAX_ADAPTERS}; see the README's LoRA section).")
    lora_strength: LoraStrengths = Field(None, description=f"{loras.STRENGTH_MIN:g}-{loras.STRENGTH_MAX:g}: one for all "
                                                           "adapters, or comma-separated, one per adapter (default 1).")

    @model_validator(mode="after")
    def _check_limits(self) -> GenerationBody:
        if not self.prompt or not self.prompt.strip():
            raise _refuse("prompt is required")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name) or "") > MAX_PROMPT_CHARS:
                raise _refuse(f"{name} is too long (at most {MAX_PROMPT_CHARS} characters)")
        for name, limit in MAX_LENGTHS.items():
            if len(getattr(self, name, None) or "") > limit:
                raise _refuse(f"{name} is too long (at most {limit} characters)")
        # width/height: each path family's own range (``size_problem``), checked when the route is known
        _check_range("samples", self.samples, 1, 4)
        _check_range("seed", self.seed, 0, SEED_MAX)
        _check_range("num_inference_steps", self.num_inference_steps, 1, 50)
        _check_range("guidance_scale", self.guidance_scale, 0, 20)
        _check_range("guidance", self.guidance, 0, 20)
        _check_range("true_cfg_scale", self.true_cfg_scale, 1, 20)
        self._check_loras()
        if self.webhook is not None:
            self.webhook = self.webhook.strip() or None
        if self.webhook and urlsplit(self.webhook).scheme.lower() not in ("http", "https"):
            raise _refuse("webhook must be an http or https URL")
        return self

    def size_problem(self, min_side: int = MIN_SIDE, multiple: int = SIDE_MULTIPLE) -> str | None:
        """What is wrong with width/height on a path that allows ``min_side``..1024 in steps of
        ``multiple`` (ModelsLab: 256-1024, multiples of 8; its realtime paths: from 64, any)."""
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is None:
                continue
            if not min_side <= value <= MAX_SIDE:
                return f"{side} must be between {min_side} and {MAX_SIDE}"
            if value % multiple:
                return f"{side} must be divisible by {multiple}"
        return None

    def _check_loras(self) -> None:
        """The adapters' count, repeats and strengths (whether each exists is the server's
        catalog's question, asked before the job is queued)."""
        for strength in self.lora_strength or []:
            _check_range("lora_strength", strength, loras.STRENGTH_MIN, loras.STRENGTH_MAX)
        names = self.lora_model or []
        if len(names) > loras.MAX_ADAPTERS:
            raise _refuse(f"lora_model names at most {loras.MAX_ADAPTERS} adapters")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise _refuse(f"lora_model names {', '.join(repeated)} more than once")
        if names:
            try:
                self.lora_strength = loras.resolve_strengths(names, self.lora_strength)
            except ValueError as exc:
                raise _refuse(str(exc)) from None

    def to_request(self, server: str, model: str) -> GenerationRequest:
        """The request for ``model`` (chosen by the path family and ``model_id``)."""
        return GenerationRequest(
            server=server, model=model, task=self.task.value, prompt=(self.prompt or "").strip(),
            negative_prompt=self.negative_prompt or None,
            width=self.width or 512, height=self.height or 512, samples=self.samples or 1,
            seed=self.seed, steps=self.num_inference_steps,
            guidance=self.guidance if self.guidance is not None else self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale,
            safety_checker=True if self.safety_checker is None else self.safety_checker,
            base64=bool(self.base64), instant_response=bool(self.instant_response),
            temp=bool(self.temp), enhance_prompt=self.enhance_prompt, track_id=self.track_id,
            webhook=self.webhook, loras=list(self.lora_model or []),
            lora_strengths=list(self.lora_strength or []) if self.lora_model else [], **self._images(),
        )

    def _images(self) -> dict[str, Any]:
        return {}


class Text2ImgBody(GenerationBody):
    """Text to image."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": EXAMPLES[Task.TEXT2IMG]})


class Img2ImgBody(GenerationBody):
    """Image to image: one or more init images (how many a model takes is its limit)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": EXAMPLES[Task.IMG2IMG]})
    task: ClassVar[Task] = Task.IMG2IMG

    init_image: Urls = Field(None, description="An image: an http(s) URL, a base64 data: URI or bare base64; or an "
                                               "array of them (FLUX.2 klein: up to 4 references, all used).")
    init_image_2: Text = Field(None, description="Flux Kontext: a second reference image URL.")
    strength: Float = Field(None, description="0-1: how much of the init image is repainted (default per model).")

    @model_validator(mode="after")
    def _check_init_images(self) -> Img2ImgBody:
        if not self.init_image:
            raise _refuse("init_image is required")
        for url in self.init_image:
            _check_url_length("init_image", url)
        _check_url_length("init_image_2", self.init_image_2)
        _check_range("strength", self.strength, 0, 1)
        return self

    def _images(self) -> dict[str, Any]:
        return {"init_images": list(self.init_image or []), "init_image_2": (self.init_image_2 or "").strip() or None,
                "strength": self.strength}


class InpaintBody(Img2ImgBody):
    """Inpainting: ``init_image`` is repainted where ``mask_image`` is white and kept where it is
    black (grey blends); the mask may have any size (it is resized to the image)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": EXAMPLES[Task.INPAINT]})
    task: ClassVar[Task] = Task.INPAINT

    mask_image: Text = Field(None, description="Required: the mask (http(s) URL, base64 data: URI or bare base64).")

    @model_validator(mode="after")
    def _check_mask(self) -> InpaintBody:
        if not (self.mask_image or "").strip():
            raise _refuse("mask_image is required")
        _check_url_length("mask_image", self.mask_image)
        return self

    def _images(self) -> dict[str, Any]:
        return {**super()._images(), "mask_image": (self.mask_image or "").strip()}


BODIES: dict[Task, type[GenerationBody]] = {Task.TEXT2IMG: Text2ImgBody, Task.IMG2IMG: Img2ImgBody,
                                             Task.INPAINT: InpaintBody}


class FetchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Text = None
    request_id: Int = Field(None, description="The id of the request.")
