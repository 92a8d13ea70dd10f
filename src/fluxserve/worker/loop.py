"""The worker's loop: claim queued jobs from the store (several compatible ones as a batch),
prepare them, generate, hand the images to the finisher thread, take commands between jobs,
report what happens, and stop when asked: ``request_stop`` (a SIGTERM) stops claiming at once
and gives the job in hand a grace period, after which it goes back to the queue.

The store is the worker's only contract with the API, so the worker can run as a thread in the
server or in its own process (``fluxserve.supervisor``). It holds the engine through the
``Engine`` protocol below (``engine.runner.Engine`` in production, a fake in unit tests), so this
package never imports torch.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from fluxserve.dependencies import Dependency, Health, transient_dependency
from fluxserve.engine.errors import JobInterrupted
from fluxserve.engine.families.base import Inputs
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job
from fluxserve.models import ModelSpec, Registry
from fluxserve.params import JobParams
from fluxserve.storage.configs import StorageConfigs
from fluxserve.storage.local import LocalStorage
from fluxserve.worker.claim import Claim, claimed_token
from fluxserve.worker.config import WorkerConfig
from fluxserve.worker.finish import FinisherThread, ResultWriter, Safety
from fluxserve.worker.membership import Membership
from fluxserve.worker.messages import (
    Command,
    JobFinished,
    JobStarted,
    NullSink,
    Outcome,
    Sink,
    StatusReport,
)
from fluxserve.worker.prepare import Preparer

STATUS_EVERY_SECONDS = 5.0
STATUS_IDLE_SECONDS = 0.05
PROBE_FIRST_SECONDS, PROBE_MAX_SECONDS = 0.5, 10.0  # probing a dependency that is away
FINISH_AFTER_GRACE_SECONDS = 5.0  # a stopping worker's finisher may run this long past the grace period
log = logging.getLogger(__name__)


class Engine(Protocol):
    @property
    def device(self) -> str: ...

    def load(self, spec: ModelSpec) -> None: ...
    def pipeline(self, spec: ModelSpec) -> Any: ...
    def generate(self, spec: ModelSpec, params: JobParams, inputs: Inputs,
                 progress: Callable[[int, int], None] | None = None) -> list[Image.Image]: ...
    def generate_batch(self, spec: ModelSpec, jobs: list[JobParams],
                       progress: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]: ...
    def loaded(self) -> list[str]: ...
    def clear(self) -> None: ...
    def release_memory(self) -> None: ...
    def is_out_of_memory(self, exc: BaseException) -> bool: ...
    def status(self) -> dict[str, Any]: ...


def _queue_time(job: Job) -> float:
    return max(0.0, (job.started_at - job.created_at).total_seconds()) if job.started_at else 0.0


Finish = Callable[[], float | None]


class Worker:
    def __init__(
        self, *, registry: Registry, jobs: JobStore, engine: Engine, safety: Safety, outputs: LocalStorage,
        inputs: LocalStorage, config: WorkerConfig | None = None, sink: Sink | None = None,
        commands: queue.Queue[Command] | Any = None, storage_configs: StorageConfigs | None = None,
        enhancer: Any = None, stop_requested: Callable[[], bool] | None = None,
        membership: Membership | None = None,
    ):
        self.config = config or WorkerConfig()
        self.registry = registry
        self.jobs = jobs
        self.engine = engine
        self.sink = sink or NullSink()
        self.commands = commands if commands is not None else queue.Queue()
        self.preparer = Preparer(registry, inputs, engine, enhancer, storage_configs.shared if storage_configs else None)
        self.health = Health()  # dependencies found away: claiming pauses until each is back
        self.outputs = outputs
        self.storage_configs = storage_configs
        self.results = ResultWriter(jobs, outputs, safety, engine, storage_configs, self.config.retention_seconds,
                                    self.health)
        self._probe_after = 0.0
        self._probe_backoff = PROBE_FIRST_SECONDS
        self._reported_health: dict[str, Any] = {}
        self._finisher = FinisherThread()
        self._stopping = threading.Event()  # claim nothing more
        self._stop_requested = stop_requested  # e.g. the child process's "a signal came" (looked at before each claim)
        self._stop_lock = threading.Lock()
        self._stop_deadline: float | None = None  # set by request_stop: when the grace period ends
        self._grace_over = threading.Event()  # generation stops at the next step; the job goes back
        self._held: dict[int, Claim] = {}  # claims of the jobs started and not yet concluded
        self._held_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_recovery = 0.0
        self._status_due = False  # a job ran since the last status report
        self._last_status = 0.0
        self._reported_models: list[str] = []
        self._last_report: StatusReport | None = None
        self.membership = membership  # the cluster's registry: heartbeats and broadcast commands
        self.jobs_done = 0  # jobs concluded (any outcome) since this worker started

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a daemon thread (thread mode)."""
        self._thread = threading.Thread(target=self.run, name="fluxserve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.commands.put(Command.STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def request_stop(self, grace_seconds: float | None = None) -> None:
        """Stop now (thread-safe; later calls change nothing): no job is claimed from here on;
        the job (or batch) in hand may finish within ``grace_seconds`` (default: the config's),
        after which its generation stops at the next step and it goes back to the queue; the
        finisher gets FINISH_AFTER_GRACE_SECONDS more for what it holds; then run() returns."""
        with self._stop_lock:
            if self._stop_deadline is not None:
                return
            grace = self.config.shutdown_grace_seconds if grace_seconds is None else max(0.0, grace_seconds)
            self._stop_deadline = time.monotonic() + grace
            self._stopping.set()
            timer = threading.Timer(grace, self._grace_over.set)
            timer.name, timer.daemon = "fluxserve-grace", True
            timer.start()
        log.info("worker stopping: no new jobs; %.0fs to finish the job in hand", grace)
        try:
            self.commands.put_nowait(Command.WAKE)  # an idle wait ends now
        except Exception:  # noqa: BLE001 - a closed or full queue: the idle poll notices the stop anyway
            pass

    def _should_stop(self) -> bool:
        if not self._stopping.is_set() and self._stop_requested is not None and self._stop_requested():
            self.request_stop()
        return self._stopping.is_set()

    def release_held(self) -> list[int]:
        """Put every job this worker still holds (generating or finishing) back in the queue at
        once, its attempt not counted: a stop that can't wait. Best effort (the lease is the
        fallback); returns the ids put back."""
        with self._held_lock:
            held = list(self._held.values())
        released = []
        for claim in held:
            try:
                if self.jobs.release(claim.job_id, claim.token, 0.0, waited=False):
                    released.append(claim.job_id)
            except Exception:  # noqa: BLE001 - the database is away: the lease brings it back
                log.warning("could not put job %s back in the queue; its lease will", claim.job_id, exc_info=True)
        for job_id in released:
            self.sink.report(JobFinished(job_id, Outcome.RELEASED))
        if released:
            log.warning("put jobs %s back in the queue: the worker is stopping", released)
        return released

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop's thread (thread mode) to end; True once it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    def run(self) -> None:
        """Claim and run jobs until told to stop; while a dependency is away, claim nothing (the
        queue waits instead of draining into failures) and probe it with a backoff."""
        self.report_status()
        if self.membership is not None:
            self.membership.start(self.cluster_status, self.cluster_command)
        try:
            self._loop()
        finally:
            if self.membership is not None:
                self.membership.stop()

    def _loop(self) -> None:
        while not self._should_stop():
            if self._health_changed():
                self.report_status()
            if not self._dependencies_back():
                self._wait_for_work()
                continue
            self._recover_stale()
            if self._should_stop():  # looked at right before each claim
                break
            try:
                job = self.jobs.claim_next(loaded=self.loaded_models(), affinity_seconds=self.config.affinity_seconds,
                                           models=self.config.models)
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the worker
                self._store_trouble(exc, "claiming a job failed")
                job = None
            if job is not None:
                batch = self._gather_batch(job)
                self.process_batch(batch) if len(batch) > 1 else self.process(job)
                self._drain_commands()
            else:
                self._wait_for_work()
        self._close_finisher()

    def _close_finisher(self) -> None:
        """Wait for what the finisher was handed: without limit after a STOP command; after
        ``request_stop``, until FINISH_AFTER_GRACE_SECONDS past the grace period, then whatever
        it still holds goes back to the queue."""
        deadline = self._stop_deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + FINISH_AFTER_GRACE_SECONDS
        if self._finisher.close(timeout):
            self.results.close()
        else:
            log.warning("finishing jobs took past the grace period")
            self.release_held()

    def _gather_batch(self, job: Job) -> list[Job]:
        """Dynamic batching (off at max_batch_size 1): wait briefly for compatible jobs, claim them."""
        if self.config.max_batch_size <= 1 or not job.batch_key:
            return [job]
        if self.config.batch_wait_seconds > 0:
            time.sleep(self.config.batch_wait_seconds)
        if self._should_stop():
            return [job]
        try:
            return [job] + self.jobs.claim_compatible(job.batch_key, self.config.max_batch_size - 1)
        except Exception:  # noqa: BLE001 - batching is an optimisation; the claimed job still runs
            log.exception("claiming a batch failed")
            return [job]

    # -- dependencies ---------------------------------------------------------------------------
    def _store_trouble(self, exc: Exception, what: str) -> None:
        """The database away is an outage (logged once, by ``health``); anything else a bug."""
        dependency = transient_dependency(exc)
        if dependency is None:
            log.exception(what)
        else:
            self.health.down(dependency, f"{type(exc).__name__}: {exc}"[:300])

    def _dependencies_back(self) -> bool:
        """True when nothing is away. Otherwise probe what is (at most every few seconds, backing
        off to PROBE_MAX_SECONDS) and mark it back when the probe passes."""
        if not self.health.degraded:
            return True
        now = time.monotonic()
        if now < self._probe_after:
            return False
        for dependency in self.health.down_dependencies():
            try:
                self._probe(dependency)
            except Exception as exc:  # noqa: BLE001 - still away
                self.health.down(dependency, f"{type(exc).__name__}: {exc}"[:300])
                self._probe_after = now + self._probe_backoff
                self._probe_backoff = min(PROBE_MAX_SECONDS, self._probe_backoff * 2)
                return False
            self.health.up(dependency)
        self._probe_backoff = PROBE_FIRST_SECONDS
        return True

    def _probe(self, dependency: Dependency) -> None:
        """Raise if ``dependency`` still can't do what the jobs need."""
        if dependency is Dependency.DATABASE:
            self.jobs.ping()
        elif dependency is Dependency.DISK:
            self.outputs.check()  # writes (and removes) about one output's worth
        elif dependency is Dependency.OBJECT_STORE:
            remote = self.results.last_remote
            if remote and self.storage_configs is not None:
                self.storage_configs.storage(remote).check()

    def _health_changed(self) -> bool:
        current = {name: info["reason"] for name, info in self.health.snapshot().items()}
        changed = current != self._reported_health
        self._reported_health = current
        return changed

    # -- commands and status --------------------------------------------------------------------
    def _wait_for_work(self) -> None:
        try:
            command = self.commands.get(
                timeout=STATUS_IDLE_SECONDS if self._status_due else self.config.idle_poll_seconds)
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

    def _handle(self, command: Command | str) -> None:
        try:
            command = Command(command)
        except ValueError:
            log.warning("ignoring unknown worker command %r", command)
            return
        if command is Command.STOP:
            self._stopping.set()
        elif command is Command.CLEAR_CACHE:
            self.engine.clear()
            gc.collect()
            self.report_status()
        elif command is Command.STATUS:
            self.report_status()
        # WAKE needs no action: returning from the wait is the point

    def loaded_models(self, pipelines: list[str] | None = None) -> list[str]:
        """The registry names of the models whose pipeline the engine holds (``Engine.loaded()``
        names pipelines, ``ModelSpec.pipeline_key``; models sharing weights share one)."""
        held = set(self.engine.loaded() if pipelines is None else pipelines)
        return [spec.name for spec in self.registry.specs() if spec.pipeline_key in held]

    @property
    def busy(self) -> bool:
        """Whether a job is in hand (generating, or being finished)."""
        with self._held_lock:
            return bool(self._held)

    def cluster_status(self) -> tuple[list[str], dict[str, Any]]:
        """What this worker beats with in the cluster's registry (read from another thread: only
        what is already at hand, nothing that walks the engine's tensors)."""
        with self._held_lock:
            running = sorted(self._held)
        last = self._last_report
        pipelines = list(self._reported_models)
        return self.loaded_models(pipelines), {
            "pipelines": pipelines,
            "state": "stopping" if self._stopping.is_set() else "busy" if running else "idle",
            "running": running, "jobs_done": self.jobs_done, "device": self.engine.device,
            "model_group": list(self.config.models) if self.config.models else None,
            "gpu_memory": last.gpu_memory if last else None, "dependencies": self.health.snapshot(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
        }

    def cluster_command(self, command: str) -> None:
        """A command broadcast to every worker (``WorkerRegistry.broadcast``): run between jobs
        like the local ones. ``restart`` drops the models here (they load again on next use)."""
        known = {"clear_cache": Command.CLEAR_CACHE, "restart": Command.CLEAR_CACHE}
        if command not in known:
            log.warning("ignoring unknown broadcast command %r", command)
            return
        log.info("broadcast command: %s", command)
        self.commands.put(known[command])

    def _status_after_job(self) -> None:
        """Status (loaded models, memory, residency) is for system_details, not for the waiting
        requests: walking every tensor of the resident pipelines holds the GIL for milliseconds
        that the event loop would spend answering. So under load it is reported at most every
        STATUS_EVERY_SECONDS, and otherwise once the worker has had no work for
        STATUS_IDLE_SECONDS (by then the last answers have gone out)."""
        self._status_due = True
        if self._models_changed() or time.monotonic() - self._last_status >= STATUS_EVERY_SECONDS:
            self.report_status()

    def _models_changed(self) -> bool:
        return self.engine.loaded() != self._reported_models  # a model was loaded or evicted

    def _load(self, spec: ModelSpec) -> None:
        """Load the job's model outside the timed section (generationTime is generation); a newly
        loaded (or evicted) model is reported before the job runs, so system_details lists it by
        the time the job is answered."""
        self.engine.load(spec)
        if self._models_changed():
            self.report_status()

    def report_status(self) -> None:
        self._status_due, self._last_status = False, time.monotonic()
        try:
            status = self.engine.status()
            self._reported_models = list(status.get("models_loaded", []))
            self._last_report = StatusReport(**status, dependencies=self.health.snapshot())
            self.sink.report(self._last_report)
        except Exception:  # noqa: BLE001 - status is best-effort
            log.debug("status report failed", exc_info=True)

    def _recover_stale(self) -> None:
        now = time.monotonic()
        if now - self._last_recovery < min(self.config.lease_seconds / 3, 5.0):
            return
        self._last_recovery = now
        try:
            requeued, failed = self.jobs.recover_stale(self.config.lease_seconds, self.config.max_attempts)
        except Exception as exc:  # noqa: BLE001
            self._store_trouble(exc, "recovering stale jobs failed")
            return
        if requeued or failed:
            log.warning("recovered jobs of a stopped worker: requeued %s, failed %s", requeued, failed)
        for job_id in failed:
            self.sink.report(JobFinished(job_id, Outcome.FAILED))

    # -- one job, or a batch of compatible ones ----------------------------------------------
    def process(self, job: Job) -> None:
        """Generate now; finish (safety, PNG, store, commit) on the finisher thread."""
        self.sink.report(JobStarted(job.id, claimed_token(job)))
        self._run_one(job, self._claim(job))

    def _claim(self, job: Job) -> Claim:
        """Heartbeats for a job this worker runs, held until the job is concluded."""
        claim = Claim(self.jobs, job, self.config.heartbeat_seconds, self.health, interrupt=self._grace_over)
        with self._held_lock:
            self._held[job.id] = claim
        return claim.start()

    def process_batch(self, jobs: list[Job]) -> None:
        """Compatible jobs in one pipeline call; if that call fails, each job runs alone (so one
        bad job or an out-of-memory batch costs no other job its result)."""
        for job in jobs:
            self.sink.report(JobStarted(job.id, claimed_token(job)))
        claims = [self._claim(job) for job in jobs]
        try:
            finishes = self._generate_batch(jobs, claims)
        except JobInterrupted:  # the worker is stopping: the whole batch goes back to the queue
            self._conclude(list(zip(jobs, claims)), lambda: [(self.results.put_back(job), None) for job in jobs])
            return
        except Exception:  # noqa: BLE001 - retried one by one below
            log.warning("batch of jobs %s failed; running them one by one", [j.id for j in jobs], exc_info=True)
            self.engine.release_memory()
            for job, claim in zip(jobs, claims):
                self._run_one(job, claim)
            return
        self._finish_later(list(zip(jobs, claims, finishes)))

    def _run_one(self, job: Job, claim: Claim) -> None:
        try:
            finish = self._generate_solo(job, claim)
        except Exception as exc:  # noqa: BLE001 - recorded as the job's failure, here, before the next job

            def record(error: Exception = exc) -> list[tuple[Outcome, float | None]]:
                return [self.results.fail(job, error)]

            self._conclude([(job, claim)], record)
            return
        self._finish_later([(job, claim, finish)])

    def _generate_solo(self, job: Job, claim: Claim) -> Finish:
        """Generate one job's images; returns the step that finishes it."""
        prepared = self.preparer.prepare(job)
        self._load(prepared.spec)
        started = time.perf_counter()
        images = self.engine.generate(prepared.spec, prepared.params, prepared.inputs, progress=claim.progress)
        return lambda: self.results.succeed(prepared, images, started)

    def _generate_batch(self, jobs: list[Job], claims: list[Claim]) -> list[Finish]:
        prepared = [self.preparer.prepare(job) for job in jobs]
        spec = prepared[0].spec
        self._load(spec)
        started = time.perf_counter()

        def progress(step: int, total: int) -> None:
            for claim in claims:
                claim.progress(step, total)

        batches = self.engine.generate_batch(spec, [p.params for p in prepared], progress=progress)
        finishes: list[Finish] = []
        for one, images in zip(prepared, batches):
            one.meta["batch_size"] = len(jobs)  # shared a pipeline call with this many jobs
            finishes.append(functools.partial(self.results.succeed, one, images, started))
        return finishes

    def _finish_later(self, items: list[tuple[Job, Claim, Finish]]) -> None:
        self._finisher.put(lambda: self._conclude(
            [(job, claim) for job, claim, _ in items],
            lambda: [self.results.guarded(job, finish) for job, _, finish in items]))

    def _conclude(self, jobs: list[tuple[Job, Claim]],
                  record: Callable[[], list[tuple[Outcome, float | None]]]) -> None:
        """Jobs are over: ``record`` writes how each ended (finished, failed or lost); their
        heartbeats stop (even if that write failed: the lease then requeues them, and the worker
        goes on); they are reported."""
        try:
            results = record()
        except Exception:  # noqa: BLE001 - e.g. the database is away: the lease brings the jobs back
            log.exception("recording how jobs %s ended failed; their leases will requeue them", [j.id for j, _ in jobs])
            return
        finally:
            for job, claim in jobs:
                claim.stop()
                with self._held_lock:
                    self._held.pop(job.id, None)
        self.jobs_done += len(jobs)
        for (job, _), (outcome, generation_time) in zip(jobs, results):
            self.sink.report(JobFinished(job.id, outcome, generation_time, _queue_time(job)))
        self._status_after_job()

