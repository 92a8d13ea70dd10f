"""The OpenAI Images API: ``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart)
and ``GET /v1/models``, as the OpenAI SDKs and the tools built on them (LiteLLM, Open WebUI,
SillyTavern, ...) call them, authenticated with ``Authorization: Bearer <key>``.

Thin like ``api.modelslab``: a request's fields are checked by the ModelsLab text-to-image body
(``api.schemas.Text2ImgBody``: one set of rules for sizes, counts, steps, prompts), which makes
the ordinary ``GenerationRequest``; ``GenerationService.enqueue`` turns it into a job with
``server="openai"``, so it is durable, counted by the key's queue limit, seen and cancelled by
the admin endpoints and stored like any other. OpenAI clients expect the images in the answer:
the route waits for the job (``FLUXSERVE_OPENAI_WAIT_SECONDS``) and answers OpenAI's shape
(``contract.OpenAIImagesAnswer``). Refusals are OpenAI-shaped because ``errors.render_error``
renders everything under ``/v1/`` that way.

(No ``from __future__ import annotations``: FastAPI reads the route functions' annotations.)
"""

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fluxserve.api.answers import fetch_url, output_links
from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.generation import GenerationService
from fluxserve.api.modelslab import IdempotencyHeader
from fluxserve.api.paths import OPENAI_DEFAULT_MODEL, OPENAI_SERVER
from fluxserve.api.schemas import Bool, Float, Int, Text, Text2ImgBody
from fluxserve.contract import (
    OPENAI_ERROR_STATUSES,
    OpenAIErrorAnswer,
    OpenAIImage,
    OpenAIImagesAnswer,
    OpenAIModel,
    OpenAIModelList,
)
from fluxserve.dependencies import transient_dependency
from fluxserve.engine.families.base import Task
from fluxserve.images import to_base64
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import ApiKey, Job
from fluxserve.models import TASK_WORDS, ModelSpec, Registry, UnknownModel
from fluxserve.params import GenerationRequest, Upload

SERVER = OPENAI_SERVER  # job.server of every request taken here
DEFAULT_MODEL = OPENAI_DEFAULT_MODEL  # text to image, editing with 1-4 images and inpainting; the fastest
RESPONSE_FORMATS = ("url", "b64_json")
DEPLOY_TYPES = {Task.TEXT2IMG: "text_to_image", Task.IMG2IMG: "image_editing", Task.INPAINT: "image_editing"}
NO_RETRY = {"x-should-retry": "false"}  # the OpenAI SDKs retry 5xx: a retry would queue the same work again
STARTED = int(time.time())  # "created" of the served models
MAX_FILENAME_CHARS = 200  # of an upload's name, as meta records it

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["OpenAI Images API"],
                   dependencies=[Depends(HTTPBearer(auto_error=False, description="A fluxserve API key"))])


def _responses(*statuses: int, ok: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    answers: dict[int | str, dict[str, Any]] = {200: {"model": ok, "description": description}}
    for status in statuses:
        answers[status] = {"model": OpenAIErrorAnswer, "description": OPENAI_ERROR_STATUSES[status]}
    return answers


IMAGES_RESPONSES = _responses(400, 401, 404, 408, 409, 410, 413, 429, 500, 503, 504, ok=OpenAIImagesAnswer,
                              description="The images: `url` or `b64_json` (PNG) per `response_format`")


# -- the fields both image routes take ------------------------------------------------------------
class ImageFields(BaseModel):
    """OpenAI's fields, and fluxserve's extensions (``seed``, ``negative_prompt``, ...). Unknown
    fields (``background``, ``output_format``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": {
        "model": DEFAULT_MODEL, "prompt": "a lighthouse on a cliff at dawn", "n": 1, "size": "512x512",
        "response_format": "url", "seed": 7}})

    prompt: Text = Field(None, description="Required. What to generate.")
    model: Text = Field(None, description=f"A served model name or alias, any case (default `{DEFAULT_MODEL}`; "
                                          "`GET /v1/models` lists them).")
    n: Int = Field(None, description="Images to generate, 1-4 (default 1).")
    size: Text = Field(None, description="`WxH`, each side 256-1024 and a multiple of 8, or `auto` (default): "
                                         "512x512, or for edits the first image's size fitted to those limits.")
    response_format: Text = Field(None, description="`url` (default) or `b64_json`.")
    seed: Int = Field(None, description="Extension: the first image's seed (image i uses seed + i); random if absent.")
    negative_prompt: Text = Field(None, description="Extension: applied by the FLUX.1 models with true_cfg_scale > 1.")
    num_inference_steps: Int = Field(None, description="Extension: 1-50 (default per model).")
    guidance_scale: Float = Field(None, description="Extension: 0-20 (default per model).")
    enhance_prompt: Bool = Field(None, description="Extension: rewrite the prompt first; the prompt used is "
                                                   "`revised_prompt`.")
    user: Text = Field(None, description="Accepted and ignored.")
    quality: Text = Field(None, description="Accepted and ignored.")
    style: Text = Field(None, description="Accepted and ignored.")
    stream: Bool = Field(None, description="Not supported: `true` is refused.")


def _choose_model(registry: Registry, name: str | None, task: Task) -> ModelSpec:
    """The model ``name`` names (aliases, any case), if it can do ``task``; the default when absent."""
    able = registry.for_task(task)
    sent = (name or "").strip() or (DEFAULT_MODEL if DEFAULT_MODEL in able else next(iter(able), DEFAULT_MODEL))
    try:
        spec = registry.get(sent)
    except UnknownModel:
        raise ApiError(404, f"The model '{sent}' does not exist here; served models: {', '.join(registry.names())}",
                       param="model", code="model_not_found") from None
    if not spec.supports(task):
        raise ApiError(400, f"The model '{sent}' can't do {TASK_WORDS[task]}; models that can: {', '.join(able)}",
                       param="model", code="model_not_supported")
    return spec


def _size(size: str | None) -> tuple[int | None, int | None]:
    """``WxH`` as two numbers (checked against the limits by the ModelsLab body), ``auto`` as none."""
    text = (size or "").strip().lower()
    if text in ("", "auto"):
        return None, None
    width, x, height = text.partition("x")
    if not x or not width.strip().isdigit() or not height.strip().isdigit():
        raise ApiError(400, f"Invalid size '{size}': use WxH (e.g. 512x512) or auto", param="size")
    return int(width), int(height)


#: ModelsLab body fields -> the OpenAI field that set them (for refusals: ``param`` and the message)
_OPENAI_NAMES = {"samples": "n", "width": "size", "height": "size"}


def _refusal(exc: ValidationError, size: str | None) -> ApiError:
    """A ModelsLab body's complaint in OpenAI's words (``samples`` is ``n``; a side is ``size``)."""
    error = exc.errors()[0]
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else message.split(" ", 1)[0]
    param = _OPENAI_NAMES.get(field, field)
    if param == "size":
        return ApiError(400, f"Invalid size '{size}': {message}", param="size")
    if field in _OPENAI_NAMES:
        message = param + message.removeprefix(field)
    return ApiError(400, message, param=param)


def _request(fields: ImageFields, spec: ModelSpec, task: Task) -> tuple[GenerationRequest, bool]:
    """The fields as an ordinary request for ``spec`` (images added by the caller), and whether
    the answer inlines the images (``b64_json``)."""
    if fields.stream:
        raise ApiError(400, "stream is not supported: the answer holds the finished images", param="stream")
    response_format = (fields.response_format or "url").strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"Invalid response_format '{fields.response_format}': use url or b64_json",
                       param="response_format")
    width, height = _size(fields.size)
    try:
        body = Text2ImgBody(prompt=fields.prompt, negative_prompt=fields.negative_prompt, width=width, height=height,
                            samples=fields.n, seed=fields.seed, num_inference_steps=fields.num_inference_steps,
                            guidance_scale=fields.guidance_scale, enhance_prompt=fields.enhance_prompt)
    except ValidationError as exc:
        raise _refusal(exc, fields.size) from None
    problem = body.size_problem()  # ModelsLab's sizes outside the realtime paths: 256-1024, multiples of 8
    if problem:
        raise ApiError(400, f"Invalid size '{fields.size}': {problem}", param="size")
    request = replace(body.to_request(SERVER, spec.name), task=task.value, width=width, height=height)
    return request, response_format == "b64_json"


# -- waiting and answering ----------------------------------------------------------------------
async def _generate(generation: GenerationService, key: ApiKey, request: GenerationRequest, inline: bool,
                    task: Task, idempotency_key: str | None) -> JSONResponse:
    job, replayed = await generation.enqueue(key, request, deploy_type=DEPLOY_TYPES[task],
                                             idempotency_key=idempotency_key)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    wait = generation.settings.openai_wait_seconds
    where = fetch_url(generation.settings.base_url, job)
    # the job is committed: a failure from here on must not make the client send it again
    try:
        job = await generation.wait_for(job.id, wait)
        images = await run_in_threadpool(_images, generation, job, inline) \
            if job.status == JobStatus.SUCCEEDED.value else None
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away while waiting
        if transient_dependency(exc) is None:
            log.exception("answering job %s failed", job.id)
        raise ApiError(503, f"Request {job.id} was queued, but its state can't be read now; fetch it later with POST "
                            f"{where}", headers={**NO_RETRY, **headers}) from None
    status = JobStatus(job.status)
    if images is not None:
        return JSONResponse(OpenAIImagesAnswer(created=_unix(job.created_at), data=images).body(), headers=headers)
    if status is JobStatus.FAILED:
        raise ApiError(500, job.error or "Generation failed", code="generation_failed", headers={**NO_RETRY, **headers})
    if status is JobStatus.CANCELLED:
        raise ApiError(410, f"Request {job.id}: {job.error or 'Request was cancelled'}", code="request_cancelled",
                       headers={**NO_RETRY, **headers})
    raise ApiError(504, f"The images were not ready within {wait:g} seconds: request {job.id} is still {job.status}; "
                        f"fetch it with POST {where} (body {{\"key\": YOUR_KEY}}), or send the request again with the "
                        "same Idempotency-Key header to wait for it again", code="timeout", headers={**NO_RETRY, **headers})


def _images(generation: GenerationService, job: Job, inline: bool) -> list[OpenAIImage]:
    meta = job.meta or {}
    revised = meta.get("prompt") if meta.get("enhance_prompt_status") == "ok" else None
    if inline:
        return [OpenAIImage(b64_json=to_base64(generation.storage.read(name)), revised_prompt=revised)
                for name in job.output_names()]
    return [OpenAIImage(url=url, revised_prompt=revised) for url in output_links(job, generation.storage)]


def _unix(moment: datetime) -> int:
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())


# -- the routes ------------------------------------------------------------------------------------
@router.post("/images/generations", summary="Create images from a prompt (OpenAI)", responses=IMAGES_RESPONSES)
async def generations(fields: ImageFields, key: AuthKey, services: ServicesDep,
                      idempotency_key: IdempotencyHeader = None) -> JSONResponse:
    """OpenAI's `images.generate`: text to image with a served model. Waits for the images (up to
    `FLUXSERVE_OPENAI_WAIT_SECONDS`); the request is an ordinary job (its id is in a 504's message)."""
    generation = services.generation
    spec = _choose_model(generation.registry, fields.model, Task.TEXT2IMG)
    request, inline = _request(fields, spec, Task.TEXT2IMG)
    return await _generate(generation, key, request, inline, Task.TEXT2IMG, idempotency_key)


@router.post("/images/edits", summary="Edit images, or inpaint with a mask (OpenAI)", responses=IMAGES_RESPONSES)
async def edits(
    key: AuthKey,
    services: ServicesDep,
    idempotency_key: IdempotencyHeader = None,
    prompt: Annotated[str | None, Form(description="Required. The edit to make.")] = None,
    image: Annotated[list[UploadFile] | None, File(description="The image to edit; several as repeated `image` "
                                                               "fields (or `image[]`, as the OpenAI SDKs send a "
                                                               "list): FLUX.2 klein takes up to 4, others 1.")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="Several images (the OpenAI "
                                                                                   "SDKs' list form).")] = None,
    mask: Annotated[UploadFile | None, File(description="Optional: a PNG with alpha whose fully transparent pixels "
                                                        "mark where to edit (inpainting of the first image); "
                                                        "without it, image to image.")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[str | None, Form()] = None,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[str | None, Form()] = None,
    seed: Annotated[str | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    num_inference_steps: Annotated[str | None, Form()] = None,
    guidance_scale: Annotated[str | None, Form()] = None,
    enhance_prompt: Annotated[str | None, Form()] = None,
    stream: Annotated[str | None, Form()] = None,
) -> JSONResponse:
    """OpenAI's `images.edit` (multipart): the images are references for the model's editing, or
    with `mask` the first one is inpainted where the mask is transparent and kept elsewhere.
    Uploads are decoded with the same defences as init images and stored like them."""
    try:
        fields = ImageFields(prompt=prompt, model=model, n=n, size=size, response_format=response_format, seed=seed,
                             negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, enhance_prompt=enhance_prompt, stream=stream)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    files = [*(image or []), *(images or [])]
    if not files:
        raise ApiError(400, "image is required", param="image")
    task = Task.INPAINT if mask is not None else Task.IMG2IMG
    generation = services.generation
    spec = _choose_model(generation.registry, fields.model, task)
    if len(files) > spec.init_image_limit:
        takers = [s.name for s in generation.registry.specs() if s.supports(task) and s.init_image_limit >= len(files)]
        raise ApiError(400, f"{spec.name} takes at most {spec.init_image_limit} image(s), not {len(files)}"
                            + (f"; models that take {len(files)}: {', '.join(takers)}" if takers else ""), param="image")
    request, inline = _request(fields, spec, task)
    uploads: list[str | Upload] = [await _upload(file) for file in files]
    request = replace(request, init_images=uploads, mask_image=await _upload(mask) if mask else None,
                      mask_convention="alpha")
    return await _generate(generation, key, request, inline, task, idempotency_key)


async def _upload(file: UploadFile) -> Upload:
    """The file's bytes, and its name as meta records it (printable, bounded: it is the client's text)."""
    name = "".join(ch for ch in (file.filename or "") if ch.isprintable())[-MAX_FILENAME_CHARS:]
    return Upload(await file.read(), name)


@router.get("/models", summary="The served models (OpenAI)", response_model=OpenAIModelList,
            responses={401: {"model": OpenAIErrorAnswer, "description": OPENAI_ERROR_STATUSES[401]}})
async def models(_key: AuthKey, services: ServicesDep) -> OpenAIModelList:
    """Every served model's name (what `model` takes; aliases are accepted there too)."""
    return OpenAIModelList(data=[OpenAIModel(id=name, created=STARTED) for name in services.generation.registry.names()])


@router.get("/models/{model}", summary="One served model (OpenAI)", response_model=OpenAIModel,
            responses={status: {"model": OpenAIErrorAnswer, "description": OPENAI_ERROR_STATUSES[status]}
                       for status in (401, 404)})
async def model_info(model: str, _key: AuthKey, services: ServicesDep) -> OpenAIModel:
    try:
        spec = services.generation.registry.get(model)
    except UnknownModel:
        raise ApiError(404, f"The model '{model}' does not exist here", param="model", code="model_not_found") from None
    return OpenAIModel(id=spec.name, created=STARTED)
