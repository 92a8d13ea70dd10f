"""``GET /api/fluxserve/jobs``: a key's recent requests, newest first, each with the body a fetch
of it answers (success with its images, processing, or failed), for the playground's history.
Scoped to the key like every other job route: another key's jobs never appear."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.jobs.tables import Job

history_router = APIRouter(prefix="/api/fluxserve", tags=["fluxserve"])
MAX_LIMIT = 100


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@history_router.get("/jobs")
async def recent_jobs(
    key: AuthKey, services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many (the most recent first).")] = 20,
) -> dict:
    """The key's most recent requests, newest first (send the key in a `Key` header or
    `Authorization: Bearer`): each with its state, times and `answer`, the body a fetch of it
    answers."""
    generation = services.generation
    jobs: list[Job] = await run_in_threadpool(generation.jobs.recent, key.id, limit)
    items: list[dict[str, Any]] = []
    for job in jobs:
        answer = await generation._answer(job)  # the fetch answer, as the progress stream's done event
        items.append({
            "id": job.id, "state": job.status, "model": job.model, "task": job.task, "server": job.server,
            "created_at": _when(job.created_at), "finished_at": _when(job.finished_at),
            "answer": json.loads(bytes(answer.body)),
        })
    return {"status": "ok", "jobs": items, "limit": limit}
