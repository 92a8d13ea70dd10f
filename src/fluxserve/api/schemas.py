"""Request bodies, one per endpoint shape. Lenient about types (see ``lenient``), strict about
ranges, silent about unknown fields; each translates itself into a ``GenerationRequest``."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fluxserve.api import lenient
from fluxserve.models import FLUX1, KLEIN, KONTEXT, REALTIME
from fluxserve.params import SEED_MAX, GenerationRequest

Int = Annotated[int | None, BeforeValidator(lenient.to_int)]
Float = Annotated[float | None, BeforeValidator(lenient.to_float)]
Bool = Annotated[bool | None, BeforeValidator(lenient.to_bool)]
Text = Annotated[str | None, BeforeValidator(lenient.to_text)]
Urls = Annotated[list[str] | None, BeforeValidator(lenient.to_url_list)]

MIN_SIDE, MAX_SIDE = 256, 1024
MAX_PROMPT_CHARS = 8000  # far beyond what the text encoders read (512 tokens); bounds storage
MAX_LENGTHS = {"track_id": 200, "webhook": 2048, "model_id": 64}  # as stored
MAX_URL_CHARS = 8192  # http(s) init image URLs (data: URIs are bounded by the body size)


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_parameter", message)


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise _refuse(f"{name} must be between {low:.12g} and {high:.12g}")


class GenerationBody(BaseModel):
    """Fields every generation endpoint accepts."""

    model_config = ConfigDict(extra="ignore")

    key: Text = Field(None, description="API key (or send it in a `Key` header).")
    prompt: Text = Field(None, description="Required. What to generate.")
    negative_prompt: Text = None
    width: Int = Field(None, description="256-1024, a multiple of 8 (default 512).")
    height: Int = Field(None, description="256-1024, a multiple of 8 (default 512).")
    samples: Int = Field(None, description="Images to generate, 1-4 (default 1).")
    seed: Int = Field(None, description="null for random; the seed used is in meta.seed.")
    num_inference_steps: Int = Field(None, description="1-50 (default per model).")
    guidance_scale: Float = Field(None, description="0-20 (default per model).")
    strength: Float = Field(None, description="0-1, image-to-image only.")
    true_cfg_scale: Float = Field(None, description="FLUX.1 family: > 1 applies negative_prompt (2x cost).")
    safety_checker: Bool = None
    base64: Bool = None
    instant_response: Bool = None
    temp: Bool = None
    enhance_prompt: Bool = None
    webhook: Text = None
    track_id: Text = None

    @model_validator(mode="after")
    def _check_limits(self) -> "GenerationBody":
        if not self.prompt or not self.prompt.strip():
            raise _refuse("prompt is required")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name) or "") > MAX_PROMPT_CHARS:
                raise _refuse(f"{name} is too long (at most {MAX_PROMPT_CHARS} characters)")
        for name, limit in MAX_LENGTHS.items():
            if len(getattr(self, name, None) or "") > limit:
                raise _refuse(f"{name} is too long (at most {limit} characters)")
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is None:
                continue
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise _refuse(f"{side} must be between {MIN_SIDE} and {MAX_SIDE}")
            if value % 8:
                raise _refuse(f"{side} must be divisible by 8")
        _check_range("samples", self.samples, 1, 4)
        _check_range("seed", self.seed, 0, SEED_MAX)
        _check_range("num_inference_steps", self.num_inference_steps, 1, 50)
        _check_range("guidance_scale", self.guidance_scale, 0, 20)
        _check_range("strength", self.strength, 0, 1)
        _check_range("true_cfg_scale", self.true_cfg_scale, 1, 20)
        if self.webhook is not None:
            self.webhook = self.webhook.strip() or None
        if self.webhook and urlsplit(self.webhook).scheme.lower() not in ("http", "https"):
            raise _refuse("webhook must be an http or https URL")
        return self

    def _request(self, server: str, model: str, task: str, **extra: Any) -> GenerationRequest:
        return GenerationRequest(
            server=server, model=model, task=task, prompt=self.prompt.strip(),
            negative_prompt=self.negative_prompt or None,
            width=self.width or 512, height=self.height or 512, samples=self.samples or 1,
            seed=self.seed, steps=self.num_inference_steps, guidance=self.guidance_scale,
            strength=self.strength, true_cfg_scale=self.true_cfg_scale,
            safety_checker=True if self.safety_checker is None else self.safety_checker,
            base64=bool(self.base64), instant_response=bool(self.instant_response),
            temp=bool(self.temp), enhance_prompt=self.enhance_prompt, track_id=self.track_id,
            webhook=self.webhook, **extra,
        )


class Text2ImgBody(GenerationBody):
    """FLUX.2 klein text-to-image (flux_klein and realtime servers)."""

    def to_request(self, server: str) -> GenerationRequest:
        model = REALTIME if server.endswith("realtime") else KLEIN
        return self._request(server, model, "text2img")


class _InitImageBody(GenerationBody):
    init_image: Urls = Field(None, description="Image URL (http, https or a base64 data: URI).")
    max_init_images: ClassVar[int] = 1

    @model_validator(mode="after")
    def _check_init_images(self) -> "_InitImageBody":
        if not self.init_image:
            raise _refuse("init_image is required")
        if any(len(url) > MAX_URL_CHARS and not url.startswith("data:") for url in self.init_image):
            raise _refuse(f"init_image URLs must be at most {MAX_URL_CHARS} characters")
        if len(self.init_image) > self.max_init_images:
            raise _refuse(f"init_image accepts at most {self.max_init_images} image URL(s)")
        return self


class KleinImg2ImgBody(_InitImageBody):
    """FLUX.2 klein editing: 1-4 reference images, all used."""

    init_image: Urls = Field(None, description="An image URL or an array of 1-4 URLs, all used as references.")
    max_init_images: ClassVar[int] = 4

    def to_request(self, server: str) -> GenerationRequest:
        return self._request(server, KLEIN, "img2img", init_images=self.init_image)


class RealtimeImg2ImgBody(_InitImageBody):
    def to_request(self, server: str) -> GenerationRequest:
        return self._request(server, REALTIME, "img2img", init_images=self.init_image)


class FluxImg2ImgBody(_InitImageBody):
    def to_request(self, server: str) -> GenerationRequest:
        return self._request(server, FLUX1, "img2img", init_images=self.init_image)


class KontextBody(_InitImageBody):
    """Flux Kontext editing (v6 images/img2img)."""

    model_id: Text = Field(None, description='Required: "flux-kontext-dev".')
    init_image_2: Text = Field(None, description="Optional second reference image URL.")
    guidance: Float = Field(None, description="0-20 (default 2.5). guidance_scale is accepted too.")

    @model_validator(mode="after")
    def _check_kontext(self) -> "KontextBody":
        if not self.model_id:
            raise _refuse("model_id is required")
        if len(self.model_id) > MAX_LENGTHS["model_id"]:
            raise _refuse(f"model_id is too long (at most {MAX_LENGTHS['model_id']} characters)")
        if self.init_image_2 and len(self.init_image_2) > MAX_URL_CHARS and not self.init_image_2.startswith("data:"):
            raise _refuse(f"init_image_2 URLs must be at most {MAX_URL_CHARS} characters")
        _check_range("guidance", self.guidance, 0, 20)
        return self

    def to_request(self, server: str) -> GenerationRequest:
        request = self._request(
            server, self.model_id, "img2img", init_images=self.init_image,
            init_image_2=(self.init_image_2 or "").strip() or None,
        )
        if self.guidance is not None:
            request.guidance = self.guidance
        return request


class FetchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Text = None
    request_id: Int = Field(None, description="The id of the request (for /api/v6/images/fetch).")


KONTEXT_MODEL_IDS = (KONTEXT,)
