"""The worker's settings, typed (built from ``Settings`` by ``from_settings``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerConfig:
    max_attempts: int = 3  # tries per job when its worker dies mid-generation
    lease_seconds: float = 15.0  # a running job silent this long is taken back
    heartbeat_seconds: float = 2.0
    retention_seconds: float = 86400.0  # local images expire this long after they are made
    max_batch_size: int = 1  # compatible jobs per pipeline call (1: no batching)
    batch_wait_seconds: float = 0.0  # how long a batch waits for companions
    idle_poll_seconds: float = 0.2  # how often an idle worker looks at the queue
    shutdown_grace_seconds: float = 30.0  # a stopping worker's time to finish the job in hand
    affinity_seconds: float = 30.0  # jobs for loaded models first, unless another waited this long
    models: tuple[str, ...] | None = None  # the model group claimed (registry names); None: every model

    @classmethod
    def from_settings(cls, settings: Any) -> WorkerConfig:
        return cls(
            max_attempts=settings.max_job_attempts, lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds, retention_seconds=settings.retention_seconds,
            max_batch_size=settings.max_batch_size, batch_wait_seconds=settings.batch_wait_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds, affinity_seconds=settings.affinity_seconds,
            models=tuple(settings.worker_models) if settings.worker_models else None,
        )
