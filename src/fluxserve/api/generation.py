"""The serving logic behind the generation routes: turn a validated request into a durable job,
then answer with its result, or "processing" once the wait bound passes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fluxserve.api.answers import expired_body, failure_body, processing_body, success_body
from fluxserve.api.errors import ApiError
from fluxserve.api.own_outputs import read_own_output
from fluxserve.api.paths import Action, PathFamily
from fluxserve.api.schemas import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, GenerationBody
from fluxserve.config import Settings
from fluxserve.dependencies import Dependency, Health, transient_dependency
from fluxserve.events import JobEvents
from fluxserve.images import ImageInputError, decode_image, fetch_image_bytes
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import IdempotencyConflict, JobStore
from fluxserve.jobs.tables import ApiKey, Job
from fluxserve.loras import LoraCatalog, UnknownLora
from fluxserve.metrics import Metrics
from fluxserve.models import ModelSpec, Registry, UnknownModel, UnsuitableRequest
from fluxserve.params import SEED_MAX, GenerationRequest, ImageSource, JobParams, Upload
from fluxserve.png_encoding import encode_png
from fluxserve.storage.configs import StorageConfigs
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.s3 import UploadError

POLL_SECONDS = 1.0  # fallback polling when the worker runs elsewhere and no listener pushes changes
RETRY_AFTER_SECONDS = 10  # what a 503 asks clients to wait
log = logging.getLogger(__name__)


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
    health: Health = field(default_factory=Health)  # what this process found away
    dependency_status: Callable[[], dict[str, Any]] = lambda: {}  # what the worker found away
    live_workers: Callable[[str], int] = lambda model: 1  # workers of the cluster claiming this model's jobs

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

    async def generate(self, key: ApiKey, family: PathFamily, action: Action, body: GenerationBody,
                       idempotency_key: str | None = None) -> JSONResponse:
        """A generation route's work: the model, the request, the job, the answer."""
        problem = body.size_problem(family.min_side, family.side_multiple)
        if problem:
            raise ApiError(400, problem)
        spec = self.choose_model(action, body.model_id)
        return await self.submit(key, body.to_request(family.server, spec.name), deploy_type=family.deploy_type_of(action),
                                 idempotency_key=idempotency_key)

    async def submit(self, key: ApiKey, request: GenerationRequest, *, deploy_type: str | None = None,
                     idempotency_key: str | None = None) -> JSONResponse:
        """Queue the request (``enqueue``), then answer ModelsLab's way: its result if it is done
        within the wait bound, else ``processing`` (at once with ``instant_response``). A request
        sent again with the same idempotency key gets the first one's job and answer."""
        job, replayed = await self.enqueue(key, request, deploy_type=deploy_type, idempotency_key=idempotency_key)
        # the job is committed: from here on the answer never fails (the client would send it again)
        try:
            if not request.instant_response:
                job = await self.wait_for(job.id, self.settings.sync_wait_seconds)
            answer = await self._answer(job)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away while waiting
            if transient_dependency(exc) is None:
                log.exception("answering job %s failed; answering processing", job.id)
            answer = JSONResponse(processing_body(job, self.storage, self.settings.base_url, self._rough_eta(job)))
        if replayed:
            answer.headers["Idempotent-Replayed"] = "true"
        return answer

    async def enqueue(self, key: ApiKey, request: GenerationRequest, *, deploy_type: str | None = None,
                      idempotency_key: str | None = None) -> tuple[Job, bool]:
        """The request as a durable queued job (every API's requests become jobs here): the model
        checked, the key's queue limit applied, the input images stored, the seeds drawn. With an
        idempotency key (the client's ``Idempotency-Key`` header, or opt-in its ``track_id``), a
        request sent again gets the first one's job instead of a new one, and ``True`` (Stripe's
        rules: same key and same request: that job; same key, another request: 409)."""
        spec = self._model(request)
        idempotency = self._idempotency(request, deploy_type, idempotency_key)
        if idempotency is not None:
            earlier = await run_in_threadpool(self.jobs.idempotent_job, key.id, *idempotency)
            if earlier is not None:
                return await self._earlier_job(earlier), True
        self._refuse_while_away(Dependency.DISK)
        await self._check_queue_limit(key)
        inputs = [await self._store_image(source) for source in request.init_images]
        input_2 = (await self._store_image(request.init_image_2)).name if request.init_image_2 else None
        mask = (await self._store_image(request.mask_image, what="mask", mask=request.mask_convention)).name \
            if request.mask_image else None
        params = self._resolve(request, spec, inputs, input_2, mask)
        params.base64_inline = request.base64 and self.settings.base64_inline
        if self.storage_configs is not None and not request.temp:  # temp: local, expiring, even with S3
            params.remote = await run_in_threadpool(self.storage_configs.for_job, key.id, deploy_type)
            if params.remote:
                self._refuse_while_away(Dependency.OBJECT_STORE)
        file_prefix = str(uuid.uuid4())
        try:
            job = await run_in_threadpool(
                self.jobs.create, key_id=key.id, server=request.server, model=spec.name, task=request.task,
                params=params.to_dict(), meta=self._meta(request, spec, params, file_prefix), file_prefix=file_prefix,
                webhook=request.webhook, track_id=request.track_id, batch_key=spec.family.batch_key(params),
                idempotency=idempotency,
            )
        except IdempotencyConflict as twin:  # the same key sent concurrently: the other one won
            return await self._earlier_job(twin), True
        self.health.up(Dependency.DATABASE)  # it took the job: it is there
        self.metrics.jobs_submitted.labels(spec.name).inc()
        self.events.job_queued()
        return job, False

    async def _earlier_job(self, earlier: IdempotencyConflict) -> Job:
        """The job an idempotency key already names, if this is the same request (else 409)."""
        if not earlier.same_request:
            raise ApiError(409, "Idempotency-Key was already used with a different request; use a new key",
                           id=earlier.job_id)
        job = await run_in_threadpool(self.jobs.get, earlier.job_id)
        assert job is not None  # its idempotency key references it
        return job

    def _idempotency(self, request: GenerationRequest, deploy_type: str | None,
                     header: str | None) -> tuple[str, str] | None:
        """(key, hash of the request as parsed) when the request is to be idempotent."""
        value = (header or "").strip()
        if not value and self.settings.idempotent_track_id and request.track_id:
            value = f"track_id:{request.track_id}"
        if not value:
            return None
        if len(value) > 255 or not value.isprintable() or not value.isascii():
            raise ApiError(400, "Idempotency-Key must be 1-255 printable ASCII characters")
        # uploaded images count by their content (hashed), not as their bytes spelled out
        images = {"init_images": [_fingerprint(source) for source in request.init_images],
                  "mask_image": _fingerprint(request.mask_image) if request.mask_image else None}
        fields = {**asdict(replace(request, init_images=[], mask_image=None)), **images}
        canonical = json.dumps({"request": fields, "deploy_type": deploy_type}, sort_keys=True, default=str)
        return value, hashlib.sha256(canonical.encode()).hexdigest()

    def _refuse_while_away(self, dependency: Dependency) -> None:
        """503 with a retry hint while ``dependency`` is away (the worker or this process found
        it so): a job accepted now could only wait."""
        away = {**self.dependency_status(), **self.health.snapshot()}
        if dependency.value in away:
            raise ApiError(503, "Service temporarily unavailable", retry_after=RETRY_AFTER_SECONDS,
                           reason=f"{dependency.value} unavailable: {away[dependency.value]['reason']}")

    @staticmethod
    def _rough_eta(job: Job) -> float:
        """A guess that needs no database: half a second per step and image."""
        return round(0.5 * job.params["steps"] * len(job.params["seeds"]), 2)

    def _model(self, request: GenerationRequest) -> ModelSpec:
        """The request's model, if it can take the request's inputs (its family's limits) and
        every LoRA adapter it names is offered here."""
        try:
            spec = self.registry.get(request.model)
            self.registry.check_inputs(spec, request.task, init_images=len(request.init_images),
                                       second_image=bool(request.init_image_2), mask=bool(request.mask_image),
                                       loras=bool(request.loras))
            LoraCatalog.from_settings(self.settings).check(request.loras)
        except UnknownModel:
            raise ApiError(404, f"Model not found: {request.model}") from None
        except (UnsuitableRequest, UnknownLora) as exc:
            raise ApiError(getattr(exc, "status", 400), str(exc)) from None
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
        try:
            if path.exists():
                os.utime(path)  # fresh again, so retention keeps it for this job
            else:
                await run_in_threadpool(self.inputs.save, name, png)
        except OSError as exc:
            if transient_dependency(exc) is None:
                raise
            self.health.down(Dependency.DISK, f"{type(exc).__name__}: {exc}")
            raise ApiError(503, "Service temporarily unavailable", retry_after=RETRY_AFTER_SECONDS,
                           reason="disk unavailable: the input image could not be stored") from None
        self.health.up(Dependency.DISK)
        await self._share_input(name, png)
        return StoredImage(name, *decoded.size)

    async def _share_input(self, name: str, png: bytes) -> None:
        """With a server-wide bucket, the input goes there too (``storage.shared``): the worker
        that claims the job may run on another node. Written every time, not only when missing:
        the upload's date is what keeps it from retention while the job waits."""
        shared = self.storage_configs.shared if self.storage_configs is not None else None
        if shared is None:
            return
        try:
            await run_in_threadpool(shared.inputs.save, name, png)
        except UploadError as exc:
            if exc.transient_dependency is not None:
                self.health.down(Dependency.OBJECT_STORE, str(exc))
            raise ApiError(503, "Service temporarily unavailable", retry_after=RETRY_AFTER_SECONDS,
                           reason=f"object_store unavailable: the input image could not be stored: {exc}") from None
        self.health.up(Dependency.OBJECT_STORE)

    async def _image_bytes(self, source: ImageSource) -> bytes:
        """An input's bytes, under the same size cap whether fetched or uploaded."""
        policy = self.settings.fetch_policy()
        if not isinstance(source, Upload):
            own = await run_in_threadpool(read_own_output, self.storage, source, policy.max_bytes)
            if own is not None:  # one of our outputs: read from disk, not fetched (own_outputs)
                return own
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
            loras=list(request.loras), lora_strengths=list(request.lora_strengths),
        )

    @staticmethod
    def _meta(request: GenerationRequest, spec: ModelSpec, params: JobParams, file_prefix: str) -> dict[str, Any]:
        yes_no = {True: "yes", False: "no"}
        meta: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt or "",  # a string, as ModelsLab's typed clients expect
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
            "webhook": request.webhook,
            # fields ModelsLab's meta carries, as they are here: flagged images are blacked out, no
            # watermark is added, outputs are files under outputs/, prompts are rewritten without a style
            "safety_checker_type": "black",
            "watermark": "no",
            "outdir": "outputs",
            "enhance_style": None,
        }
        if spec.negative_prompt_supported:
            meta["true_cfg_scale"] = params.true_cfg_scale
        if params.loras:  # applied as listed, or the job fails saying why
            meta["lora_model"] = list(params.loras)
            meta["lora_strength"] = list(params.lora_strengths)
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
            if JobStatus(job.status).is_terminal or remaining <= 0 or self.events.closing.is_set():
                return job  # a server that is stopping answers processing now
            await self.events.wait(job_id, min(remaining, self.events.poll_seconds(POLL_SECONDS)))

    async def _answer(self, job: Job) -> JSONResponse:
        status = JobStatus(job.status)
        if status is JobStatus.SUCCEEDED:
            webhook_status = await run_in_threadpool(self.jobs.webhook_status, job.id)
            if job.expired_at is not None and not self._kept_elsewhere(job):
                return JSONResponse(expired_body(job, webhook_status))
            try:
                body = await run_in_threadpool(success_body, job, self.storage, webhook_status)
            except FileNotFoundError:  # the local copy expired (or was deleted by hand)
                if not self._kept_elsewhere(job):
                    return JSONResponse(expired_body(job, webhook_status))
                body = success_body(job, self.storage, webhook_status, inline=False)  # S3 copies stay
            return JSONResponse(body)
        if status in (JobStatus.FAILED, JobStatus.CANCELLED):  # served: the job failed (HTTP 200, as ModelsLab)
            return JSONResponse(failure_body(job))
        eta = await run_in_threadpool(self.eta, job)
        return JSONResponse(processing_body(job, self.storage, self.settings.base_url, eta))

    def _kept_elsewhere(self, job: Job) -> bool:
        """Whether a job's images outlive retention: uploaded to a key's own bucket (retention
        deletes only the server's copies, which include a server-wide bucket's objects)."""
        if not job.output_urls:
            return False
        shared = self.storage_configs.shared if self.storage_configs is not None else None
        return shared is None or not shared.holds_uploads_of(job.params.get("remote"))

    def eta(self, job: Job) -> float:
        per_job = self.jobs.recent_generation_time(job.model)
        if per_job is None:  # nothing measured yet: a rough guess from the step count
            per_job = 0.5 * job.params["steps"] * len(job.params["seeds"])
        # the jobs ahead spread over the live workers that claim this model (at least one: a
        # worker that is starting, or none yet, still means the job waits its turn)
        workers = max(1, self.live_workers(job.model))
        return round(math.ceil((self.jobs.jobs_ahead(job.id) + 1) / workers) * per_job, 2)


def _as_mask(image, convention: str):
    """A mask as the engine reads it, white (255) repaints and black (0) keeps: its luminance, or
    (OpenAI's convention) white where it is fully transparent and black elsewhere."""
    if convention != "alpha":
        return image.convert("L")
    if "A" not in image.getbands():
        raise ImageInputError("The mask has no transparency: its fully transparent pixels (alpha 0) mark where to edit")
    return image.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)


def _fingerprint(source: ImageSource) -> str:
    """An input image as an idempotency hash counts it: a URL as sent, an upload by its content."""
    return f"upload:sha256:{hashlib.sha256(source.data).hexdigest()}" if isinstance(source, Upload) else source


def fit_size(width: int, height: int) -> tuple[int, int]:
    """A size within the service's limits with the aspect of ``width`` x ``height`` (as far as
    the limits allow): scaled down to fit, up to reach the smallest side, rounded to the multiple."""
    scale = max(min(1.0, MAX_SIDE / max(width, height)), MIN_SIDE / min(width, height))

    def side(value: int) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(value * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE))

    return side(width), side(height)
