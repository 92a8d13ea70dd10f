"""In-process signalling between the API (asyncio) and the worker (threads): "a job was
queued" wakes the worker, "job N finished" wakes the requests waiting for it. Only a
latency optimisation: both sides also poll the store, which stays the source of truth."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable


class JobEvents:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self.wake_worker: Callable[[], None] = lambda: None  # set by whoever hosts the worker

    def job_queued(self) -> None:
        self.wake_worker()

    def job_changed(self, job_id: int) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that request's event loop is closed (server shutting down)
                pass

    async def wait(self, job_id: int, timeout: float) -> None:
        """Return when job ``job_id`` changes or ``timeout`` passes, whichever is first."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters[job_id].add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters[job_id].discard(entry)
                if not self._waiters[job_id]:
                    del self._waiters[job_id]
