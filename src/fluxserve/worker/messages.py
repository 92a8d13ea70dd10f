"""What the worker is told (commands) and what it tells (reports), as types. Both cross a
process boundary in process mode (``supervisor``), so they are plain picklable values."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class Command(str, Enum):
    STOP = "stop"  # finish the job in hand, then return from run()
    CLEAR_CACHE = "clear_cache"  # drop the loaded pipelines (between jobs)
    STATUS = "status"  # report status now
    WAKE = "wake"  # a job was queued: stop waiting


class Outcome(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # the claim was lost (another worker took the job over), or left to its lease; nothing recorded
    RELEASED = "released"  # put back in the queue: a dependency was away, or the worker stopped (not the job's fault)


@dataclass(frozen=True)
class JobStarted:
    job_id: int
    token: str


@dataclass(frozen=True)
class JobFinished:
    job_id: int
    outcome: Outcome
    generation_time: float | None = None
    queue_time: float = 0.0


@dataclass(frozen=True)
class StatusReport:
    """The engine's state, for system_details and the metrics."""

    models_loaded: list[str] = field(default_factory=list)
    device: str | None = None
    gpu_memory: dict[str, int] | None = None
    residency: Any = None
    optimizations: Any = None
    dependencies: dict[str, Any] = field(default_factory=dict)  # dependencies.Health.snapshot(): what is away

    def as_dict(self) -> dict[str, Any]:
        return {"models_loaded": self.models_loaded, "device": self.device, "gpu_memory": self.gpu_memory,
                "residency": self.residency, "optimizations": self.optimizations, "dependencies": self.dependencies}


Report = JobStarted | JobFinished | StatusReport


class Sink(Protocol):
    """Where the worker's reports go: the server's ``WorkerLink`` (thread mode), or a queue to it."""

    def report(self, report: Report) -> None: ...


class NullSink:
    def report(self, report: Report) -> None:
        pass
