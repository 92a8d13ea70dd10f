"""Finishing jobs: the safety check, PNG encoding, storing (local disk, and the job's bucket when
it has one), and the one write that records the outcome. Runs on a thread of its own
(``FinisherThread``) so that the worker generates the next job meanwhile."""

from __future__ import annotations

import base64
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Protocol

from PIL import Image

from fluxserve.contract import SuccessAnswer
from fluxserve.dependencies import Dependency, Health, transient_dependency
from fluxserve.engine.errors import JobAborted, JobInterrupted, ModelLoadError
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job, utcnow
from fluxserve.png_encoding import encode_png
from fluxserve.storage.configs import StorageConfigs, StorageUnavailable
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.s3 import UploadError
from fluxserve.worker.claim import claimed_token
from fluxserve.worker.messages import Outcome
from fluxserve.worker.prepare import PreparedJob

log = logging.getLogger(__name__)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

OOM_MESSAGE = ("Out of GPU memory while generating; the memory was released. "
               "Try fewer samples or a smaller size, or retry when the server is less busy.")


class Safety(Protocol):
    def filter(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[float], bool]: ...


class MemoryEngine(Protocol):
    def is_out_of_memory(self, exc: BaseException) -> bool: ...
    def release_memory(self) -> None: ...


class FinisherThread:
    """Runs finishing tasks in order on one thread. At most one task waits behind the one in
    progress (``put`` blocks), so generated images never pile up in memory."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="fluxserve-finisher", daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was handed over, then stop; with ``timeout``, wait at most that long.
        False: tasks were still running when it passed (the thread goes on; it is a daemon)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._tasks.put(None, timeout=timeout)
        except queue.Full:  # a task is waiting behind one in progress, both past the bound
            return False
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # noqa: BLE001 - tasks record their own failures; never die
                log.exception("finishing jobs failed")


class ResultWriter:
    """Records how jobs ended: ``succeed`` (check, encode, store, commit) or ``fail``. A failure
    caused by a dependency being away (``dependencies.transient_dependency``: disk full, object
    store or database unreachable) is not the job's: the job goes back to the queue (with a
    backoff) and ``health`` says what is away, so the worker waits instead of failing the queue."""

    def __init__(self, jobs: JobStore, outputs: LocalStorage, safety: Safety, engine: MemoryEngine,
                 storage_configs: StorageConfigs | None, retention_seconds: float, health: Health | None = None,
                 max_release_seconds: float = 30.0):
        self.jobs = jobs
        self.outputs = outputs
        self.safety = safety
        self.engine = engine
        self.storage_configs = storage_configs
        self.retention_seconds = retention_seconds
        self.health = health or Health()
        self.max_release_seconds = max_release_seconds
        self.last_remote: dict[str, Any] | None = None  # the bucket a job could not reach (probed before resuming)
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png")

    def close(self) -> None:
        self._encoders.shutdown(wait=True)

    def succeed(self, prepared: PreparedJob, images: list[Image.Image], started: float) -> float | None:
        """Safety check, store (and upload), and record the success exactly once. Returns the
        generation time, or None if the job was no longer ours."""
        job, params, meta = prepared.job, prepared.params, prepared.meta
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
        files = list(zip(names, pngs, ["image/png"] * len(names)))
        if job.base64_files:  # ModelsLab's base64 answers: a text file of each image's base64 beside it
            files += [(name, base64.b64encode(png), "text/plain") for name, png in zip(job.base64_names(), pngs)]
        stored = {name: self.outputs.save(name, data) for name, data, _ in files}  # same names on a retry
        shared = self.storage_configs.shared if self.storage_configs is not None else None
        if shared is not None and not shared.holds_uploads_of(params.remote):
            # the server's copy where every replica finds it (a default-bucket upload below is that copy)
            for name, data, kind in files:
                shared.outputs.save(name, data, kind)
        output_urls = None
        if params.remote:
            if self.storage_configs is None:
                raise StorageUnavailable("Upload failed: this worker has no S3 support configured")
            remote = self.storage_configs.storage(params.remote)  # any failure fails the job: never a silent drop
            stored = {name: remote.save(name, data, kind) for name, data, kind in files}
            output_urls = [stored[name] for name in names]
        elapsed = time.perf_counter() - started
        links = [stored[name] for name in names]
        output = [stored[name] for name in job.base64_names()] if job.base64_files else links
        webhook = SuccessAnswer(id=job.id, output=output, proxy_links=links, generationTime=round(elapsed, 4),
                                nsfw_content_detected=nsfw, meta=meta)
        finished = self.jobs.succeed(
            job.id, claimed_token(job), outputs=list(stored), nsfw_detected=nsfw, generation_time=elapsed, meta=meta,
            expires_at=utcnow() + timedelta(seconds=self.retention_seconds),
            webhook_payload={**webhook.body(), "track_id": job.track_id}, output_urls=output_urls,
        )
        if not finished:
            log.warning("job %s was no longer ours when it finished; result left to its new owner", job.id)
            return None
        return elapsed

    def guarded(self, job: Job, run: Callable[[], float | None]) -> tuple[Outcome, float | None]:
        """Run one job's finishing work; every failure becomes that job's recorded failure."""
        try:
            generation_time = run()
        except Exception as exc:  # noqa: BLE001 - the job fails with a message, the worker lives
            return self.fail(job, exc)
        return (Outcome.SUCCEEDED if generation_time is not None else Outcome.LOST), generation_time

    def fail(self, job: Job, exc: Exception) -> tuple[Outcome, None]:
        """Record ``exc`` as the job's failure (or nothing, if the job is no longer ours); a
        dependency's absence puts the job back instead (``Outcome.RELEASED``)."""
        if isinstance(exc, JobAborted):
            log.warning("job %s: claim lost mid-run; its new owner will finish it", job.id)
            return Outcome.LOST, None
        if isinstance(exc, JobInterrupted):
            return self.put_back(job), None
        dependency = transient_dependency(exc)
        if dependency is not None:
            return self._release(job, dependency, exc), None
        self._remove_files(job)  # a job that fails leaves no files
        if not self.jobs.fail(job.id, claimed_token(job), self.failure_message(job, exc)):
            log.warning("job %s failed after its claim was lost; its new owner will finish it", job.id)
            return Outcome.LOST, None
        return Outcome.FAILED, None

    def _release(self, job: Job, dependency: Dependency, exc: Exception) -> Outcome:
        self.health.down(dependency, _short(exc))
        if dependency is Dependency.OBJECT_STORE:
            self.last_remote = job.params.get("remote")
        if dependency is Dependency.DATABASE:  # nothing can be written: its lease brings it back
            return Outcome.LOST
        delay = min(self.max_release_seconds, 2.0 ** (job.waits or 0)) * random.uniform(0.5, 1.0)
        try:
            released = self.jobs.release(job.id, claimed_token(job), delay)
        except Exception as error:  # noqa: BLE001 - the database went too: the lease brings it back
            self.health.down(Dependency.DATABASE, _short(error))
            return Outcome.LOST
        log.info("job %s put back in the queue for %.1fs: %s unavailable", job.id, delay, dependency.value)
        return Outcome.RELEASED if released else Outcome.LOST

    def put_back(self, job: Job) -> Outcome:
        """The worker is stopping and may not finish ``job``: it goes back to the queue, to be
        claimed at once by another worker or the next start; the attempt does not count."""
        try:
            released = self.jobs.release(job.id, claimed_token(job), 0.0, waited=False)
        except Exception as error:  # noqa: BLE001 - e.g. the database is away: the lease brings it back
            log.warning("job %s could not be put back in the queue (%s); its lease will", job.id, _short(error))
            return Outcome.LOST
        if released:
            log.info("job %s put back in the queue: the worker is stopping", job.id)
        return Outcome.RELEASED if released else Outcome.LOST

    def _remove_files(self, job: Job) -> None:
        """The files a failed attempt wrote (locally, and in its bucket): best effort."""
        names = job.output_names() + job.base64_names()
        targets: list[Any] = [self.outputs]
        if self.storage_configs is not None and self.storage_configs.shared is not None:
            targets.append(self.storage_configs.shared.outputs)
        remote = job.params.get("remote")
        if remote and self.storage_configs is not None:
            try:
                targets.append(self.storage_configs.storage(remote))
            except Exception:  # noqa: BLE001 - e.g. the details were removed: nothing was uploaded there
                pass
        for storage in targets:
            for name in names:
                try:
                    storage.delete(name)
                except Exception:  # noqa: BLE001 - best effort
                    log.debug("could not delete %s of failed job %s", name, job.id, exc_info=True)

    def failure_message(self, job: Job, exc: Exception) -> str:
        if isinstance(exc, (ModelLoadError, StorageUnavailable, UploadError)):
            return str(exc)  # written for the client
        if self.engine.is_out_of_memory(exc):
            self.engine.release_memory()
            return OOM_MESSAGE
        log.exception("job %s failed", job.id, exc_info=exc)
        return f"Generation failed: {type(exc).__name__}: {exc}"
