"""The eta of a queued request spreads the jobs ahead of it (and itself) over the live workers
that claim its model (``GenerationService.eta``; the count comes from the worker registry)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluxserve.api.generation import GenerationService


class Jobs:
    def __init__(self, ahead: int, per_job: float | None):
        self.ahead, self.per_job = ahead, per_job

    def recent_generation_time(self, model):
        return self.per_job

    def jobs_ahead(self, job_id):
        return self.ahead


def eta(ahead: int, per_job: float | None, workers: int, steps: int = 4, seeds: int = 1) -> float:
    asked: list[str] = []

    def live_workers(model: str) -> int:
        asked.append(model)
        return workers

    service = SimpleNamespace(jobs=Jobs(ahead, per_job), live_workers=live_workers)
    job = SimpleNamespace(id=9, model="flux-klein", params={"steps": steps, "seeds": [0] * seeds})
    value = GenerationService.eta(service, job)  # type: ignore[arg-type]
    assert asked == ["flux-klein"]
    return value


@pytest.mark.parametrize(("ahead", "workers", "expected"), [
    (0, 1, 2.0),   # next in line: one job's time
    (3, 1, 8.0),   # three ahead, one worker: four jobs' time
    (3, 2, 4.0),   # two workers take two at a time: two rounds
    (3, 4, 2.0),   # enough workers: its own time only
    (3, 0, 8.0),   # no live worker (one starting): counted as one
])
def test_the_eta_divides_the_queue_by_the_live_workers(ahead, workers, expected):
    assert eta(ahead, 2.0, workers) == expected


def test_without_a_measured_time_the_eta_guesses_from_the_steps():
    assert eta(1, None, 2, steps=4, seeds=2) == 4.0  # 0.5 s per step and image, one round
