"""The FastAPI application factory. Knows nothing of torch: generation happens in the worker,
which talks to the API only through the job store (and in-process events)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.cors import CORSMiddleware

from fluxserve import __version__
from fluxserve.api.admin import admin, ops
from fluxserve.api.catalog import catalog_router
from fluxserve.api.deps import Services, WorkerControl
from fluxserve.api.errors import install_error_handlers
from fluxserve.api.generation import GenerationService
from fluxserve.api.history import history_router
from fluxserve.api.json_bodies import JsonBodiesMiddleware
from fluxserve.api.json_newline import JsonNewlineMiddleware, NewlineJSONResponse
from fluxserve.api.limits import AddressRateLimitMiddleware, BodyLimitMiddleware, RateLimits
from fluxserve.api.modelslab import router as modelslab_router
from fluxserve.api.openai import router as openai_router
from fluxserve.api.operator import operator_router
from fluxserve.api.outputs import outputs_router
from fluxserve.api.pages import install_pages
from fluxserve.api.progress import jobs_router
from fluxserve.api.storage_routes import storage_router
from fluxserve.api.webhook_admin import webhooks_router
from fluxserve.config import Settings
from fluxserve.dependencies import Health
from fluxserve.events import JobEvents
from fluxserve.jobs.database import open_database
from fluxserve.jobs.deliveries import WebhookDeliveries
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.workers import WorkerRegistry
from fluxserve.keys import KeyStore
from fluxserve.metrics import Metrics
from fluxserve.models import Registry
from fluxserve.storage.configs import StorageConfigs
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.shared import OutputsOnDisk

LIVE_WORKERS_TTL_SECONDS = 1.0


def create_app(
    settings: Settings,
    registry: Registry,
    *,
    events: JobEvents | None = None,
    metrics: Metrics | None = None,
    host: WorkerControl | None = None,
    reload_settings: Callable[[], Settings] | None = None,
    storage_configs: StorageConfigs | None = None,
    sessions: sessionmaker[Session] | None = None,
    on_startup: Callable[[], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    sessions = sessions or open_database(settings.resolved_database_url)
    events = events or JobEvents()
    metrics = metrics or Metrics()
    jobs = JobStore(sessions, webhook_retry_seconds=settings.webhook_retry_seconds)
    deliveries = WebhookDeliveries(sessions, retry_seconds=settings.webhook_retry_seconds)
    metrics.bind(queue_depth=jobs.queue_depth, running=jobs.running_count, dead_letters=deliveries.dead_count)

    workers = WorkerRegistry(sessions)

    def worker_status() -> dict:
        """The local workers' last status (``supervisor.WorkerPool``); nothing without them."""
        return getattr(host, "last_status", None) or getattr(getattr(host, "link", None), "last_status", {}) or {}

    counted: dict[str | None, tuple[float, int]] = {}

    def live_workers(model: str | None = None) -> int:
        """Workers of the cluster that beat within the lease and claim ``model``'s jobs (read at
        most once a second per model: every processing answer's eta asks)."""
        now = time.monotonic()
        cached = counted.get(model)
        if cached is None or now - cached[0] >= LIVE_WORKERS_TTL_SECONDS:
            cached = counted[model] = (now, workers.count_alive(settings.lease_seconds, model))
        return cached[1]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # dedicated to fetching strangers' URLs: no proxies from the environment, no redirects
        # followed by httpx (fetching checks each hop), no connection reuse across checked names
        async with httpx.AsyncClient(
            headers={"User-Agent": f"fluxserve/{__version__}"}, trust_env=False, follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as http:
            app.state.services = Services(
                generation=GenerationService(
                    settings=settings, registry=registry, jobs=jobs, metrics=metrics,
                    storage_configs=storage_configs,
                    storage=OutputsOnDisk(settings.outputs_dir, settings.base_url,
                                          storage_configs.shared if storage_configs is not None else None),
                    inputs=LocalStorage(settings.inputs_dir, settings.base_url),
                    events=events, http=http, health=app.state.health,
                    dependency_status=lambda: dict(worker_status().get("dependencies") or {}),
                    live_workers=live_workers,
                ),
                keys=KeyStore(sessions),
                host=host,
                worker_status=worker_status,
                workers=workers,
                reload_settings=reload_settings,
                storage_configs=storage_configs,
                deliveries=deliveries,
            )
            if on_startup:
                on_startup()
            try:
                yield
            finally:
                if on_shutdown:
                    on_shutdown()

    app = FastAPI(
        title="fluxserve",
        version=__version__,
        description="Self-hosted image generation that speaks the ModelsLab API.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served by api.pages from local files, not FastAPI's CDN links
        default_response_class=NewlineJSONResponse,
    )
    install_error_handlers(app)
    app.state.health = Health()  # dependencies this process found away (the worker reports its own)
    rate_limits = RateLimits(settings.rate_limit_per_key, settings.rate_limit_per_address, storage_url=settings.redis_url)
    app.state.rate_limits = rate_limits
    # added last = runs first: address limit, then body limits, then JSON content type
    app.add_middleware(JsonBodiesMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    app.add_middleware(AddressRateLimitMiddleware, limits=rate_limits)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Key", "Authorization"])
    app.add_middleware(JsonNewlineMiddleware)  # outermost: every JSON answer, refusals included, ends with "\n"
    for router in (modelslab_router, openai_router, admin, storage_router, jobs_router, history_router, catalog_router,
                   operator_router, webhooks_router, outputs_router, ops):
        app.include_router(router)
    install_pages(app)  # the playground (/), the operator view (/operator), /docs and /redoc
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 answers it adds to every route with a body: invalid input
    is answered 400 with ModelsLab's (or on /v1/, OpenAI's) error shape (``errors.install_error_handlers``),
    as /docs says."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
