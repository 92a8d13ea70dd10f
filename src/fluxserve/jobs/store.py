"""The job store: the source of truth for every request.

Every state change is one short transaction guarded by the state it expects (and, for a
running job, by the claim token of the attempt that runs it), so a job is claimed by one
worker at a time and finished exactly once, even when a worker presumed dead wakes up.
A webhook delivery row is written in the same transaction that finishes a job, so no
crash can lose a notification or send one for a job that did not finish.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, case, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from fluxserve.contract import FailedAnswer
from fluxserve.jobs.database import rowcount
from fluxserve.jobs.deliveries import receiver_of
from fluxserve.jobs.status import DeliveryStatus, JobStatus
from fluxserve.jobs.tables import ApiKey, IdempotencyKey, Job, WebhookDelivery, utcnow

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
NOTIFY_CHANNEL = "fluxserve_jobs"  # PostgreSQL: every job change is announced here (``jobs.notify``)
QUEUED_SUFFIX = " queued"  # a payload "<id> queued": a new job (idle workers may claim it), else "<id>": a change
IDEMPOTENCY_SECONDS = 24 * 3600  # how long an Idempotency-Key names its job (Stripe keeps them 24 h)


class IdempotencyConflict(Exception):
    """The idempotency key already created job ``job_id`` (for the same request, or not)."""

    def __init__(self, job_id: int, same_request: bool):
        super().__init__(f"idempotency key already used for job {job_id}")
        self.job_id, self.same_request = job_id, same_request


def _notify(session: Session, job_id: int, suffix: str = "") -> None:
    """On PostgreSQL, announce that job ``job_id`` changed (``NOTIFY fluxserve_jobs``): delivered
    to every listening API process when this transaction commits, and not at all if it rolls back
    (``jobs.notify.JobNotifications`` wakes the requests waiting for it). Elsewhere: nothing
    (SQLite serves one box, where the worker reports in process)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": NOTIFY_CHANNEL, "payload": f"{job_id}{suffix}"})


def _claim(session: Session, job_id: int) -> bool:
    """queued -> running under a fresh claim token; False if another worker won the race."""
    now = utcnow()
    claimed = bool(rowcount(session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, started_at=now, heartbeat_at=now, claim_token=str(uuid.uuid4()),
                attempts=Job.attempts + 1, progress_step=0, progress_total=0)
    )))
    if claimed:
        _notify(session, job_id)
    return claimed


def _storable_id(job_id: int) -> bool:
    """Ids are positive 64-bit integers on every backend."""
    return isinstance(job_id, int) and 0 < job_id < 2**63


def _claimable(now: datetime):
    """Queued, and not waiting out a dependency's outage (``release``)."""
    return (Job.status == JobStatus.QUEUED.value) & or_(Job.not_before.is_(None), Job.not_before <= now)


def _silent_since(cutoff: datetime):
    """No heartbeat since ``cutoff`` (NULL: claimed by a release that did not beat)."""
    return or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))


def next_job_query(now: datetime, *, loaded: Sequence[str] = (), affinity_seconds: float = 0.0,
                   models: Sequence[str] | None = None) -> Select[int]:
    """The id of the job ``JobStore.claim_next`` takes next (its docstring says which).

    When each key was last served is looked up once per key with a claimable job (a materialized
    CTE joined to the queue), not once per queued job: as a correlated subquery in the ORDER BY it ran
    for every queued row, so a claim cost grew with the queue (40-90 ms of server time at 10,000
    queued jobs on PostgreSQL, 15 ms now: bench/control_plane.py, BENCHMARKS.md)."""
    claimable = _claimable(now)
    if models is not None:
        claimable = claimable & Job.model.in_(list(models))
    waiting = select(Job.key_id).where(claimable).distinct().subquery("waiting")
    served = aliased(Job)
    last_served = (select(func.max(served.started_at))
                   .where(served.key_id == waiting.c.key_id, served.started_at.is_not(None)).scalar_subquery())
    # MATERIALIZED: computed once; as a plain subquery PostgreSQL may flatten it into the join or
    # rescan it per queued job, running the lookup per job again
    fairness = (select(waiting.c.key_id, last_served.label("last_served")).cte("fairness")
                .prefix_with("MATERIALIZED", dialect="postgresql"))
    order = []
    if loaded:
        waited_enough = Job.created_at <= now - timedelta(seconds=affinity_seconds)
        order.append(case((or_(Job.model.in_(list(loaded)), waited_enough), 0), else_=1))
    return (select(Job.id).join(fairness, fairness.c.key_id == Job.key_id).where(claimable)
            .order_by(*order, fairness.c.last_served.asc().nulls_first(), Job.id).limit(1))


def failure_payload(job: Job, message: str) -> dict[str, Any]:
    """ModelsLab's failure webhook body."""
    return FailedAnswer(id=job.id, message=message, track_id=job.track_id).body()


class JobStore:
    def __init__(self, sessions: sessionmaker[Session], *, webhook_retry_seconds: float = 86400.0):
        self._sessions = sessions
        self.webhook_retry_seconds = webhook_retry_seconds

    # -- creating and reading ------------------------------------------------------------------
    def create(
        self, *, key_id: int, server: str, model: str, task: str, params: dict[str, Any],
        meta: dict[str, Any], file_prefix: str, webhook: str | None = None, track_id: str | None = None,
        batch_key: str | None = None, idempotency: tuple[str, str] | None = None,
    ) -> Job:
        """Queue a job. With ``idempotency`` = (the client's key, the request's hash), the key is
        recorded in the same transaction; if the key already names a job (within
        ``IDEMPOTENCY_SECONDS``), nothing is created and ``IdempotencyConflict`` says which."""
        job = Job(
            key_id=key_id, server=server, model=model, task=task, status=JobStatus.QUEUED.value,
            params=params, meta=meta, file_prefix=file_prefix, outputs=[], webhook=webhook, track_id=track_id,
            batch_key=batch_key,
        )
        if idempotency is not None:
            existing = self.idempotent_job(key_id, *idempotency)
            if existing is not None:
                raise existing
        try:
            with self._sessions.begin() as session:
                session.add(job)
                session.flush()  # the job's id
                if idempotency is not None:
                    session.add(IdempotencyKey(key_id=key_id, value=idempotency[0], request_hash=idempotency[1],
                                               job_id=job.id))
                _notify(session, job.id, QUEUED_SUFFIX)
        except IntegrityError:
            if idempotency is None:
                raise
            existing = self.idempotent_job(key_id, *idempotency)  # a concurrent twin won the race
            if existing is None:
                raise
            raise existing from None
        return job

    def idempotent_job(self, key_id: int, value: str, request_hash: str) -> IdempotencyConflict | None:
        """The job an unexpired idempotency key already created, as an ``IdempotencyConflict``
        (``same_request`` tells whether the request matches); an expired key is deleted."""
        cutoff = utcnow() - timedelta(seconds=IDEMPOTENCY_SECONDS)
        with self._sessions.begin() as session:
            row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.key_id == key_id,
                                                              IdempotencyKey.value == value))
            if row is None:
                return None
            if row.created_at < cutoff:
                session.delete(row)
                return None
            return IdempotencyConflict(row.job_id, row.request_hash == request_hash)

    def forget_idempotency_keys(self, now: datetime | None = None) -> int:
        """Delete keys older than ``IDEMPOTENCY_SECONDS`` (the janitor's job); returns how many."""
        cutoff = (now or utcnow()) - timedelta(seconds=IDEMPOTENCY_SECONDS)
        with self._sessions.begin() as session:
            return rowcount(session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)))

    def get(self, job_id: int, key_id: int | None = None) -> Job | None:
        if not _storable_id(job_id):  # e.g. a client's 10**30: no such job, and no database error
            return None
        with self._sessions() as session:
            job = session.get(Job, job_id)
        if job is None or (key_id is not None and job.key_id != key_id):
            return None
        return job

    def queued_count(self, key_id: int | None = None) -> int:
        query = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)
        if key_id is not None:
            query = query.where(Job.key_id == key_id)
        with self._sessions() as session:
            return session.scalar(query) or 0

    def active_count(self, key_id: int) -> int:
        """A key's unfinished (queued or running) jobs: what the per-key limit counts."""
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE), Job.key_id == key_id)
            ) or 0

    def queue_depth(self) -> int:
        return self.queued_count()

    def running_count(self) -> int:
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING.value)
            ) or 0

    def jobs_ahead(self, job_id: int) -> int:
        """Active jobs that will run before this one (FIFO by id)."""
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE), Job.id < job_id)
            ) or 0

    def recent_generation_time(self, model: str | None = None, limit: int = 20) -> float | None:
        with self._sessions() as session:
            recent = select(Job.generation_time).where(Job.status == JobStatus.SUCCEEDED.value)
            if model is not None:
                recent = recent.where(Job.model == model)
            latest = recent.order_by(Job.id.desc()).limit(limit).subquery()
            return session.scalar(select(func.avg(latest.c.generation_time)))

    def oldest_queued_age(self) -> float:
        """Seconds the oldest queued job has waited (0 with an empty queue)."""
        with self._sessions() as session:
            oldest = session.scalar(select(func.min(Job.id)).where(Job.status == JobStatus.QUEUED.value))
            job = session.get(Job, oldest) if oldest is not None else None
        return max(0.0, (utcnow() - job.created_at).total_seconds()) if job else 0.0

    def webhook_status(self, job_id: int) -> str:
        """"" without a webhook, else the latest delivery's state: pending | delivered | failed
        (the receiver refused it) | dead (its retry window ended; an admin may replay it)."""
        with self._sessions() as session:
            return session.scalar(
                select(WebhookDelivery.status).where(WebhookDelivery.job_id == job_id)
                .order_by(WebhookDelivery.id.desc()).limit(1)
            ) or ""

    # -- listings (the playground's history, the operator view) -------------------------------
    def recent(self, key_id: int, limit: int = 20) -> list[Job]:
        """A key's most recent jobs, newest first."""
        with self._sessions() as session:
            return list(session.scalars(select(Job).where(Job.key_id == key_id).order_by(Job.id.desc()).limit(limit)))

    def recent_failures(self, limit: int = 50) -> list[tuple[Job, str | None]]:
        """Failed jobs of every key, the most recently finished first, each with its key's name."""
        with self._sessions() as session:
            rows = session.execute(
                select(Job, ApiKey.name).join(ApiKey, ApiKey.id == Job.key_id, isouter=True)
                .where(Job.status == JobStatus.FAILED.value)
                .order_by(Job.finished_at.desc(), Job.id.desc()).limit(limit)
            )
            return [(job, name) for job, name in rows]

    def active(self, limit: int = 100) -> list[tuple[Job, str | None]]:
        """Running then queued jobs of every key (oldest first in each), each with its key's name."""
        running_first = case((Job.status == JobStatus.RUNNING.value, 0), else_=1)
        with self._sessions() as session:
            rows = session.execute(
                select(Job, ApiKey.name).join(ApiKey, ApiKey.id == Job.key_id, isouter=True)
                .where(Job.status.in_(ACTIVE)).order_by(running_first, Job.id).limit(limit)
            )
            return [(job, name) for job, name in rows]

    # -- running -------------------------------------------------------------------------------
    def claim_next(self, *, loaded: Sequence[str] = (), affinity_seconds: float = 0.0,
                   models: Sequence[str] | None = None) -> Job | None:
        """Move the next queued job to running under a fresh claim token and return it. Next is:

        1. a job for a model in ``loaded`` (the worker holds it: no model swap), unless a job for
           another model has waited ``affinity_seconds`` or more (then it is as good: no starvation);
        2. fair share: the job of the key served longest ago (a key never served first), so one
           key with 500 queued jobs does not block another key's single job;
        3. the oldest.

        ``models`` limits the worker to its model group. On PostgreSQL the row is taken with
        ``FOR UPDATE SKIP LOCKED``, so concurrent workers take different jobs without retrying."""
        while True:
            query = next_job_query(utcnow(), loaded=loaded, affinity_seconds=affinity_seconds, models=models)
            with self._sessions.begin() as session:
                if session.get_bind().dialect.name == "postgresql":
                    query = query.with_for_update(of=Job, skip_locked=True)
                job_id = session.scalar(query)
                if job_id is None:
                    return None
                claimed = _claim(session, job_id)
            if claimed:  # another worker may have won the race (SQLite): then try the next one
                return self.get(job_id)

    def claim_compatible(self, batch_key: str, limit: int) -> list[Job]:
        """Claim up to ``limit`` more queued jobs that may share one pipeline call (FIFO)."""
        claimed: list[Job] = []
        with self._sessions() as session:
            candidates = list(session.scalars(
                select(Job.id).where(_claimable(utcnow()), Job.batch_key == batch_key)
                .order_by(Job.id).limit(limit)
            ))
        for job_id in candidates:
            with self._sessions.begin() as session:
                won = _claim(session, job_id)
            if won:
                job = self.get(job_id)
                assert job is not None  # just claimed, and jobs are never deleted
                claimed.append(job)
        return claimed

    def heartbeat(self, job_id: int, token: str, step: int | None = None, total: int | None = None) -> bool:
        """Keep the claim alive (and record progress). False: the job is no longer ours."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if step is not None:
            values["progress_step"] = step
        if total is not None:
            values["progress_total"] = total
        with self._sessions.begin() as session:
            beaten = bool(rowcount(session.execute(
                update(Job).where(Job.id == job_id, Job.claim_token == token, Job.status == JobStatus.RUNNING.value)
                .values(**values)
            )))
            if beaten and step is not None:  # progress, which streams show (written at most 4 times a second)
                _notify(session, job_id)
            return beaten

    def succeed(
        self, job_id: int, token: str, *, outputs: list[str], nsfw_detected: bool, generation_time: float,
        meta: dict[str, Any], expires_at: datetime | None = None, webhook_payload: dict[str, Any] | None = None,
        output_urls: list[str] | None = None,
    ) -> bool:
        return self._finish(
            job_id, token, JobStatus.SUCCEEDED, webhook_payload,
            outputs=outputs, nsfw_detected=nsfw_detected, generation_time=generation_time, meta=meta,
            expires_at=expires_at, output_urls=output_urls,
        )

    def release(self, job_id: int, token: str, delay_seconds: float, *, waited: bool = True) -> bool:
        """Put a running job back in the queue because a dependency it needs is away (not the
        job's fault), or because its worker is stopping: it is claimed again after
        ``delay_seconds``, this attempt does not count against ``max_job_attempts``, and nothing
        is recorded as failed. ``waited`` counts the release in ``waits`` (the backoff of a
        dependency's outage; a stop is none). False: not ours."""
        with self._sessions.begin() as session:
            released = bool(rowcount(session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.claim_token == token)
                .values(status=JobStatus.QUEUED.value, claim_token=None, attempts=Job.attempts - 1,
                        waits=Job.waits + (1 if waited else 0), not_before=utcnow() + timedelta(seconds=delay_seconds),
                        progress_step=0, progress_total=0)
            )))
            if released:
                _notify(session, job_id, QUEUED_SUFFIX)
            return released

    def ping(self) -> None:
        """Raise if the database can't be reached (a cheap query)."""
        with self._sessions() as session:
            session.execute(select(1))

    def fail(self, job_id: int, token: str, message: str) -> bool:
        return self._finish(job_id, token, JobStatus.FAILED, None, error=message)

    def _finish(
        self, job_id: int, token: str, status: JobStatus, payload: dict[str, Any] | None, **values: Any
    ) -> bool:
        with self._sessions.begin() as session:
            changed = rowcount(session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.claim_token == token)
                .values(status=status.value, finished_at=utcnow(), claim_token=None, **values)
            ))
            if changed:
                _notify(session, job_id)
                job = session.get(Job, job_id)
                assert job is not None  # the update above just matched it
                if payload is None and status is JobStatus.SUCCEEDED and job.webhook:
                    raise ValueError("succeed() needs the webhook payload for a job with a webhook")  # rolls back
                self._queue_webhook(session, job, payload if payload is not None else failure_payload(job, job.error or "failed"))
        return bool(changed)

    def _queue_webhook(self, session: Session, job: Job, payload: dict[str, Any]) -> None:
        if not job.webhook:
            return
        now = utcnow()
        session.add(WebhookDelivery(
            job_id=job.id, key_id=job.key_id, url=job.webhook, receiver=receiver_of(job.webhook), payload=payload,
            status=DeliveryStatus.PENDING.value, next_attempt_at=now,
            give_up_at=now + timedelta(seconds=self.webhook_retry_seconds),
        ))

    # -- cancelling ----------------------------------------------------------------------------
    def cancel(self, job_id: int, key_id: int | None = None, message: str = "Request was cancelled") -> bool:
        """Cancel a queued job (running and finished jobs are left alone)."""
        if not _storable_id(job_id):
            return False
        with self._sessions.begin() as session:
            query = update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            if key_id is not None:
                query = query.where(Job.key_id == key_id)
            changed = rowcount(session.execute(
                query.values(status=JobStatus.CANCELLED.value, finished_at=utcnow(), error=message)
            ))
            if changed:
                _notify(session, job_id)
                job = session.get(Job, job_id)
                assert job is not None  # the update above just matched it
                self._queue_webhook(session, job, failure_payload(job, message))
        return bool(changed)

    def cancel_queued(self, key_id: int | None = None, message: str = "Request was cancelled: queue cleared") -> list[int]:
        query = select(Job.id).where(Job.status == JobStatus.QUEUED.value)
        if key_id is not None:
            query = query.where(Job.key_id == key_id)
        with self._sessions() as session:
            ids = list(session.scalars(query.order_by(Job.id)))
        return [job_id for job_id in ids if self.cancel(job_id, message=message)]

    # -- recovery ------------------------------------------------------------------------------
    def recover_stale(self, lease_seconds: float, max_attempts: int) -> tuple[list[int], list[int]]:
        """Running jobs whose worker stopped heart-beating (it died) go back to the queue, or
        fail with a clear message once they used ``max_attempts`` tries. Returns (requeued, failed)."""
        cutoff = utcnow() - timedelta(seconds=lease_seconds)
        with self._sessions() as session:
            stale = list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value, _silent_since(cutoff))))
        requeued: list[int] = []
        failed: list[int] = []
        for job in stale:
            outcome = self.recover(job.id, job.claim_token, max_attempts, silent_since=cutoff)
            (requeued if outcome == "requeued" else failed if outcome == "failed" else []).append(job.id)
        return requeued, failed

    def recover(
        self, job_id: int, token: str | None, max_attempts: int, silent_since: datetime | None = None
    ) -> str | None:
        """Take back a running job whose worker is dead: "requeued", "failed" (out of attempts),
        or None if that attempt is not running any more. With ``silent_since``, only if the
        worker has not beaten since then (it may have woken up meanwhile)."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            guard = update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.claim_token == token)
            if silent_since is not None:
                guard = guard.where(_silent_since(silent_since))
            if job is None:
                return None
            if job.attempts >= max_attempts:
                message = (f"Generation was interrupted: the worker stopped during all {job.attempts} "
                           "attempt(s); giving up. Please try again.")
                if rowcount(session.execute(guard.values(
                    status=JobStatus.FAILED.value, finished_at=utcnow(), claim_token=None, error=message
                ))):
                    _notify(session, job_id)
                    self._queue_webhook(session, job, failure_payload(job, message))
                    return "failed"
                return None
            if rowcount(session.execute(guard.values(status=JobStatus.QUEUED.value, claim_token=None))):
                _notify(session, job_id, QUEUED_SUFFIX)
                return "requeued"
            return None

    # -- retention -----------------------------------------------------------------------------
    def due_for_expiry(self, now: datetime | None = None, limit: int = 200) -> list[Job]:
        with self._sessions() as session:
            return list(session.scalars(
                select(Job).where(
                    Job.status == JobStatus.SUCCEEDED.value, Job.expired_at.is_(None),
                    Job.expires_at.is_not(None), Job.expires_at <= (now or utcnow()),
                ).order_by(Job.expires_at).limit(limit)
            ))

    def mark_expired(self, job_id: int) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(Job).where(Job.id == job_id, Job.expired_at.is_(None), Job.status == JobStatus.SUCCEEDED.value)
                .values(expired_at=utcnow())
            )

    def active_inputs(self) -> set[str]:
        """Init image files still needed by queued or running jobs."""
        with self._sessions() as session:
            params = session.scalars(select(Job.params).where(Job.status.in_(ACTIVE)))
            return {name for p in params for name in [*p.get("inputs", []), p.get("input_2"), p.get("mask")] if name}
