"""The serving logic behind the generation routes: turn a validated request into a durable job,
then answer with its result, or "processing" once the wait bound passes."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fluxserve.api.answers import expired_body, failure_body, processing_body, success_body
from fluxserve.api.errors import ApiError
from fluxserve.api.paths import Action, PathFamily
from fluxserve.api.schemas import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, GenerationBody
from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.images import ImageInputError, decode_image, fetch_image_bytes
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import ApiKey, Job
from fluxserve.metrics import Metrics
from fluxserve.models import ModelSpec, Registry, UnknownModel, UnsuitableRequest
from fluxserve.params import SEED_MAX, GenerationRequest, ImageSource, JobParams, Upload
from fluxserve.png_encoding import encode_png
from fluxserve.storage.configs import StorageConfigs
from fluxserve.storage.local import LocalStorage

POLL_SECONDS = 1.0  # fallback polling when the worker runs elsewhere


@dataclass(frozen=True)
class StoredImage:
    """An input image decoded and kept under the data dir (``GenerationService._store_image``)."""

    name: str  # the file under the inputs dir: the SHA-256 of its PNG
    width: int
    height: int


@dataclass
class GenerationService:
    settings: Settings
    registry: Registry
    jobs: JobStore
    storage: LocalStorage
    inputs: LocalStorage
    events: JobEvents
    http: httpx.AsyncClient
    metrics: Metrics
    storage_configs: StorageConfigs | None = None

    # -- submission ---------------------------------------------------------------------------
    def choose_model(self, action: Action, model_id: str | None) -> ModelSpec:
        """The model an action serves: its own, or the body's ``model_id`` (else its default)."""
        if action.model is not None:
            return self.registry.get(action.model)
        sent = (model_id or "").strip() or action.default_model
        if not sent:
            raise ApiError(400, "model_id is required")
        try:
            return self.registry.resolve(sent, action.task)
        except UnsuitableRequest as exc:
            raise ApiError(exc.status, str(exc)) from None

    async def generate(self, key: ApiKey, family: PathFamily, action: Action, body: GenerationBody) -> JSONResponse:
        """A generation route's work: the model, the request, the job, the answer."""
        spec = self.choose_model(action, body.model_id)
        return await self.submit(key, body.to_request(family.server, spec.name), deploy_type=family.deploy_type_of(action))

    async def submit(self, key: ApiKey, request: GenerationRequest, *, deploy_type: str | None = None) -> JSONResponse:
        """Queue the request, then answer ModelsLab's way: its result if it is done within the
        wait bound, else ``processing`` (at once with ``instant_response``)."""
        job = await self.enqueue(key, request, deploy_type=deploy_type)
        if not request.instant_response:
            job = await self.wait_for(job.id, self.settings.sync_wait_seconds)
        return await self._answer(job)

    async def enqueue(self, key: ApiKey, request: GenerationRequest, *, deploy_type: str | None = None) -> Job:
        """The request as a durable queued job (every API's requests become jobs here): the model
        checked, the key's queue limit applied, the input images stored, the seeds drawn."""
        spec = self._model(request)
        await self._check_queue_limit(key)
        inputs = [await self._store_image(source) for source in request.init_images]
        input_2 = (await self._store_image(request.init_image_2)).name if request.init_image_2 else None
        mask = (await self._store_image(request.mask_image, what="mask", mask=request.mask_convention)).name \
            if request.mask_image else None
        params = self._resolve(request, spec, inputs, input_2, mask)
        if self.storage_configs is not None and not request.temp:  # temp: local, expiring, even with S3
            params.remote = await run_in_threadpool(self.storage_configs.for_job, key.id, deploy_type)
        file_prefix = str(uuid.uuid4())
        job = await run_in_threadpool(
            self.jobs.create, key_id=key.id, server=request.server, model=spec.name, task=request.task,
            params=params.to_dict(), meta=self._meta(request, spec, params, file_prefix), file_prefix=file_prefix,
            webhook=request.webhook, track_id=request.track_id, batch_key=spec.family.batch_key(params),
        )
        self.metrics.jobs_submitted.labels(spec.name).inc()
        self.events.job_queued()
        return job

    def _model(self, request: GenerationRequest) -> ModelSpec:
        """The request's model, if it can take the request's inputs (its family's limits)."""
        try:
            spec = self.registry.get(request.model)
            self.registry.check_inputs(spec, request.task, init_images=len(request.init_images),
                                       second_image=bool(request.init_image_2), mask=bool(request.mask_image))
        except UnknownModel:
            raise ApiError(404, f"Model not found: {request.model}") from None
        except UnsuitableRequest as exc:
            raise ApiError(exc.status, str(exc)) from None
        return spec

    async def _check_queue_limit(self, key: ApiKey) -> None:
        """ModelsLab's rule: a key may have a bounded number of unfinished requests (FIFO)."""
        limit = self.settings.max_queued_per_key
        queued = await run_in_threadpool(self.jobs.active_count, key.id)
        if queued >= limit:
            self.metrics.rejected.labels("queue_limit").inc()
            per_job = await run_in_threadpool(self.jobs.recent_generation_time) or 5.0
            raise ApiError(
                429, f"Rate limit exceeded. Maximum {limit} queued requests allowed.",
                retry_after=max(1, round(per_job * (queued - limit + 1))),
            )

    async def _store_image(self, source: ImageSource, what: str = "init image", mask: str | None = None) -> StoredImage:
        """Fetch an input image (a URL) or take it (an upload), then decode it (format sniffing,
        decompression bombs: ``images.decode_image``) and keep it under the data dir, so the job
        can be retried after a crash without fetching again. A mask (``mask`` names its
        convention, ``GenerationRequest.mask_convention``) is kept as white repaints, black keeps."""
        if isinstance(source, Upload):
            what = f"uploaded {what.removeprefix('init ')}"
        try:
            data = await self._image_bytes(source)
            decoded = await run_in_threadpool(decode_image, data, keep_alpha=mask == "alpha")
            png = await run_in_threadpool(encode_png, _as_mask(decoded, mask) if mask else decoded)
        except ImageInputError as exc:
            message = str(exc).replace("the init image", f"the {what}").replace("Init image", what.capitalize())
            raise ApiError(400, message) from None
        name = hashlib.sha256(png).hexdigest() + ".png"
        path = self.inputs.root / name
        if path.exists():
            os.utime(path)  # fresh again, so retention keeps it for this job
        else:
            await run_in_threadpool(self.inputs.save, name, png)
        return StoredImage(name, *decoded.size)

    async def _image_bytes(self, source: ImageSource) -> bytes:
        """An input's bytes, under the same size cap whether fetched or uploaded."""
        policy = self.settings.fetch_policy()
        if not isinstance(source, Upload):
            return await fetch_image_bytes(source, client=self.http, policy=policy)
        if len(source.data) > policy.max_bytes:
            raise ImageInputError(f"Init image too large: larger than {policy.max_bytes} bytes")
        return source.data

    @staticmethod
    def _resolve(request: GenerationRequest, spec: ModelSpec, inputs: list[StoredImage], input_2: str | None,
                 mask: str | None) -> JobParams:
        base_seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
        img2img = request.task != "text2img"  # image-to-image and inpainting start from an image
        if request.width is not None and request.height is not None:
            width, height = request.width, request.height
        else:  # the first image's size (text to image: 512²)
            width, height = fit_size(inputs[0].width, inputs[0].height) if inputs else (512, 512)
        return JobParams(
            model=spec.name, task=request.task, prompt=request.prompt, negative_prompt=request.negative_prompt,
            width=width, height=height,
            seeds=[(base_seed + i) % (SEED_MAX + 1) for i in range(request.samples)],
            steps=request.steps or spec.steps,
            guidance=spec.guidance if request.guidance is None else request.guidance,
            strength=(spec.strength if request.strength is None else request.strength) if img2img else None,
            true_cfg_scale=request.true_cfg_scale or spec.true_cfg_scale,
            inputs=[image.name for image in inputs], input_2=input_2, safety_checker=request.safety_checker,
            base64=request.base64,
            enhance_prompt=bool(request.enhance_prompt), mask=mask,
        )

    @staticmethod
    def _meta(request: GenerationRequest, spec: ModelSpec, params: JobParams, file_prefix: str) -> dict[str, Any]:
        yes_no = {True: "yes", False: "no"}
        meta: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "negative_prompt_applied": bool(
                params.negative_prompt and spec.negative_prompt_supported and params.true_cfg_scale > 1
            ),
            "model_id": spec.name,
            "width": params.width,
            "height": params.height,
            "n_samples": len(params.seeds),
            "seed": params.seeds[0],
            "seeds": params.seeds,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "safety_checker": yes_no[params.safety_checker],
            "base64": yes_no[params.base64],
            "instant_response": yes_no[request.instant_response],
            "temp": yes_no[request.temp],
            "enhance_prompt": yes_no[params.enhance_prompt],
            "file_prefix": file_prefix,
            "track_id": request.track_id,
        }
        if spec.negative_prompt_supported:
            meta["true_cfg_scale"] = params.true_cfg_scale
        if request.task != "text2img":
            meta["strength"] = params.strength
            sources = [str(source) for source in request.init_images]  # URLs, or "upload:<file name>"
            meta["init_image"] = sources[0] if len(sources) == 1 else sources
            if request.init_image_2:
                meta["init_image_2"] = request.init_image_2
            if request.mask_image:
                meta["mask_image"] = str(request.mask_image)
        return meta

    # -- answering ----------------------------------------------------------------------------
    async def fetch(self, key: ApiKey, job_id: int) -> JSONResponse:
        return await self._answer(await self.owned_job(key, job_id))

    async def owned_job(self, key: ApiKey, job_id: int) -> Job:
        job = await run_in_threadpool(self.jobs.get, job_id, key.id)
        if job is None:
            raise ApiError(404, "Request not found")
        return job

    async def cancel(self, key: ApiKey, job_id: int) -> JSONResponse:
        job = await self.owned_job(key, job_id)
        if await run_in_threadpool(self.jobs.cancel, job.id, key.id):
            self.events.job_changed(job.id)
            return JSONResponse({"status": "success", "id": job.id, "message": "Request cancelled"})
        current = await run_in_threadpool(self.jobs.get, job.id)
        assert current is not None  # found just above, and jobs are never deleted
        raise ApiError(409, f"Request {current.id} is {current.status}; only queued requests can be cancelled", id=current.id)

    async def wait_for(self, job_id: int, seconds: float) -> Job:
        """The job once it is finished (succeeded, failed, cancelled), or as it is after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            job = await run_in_threadpool(self.jobs.get, job_id)
            assert job is not None  # this request just created it, and jobs are never deleted
            remaining = deadline - time.monotonic()
            if JobStatus(job.status).is_terminal or remaining <= 0:
                return job
            await self.events.wait(job_id, min(remaining, POLL_SECONDS))

    async def _answer(self, job: Job) -> JSONResponse:
        status = JobStatus(job.status)
        if status is JobStatus.SUCCEEDED:
            webhook_status = await run_in_threadpool(self.jobs.webhook_status, job.id)
            if job.expired_at is not None and not job.output_urls:
                return JSONResponse(expired_body(job, webhook_status))
            try:
                body = await run_in_threadpool(success_body, job, self.storage, webhook_status)
            except FileNotFoundError:  # the local copy expired (or was deleted by hand)
                if not job.output_urls:
                    return JSONResponse(expired_body(job, webhook_status))
                body = success_body(job, self.storage, webhook_status, inline=False)  # S3 copies stay
            return JSONResponse(body)
        if status is JobStatus.FAILED:
            return JSONResponse(failure_body(job), status_code=500)
        if status is JobStatus.CANCELLED:
            return JSONResponse(failure_body(job), status_code=410)
        eta = await run_in_threadpool(self.eta, job)
        return JSONResponse(processing_body(job, self.storage, self.settings.base_url, eta))

    def eta(self, job: Job) -> float:
        per_job = self.jobs.recent_generation_time(job.model)
        if per_job is None:  # nothing measured yet: a rough guess from the step count
            per_job = 0.5 * job.params["steps"] * len(job.params["seeds"])
        return round((self.jobs.jobs_ahead(job.id) + 1) * per_job, 2)


def _as_mask(image, convention: str):
    """A mask as the engine reads it, white (255) repaints and black (0) keeps: its luminance, or
    (OpenAI's convention) white where it is fully transparent and black elsewhere."""
    if convention != "alpha":
        return image.convert("L")
    if "A" not in image.getbands():
        raise ImageInputError("The mask has no transparency: its fully transparent pixels (alpha 0) mark where to edit")
    return image.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)


def fit_size(width: int, height: int) -> tuple[int, int]:
    """A size within the service's limits with the aspect of ``width`` x ``height`` (as far as
    the limits allow): scaled down to fit, up to reach the smallest side, rounded to the multiple."""
    scale = max(min(1.0, MAX_SIDE / max(width, height)), MIN_SIDE / min(width, height))

    def side(value: int) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(value * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE))

    return side(width), side(height)
