"""This worker process as a member of the cluster (``jobs.workers.WorkerRegistry``, in the
database every replica shares): it registers when its loop starts, beats every heartbeat with
what it holds and does (models loaded, busy or idle, its GPU), picks up the admin commands
broadcast to every worker since it last looked (clear the cache, restart), forgets the workers
that stopped beating, and leaves when it stops. All of it from one side thread, best effort: a
database that is away costs beats (the row is re-made on the next one), never a job."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from fluxserve.jobs.workers import WorkerRegistry

log = logging.getLogger(__name__)
Describe = Callable[[], tuple[list[str], dict[str, Any]]]  # (models loaded, status)


class Membership:
    def __init__(self, registry: WorkerRegistry, *, gpu: str | None, every: float, lease_seconds: float):
        self.registry, self.gpu, self.every, self.lease_seconds = registry, gpu, every, lease_seconds
        self.worker_id: str | None = None
        self._last_seen: int | None = None  # the last broadcast command seen (None: not read yet)
        self._describe: Describe = lambda: ([], {})
        self._deliver: Callable[[str], None] = lambda command: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, describe: Describe, deliver: Callable[[str], None]) -> None:
        """Register, then beat on a daemon thread. ``describe`` gives what to beat with;
        ``deliver`` gets each broadcast command (a string such as ``clear_cache``)."""
        self._describe, self._deliver = describe, deliver
        try:
            self._last_seen = self.registry.last_command_id()  # commands sent before this start are not for it
            self.worker_id = self.registry.register(gpu=self.gpu)
        except Exception:  # noqa: BLE001 - the database is away: the first beat that gets through registers
            log.warning("could not register this worker yet; its heartbeat will", exc_info=True)
        self._thread = threading.Thread(target=self._run, name="fluxserve-membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the registry (the other replicas stop counting this worker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.every + 5.0)
        if self.worker_id is not None:
            try:
                self.registry.leave(self.worker_id)
            except Exception:  # noqa: BLE001 - it disappears after the lease anyway
                log.warning("could not leave the worker registry; the row expires after the lease", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()

    def tick(self) -> None:
        """One beat: the row, the commands since the last one, the dead workers."""
        try:
            if self._last_seen is None:
                self._last_seen = self.registry.last_command_id()
            if self.worker_id is None:
                self.worker_id = self.registry.register(gpu=self.gpu)
            models, status = self._describe()
            self.registry.beat(self.worker_id, models, {**status, "gpu": self.gpu})
            for command_id, command in self.registry.commands_after(self._last_seen):
                self._last_seen = command_id
                self._deliver(command)
            self.registry.forget_dead(self.lease_seconds)
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.debug("worker heartbeat failed", exc_info=True)
