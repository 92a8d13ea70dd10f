"""The cluster's workers, in the database every replica shares: each worker process registers,
beats with its status (models held, device, memory, dependencies away, running jobs), and leaves
when it stops; one that stops beating is dead after the lease and disappears. Admin commands for
every worker (clear the cache, restart) go through the same database."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.tables import WorkerCommand, WorkerRow, utcnow

COMMANDS_KEPT_SECONDS = 3600


class WorkerRegistry:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    # -- a worker's own row ---------------------------------------------------------------------
    def register(self, gpu: str | None = None, worker_id: str | None = None) -> str:
        """A new row for this process; returns its id."""
        worker_id = worker_id or uuid.uuid4().hex
        with self._sessions.begin() as session:
            session.merge(WorkerRow(id=worker_id, host=socket.gethostname()[:255], pid=os.getpid(), gpu=gpu,
                                    models=[], status={}, started_at=utcnow(), heartbeat_at=utcnow()))
        return worker_id

    def beat(self, worker_id: str, models: list[str], status: dict[str, Any]) -> None:
        """This worker is alive, holds ``models``, and is in ``status`` (re-registers a row that a
        replica removed as dead while this worker was paused)."""
        with self._sessions.begin() as session:
            row = session.get(WorkerRow, worker_id)
            if row is None:
                row = WorkerRow(id=worker_id, host=socket.gethostname()[:255], pid=os.getpid(), started_at=utcnow())
                session.add(row)
            row.models, row.status, row.heartbeat_at = models, status, utcnow()

    def leave(self, worker_id: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))

    # -- the cluster ------------------------------------------------------------------------------
    def alive(self, lease_seconds: float) -> list[WorkerRow]:
        """Workers that beat within ``lease_seconds``, oldest first."""
        cutoff = utcnow() - timedelta(seconds=lease_seconds)
        with self._sessions() as session:
            return list(session.scalars(select(WorkerRow).where(WorkerRow.heartbeat_at >= cutoff)
                                        .order_by(WorkerRow.started_at)))

    def count_alive(self, lease_seconds: float, model: str | None = None) -> int:
        """Live workers, or those of them that claim ``model``'s jobs (a worker whose status names
        no ``model_group`` claims every model)."""
        return sum(1 for row in self.alive(lease_seconds)
                   if model is None or not (row.status or {}).get("model_group") or model in row.status["model_group"])

    def forget_dead(self, lease_seconds: float) -> int:
        """Delete workers silent for ``lease_seconds`` (and commands older than an hour)."""
        now = utcnow()
        with self._sessions.begin() as session:
            gone = session.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - timedelta(seconds=lease_seconds)))
            session.execute(delete(WorkerCommand).where(
                WorkerCommand.created_at < now - timedelta(seconds=COMMANDS_KEPT_SECONDS)))
        return int(getattr(gone, "rowcount", 0) or 0)

    # -- commands for every worker ----------------------------------------------------------------
    def broadcast(self, command: str) -> int:
        with self._sessions.begin() as session:
            row = WorkerCommand(command=command)
            session.add(row)
            session.flush()
            return row.id

    def last_command_id(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.max(WorkerCommand.id))) or 0

    def commands_after(self, command_id: int) -> list[tuple[int, str]]:
        with self._sessions() as session:
            return [(row.id, row.command) for row in session.scalars(
                select(WorkerCommand).where(WorkerCommand.id > command_id).order_by(WorkerCommand.id))]
