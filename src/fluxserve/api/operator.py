"""What the operator view reads and does beyond the enterprise admin endpoints (admin keys only):
the recent failed jobs of every key with their messages, the queue (running and queued jobs of
every key), and cancelling any key's queued job."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from fluxserve.api.deps import AdminKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import Job, utcnow

operator_router = APIRouter(prefix="/api/fluxserve/admin", tags=["operator"])
MAX_LIMIT = 500


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _job_item(job: Job, key_name: str | None) -> dict[str, Any]:
    return {"id": job.id, "status": job.status, "model": job.model, "task": job.task, "server": job.server,
            "key_id": job.key_id, "key_name": key_name, "attempts": job.attempts,
            "created_at": _when(job.created_at), "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at)}


@operator_router.get("/failures")
async def recent_failures(
    _key: AdminKey, services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many (the most recent first).")] = 50,
) -> dict:
    """Failed jobs of every key, the most recently failed first, with the message each was
    answered (cancelled requests are not failures and are left out)."""
    rows = await run_in_threadpool(services.generation.jobs.recent_failures, limit)
    return {"status": "ok", "failures": [{**_job_item(job, name), "message": job.error or "Generation failed",
                                          "time": _when(job.finished_at or job.created_at)} for job, name in rows]}


@operator_router.get("/queue")
async def queue(
    _key: AdminKey, services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many jobs to list.")] = 100,
) -> dict:
    """Running jobs (with their step) then queued ones (oldest first, with how long each has
    waited), of every key."""
    jobs = services.generation.jobs
    rows = await run_in_threadpool(jobs.active, limit)
    now = utcnow()
    items = []
    for job, name in rows:
        item = _job_item(job, name)
        item["waited_seconds"] = round(max(0.0, ((job.started_at or now) - job.created_at).total_seconds()), 2)
        if job.status == JobStatus.RUNNING.value:
            item.update(step=job.progress_step, total=job.progress_total)
        items.append(item)
    depth, running = await run_in_threadpool(jobs.queue_depth), await run_in_threadpool(jobs.running_count)
    return {"status": "ok", "jobs": items, "queue_depth": depth, "running": running}


@operator_router.post("/jobs/{job_id}/cancel")
async def cancel_any(job_id: int, _key: AdminKey, services: ServicesDep) -> dict:
    """Cancel any key's queued job (its webhook, if any, is told it failed); 409 once it runs."""
    generation = services.generation
    job = await run_in_threadpool(generation.jobs.get, job_id)
    if job is None:
        raise ApiError(404, "Request not found")
    if await run_in_threadpool(generation.jobs.cancel, job_id, None, "Request was cancelled by an administrator"):
        generation.events.job_changed(job_id)
        return {"status": "success", "id": job_id, "message": "Request cancelled"}
    current = await run_in_threadpool(generation.jobs.get, job_id)
    state = current.status if current is not None else job.status
    raise ApiError(409, f"Request {job_id} is {state}; only queued requests can be cancelled", id=job_id)
