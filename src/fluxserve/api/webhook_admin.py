"""Webhook dead letters, for admins (admin keys only, like the enterprise admin endpoints): list
the deliveries that gave up (``dead``: the retry window ended; ``failed``: the receiver refused
them) and replay them.

Listings show each delivery's receiver (``scheme://host[:port]``), never its full URL: a
webhook URL's path or query often carries the receiver's own token, and listings end up in
terminals and tickets. The job id leads to the rest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from fluxserve.api.deps import AdminKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.schemas import Int, Text
from fluxserve.jobs.deliveries import GIVEN_UP, ReplayRefused, WebhookDeliveries, receiver_of
from fluxserve.jobs.status import DeliveryStatus
from fluxserve.jobs.tables import WebhookDelivery

webhooks_router = APIRouter(prefix="/api/fluxserve/webhooks", tags=["webhook admin"])
MAX_PER_PAGE = 200
MAX_PAGE = 1_000_000
MAX_ID = 2**63 - 1
STATUSES: dict[str, tuple[str, ...]] = {
    "dead": (DeliveryStatus.DEAD.value,), "failed": (DeliveryStatus.FAILED.value,), "all": GIVEN_UP,
}


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Text = Field(None, description="An admin key (or send it in a `Key` header).")
    job_id: Int = Field(None, description="Only this job's dead deliveries (default: every dead one).")


def _deliveries(services: Any) -> WebhookDeliveries:
    if services.deliveries is None:
        raise ApiError(503, "Service temporarily unavailable")
    return services.deliveries


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def delivery_item(row: WebhookDelivery) -> dict[str, Any]:
    """What admins see of a delivery (no URL path or query, no payload, no secret)."""
    given_up = row.status in GIVEN_UP
    return {
        "id": row.id, "job_id": row.job_id, "key_id": row.key_id, "status": row.status,
        "receiver": row.receiver or receiver_of(row.url), "attempts": row.attempts, "replays": row.replays,
        "last_error": row.last_error, "created_at": _when(row.created_at),
        # rows from before gave_up_at existed: their last try is their next_attempt_at
        "gave_up_at": _when(row.gave_up_at or (row.next_attempt_at if given_up else None)),
        "retry_until": _when(row.give_up_at), "delivered_at": _when(row.delivered_at),
    }


@webhooks_router.get("/deliveries")
async def list_deliveries(
    _key: AdminKey, services: ServicesDep,
    status: Annotated[Literal["dead", "failed", "all"], Query(
        description="dead: the retry window ended; failed: the receiver refused it; all: both")] = "dead",
    job_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this job's deliveries.")] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = 50,
) -> dict:
    """Deliveries that gave up, the most recent first (send the admin key in a `Key` header)."""
    rows, total = await run_in_threadpool(
        _deliveries(services).given_up, STATUSES[status], job_id=job_id, page=page, per_page=per_page)
    return {"status": "ok", "deliveries": [delivery_item(row) for row in rows], "total": total,
            "page": page, "per_page": per_page}


@webhooks_router.post("/deliveries/{delivery_id}/replay")
async def replay_delivery(delivery_id: int, _key: AdminKey, services: ServicesDep) -> dict:
    """Send a dead or failed delivery again: pending, due now, with a fresh retry window and
    attempts counter (the same row, delivery id and Idempotency-Key). 409 for a pending or
    delivered one."""
    try:
        row = await run_in_threadpool(_deliveries(services).replay, delivery_id)
    except LookupError:
        raise ApiError(404, "Webhook delivery not found") from None
    except ReplayRefused as exc:
        raise ApiError(409, f"Webhook delivery {delivery_id} is {exc.delivery.status}: only dead or failed "
                            "deliveries can be replayed") from None
    return {"status": "success", "message": f"Webhook delivery {row.id} replayed: pending, due now",
            "id": row.id, "delivery": delivery_item(row)}


@webhooks_router.post("/replay")
async def replay_dead(_key: AdminKey, services: ServicesDep, body: ReplayBody | None = None) -> dict:
    """Replay every dead delivery, or one job's (`job_id`). Failed ones (refused by their
    receiver) are replayed one by one, by id."""
    job_id = body.job_id if body is not None else None
    if job_id is not None and not 0 < job_id <= MAX_ID:
        raise ApiError(400, "job_id must be a positive integer")
    replayed = await run_in_threadpool(_deliveries(services).replay_dead, job_id)
    return {"status": "success", "message": f"{len(replayed)} dead webhook deliveries replayed",
            "replayed": replayed}
