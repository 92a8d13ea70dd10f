"""The one module that wires engine + safety + storage + jobs: claims queued jobs from the
store, generates, checks, stores, and records the outcome exactly once.

The store is the worker's only contract with the API, so the worker can run as a thread in
the server or in its own process (``fluxserve.supervisor``). It reports what it does through a
``WorkerSink`` (events for waiting requests, metrics, status) and takes commands (clear the
model cache, stop) from a queue between jobs.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Protocol

from PIL import Image

from fluxserve.engine.generate import Generator, JobAborted
from fluxserve.engine.loading import ModelLoadError, PipelineCache
from fluxserve.png_encoding import encode_png
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job, utcnow
from fluxserve.models import KLEIN, Registry
from fluxserve.params import JobParams
from fluxserve.safety import SafetyChecker
from fluxserve.storage.configs import StorageConfigs, StorageUnavailable
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.s3 import S3Uploader, UploadError

STATUS_EVERY_SECONDS = 5.0
STATUS_IDLE_SECONDS = 0.05
log = logging.getLogger(__name__)


class WorkerSink(Protocol):
    def job_started(self, job_id: int, token: str) -> None: ...
    def job_finished(self, job_id: int, outcome: str, generation_time: float | None, queue_time: float) -> None: ...
    def status(self, status: dict[str, Any]) -> None: ...


def _queue_time(job: Job) -> float:
    return max(0.0, (job.started_at - job.created_at).total_seconds()) if job.started_at else 0.0


class NullSink:
    def job_started(self, job_id: int, token: str) -> None:
        pass

    def job_finished(self, job_id: int, outcome: str, generation_time: float | None, queue_time: float) -> None:
        pass

    def status(self, status: dict[str, Any]) -> None:
        pass


def out_of_memory_error() -> type[BaseException]:
    import torch

    return torch.cuda.OutOfMemoryError


def gpu_memory() -> dict[str, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
            "free_bytes": free, "total_bytes": total}


class _Claim:
    """Keeps a running job's claim alive from a side thread and records its progress."""

    def __init__(self, jobs: JobStore, job: Job, every: float):
        self.jobs, self.job_id, self.token, self.every = jobs, job.id, job.claim_token, every
        self.step, self.total = 0, 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def start(self) -> "_Claim":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        if self.lost.is_set():
            raise JobAborted("the job's claim was lost (it was recovered by another worker)")

    def _run(self) -> None:
        """Beat every ``every`` seconds, and sooner (at most 4 times a second) when a step is done,
        so progress streams see each step without a database write per step."""
        written, last_beat = None, time.monotonic()
        while not self._stop.wait(min(self.every, 0.25)):
            progress = (self.step, self.total)
            if progress == written and time.monotonic() - last_beat < self.every:
                continue
            try:
                if not self.jobs.heartbeat(self.job_id, self.token, *progress):
                    self.lost.set()
                    return
                written, last_beat = progress, time.monotonic()
            except Exception:  # noqa: BLE001 - a missed beat is retried on the next tick
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


class _Finisher:
    """Finishes jobs (safety check, PNG, store, the committing write) on a thread of its own, so
    the worker starts the next job's generation meanwhile: the accelerator no longer waits for
    CPU work between jobs. At most one finish waits behind the one in progress (``put`` blocks),
    so images never pile up in memory. Claims keep beating until a job is finished."""

    def __init__(self) -> None:
        self._tasks: "queue.Queue[Callable[[], None] | None]" = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="fluxserve-finisher", daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def close(self) -> None:
        """Finish what was handed over, then stop."""
        self._tasks.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # noqa: BLE001 - tasks record their own failures; never die
                log.exception("finishing jobs failed")


class Worker:
    def __init__(
        self, *, registry: Registry, jobs: JobStore, pipelines: PipelineCache, safety: SafetyChecker,
        outputs: LocalStorage, inputs: LocalStorage, max_attempts: int, lease_seconds: float,
        heartbeat_seconds: float, retention_seconds: float, sink: WorkerSink | None = None,
        commands: "queue.Queue[str] | Any" = None, idle_poll_seconds: float = 0.2,
        storage_configs: StorageConfigs | None = None, uploader: S3Uploader | None = None,
        enhancer: Any = None, max_batch_size: int = 1, batch_wait_seconds: float = 0.0,
    ):
        self.max_batch_size = max_batch_size
        self.batch_wait_seconds = batch_wait_seconds
        self.storage_configs = storage_configs
        self.uploader = uploader
        self.enhancer = enhancer
        self.registry = registry
        self.jobs = jobs
        self.pipelines = pipelines
        self.generator = Generator(pipelines)
        self.safety = safety
        self.outputs = outputs
        self.inputs = inputs
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.retention_seconds = retention_seconds
        self.sink = sink or NullSink()
        self.commands = commands if commands is not None else queue.Queue()
        self.idle_poll_seconds = idle_poll_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_recovery = 0.0
        self._finisher = _Finisher()
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png")
        self._status_due = False  # a job ran since the last status report
        self._last_status = 0.0
        self._reported_models: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a daemon thread (thread mode)."""
        self._thread = threading.Thread(target=self.run, name="fluxserve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.commands.put("stop")
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Claim and run jobs until told to stop."""
        self.report_status()
        while not self._stopping.is_set():
            self._recover_stale()
            try:
                job = self.jobs.claim_next()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                log.exception("claiming a job failed")
                job = None
            if job is not None:
                batch = self._gather_batch(job)
                self.process_batch(batch) if len(batch) > 1 else self.process(job)
                self._drain_commands()
            else:
                self._wait_for_work()
        self._finisher.close()
        self._encoders.shutdown(wait=True)

    def _gather_batch(self, job: Job) -> list[Job]:
        """Dynamic batching (off at max_batch_size 1): wait briefly for compatible jobs, claim them."""
        if self.max_batch_size <= 1 or not job.batch_key:
            return [job]
        if self.batch_wait_seconds > 0:
            time.sleep(self.batch_wait_seconds)
        try:
            return [job] + self.jobs.claim_compatible(job.batch_key, self.max_batch_size - 1)
        except Exception:  # noqa: BLE001 - batching is an optimisation; the claimed job still runs
            log.exception("claiming a batch failed")
            return [job]

    def _status_after_job(self) -> None:
        """Status (loaded models, memory, residency) is for system_details, not for the waiting
        requests: walking every tensor of the resident pipelines holds the GIL for milliseconds
        that the event loop would spend answering. So under load it is reported at most every
        STATUS_EVERY_SECONDS, and otherwise once the worker has had no work for
        STATUS_IDLE_SECONDS (by then the last answers have gone out)."""
        self._status_due = True
        changed = self.pipelines.loaded() != self._reported_models  # a model was loaded or evicted
        if changed or time.monotonic() - self._last_status >= STATUS_EVERY_SECONDS:
            self.report_status()

    def _wait_for_work(self) -> None:
        try:
            command = self.commands.get(timeout=STATUS_IDLE_SECONDS if self._status_due else self.idle_poll_seconds)
        except queue.Empty:
            if self._status_due:
                self.report_status()
            return
        self._handle(command)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            self._handle(command)

    def _handle(self, command: str) -> None:
        if command == "stop":
            self._stopping.set()
        elif command == "clear_cache":
            self.pipelines.clear()
            gc.collect()
            self.report_status()
        elif command == "status":
            self.report_status()
        # "wake" needs no action: returning from the wait is the point

    def _recover_stale(self) -> None:
        now = time.monotonic()
        if now - self._last_recovery < min(self.lease_seconds / 3, 5.0):
            return
        self._last_recovery = now
        try:
            requeued, failed = self.jobs.recover_stale(self.lease_seconds, self.max_attempts)
        except Exception:  # noqa: BLE001
            log.exception("recovering stale jobs failed")
            return
        if requeued or failed:
            log.warning("recovered jobs of a stopped worker: requeued %s, failed %s", requeued, failed)
        for job_id in failed:
            self.sink.job_finished(job_id, "failed", None, 0.0)

    def report_status(self) -> None:
        self._status_due, self._last_status = False, time.monotonic()
        self._reported_models = self.pipelines.loaded()
        try:
            self.sink.status({"models_loaded": self._reported_models, "gpu_memory": gpu_memory(),
                              "device": self.pipelines.device, "residency": self.pipelines.residency.accounting(),
                              "optimizations": self.pipelines.optimization_reports()})
        except Exception:  # noqa: BLE001 - status is best-effort
            log.debug("status report failed", exc_info=True)

    # -- one job, or a batch of compatible ones ----------------------------------------------
    def process(self, job: Job) -> None:
        """Generate now; finish (safety, PNG, store, commit) on the finisher thread."""
        self.sink.job_started(job.id, job.claim_token)
        self._run_one(job, _Claim(self.jobs, job, self.heartbeat_seconds).start())

    def process_batch(self, jobs: list[Job]) -> None:
        """Compatible text-to-image jobs in one pipeline call; if that call fails, each job runs
        alone (so one bad job or an out-of-memory batch costs no other job its result)."""
        for job in jobs:
            self.sink.job_started(job.id, job.claim_token)
        claims = [_Claim(self.jobs, job, self.heartbeat_seconds).start() for job in jobs]
        try:
            finishes = self._generate_batch(jobs, claims)
        except Exception:  # noqa: BLE001 - retried one by one below
            log.warning("batch of jobs %s failed; running them one by one", [j.id for j in jobs], exc_info=True)
            self.pipelines.release_memory()
            for job, claim in zip(jobs, claims):
                self._run_one(job, claim)
            return
        self._finish_later(list(zip(jobs, claims, finishes)))

    def _run_one(self, job: Job, claim: _Claim) -> None:
        try:
            finish = self._generate_solo(job, claim)
        except Exception as exc:  # noqa: BLE001 - recorded as the job's failure, here, before the next job
            self._conclude([(job, claim)], lambda error=exc: [self._failed(job, error)])
            return
        self._finish_later([(job, claim, finish)])

    def _finish_later(self, items: list[tuple[Job, _Claim, Callable[[], float | None]]]) -> None:
        self._finisher.put(lambda: self._conclude([(job, claim) for job, claim, _ in items],
                                                  lambda: [self._guarded(job, finish) for job, _, finish in items]))

    def _conclude(self, jobs: list[tuple[Job, _Claim]],
                  record: Callable[[], list[tuple[str, float | None]]]) -> None:
        """Jobs are over: ``record`` writes how each ended (finished, failed or lost); their
        heartbeats stop (even if that write failed: the lease then requeues them); they are
        reported."""
        try:
            results = record()
        finally:
            for _, claim in jobs:
                claim.stop()
        for (job, _), (outcome, generation_time) in zip(jobs, results):
            self.sink.job_finished(job.id, outcome, generation_time, _queue_time(job))
        self._status_after_job()

    def _guarded(self, job: Job, run) -> tuple[str, float | None]:
        """Run one job's work; every failure becomes that job's recorded failure."""
        try:
            generation_time = run()
        except Exception as exc:  # noqa: BLE001 - the job fails with a message, the worker lives
            return self._failed(job, exc)
        return ("succeeded" if generation_time is not None else "lost"), generation_time

    def _failed(self, job: Job, exc: Exception) -> tuple[str, None]:
        if isinstance(exc, JobAborted):
            log.warning("job %s: claim lost mid-run; its new owner will finish it", job.id)
            return "lost", None
        if isinstance(exc, (ModelLoadError, StorageUnavailable, UploadError)):
            self.jobs.fail(job.id, job.claim_token, str(exc))
        else:
            self.jobs.fail(job.id, job.claim_token, self._failure_message(job, exc))
        return "failed", None

    def _failure_message(self, job: Job, exc: Exception) -> str:
        if isinstance(exc, out_of_memory_error()):
            self.pipelines.release_memory()
            return ("Out of GPU memory while generating; the memory was released. "
                    "Try fewer samples or a smaller size, or retry when the server is less busy.")
        log.exception("job %s failed", job.id)
        return f"Generation failed: {type(exc).__name__}: {exc}"

    def _prepare(self, job: Job):
        params = JobParams.from_dict(job.params)
        meta = dict(job.meta)
        if params.enhance_prompt:
            params.prompt = self._enhance(params.prompt, meta)
        return params, self.registry.get(params.model), meta

    def _generate_solo(self, job: Job, claim: _Claim) -> Callable[[], float | None]:
        """Generate one job's images; returns the step that finishes it."""
        params, spec, meta = self._prepare(job)
        references = [self._load_input(name) for name in params.inputs]
        second = self._load_input(params.input_2) if params.input_2 else None
        self.pipelines.get(spec)  # load outside the timed section: generationTime is generation
        started = time.perf_counter()
        images = self.generator.run(spec, params, references, second, progress=claim.progress)
        return lambda: self._finish(job, params, meta, images, started)

    def _generate_batch(self, jobs: list[Job], claims: list[_Claim]) -> list[Callable[[], float | None]]:
        prepared = [self._prepare(job) for job in jobs]
        spec = prepared[0][1]
        self.pipelines.get(spec)
        started = time.perf_counter()

        def progress(step: int, total: int) -> None:
            for claim in claims:
                claim.progress(step, total)

        batches = self.generator.run_batch(spec, [params for params, _, _ in prepared], progress=progress)
        finishes = []
        for job, (params, _, meta), images in zip(jobs, prepared, batches):
            meta["batch_size"] = len(jobs)  # shared a pipeline call with this many jobs
            finishes.append(lambda job=job, params=params, meta=meta, images=images:
                            self._finish(job, params, meta, images, started))
        return finishes

    def _finish(self, job: Job, params: JobParams, meta: dict[str, Any], images, started: float) -> float | None:
        """Safety check, store (and upload), and record the success exactly once."""
        # PNGs are encoded on the encoder threads (the codec releases the GIL) while the safety
        # checker scores the same images here: a flagged image's PNG is replaced by the blank's
        encoding = [self._encoders.submit(encode_png, image) for image in images]
        nsfw = False
        if params.safety_checker:
            checked, scores, nsfw = self.safety.filter(images)
            meta["nsfw_scores"] = [round(score, 4) for score in scores]
            pngs = [future.result() if kept is image else encode_png(kept)
                    for future, image, kept in zip(encoding, images, checked)]
        else:
            pngs = [future.result() for future in encoding]
        names = job.output_names()
        for name, png in zip(names, pngs):
            self.outputs.save(name, png)  # same names on a retry: one set of files
        output_urls = self._upload(params, names, pngs) if params.remote else None
        elapsed = time.perf_counter() - started
        links = output_urls or [self.outputs.url_for(name) for name in names]
        payload = {
            "status": "success", "id": job.id, "output": links, "proxy_links": links,
            "generationTime": round(elapsed, 4), "nsfw_content_detected": nsfw, "track_id": job.track_id,
            "meta": meta,
        }
        finished = self.jobs.succeed(
            job.id, job.claim_token, outputs=names, nsfw_detected=nsfw, generation_time=elapsed, meta=meta,
            expires_at=utcnow() + timedelta(seconds=self.retention_seconds), webhook_payload=payload,
            output_urls=output_urls,
        )
        if not finished:
            log.warning("job %s was no longer ours when it finished; result left to its new owner", job.id)
            return None
        return elapsed

    def _enhance(self, prompt: str, meta: dict[str, Any]) -> str:
        """Rewrite the prompt (default: with the klein pipeline's own Qwen3 encoder); on any
        failure the original is used. Both prompts, and how it went, go into meta."""
        def klein():
            return self.pipelines.get(self.registry.get(KLEIN))

        result = self.enhancer.enhance(prompt, klein) if self.enhancer else None
        meta["original_prompt"] = prompt
        if result is None or not result.ok:
            meta["enhance_prompt_status"] = f"failed, original prompt used: {result.error if result else 'no enhancer'}"
            return prompt
        meta.update(prompt=result.prompt, enhanced_prompt=result.prompt, enhance_prompt_status="ok",
                    enhance_prompt_source=result.source, enhance_prompt_seconds=round(result.seconds, 3))
        return result.prompt

    def _upload(self, params: JobParams, names: list[str], pngs: list[bytes]) -> list[str]:
        """To the bucket the job was queued for; any failure fails the job (never a silent drop)."""
        if self.storage_configs is None or self.uploader is None:
            raise StorageUnavailable("Upload failed: this worker has no S3 support configured")
        details = self.storage_configs.details(params.remote)
        return [self.uploader.upload(details, name, png) for name, png in zip(names, pngs)]

    def _load_input(self, name: str) -> Image.Image:
        with Image.open(self.inputs.path_for(name)) as image:
            return image.convert("RGB")
