"""In-process signalling between the API (asyncio) and the worker (threads): "a job was
queued" wakes the worker, "job N finished" wakes the requests waiting for it, "the server is
stopping" wakes them all. Only a latency optimisation: both sides also poll the store, which
stays the source of truth.

Across processes and nodes (PostgreSQL), ``jobs.notify.JobNotifications`` feeds the same calls
from the database's NOTIFYs and says, through ``set_pushed``, whether it is connected: while it
is, every change reaches ``job_changed`` and waiters poll only rarely (``poll_seconds``)."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable

PUSHED_POLL_SECONDS = 5.0  # how often waiters re-read the store while every change is pushed to them


class JobEvents:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self.wake_worker: Callable[[], None] = lambda: None  # set by whoever hosts the worker
        self.closing = threading.Event()  # the server is stopping: waits end now, progress streams close
        self.pushed = False  # a database listener hands every job change to job_changed (jobs.notify)

    def poll_seconds(self, fallback: float) -> float:
        """How long a waiter may sleep between reads of the store: ``fallback`` (tight polling),
        or much longer while every change is pushed (a missed wake-up costs at most this)."""
        return max(fallback, PUSHED_POLL_SECONDS) if self.pushed else fallback

    def set_pushed(self, pushed: bool) -> None:
        """The database listener connected (True) or lost its connection (False). Every waiter
        wakes either way: after a reconnect, changes made meanwhile were announced to nobody;
        after a loss, they go back to polling at the tight interval now, not after a long sleep."""
        self.pushed = pushed
        self.wake_all()

    def wake_all(self) -> None:
        with self._lock:
            waiters = [entry for entries in self._waiters.values() for entry in entries]
        self._wake(waiters)

    def shutdown(self) -> None:
        """The server is stopping: wake every waiting request (and make later waits return at
        once), so that they answer now instead of holding the shutdown up."""
        self.closing.set()
        self.wake_all()

    def job_queued(self) -> None:
        self.wake_worker()

    def job_changed(self, job_id: int) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that request's event loop is closed (server shutting down)
                pass

    async def wait(self, job_id: int, timeout: float) -> None:
        """Return when job ``job_id`` changes or ``timeout`` passes, whichever is first (at once
        while the server is closing)."""
        if self.closing.is_set():
            return
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
