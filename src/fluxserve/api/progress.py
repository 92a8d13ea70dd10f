"""Our own additions to the ModelsLab API: cancelling a queued request, and a Server-Sent
Events stream of one request's progress (queued position, step i of n, done)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.jobs.status import JobStatus

jobs_router = APIRouter(prefix="/api/fluxserve/jobs", tags=["fluxserve"])
POLL_SECONDS = 0.25


@jobs_router.post("/{job_id}/cancel")
async def cancel(job_id: int, key: AuthKey, services: ServicesDep) -> JSONResponse:
    """Cancel a queued request (its webhook, if any, is told it failed)."""
    return await services.generation.cancel(key, job_id)


@jobs_router.get("/{job_id}/events")
async def events(job_id: int, key: AuthKey, services: ServicesDep) -> EventSourceResponse:
    """Events: `queued` {position, eta}, `progress` {step, total}, then `done` with the same body
    a fetch would answer (success / error), and the stream ends."""
    generation = services.generation
    await generation.owned_job(key, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[dict]:
        last = None
        while True:
            job = await run_in_threadpool(generation.jobs.get, job_id)
            assert job is not None  # owned_job found it above, and jobs are never deleted
            status = JobStatus(job.status)
            if status.is_terminal:
                answer = await generation._answer(job)
                yield {"event": "done", "data": bytes(answer.body).decode()}
                return
            if status is JobStatus.QUEUED:
                ahead = await run_in_threadpool(generation.jobs.jobs_ahead, job_id)
                event = ("queued", {"id": job_id, "position": ahead + 1,
                                    "eta": await run_in_threadpool(generation.eta, job)})
            else:
                event = ("progress", {"id": job_id, "step": job.progress_step, "total": job.progress_total})
            if event != last:
                last = event
                yield {"event": event[0], "data": json.dumps(event[1])}
            await generation.events.wait(job_id, POLL_SECONDS)

    return EventSourceResponse(stream(), ping=15)
