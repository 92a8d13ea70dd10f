"""Assembling the running service from settings: registry, app, worker."""

from __future__ import annotations

import logging
import threading

from fastapi import FastAPI

from fluxserve.api.app import create_app
from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.models import Registry

log = logging.getLogger(__name__)


def build_registry(settings: Settings, *, build_tiny: bool = True) -> Registry:
    tiny_root = None
    if settings.models == "tiny":
        tiny_root = settings.tiny_models_dir
        if build_tiny:
            from fluxserve.engine.tiny import build_tiny_loras, build_tiny_models

            build_tiny_models(tiny_root)
            build_tiny_loras(tiny_root, settings.tiny_loras_dir)  # the demo adapters (see fluxserve.loras)
    return Registry.build(settings.model_overrides, tiny_root=tiny_root)


def build_storage(settings: Settings, sessions):
    """Which storage each job's images go to: per-key S3 details (secrets encrypted with the
    server secret), the server-wide default bucket, local disk."""
    from fluxserve.secretbox import SecretBox, load_or_create_server_secret
    from fluxserve.storage.configs import StorageConfigs
    from fluxserve.storage.s3 import S3Uploader

    secrets = SecretBox(load_or_create_server_secret(settings.data_dir, settings.secret_key))
    default = settings.s3_default_details()  # checked when the settings were built
    return StorageConfigs(sessions, secrets, default, S3Uploader(attempts=settings.s3_upload_attempts))


def build_enhancer(settings: Settings):
    from fluxserve.engine.enhance import LocalQwenEnhancer, OpenAIEnhancer, PromptEnhancer

    remote = None
    if settings.enhance_openai_base_url:
        remote = OpenAIEnhancer(
            base_url=settings.enhance_openai_base_url, model=settings.enhance_openai_model,
            api_key=settings.enhance_openai_api_key, timeout=settings.enhance_timeout_seconds,
        )
    local = LocalQwenEnhancer(max_new_tokens=settings.enhance_max_new_tokens, max_seconds=settings.enhance_timeout_seconds)
    return PromptEnhancer(openai=remote, local=local)


def build_worker(settings: Settings, *, sink=None, commands=None, stop_requested=None, gpu: str | None = None):
    """A worker for these settings (thread or child process: see ``supervisor``), a member of
    the cluster's worker registry (``gpu``: the CUDA_VISIBLE_DEVICES it was given, if any)."""
    from fluxserve.engine.loading import PipelineCache, pick_device
    from fluxserve.engine.lora import Adapters
    from fluxserve.engine.optimize import Optimizations, compute_dtype
    from fluxserve.engine.residency import Residency, parse_bytes
    from fluxserve.engine.runner import Engine
    from fluxserve.jobs.database import open_database
    from fluxserve.jobs.store import JobStore
    from fluxserve.jobs.workers import WorkerRegistry
    from fluxserve.loras import LoraCatalog
    from fluxserve.safety import SafetyChecker
    from fluxserve.storage.local import LocalStorage
    from fluxserve.worker import Worker, WorkerConfig
    from fluxserve.worker.membership import Membership

    device = pick_device(settings.device)
    optimizations = Optimizations.from_strings(settings.optimizations or "")
    residency = Residency(device=device, budget_bytes=parse_bytes(settings.gpu_memory_budget), offload=settings.offload)
    adapters = Adapters(LoraCatalog.from_settings(settings), settings.lora_max_loaded)
    pipelines = PipelineCache(device, compute_dtype(device, optimizations), residency, optimizations,
                              tuple(settings.compile_warm_sizes), settings.max_batch_size, adapters)
    sessions = open_database(settings.resolved_database_url)
    return Worker(
        registry=build_registry(settings, build_tiny=False),
        jobs=JobStore(sessions, webhook_retry_seconds=settings.webhook_retry_seconds),
        engine=Engine(pipelines), safety=SafetyChecker(settings.nsfw_threshold),
        outputs=LocalStorage(settings.outputs_dir, settings.base_url),
        inputs=LocalStorage(settings.inputs_dir, settings.base_url),
        config=WorkerConfig.from_settings(settings), storage_configs=build_storage(settings, sessions),
        enhancer=build_enhancer(settings), sink=sink, commands=commands, stop_requested=stop_requested,
        membership=Membership(WorkerRegistry(sessions), gpu=gpu, every=settings.heartbeat_seconds,
                              lease_seconds=settings.lease_seconds),
    )


def build_pool(settings: Settings, events: JobEvents, metrics, jobs, gpus: list[str | None] | None = None):
    """The workers this process hosts: one per GPU of ``FLUXSERVE_GPUS`` (``fluxserve.gpus``;
    ``gpus`` replaces the detection), each a thread or a child process as ``FLUXSERVE_WORKER``
    says. ``events`` wakes them all when a job is queued."""
    from fluxserve.gpus import worker_gpus
    from fluxserve.supervisor import ProcessWorkerHost, ThreadWorkerHost, WorkerLink, WorkerPool

    chosen = worker_gpus(settings.gpus) if gpus is None else gpus
    host_class = ProcessWorkerHost if settings.worker == "process" else ThreadWorkerHost
    pool = WorkerPool([host_class(settings, WorkerLink(events, metrics), jobs, gpu=gpu) for gpu in chosen])
    events.wake_worker = pool.wake
    if len(chosen) > 1 or chosen[0] is not None:
        log.info("%d worker(s), one per GPU: CUDA_VISIBLE_DEVICES %s", len(chosen), ", ".join(map(str, chosen)))
    return pool


def build_server_app(settings: Settings, reload_settings=None) -> FastAPI:
    """The API, with the worker (thread or child process), the webhook dispatcher and the
    retention janitor started and stopped with the app (``ServerLifecycle``, also kept as
    ``app.state.lifecycle`` for the signal handling of ``fluxserve.serving``)."""
    from fluxserve.jobs.database import open_database
    from fluxserve.jobs.store import JobStore
    from fluxserve.metrics import Metrics

    registry = build_registry(settings)  # builds the tiny models once, before any worker starts
    sessions = open_database(settings.resolved_database_url)
    jobs = JobStore(sessions, webhook_retry_seconds=settings.webhook_retry_seconds)
    events, metrics = JobEvents(), Metrics()
    host = build_pool(settings, events, metrics, jobs) if settings.run_worker else None
    if host is None and settings.resolved_database_url.startswith("sqlite"):
        log.warning("no worker runs in this server (FLUXSERVE_RUN_WORKER=false / --no-worker) and its database is "
                    "SQLite: jobs are only queued, until a `fluxserve worker` on this machine, with the same "
                    "FLUXSERVE_DATABASE_URL, takes them. Share a PostgreSQL database between machines.")
    background = _background_services(settings, sessions, jobs, metrics)
    listener = build_listener(settings, events)
    if listener is not None:
        background.append(listener)
    lifecycle = ServerLifecycle(host, events, background, settings.shutdown_grace_seconds)
    app = create_app(
        settings, registry, events=events, metrics=metrics, host=host, storage_configs=build_storage(settings, sessions),
        sessions=sessions,
        reload_settings=reload_settings or (lambda: settings), on_startup=lifecycle.start, on_shutdown=lifecycle.stop,
    )
    if host is not None:
        pool = host
        metrics.bind_workers(busy=lambda: pool.busy,
                             alive=lambda: sum(1 for one in pool.hosts if one.describe()["alive"]))
    app.state.lifecycle = lifecycle
    return app


def build_listener(settings: Settings, events: JobEvents):
    """On PostgreSQL, the thread that turns the database's job NOTIFYs into this process's
    wake-ups (``jobs.notify``); None on SQLite (one box: the worker reports in process)."""
    from fluxserve.jobs.notify import JobNotifications, listens

    if not listens(settings.resolved_database_url):
        return None
    return JobNotifications(settings.resolved_database_url, on_change=events.job_changed,
                            on_queued=events.job_queued, on_connected=events.set_pushed)


class ServerLifecycle:
    """What runs beside the API: the worker host and the background services. ``begin_stop``
    (the first SIGTERM/SIGINT, before uvicorn drains its connections) stops the worker claiming
    and ends waiting requests and progress streams; ``stop`` (the app's shutdown) waits for the
    worker, bounded by the grace period, then stops the services; ``force_stop`` (a second
    signal) puts the running jobs back in the queue at once."""

    BACKGROUND_STOP_SECONDS = 3.0  # a webhook POST cut short stays pending and is sent after the restart

    def __init__(self, host, events: JobEvents, background: list, grace_seconds: float):
        # host: the WorkerPool, or None for an API without workers (``serve --no-worker``)
        self.host, self.events, self.background, self.grace_seconds = host, events, background, grace_seconds
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        if self.host is not None:
            self.host.start()
        for service in self.background:
            service.start()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def begin_stop(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        log.info("stopping: no new jobs are claimed; the job in hand has up to %.0fs to finish "
                 "(a second SIGTERM/SIGINT stops at once)", self.grace_seconds)
        self.events.shutdown()  # waiting requests answer now, progress streams send their last event
        if self.host is not None:
            self.host.begin_stop()

    def stop(self) -> None:
        self.begin_stop()  # if no signal did (e.g. a test server told to exit)
        if self.host is not None:
            self.host.stop()
            log.info("worker stopped")
        for service in self.background:  # after the worker: its last jobs' webhooks may still go out
            service.stop(timeout=self.BACKGROUND_STOP_SECONDS)
        log.info("background services stopped")

    def force_stop(self) -> None:
        self.events.shutdown()
        if self.host is not None:
            self.host.force_stop()


def _background_services(settings: Settings, sessions, jobs, metrics) -> list:
    """Threads beside the API: webhook delivery and retention (both driven by the store)."""
    from fluxserve.retention import Janitor
    from fluxserve.storage.local import LocalStorage
    from fluxserve.webhooks import WebhookDispatcher

    return [
        WebhookDispatcher(
            sessions, timeout_seconds=settings.webhook_timeout_seconds, fetch_policy=settings.fetch_policy(),
            concurrency=settings.webhook_concurrency, per_host=settings.webhook_per_host,
            on_result=lambda result: metrics.webhook_deliveries.labels(result).inc(),
        ),
        Janitor(
            jobs, LocalStorage(settings.outputs_dir, settings.base_url),
            LocalStorage(settings.inputs_dir, settings.base_url),
            retention_seconds=settings.retention_seconds, interval_seconds=settings.janitor_interval_seconds,
            shared=build_storage(settings, sessions).shared,  # the server-wide bucket's copies, if there is one
        ),
    ]
