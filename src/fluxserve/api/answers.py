"""A job row as the ModelsLab answer a client gets (``contract``): success, processing, or the
failed shape, with the URLs its images have or will have."""

from __future__ import annotations

from typing import Any

from fluxserve.api.paths import BY_SERVER
from fluxserve.contract import FailedAnswer, ProcessingAnswer, SuccessAnswer
from fluxserve.images import to_base64
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import Job
from fluxserve.storage.local import LocalStorage

DEFAULT_FETCH = BY_SERVER["v6"].fetch_path  # for jobs of a server no longer in the table


def output_links(job: Job, storage: LocalStorage) -> list[str]:
    """The URLs a job's images (PNG) have (or will have): its bucket's public URL, or ours."""
    if job.output_urls:
        return list(job.output_urls)
    return _links(job, job.output_names(), storage)


def answer_links(job: Job, storage: LocalStorage) -> list[str]:
    """What ``output`` / ``future_links`` hold: the PNG links, or with ``base64`` (ModelsLab's
    way) the links of the ``.base64`` text files holding each image's base64."""
    return _links(job, job.base64_names(), storage) if job.base64_files else output_links(job, storage)


def _links(job: Job, names: list[str], storage: LocalStorage) -> list[str]:
    remote = job.params.get("remote")
    if remote:
        return [remote["public_url"].rstrip("/") + "/" + name for name in names]
    return [storage.url_for(name) for name in names]


def fetch_url(base_url: str, job: Job) -> str:
    family = BY_SERVER.get(job.server)
    return base_url + (family.fetch_path if family else DEFAULT_FETCH).format(id=job.id)


def success_body(job: Job, storage: LocalStorage, webhook_status: str = "", *, inline: bool | None = None) -> dict[str, Any]:
    """``inline`` (default: the request's base64 flag) puts the PNG bytes in ``output``."""
    links = output_links(job, storage)
    inline = job.params.get("base64") and not job.base64_files if inline is None else inline
    output = [to_base64(storage.read(name)) for name in job.output_names()] if inline else answer_links(job, storage)
    return SuccessAnswer(
        generationTime=round(job.generation_time or 0.0, 4), id=job.id, output=output, proxy_links=links,
        nsfw_content_detected=bool(job.nsfw_detected), webhook_status=webhook_status, tip="", warning="",
        meta=job.meta,
    ).body()


def expired_body(job: Job, webhook_status: str = "") -> dict[str, Any]:
    """A finished job whose images were deleted by retention: the record stays, the files don't."""
    when = job.expired_at.isoformat() if job.expired_at else "now"
    return SuccessAnswer(
        generationTime=round(job.generation_time or 0.0, 4), id=job.id, output=[], proxy_links=[],
        nsfw_content_detected=bool(job.nsfw_detected), webhook_status=webhook_status, meta=job.meta,
        message=f"The images of this request expired and were deleted ({when}); the record is kept.",
    ).body()


def processing_body(job: Job, storage: LocalStorage, base_url: str, eta: float) -> dict[str, Any]:
    links = output_links(job, storage)
    state = "queued" if job.status == JobStatus.QUEUED.value else "being generated"
    return ProcessingAnswer(
        tip=f"Your request is {state}; fetch it from fetch_result or wait for the future_links.",
        tip_1="The images appear at future_links when they are ready.",
        webhook_status="pending" if job.webhook else "",
        eta=eta, fetch_result=fetch_url(base_url, job), id=job.id, meta=job.meta,
        future_links=answer_links(job, storage), proxy_links=links,
    ).body()


def failure_body(job: Job) -> dict[str, Any]:
    """A failed or cancelled job: the failure webhook's own body."""
    return FailedAnswer(id=job.id, message=job.error or "Generation failed", track_id=job.track_id).body()
