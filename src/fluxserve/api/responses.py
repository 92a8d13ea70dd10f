"""The success / processing / error bodies of the ModelsLab contract, built from a job row."""

from __future__ import annotations

from typing import Any

from fluxserve.images import to_base64
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import Job
from fluxserve.storage.local import LocalStorage

FETCH_PATHS = {
    "flux_klein": "/api/v1/enterprise/flux_klein/fetch/{id}",
    "realtime": "/api/v1/enterprise/realtime/fetch/{id}",
    "flux": "/api/v1/enterprise/flux/fetch/{id}",
    "v6": "/api/v6/images/fetch/{id}",
    "v6_realtime": "/api/v6/realtime/fetch/{id}",
    "v7": "/api/v7/images/fetch/{id}",
}


def output_links(job: Job, storage: LocalStorage) -> list[str]:
    """The URLs a job's images have (or will have): its bucket's public URL, or ours."""
    if job.output_urls:
        return list(job.output_urls)
    remote = job.params.get("remote")
    if remote:
        return [remote["public_url"].rstrip("/") + "/" + name for name in job.output_names()]
    return [storage.url_for(name) for name in job.output_names()]


def fetch_url(base_url: str, job: Job) -> str:
    return base_url + FETCH_PATHS[job.server].format(id=job.id)


def success_body(job: Job, storage: LocalStorage, webhook_status: str = "", *, inline: bool | None = None) -> dict[str, Any]:
    """``inline`` (default: the request's base64 flag) puts the PNG bytes in ``output``."""
    links = output_links(job, storage)
    inline = job.params.get("base64") if inline is None else inline
    output = [to_base64(storage.read(name)) for name in job.outputs] if inline else links
    return {
        "status": "success",
        "generationTime": round(job.generation_time or 0.0, 4),
        "id": job.id,
        "output": output,
        "proxy_links": links,
        "nsfw_content_detected": bool(job.nsfw_detected),
        "webhook_status": webhook_status,
        "tip": "",
        "meta": job.meta,
    }


def expired_body(job: Job, webhook_status: str = "") -> dict[str, Any]:
    """A finished job whose images were deleted by retention: the record stays, the files don't."""
    when = job.expired_at.isoformat() if job.expired_at else "now"
    return {
        "status": "success",
        "generationTime": round(job.generation_time or 0.0, 4),
        "id": job.id,
        "output": [],
        "proxy_links": [],
        "nsfw_content_detected": bool(job.nsfw_detected),
        "webhook_status": webhook_status,
        "message": f"The images of this request expired and were deleted ({when}); the record is kept.",
        "meta": job.meta,
    }


def processing_body(job: Job, storage: LocalStorage, base_url: str, eta: float) -> dict[str, Any]:
    links = output_links(job, storage)
    state = "queued" if job.status == JobStatus.QUEUED.value else "being generated"
    return {
        "status": "processing",
        "tip": f"Your request is {state}; fetch it from fetch_result or wait for the future_links.",
        "eta": eta,
        "message": "Request processing",
        "fetch_result": fetch_url(base_url, job),
        "id": job.id,
        "output": [],
        "meta": job.meta,
        "future_links": links,
        "proxy_links": links,
    }


def failure_body(job: Job) -> dict[str, Any]:
    return {"status": "error", "id": job.id, "message": job.error or "Generation failed", "output": []}
