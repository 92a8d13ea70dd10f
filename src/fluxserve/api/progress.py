"""Our own additions to the ModelsLab API: cancelling a queued request, and a Server-Sent
Events stream of one request's progress (queued position, step i of n, done; or, when the
server stops first, a final ``shutdown`` event saying where to fetch the result)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from fluxserve.api.answers import fetch_url
from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import Job

jobs_router = APIRouter(prefix="/api/fluxserve/jobs", tags=["fluxserve"])
POLL_SECONDS = 0.25
FAREWELL_SECONDS = 5.0  # how long a stream may take to send its final event once the server stops


@jobs_router.post("/{job_id}/cancel")
async def cancel(job_id: int, key: AuthKey, services: ServicesDep) -> JSONResponse:
    """Cancel a queued request (its webhook, if any, is told it failed)."""
    return await services.generation.cancel(key, job_id)


@jobs_router.get("/{job_id}/events")
async def events(job_id: int, key: AuthKey, services: ServicesDep) -> EventSourceResponse:
    """Events: `queued` {position, eta}, `progress` {step, total}, then `done` with the same body
    a fetch would answer (success / error), and the stream ends. If the server stops first, the
    last event is `shutdown` {id, status: "processing", job_status, message, fetch_result}: the
    request is kept (and finished after the restart); poll fetch_result."""
    generation = services.generation
    await generation.owned_job(key, job_id)  # 404 before the stream starts
    stopping = anyio.Event()  # set by sse_starlette when it sees the server stop (our events say it first)

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
            if generation.events.closing.is_set() or stopping.is_set():
                yield {"event": "shutdown", "data": json.dumps(_shutdown_body(job, generation.settings.base_url))}
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
            await generation.events.wait(job_id, generation.events.poll_seconds(POLL_SECONDS))

    return EventSourceResponse(stream(), ping=15, shutdown_event=stopping, shutdown_grace_period=FAREWELL_SECONDS)


def _shutdown_body(job: Job, base_url: str) -> dict[str, Any]:
    return {
        "id": job.id, "status": "processing", "job_status": job.status,
        "message": "The server is restarting; this stream ends here. The request is kept and will be finished: "
                   "fetch it from fetch_result (it answers again once the server is back).",
        "fetch_result": fetch_url(base_url, job),
    }
