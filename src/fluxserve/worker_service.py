"""The ``fluxserve worker`` role: GPU workers alone, one process per GPU (``FLUXSERVE_GPUS``),
claiming jobs from the shared database, with no public API. A small HTTP port
(``FLUXSERVE_WORKER_HOST``:``FLUXSERVE_WORKER_PORT``) answers ``GET /health`` (200 while every
worker process is alive and none finds a dependency away, else 503; JSON either way, with
whether each worker is busy) and ``GET /metrics`` (Prometheus). On Kubernetes it keeps its pod's
deletion cost at the number of jobs in hand (``fluxserve.pod_cost``): scale-in removes idle pods first.

It stops like ``serve`` (``fluxserve.serving``): the first SIGTERM/SIGINT stops claiming, the
jobs in hand get ``FLUXSERVE_SHUTDOWN_GRACE_SECONDS`` to finish, else go back to the queue, and
the process exits 0; a second signal puts them back at once and exits 128 + the signal.

This process imports no torch (the workers are child processes), except in ``thread`` mode,
and, with ``--models tiny``, to build the tiny models once if they are missing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.jobs.database import open_database
from fluxserve.jobs.store import JobStore
from fluxserve.metrics import Metrics
from fluxserve.pod_cost import start_pod_cost
from fluxserve.runtime import ServerLifecycle, build_listener, build_pool, build_registry

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_worker_app(settings: Settings, gpus: list[str | None] | None = None) -> Starlette:
    """The worker role's app: its workers start and stop with it (``app.state.lifecycle``, for
    the signal handling of ``fluxserve.serving``). ``gpus`` replaces the GPU detection."""
    build_registry(settings)  # with --models tiny: builds them once, before any worker starts
    jobs = JobStore(open_database(settings.resolved_database_url), webhook_retry_seconds=settings.webhook_retry_seconds)
    events, metrics = JobEvents(), Metrics()
    pool = build_pool(settings, events, metrics, jobs, gpus)
    metrics.bind(queue_depth=jobs.queue_depth, running=jobs.running_count)
    metrics.bind_workers(busy=lambda: pool.busy, alive=lambda: sum(1 for host in pool.hosts if host.describe()["alive"]))
    listener = build_listener(settings, events)  # on PostgreSQL: a job queued anywhere wakes these workers at once
    lifecycle = ServerLifecycle(pool, events, [] if listener is None else [listener], settings.shutdown_grace_seconds)

    async def health(_request: Request) -> JSONResponse:
        """ok (200) while every worker process runs and finds nothing away; degraded (503)
        otherwise, and from the moment the role is stopping."""
        workers = pool.describe()
        away = dict(pool.last_status.get("dependencies") or {})
        stopping = lifecycle.stopping
        healthy = workers["alive"] and not away and not stopping
        body: dict[str, Any] = {"status": "ok" if healthy else "degraded", "role": "worker", "stopping": stopping,
                                "busy": workers["busy"], "worker": workers}
        if away:
            body["dependencies"] = away
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_page(_request: Request) -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=PROMETHEUS_TYPE)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        lifecycle.start()
        pod_cost = start_pod_cost(settings, lambda: pool.jobs_in_hand)  # None off Kubernetes
        try:
            yield
        finally:
            lifecycle.stop()  # stop claiming; the jobs in hand finish or go back (grace period)
            if pod_cost is not None:  # stopped after the drain: a draining pod stays costly to pick
                pod_cost.stop()

    app = Starlette(routes=[Route("/health", health), Route("/metrics", metrics_page)], lifespan=lifespan)
    app.state.lifecycle = lifecycle
    app.state.pool = pool
    return app


def run_worker_service(settings: Settings, log_level: str) -> None:
    from fluxserve.serving import run_server

    run_server(build_worker_app(settings), settings, log_level, host=settings.worker_host, port=settings.worker_port)
