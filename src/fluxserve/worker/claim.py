"""Keeping a running job's claim alive: heartbeats from a side thread, with progress."""

from __future__ import annotations

import logging
import threading
import time

from fluxserve.dependencies import Health, transient_dependency
from fluxserve.engine.errors import JobAborted, JobInterrupted
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job

log = logging.getLogger(__name__)


def claimed_token(job: Job) -> str:
    """The claim token of a job this worker claimed (set by the claim, cleared only when the job
    finishes or is taken back)."""
    assert job.claim_token is not None, f"job {job.id} is not claimed"
    return job.claim_token


class Claim:
    """A job this worker runs: its heartbeat (from a side thread) and its progress."""

    def __init__(self, jobs: JobStore, job: Job, every: float, health: Health | None = None,
                 interrupt: threading.Event | None = None):
        self.jobs, self.job_id, self.token, self.every = jobs, job.id, claimed_token(job), every
        self.health = health or Health()
        self.interrupt = interrupt  # set when a stopping worker's grace period is over
        self.step, self.total = 0, 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def start(self) -> Claim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def progress(self, step: int, total: int) -> None:
        """Called after each denoising step; stops the generation if the job is no longer ours,
        or if the worker is stopping and may not finish it."""
        self.step, self.total = step, total
        if self.lost.is_set():
            raise JobAborted("the job's claim was lost (it was recovered by another worker)")
        if self.interrupt is not None and self.interrupt.is_set():
            raise JobInterrupted("the worker is stopping and its grace period is over")

    def _run(self) -> None:
        """Beat every ``every`` seconds, and sooner (at most 4 times a second) when a step is done,
        so progress streams see each step without a database write per step."""
        written, last_beat = None, time.monotonic()
        while not self._stop.wait(min(self.every, 0.25)):
            progress = (self.step, self.total)
            if progress == written and time.monotonic() - last_beat < self.every:
                continue
            try:
                if not self.jobs.heartbeat(self.job_id, self.token, *progress):
                    self.lost.set()
                    return
                written, last_beat = progress, time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried on the next tick
                dependency = transient_dependency(exc)
                if dependency is not None:  # one line for the outage, not one per beat
                    self.health.down(dependency, f"{type(exc).__name__}: {exc}"[:300])
                else:
                    log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
