"""Fakes and fixtures for the worker's unit tests: a real job store on a temporary SQLite file
(the contract between the API and the worker), and fakes for everything heavy: the engine, the
safety checker, the report sink, the prompt enhancer and the remote (S3) storage.

Nothing here imports torch: the worker takes its engine through ``worker.loop.Engine``."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select, update

from fluxserve.engine.families.base import Inputs
from fluxserve.jobs.database import open_database
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job, WebhookDelivery
from fluxserve.keys import KeyStore
from fluxserve.models import ModelSpec, Registry
from fluxserve.params import JobParams
from fluxserve.storage.local import LocalStorage
from fluxserve.worker import Worker, WorkerConfig
from fluxserve.worker.messages import JobFinished, JobStarted, StatusReport

SIZE = 16  # every generated image is SIZE x SIZE: PNG encoding stays cheap
BASE_URL = "http://worker.test"


def seed_colour(seed: int) -> tuple[int, int, int]:
    """The solid colour the fake engine paints for ``seed`` (never black: black is the blank)."""
    return (40 + seed * 37 % 200, 40 + seed * 91 % 200, 40 + seed * 53 % 200)


# -- the engine ---------------------------------------------------------------------------------
class FakeOutOfMemory(RuntimeError):
    """What the fake engine calls out-of-memory (``FakeEngine.is_out_of_memory``)."""


@dataclass
class GenerateCall:
    spec: str
    params: JobParams
    inputs: Inputs


class FakeEngine:
    """The ``Engine`` protocol without torch: each seed becomes a solid-colour image (the seed
    also kept in ``image.info["seed"]``), every call is recorded. ``fail_on[prompt]`` is an
    exception raised for that prompt (by ``generate``, and by ``generate_batch`` for a batch
    holding it); ``batch_error`` makes every ``generate_batch`` fail; ``during_generate`` is
    called with the params inside ``generate`` (e.g. to steal the job's claim); with
    ``steps`` > 0, ``progress`` is called that many times (``step_seconds`` apart)."""

    device = "fake"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[GenerateCall] = []
        self.batch_calls: list[tuple[str, list[JobParams]]] = []
        self.loads: list[str] = []
        self.pipelines_requested: list[str] = []
        self.fail_on: dict[str, BaseException] = {}
        self.batch_error: BaseException | None = None
        self.during_generate: Callable[[JobParams], None] | None = None
        self.steps = 0
        self.step_seconds = 0.0
        self.cleared = 0
        self.released = 0
        self.status_calls = 0
        self._loaded: list[str] = []

    # the protocol
    def load(self, spec: ModelSpec) -> None:
        with self.lock:
            self.loads.append(spec.name)
            if spec.pipeline_key not in self._loaded:  # named as the production engine names them
                self._loaded.append(spec.pipeline_key)

    def pipeline(self, spec: ModelSpec) -> Any:
        self.load(spec)
        self.pipelines_requested.append(spec.name)
        return f"pipeline:{spec.name}"

    def generate(self, spec: ModelSpec, params: JobParams, inputs: Inputs,
                 progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        with self.lock:
            self.calls.append(GenerateCall(spec.name, params, inputs))
        if self.during_generate is not None:
            self.during_generate(params)
        self._steps(progress)
        if params.prompt in self.fail_on:
            raise self.fail_on[params.prompt]
        return self.images(params)

    def generate_batch(self, spec: ModelSpec, jobs: list[JobParams],
                       progress: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]:
        with self.lock:
            self.batch_calls.append((spec.name, list(jobs)))
        if self.batch_error is not None:
            raise self.batch_error
        for params in jobs:
            if params.prompt in self.fail_on:
                raise self.fail_on[params.prompt]
        self._steps(progress)
        return [self.images(params) for params in jobs]

    def loaded(self) -> list[str]:
        with self.lock:
            return list(self._loaded)

    def clear(self) -> None:
        with self.lock:
            self.cleared += 1
            self._loaded.clear()

    def release_memory(self) -> None:
        with self.lock:
            self.released += 1

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeOutOfMemory)

    def status(self) -> dict[str, Any]:
        with self.lock:
            self.status_calls += 1
        return {"models_loaded": self.loaded(), "device": self.device, "gpu_memory": {"allocated_bytes": 1},
                "residency": None, "optimizations": None}

    # helpers
    @staticmethod
    def images(params: JobParams) -> list[Image.Image]:
        images = []
        for seed in params.seeds:
            image = Image.new("RGB", (params.width, params.height), seed_colour(seed))
            image.info["seed"] = seed
            images.append(image)
        return images

    def _steps(self, progress: Callable[[int, int], None] | None) -> None:
        for step in range(1, self.steps + 1):
            if self.step_seconds:
                time.sleep(self.step_seconds)
            if progress is not None:
                progress(step, self.steps)


# -- safety, sink, enhancer, remote storage ----------------------------------------------------
class FakeSafety:
    """Flags the images whose seed is in ``flagged`` (score 1.0; others 0.0) and blanks them,
    like ``fluxserve.safety.SafetyChecker``: kept images are the very objects passed in."""

    def __init__(self, flagged: set[int] | None = None) -> None:
        self.flagged = set(flagged or ())
        self.calls = 0

    def filter(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[float], bool]:
        self.calls += 1
        bad = [image.info.get("seed") in self.flagged for image in images]
        kept = [Image.new("RGB", image.size, (0, 0, 0)) if flag else image for image, flag in zip(images, bad)]
        return kept, [1.0 if flag else 0.0 for flag in bad], any(bad)


class RecordingSink:
    """A ``messages.Sink`` that keeps every report (thread-safe: the finisher reports too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: list[Any] = []

    def report(self, report: Any) -> None:
        with self._lock:
            self._reports.append(report)

    @property
    def reports(self) -> list[Any]:
        with self._lock:
            return list(self._reports)

    def of(self, kind: type) -> list[Any]:
        return [r for r in self.reports if isinstance(r, kind)]

    def started(self) -> list[JobStarted]:
        return self.of(JobStarted)

    def finished(self, job_id: int | None = None) -> list[JobFinished]:
        return [r for r in self.of(JobFinished) if job_id is None or r.job_id == job_id]

    def statuses(self) -> list[StatusReport]:
        return self.of(StatusReport)


@dataclass
class FakeEnhanced:
    """The shape of ``engine.enhance.Enhanced`` that the preparer reads."""

    prompt: str
    ok: bool
    error: str | None = None
    source: str = "fake-enhancer"
    seconds: float = 0.123456


class FakeEnhancer:
    """``enhance(prompt, getter)``: calls the pipeline getter (when given), answers ``answer``."""

    def __init__(self, answer: Callable[[str], FakeEnhanced]) -> None:
        self.answer = answer
        self.calls: list[str] = []
        self.pipelines: list[Any] = []

    def enhance(self, prompt: str, getter: Callable[[], Any] | None) -> FakeEnhanced:
        self.calls.append(prompt)
        if getter is not None:
            self.pipelines.append(getter())
        return self.answer(prompt)


class FakeRemote:
    """A bucket: ``save`` records the bytes and answers the object's URL, or raises ``error``."""

    def __init__(self, public_url: str, error: BaseException | None = None) -> None:
        self.public_url = public_url
        self.error = error
        self.saved: dict[str, tuple[bytes, str]] = {}

    def save(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        if self.error is not None:
            raise self.error
        self.saved[name] = (data, content_type)
        return f"{self.public_url}/{name}"


class FakeStorageConfigs:
    """Stands in for ``storage.configs.StorageConfigs``: ``storage(remote)`` gives the remote
    (or raises ``error``, e.g. StorageUnavailable). No server-wide bucket: ``shared`` is None
    (tests/storage/test_shared_images.py covers it against a real S3 server)."""

    shared = None

    def __init__(self, remote: FakeRemote | None = None, error: BaseException | None = None) -> None:
        self.remote = remote or FakeRemote("https://bucket.example/images")
        self.error = error
        self.asked: list[dict[str, Any]] = []

    def storage(self, remote: dict[str, Any]) -> FakeRemote:
        self.asked.append(remote)
        if self.error is not None:
            raise self.error
        return self.remote


# -- the store and jobs ------------------------------------------------------------------------
@pytest.fixture
def sessions(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield sessions
    sessions.kw["bind"].dispose()


@pytest.fixture
def store(sessions) -> JobStore:
    return JobStore(sessions)


@pytest.fixture
def key_id(sessions) -> int:
    return KeyStore(sessions).create("worker-tests")[0].id


def job_params(prompt: str = "a cat", *, model: str = "flux-klein", task: str = "text2img",
               seeds: list[int] | None = None, **extra: Any) -> JobParams:
    values: dict[str, Any] = dict(
        model=model, task=task, prompt=prompt, negative_prompt=None, width=SIZE, height=SIZE,
        seeds=seeds or [1], steps=1, guidance=1.0, strength=None, true_cfg_scale=1.0, inputs=[], input_2=None,
        safety_checker=True, base64=False,
    )
    values.update(extra)
    return JobParams(**values)


@pytest.fixture
def make_job(store, key_id) -> Callable[..., Job]:
    """Queue a job: ``make_job("prompt", seeds=[1, 2], webhook=..., batch_key=..., **params)``."""

    def make(prompt: str = "a cat", *, webhook: str | None = None, track_id: str | None = None,
             batch_key: str | None = None, meta: dict[str, Any] | None = None, **params: Any) -> Job:
        p = job_params(prompt, **params)
        return store.create(
            key_id=key_id, server="flux_klein", model=p.model, task=p.task, params=p.to_dict(),
            meta=meta if meta is not None else {"prompt": prompt, "seed": p.seeds[0], "model_id": p.model},
            file_prefix=uuid.uuid4().hex[:12], webhook=webhook, track_id=track_id, batch_key=batch_key,
        )

    return make


def job_row(store: JobStore, job_id: int) -> Job:
    job = store.get(job_id)
    assert job is not None
    return job


def deliveries(sessions, job_id: int) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)))


def steal_claim(sessions, job_id: int) -> str:
    """Another worker took the job over: its claim token is no longer ours. Returns the new one."""
    token = str(uuid.uuid4())
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(claim_token=token))
    return token


def png_colours(storage: LocalStorage, name: str) -> set[tuple[int, ...]]:
    """The colours in a stored PNG (also checks it is a SIZE x SIZE RGB PNG)."""
    with Image.open(storage.path_for(name)) as image:
        assert image.format == "PNG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
        colours = image.getcolors()
        assert colours is not None
        return {tuple(colour) for _, colour in colours}  # type: ignore[arg-type]


# -- the worker's parts -------------------------------------------------------------------------
@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def safety() -> FakeSafety:
    return FakeSafety()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def registry() -> Registry:
    return Registry.build()


@pytest.fixture
def outputs(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "outputs", BASE_URL)


@pytest.fixture
def inputs(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "inputs", BASE_URL)


FAST = WorkerConfig(heartbeat_seconds=0.05, idle_poll_seconds=0.02, lease_seconds=30.0, retention_seconds=600.0)


@pytest.fixture
def make_worker(registry, store, engine, safety, outputs, inputs, sink):
    """A Worker on the fakes (fast heartbeats and polls); its finisher is closed afterwards."""
    made: list[Worker] = []

    def make(config: WorkerConfig = FAST, **overrides: Any) -> Worker:
        parts: dict[str, Any] = dict(registry=registry, jobs=store, engine=engine, safety=safety, outputs=outputs,
                                     inputs=inputs, config=config, sink=sink)
        parts.update(overrides)
        worker = Worker(**parts)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        if worker.alive:
            worker.stop(timeout=10)
        finish(worker)


def finish(worker: Worker) -> None:
    """Wait for everything handed to the finisher, as ``run()`` does when it stops."""
    worker._finisher.close()
    worker.results.close()


@contextlib.contextmanager
def running(worker: Worker, timeout: float = 10.0) -> Iterator[list[BaseException]]:
    """``worker.run()`` on a thread; STOP on leaving, and it must end. Yields the list that
    receives what run() raised (if it did)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-worker", daemon=True)
    worker._thread = thread  # so that worker.alive and the fixture's cleanup see it
    thread.start()
    try:
        yield errors
    finally:
        worker.commands.put("stop")
        thread.join(timeout)
        assert not thread.is_alive(), "run() did not end after STOP"


def wait_finished(store: JobStore, *job_ids: int, timeout: float = 10.0) -> list[Job]:
    """Wait until every job left queued/running; returns their rows."""
    from tests.support.waiting import wait_until

    def done():
        rows = [job_row(store, job_id) for job_id in job_ids]
        return rows if all(row.status not in ("queued", "running") for row in rows) else None

    return wait_until(done, timeout, f"jobs {job_ids} to finish", interval=0.01)

