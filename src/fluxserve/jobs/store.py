"""The job store: the source of truth for every request.

Each state change is one short transaction guarded by the state it expects, so a job is
claimed by one worker and finished exactly once even with several workers or a restart.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.tables import Job, utcnow

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


class JobStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def create(
        self,
        *,
        key_id: int,
        server: str,
        model: str,
        task: str,
        params: dict[str, Any],
        meta: dict[str, Any],
        file_prefix: str,
    ) -> Job:
        job = Job(
            key_id=key_id, server=server, model=model, task=task, status=JobStatus.QUEUED.value,
            params=params, meta=meta, file_prefix=file_prefix, outputs=[],
        )
        with self._sessions.begin() as session:
            session.add(job)
        return job

    def get(self, job_id: int, key_id: int | None = None) -> Job | None:
        with self._sessions() as session:
            job = session.get(Job, job_id)
        if job is None or (key_id is not None and job.key_id != key_id):
            return None
        return job

    def claim_next(self) -> Job | None:
        """Move the oldest queued job to running and return it (None if the queue is empty)."""
        while True:
            with self._sessions.begin() as session:
                job_id = session.scalar(
                    select(Job.id).where(Job.status == JobStatus.QUEUED.value).order_by(Job.id).limit(1)
                )
                if job_id is None:
                    return None
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                    .values(status=JobStatus.RUNNING.value, started_at=utcnow(), attempts=Job.attempts + 1)
                ).rowcount
            if claimed:  # another worker may have won the race: try the next one
                return self.get(job_id)

    def succeed(
        self, job_id: int, *, outputs: list[str], nsfw_detected: bool, generation_time: float,
        meta: dict[str, Any],
    ) -> bool:
        return self._finish(
            job_id, status=JobStatus.SUCCEEDED, outputs=outputs, nsfw_detected=nsfw_detected,
            generation_time=generation_time, meta=meta,
        )

    def fail(self, job_id: int, message: str) -> bool:
        return self._finish(job_id, status=JobStatus.FAILED, error=message)

    def _finish(self, job_id: int, *, status: JobStatus, **values: Any) -> bool:
        with self._sessions.begin() as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(status=status.value, finished_at=utcnow(), **values)
            ).rowcount
        return bool(changed)

    def requeue_interrupted(self, max_attempts: int) -> tuple[int, int]:
        """After a crash: running jobs go back to the queue, or fail once out of attempts."""
        with self._sessions.begin() as session:
            failed = session.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING.value, Job.attempts >= max_attempts)
                .values(
                    status=JobStatus.FAILED.value, finished_at=utcnow(),
                    error=f"Generation was interrupted {max_attempts} times; giving up.",
                )
            ).rowcount
            requeued = session.execute(
                update(Job).where(Job.status == JobStatus.RUNNING.value).values(status=JobStatus.QUEUED.value)
            ).rowcount
        return requeued, failed

    def jobs_ahead(self, job_id: int) -> int:
        """Active jobs that will run before this one (FIFO by id)."""
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE), Job.id < job_id)
            ) or 0

    def recent_generation_time(self, model: str, limit: int = 20) -> float | None:
        with self._sessions() as session:
            recent = (
                select(Job.generation_time)
                .where(Job.model == model, Job.status == JobStatus.SUCCEEDED.value)
                .order_by(Job.id.desc())
                .limit(limit)
                .subquery()
            )
            return session.scalar(select(func.avg(recent.c.generation_time)))

    def queue_depth(self) -> int:
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)
            ) or 0
