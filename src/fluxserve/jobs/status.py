"""Job lifecycle states."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class DeliveryStatus(str, Enum):
    """A webhook delivery: ``pending`` (due or waiting for its next try), ``delivered`` (2xx),
    ``failed`` (refused: the receiver redirected or answered a non-retryable 4xx, or the URL is
    not allowed) or ``dead`` (still failing when its retry window ended: a dead letter). Failed
    and dead ones are terminal until an admin replays them (back to ``pending``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"

    @property
    def is_given_up(self) -> bool:
        return self in (DeliveryStatus.FAILED, DeliveryStatus.DEAD)
