"""The ModelsLab v7 image routes: what ``modelslab-cli`` (binary ``modelslab``) calls for
``generate image``, ``generate image-to-image`` and ``generate fetch``.

The CLI (0.2.2) sends the key both in a ``Key`` header and as the body's ``key``; ``model_id``
only when ``--model`` is given; ``width``/``height`` (default 1024) and ``samples`` (default 1)
always on text-to-image; ``init_image`` as one URL string and ``strength`` (default 0.7) on
image-to-image. It polls ``POST /api/v7/images/fetch/{id}`` until ``status`` is ``success``
(then downloads every URL in ``output``) or ``error``/``failed`` (then exits 1).

Two CLI habits shape the answers here:
* it retries a request that answered 5xx (up to 3 times: a retried submit would queue the job
  again), and while polling it treats ANY non-2xx answer as transient and keeps polling until
  its ``--timeout`` (default 5 minutes). So a job that failed or was cancelled is answered with
  HTTP 200 and the usual ``{"status": "error", ...}`` body, which the CLI reports and exits on.
  Refusals (401, 400, 404, 429, ...) keep their status codes.
* without ``--model`` it sends no ``model_id``: text-to-image then uses ``flux-klein`` and
  image-to-image ``flux-kontext-dev``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.routes import _job_id
from fluxserve.api.schemas import MAX_URL_CHARS, Float, KleinImg2ImgBody, Text, Text2ImgBody, _check_range, _refuse
from fluxserve.models import FLUX1, KLEIN, KONTEXT, REALTIME, Registry, UnknownModel
from fluxserve.params import GenerationRequest

v7 = APIRouter(prefix="/api/v7/images", tags=["v7"])

SERVER = "v7"  # job.server: names the fetch path (responses.FETCH_PATHS["v7"])

# Only the FLUX.2 klein pipeline generates from text alone; the others need an init image.
TEXT2IMG_PIPELINES = ("Flux2KleinPipeline",)

# ModelsLab model ids -> registry names (our own names are accepted as they are).
_KLEIN_IDS = {"flux-2-klein": KLEIN, "flux-2-klein-4b": KLEIN, "flux2-klein": KLEIN, "flux-klein-4b": KLEIN}
TEXT2IMG_ALIASES = {
    "": KLEIN,  # the CLI sends no model_id unless --model is given
    **_KLEIN_IDS,
}
IMG2IMG_ALIASES = {
    "": KONTEXT,  # editing by default
    "flux-kontext": KONTEXT,
    **_KLEIN_IDS,
}
# init images each model uses: klein takes up to 4 references, the others one (kontext: + init_image_2)
MAX_INIT_IMAGES = {KLEIN: 4, REALTIME: 1, FLUX1: 1, KONTEXT: 1}


def resolve_model(registry: Registry, model_id: str | None, aliases: dict[str, str],
                  pipelines: tuple[str, ...] = ()) -> str:
    """The registry name serving ``model_id`` on this route, or 404 ``Model not found: <model_id>``."""
    sent = (model_id or "").strip()
    name = aliases.get(sent.lower(), sent.lower())
    try:
        spec = registry.get(name)
    except UnknownModel:
        raise ApiError(404, f"Model not found: {sent}") from None
    if pipelines and spec.pipeline not in pipelines:  # e.g. "flux": FLUX.1 here is image-to-image only
        raise ApiError(404, f"Model not found: {sent} (text-to-image models here: flux-klein, realtime)")
    return spec.name


class V7Text2ImgBody(Text2ImgBody):
    """``POST /api/v7/images/text-to-image``."""

    model_id: Text = Field(None, description='"flux-klein" (default) or "realtime" (also "flux-2-klein", "flux-2-klein-4b").')
    guidance: Float = Field(None, description="0-20; same as guidance_scale (wins if both are sent).")
    scheduler: Text = Field(None, description="Accepted and ignored (FLUX uses its own scheduler).")

    @model_validator(mode="after")
    def _check_v7(self) -> "V7Text2ImgBody":
        _check_range("guidance", self.guidance, 0, 20)
        return self

    def to_v7_request(self, model: str) -> GenerationRequest:
        request = self._request(SERVER, model, "text2img")
        if self.guidance is not None:
            request.guidance = self.guidance
        return request


class V7Img2ImgBody(KleinImg2ImgBody):
    """``POST /api/v7/images/image-to-image``. Up to 4 init images pass validation (flux-klein's
    limit); the limit of the model that serves the request is checked in ``to_v7_request``."""

    model_id: Text = Field(None, description='"flux-kontext-dev" (default), "flux-klein", "realtime" or "flux".')
    init_image_2: Text = Field(None, description="flux-kontext-dev only: a second reference image URL.")
    guidance: Float = Field(None, description="0-20; same as guidance_scale (wins if both are sent).")

    @model_validator(mode="after")
    def _check_v7(self) -> "V7Img2ImgBody":
        _check_range("guidance", self.guidance, 0, 20)
        if self.init_image_2 and len(self.init_image_2) > MAX_URL_CHARS and not self.init_image_2.startswith("data:"):
            raise _refuse(f"init_image_2 URLs must be at most {MAX_URL_CHARS} characters")
        return self

    def to_v7_request(self, model: str) -> GenerationRequest:
        limit = MAX_INIT_IMAGES.get(model, 1)
        if len(self.init_image) > limit:
            raise ApiError(400, f"init_image accepts at most {limit} image URL(s) for {model}")
        second = (self.init_image_2 or "").strip() or None
        if second and model != KONTEXT:
            raise ApiError(400, f"init_image_2 is only supported by {KONTEXT}")
        request = self._request(SERVER, model, "img2img", init_images=self.init_image, init_image_2=second)
        if self.guidance is not None:
            request.guidance = self.guidance
        return request


def _for_cli(response: JSONResponse) -> JSONResponse:
    """A failed (500) or cancelled (410) job is a result, not a transport error: answer it with
    200 so the CLI reads ``status: error`` instead of retrying or polling until its timeout."""
    if response.status_code in (410, 500):
        response.status_code = 200
    return response


@v7.post("/text-to-image")
async def text_to_image(body: V7Text2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    model = resolve_model(services.generation.registry, body.model_id, TEXT2IMG_ALIASES, TEXT2IMG_PIPELINES)
    return _for_cli(await services.generation.submit(key, body.to_v7_request(model), pipelines=TEXT2IMG_PIPELINES))


@v7.post("/image-to-image")
async def image_to_image(body: V7Img2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    model = resolve_model(services.generation.registry, body.model_id, IMG2IMG_ALIASES)
    return _for_cli(await services.generation.submit(key, body.to_v7_request(model)))


@v7.post("/fetch/{job_id}")
async def fetch(job_id: str, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return _for_cli(await services.generation.fetch(key, _job_id(job_id)))
