"""The enterprise admin endpoints (admin keys only), health and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from fluxserve.api.deps import AdminKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.paths import ADMIN_SERVERS
from fluxserve.config import settings_problems
from fluxserve.dependencies import Dependency
from fluxserve.worker.messages import Command

admin = APIRouter(prefix="/api/v1/enterprise", tags=["enterprise admin"])
ops = APIRouter(tags=["operations"])

# Each ModelsLab enterprise "server" is one GPU box; here they share the workers and one queue.
# (the webhook settings are not: the dispatcher is built once per process, so they are reported
# under needs_process_restart)
RELOADABLE = {"model_overrides", "nsfw_threshold", "sync_wait_seconds", "max_queued_per_key", "retention_seconds",
              "lease_seconds", "heartbeat_seconds", "max_job_attempts", "device",
              "max_init_image_bytes", "init_image_timeout_seconds"}


def _check_server(server: str) -> None:
    if server not in ADMIN_SERVERS:
        raise ApiError(404, "Not found")


def _local_worker(services) -> dict:
    """This server's own workers (``serve``), or that it hosts none (``serve --no-worker``)."""
    if services.host is None:
        return {"mode": "none", "alive": False, "count": 0,
                "detail": "this server hosts no worker (--no-worker): `fluxserve worker` processes generate"}
    return services.host.describe()


def _cluster_workers(services) -> list[dict]:
    """Every live worker of the cluster, from the registry in the shared database."""
    if services.workers is None:
        return []
    settings = services.generation.settings
    return [{"id": row.id, "host": row.host, "pid": row.pid, "gpu": row.gpu, "models_loaded": row.models,
             "pipelines": (row.status or {}).get("pipelines") or [],
             "state": (row.status or {}).get("state"), "model_group": (row.status or {}).get("model_group"),
             "device": (row.status or {}).get("device"), "jobs_done": (row.status or {}).get("jobs_done"),
             "running": (row.status or {}).get("running", []), "gpu_memory": (row.status or {}).get("gpu_memory"),
             "dependencies": (row.status or {}).get("dependencies") or {},
             "cuda_visible_devices": (row.status or {}).get("cuda_visible_devices"),
             "started_at": row.started_at.isoformat(), "last_beat": row.heartbeat_at.isoformat()}
            for row in services.workers.alive(settings.lease_seconds)]


def _broadcast(services, command: str) -> None:
    """To every worker of the cluster: each picks it up on its next heartbeat."""
    if services.workers is not None:
        services.workers.broadcast(command)


@admin.post("/{server}/system_details")
async def system_details(server: str, _key: AdminKey, services: ServicesDep) -> dict:
    _check_server(server)
    jobs = services.generation.jobs
    status = services.worker_status()
    queue_depth, running, queue_time, workers = await asyncio.gather(
        run_in_threadpool(jobs.queue_depth), run_in_threadpool(jobs.running_count),
        run_in_threadpool(jobs.oldest_queued_age), run_in_threadpool(_cluster_workers, services),
    )
    models = list(status.get("models_loaded", []))
    for worker in workers:  # the pipelines every worker of the cluster holds, not only this server's
        models += [name for name in worker["pipelines"] if name not in models]
    away = _away(services)
    return {
        "status": "degraded" if away else "ok",
        "dependencies": away,
        "model_count": len(models),
        "models_loaded": models,
        "models_available": services.generation.registry.names(),
        "queue_depth": queue_depth,
        "running": running,
        "queue_time": round(queue_time, 2),
        "device": status.get("device"),
        "gpu_memory": status.get("gpu_memory"),
        "residency": status.get("residency"),
        "optimizations": status.get("optimizations"),
        "worker": _local_worker(services),
        "worker_count": len(workers),
        "workers": workers,
    }


@admin.post("/{server}/clear_cache")
async def clear_cache(server: str, _key: AdminKey, services: ServicesDep) -> dict:
    _check_server(server)
    if services.host is not None:
        services.host.command(Command.CLEAR_CACHE)  # this server's workers at once, between jobs
    await run_in_threadpool(_broadcast, services, "clear_cache")  # every worker, on its next heartbeat
    return {"status": "success", "message": "Cache cleared successfully"}


@admin.post("/{server}/clear_queue")
async def clear_queue(server: str, _key: AdminKey, services: ServicesDep) -> dict:
    _check_server(server)
    cancelled = await run_in_threadpool(services.generation.jobs.cancel_queued)
    for job_id in cancelled:
        services.generation.events.job_changed(job_id)
    # ModelsLab's message; here the server does not restart: the queued requests are cancelled
    return {"status": "success", "message": "Queue cleared, server is restarting", "cancelled": cancelled,
            "detail": f"{len(cancelled)} queued requests cancelled; running jobs finish; the worker keeps running"}


@admin.post("/{server}/restart_server")
async def restart_server(server: str, _key: AdminKey, services: ServicesDep) -> dict:
    _check_server(server)
    if services.host is not None:
        services.host.restart()  # this server's workers: fresh processes
    await run_in_threadpool(_broadcast, services, "restart")  # the others drop their models
    return {"status": "success", "message": "server restarting",
            "detail": "this server's workers restart; every other worker drops its models; models reload on next "
                      "use; queued requests are kept"}


@admin.post("/{server}/update_server")
@admin.post("/{server}/update")
async def update_server(server: str, _key: AdminKey, services: ServicesDep) -> dict:
    """Re-read the configuration (environment file + variables) and apply what can change live."""
    _check_server(server)
    if services.reload_settings is None:
        raise ApiError(503, "Configuration reload is not available")
    generation = services.generation
    old = generation.settings
    try:
        new = await run_in_threadpool(services.reload_settings)
        from fluxserve.models import Registry

        registry = Registry.build(new.model_overrides, tiny_root=old.tiny_models_dir if new.models == "tiny" else None)
    except ValidationError as exc:  # before ValueError (its base): one "FLUXSERVE_X: why" per problem
        raise ApiError(400, f"Configuration is invalid; nothing was changed: {'; '.join(settings_problems(exc))}") from None
    except ValueError as exc:
        raise ApiError(400, f"Configuration is invalid; nothing was changed: {exc}") from None
    changed = sorted(name for name in type(old).model_fields if getattr(old, name) != getattr(new, name))
    applied = [name for name in changed if name in RELOADABLE]
    needs_restart = [name for name in changed if name not in RELOADABLE]
    if applied:
        live = old.model_copy(update={name: getattr(new, name) for name in applied})
        generation.settings, generation.registry = live, registry
        if services.host is not None:
            services.host.restart(live)
    return {"status": "success", "message": "Server updated successfully", "applied": applied,
            "needs_process_restart": needs_restart}


@ops.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    """ok, or degraded (503) with why: the worker is down, or a dependency (database, disk, object
    store) is away for the worker or for this process."""
    worker = _local_worker(services)
    generation = services.generation
    try:
        depth: int | None = await run_in_threadpool(generation.jobs.queue_depth)
        generation.health.up(Dependency.DATABASE)
    except Exception as exc:  # noqa: BLE001 - reported below, once in the log
        depth = None
        generation.health.down(Dependency.DATABASE, f"{type(exc).__name__}: {exc}"[:300])
    away = _away(services)
    # without local workers (--no-worker) the API is healthy on its own: it queues, workers elsewhere generate
    healthy = (services.host is None or bool(worker.get("alive"))) and not away
    body = {"status": "ok" if healthy else "degraded", "worker": worker, "queue_depth": depth}
    if away:
        body["dependencies"] = away
    return JSONResponse(body, status_code=200 if healthy else 503)


def _away(services) -> dict:
    """What the worker and this process found away: {dependency: {since, for_seconds, reason}}."""
    return {**(services.worker_status().get("dependencies") or {}), **services.generation.health.snapshot()}


@ops.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    body = await run_in_threadpool(services.generation.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
