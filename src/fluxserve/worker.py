"""The one module that wires engine + safety + storage + jobs: claims queued jobs from the
store, generates, checks, stores, and records the outcome. Runs as a thread beside the API;
the store is its only contract with the API, so it can move to its own process."""

from __future__ import annotations

import logging
import threading
import time

from PIL import Image

from fluxserve.engine.generate import Generator
from fluxserve.engine.loading import ModelLoadError, PipelineCache
from fluxserve.events import JobEvents
from fluxserve.images import encode_png
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job
from fluxserve.models import Registry
from fluxserve.params import JobParams
from fluxserve.safety import SafetyChecker
from fluxserve.storage.local import LocalStorage

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0


class Worker:
    def __init__(
        self, *, registry: Registry, jobs: JobStore, events: JobEvents, pipelines: PipelineCache,
        safety: SafetyChecker, outputs: LocalStorage, inputs: LocalStorage, max_attempts: int,
    ):
        self.registry = registry
        self.jobs = jobs
        self.events = events
        self.pipelines = pipelines
        self.generator = Generator(pipelines)
        self.safety = safety
        self.outputs = outputs
        self.inputs = inputs
        self.max_attempts = max_attempts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        requeued, failed = self.jobs.requeue_interrupted(self.max_attempts)
        if requeued or failed:
            log.warning("recovered interrupted jobs: %d requeued, %d failed after too many attempts", requeued, failed)
        self._thread = threading.Thread(target=self._run, name="fluxserve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.events.work_available.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.claim_next()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self.events.work_available.wait(IDLE_POLL_SECONDS)
                self.events.work_available.clear()
                continue
            self.process(job)

    # -- one job --------------------------------------------------------------------------------
    def process(self, job: Job) -> None:
        try:
            self._generate_and_store(job)
        except ModelLoadError as exc:
            self.jobs.fail(job.id, str(exc))
        except Exception as exc:  # noqa: BLE001 - the job fails with a message, the worker lives
            log.exception("job %s failed", job.id)
            self.jobs.fail(job.id, f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._notify(job.id)

    def _generate_and_store(self, job: Job) -> None:
        params = JobParams.from_dict(job.params)
        spec = self.registry.get(params.model)
        references = [self._load_input(name) for name in params.inputs]
        second = self._load_input(params.input_2) if params.input_2 else None
        self.pipelines.get(spec)  # load outside the timed section: generationTime is generation
        started = time.perf_counter()
        images = self.generator.run(spec, params, references, second)
        meta = dict(job.meta)
        nsfw = False
        if params.safety_checker:
            images, scores, nsfw = self.safety.filter(images)
            meta["nsfw_scores"] = [round(score, 4) for score in scores]
        names = [f"{job.file_prefix}-{i}.png" for i in range(len(images))]
        for name, image in zip(names, images):
            self.outputs.save(name, encode_png(image))
        elapsed = time.perf_counter() - started
        if not self.jobs.succeed(job.id, outputs=names, nsfw_detected=nsfw, generation_time=elapsed, meta=meta):
            log.warning("job %s was no longer running when it finished; result discarded", job.id)

    def _load_input(self, name: str) -> Image.Image:
        with Image.open(self.inputs.path_for(name)) as image:
            return image.convert("RGB")

    def _notify(self, job_id: int) -> None:
        try:
            self.events.job_changed(job_id)
        except RuntimeError:  # the API's event loop is gone (shutting down)
            pass
