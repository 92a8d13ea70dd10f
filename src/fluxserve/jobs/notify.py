"""Wake-ups across processes and nodes on PostgreSQL: every job change the store commits is
announced with ``NOTIFY fluxserve_jobs`` (``store._notify``, payload the job id, or "<id> queued"
for a job that can be claimed), and each API process runs one ``JobNotifications`` thread that
LISTENs and hands each change to its waiting requests (``events.JobEvents.job_changed``) and
each claimable job to a worker it hosts (``JobEvents.job_queued``).

Only a latency optimisation, as the in-process events are: waiters still re-read the store. While
the listener is connected, waiters poll rarely (``JobEvents.poll_seconds``); when the connection
drops (a database outage or restart) it says so, waiters fall back to polling at once, and it
reconnects with a backoff; on reconnecting it wakes every waiter, since changes made meanwhile
were announced to nobody.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import make_url

from fluxserve.jobs.store import NOTIFY_CHANNEL, QUEUED_SUFFIX

log = logging.getLogger(__name__)

RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
RECEIVE_TIMEOUT_SECONDS = 1.0  # how often the thread looks up from the socket (to notice stop())


def listens(database_url: str) -> bool:
    """Whether the store announces job changes on this database (PostgreSQL only)."""
    return make_url(database_url).get_backend_name() == "postgresql"


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (``postgresql+psycopg://...``) as the libpq URL psycopg takes."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class JobNotifications:
    """One LISTEN connection in a daemon thread. ``on_change(job_id)`` for every change,
    ``on_queued()`` for a job that became claimable, ``on_connected(bool)`` when the connection
    comes or goes (``True`` also after a reconnect, when changes may have been missed)."""

    def __init__(self, database_url: str, *, on_change: Callable[[int], None],
                 on_queued: Callable[[], None] = lambda: None,
                 on_connected: Callable[[bool], None] = lambda connected: None):
        self.url = libpq_url(database_url)
        self.on_change, self.on_queued, self.on_connected = on_change, on_queued, on_connected
        self.connected = False
        self.received = 0  # notifications handled (tests, metrics)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxserve-listen", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """True once listening (tests and benchmarks: a change before that is only polled)."""
        deadline = time.monotonic() + timeout
        while not self.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.connected

    def _run(self) -> None:
        backoff = RECONNECT_FIRST_SECONDS
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = RECONNECT_FIRST_SECONDS
            except Exception as exc:  # noqa: BLE001 - an outage: poll meanwhile, reconnect later
                if self._stop.is_set():
                    break
                log.warning("job notifications: connection lost (%s: %s); waiters poll until it is back "
                            "(retry in %.1fs)", type(exc).__name__, str(exc).strip()[:200], backoff)
            finally:
                self._set_connected(False)
            self._stop.wait(backoff)
            backoff = min(RECONNECT_MAX_SECONDS, backoff * 2)

    def _listen(self) -> None:
        import psycopg  # the PostgreSQL driver: present wherever a PostgreSQL URL is configured

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._set_connected(True)
            while not self._stop.is_set():
                for notice in connection.notifies(timeout=RECEIVE_TIMEOUT_SECONDS):
                    self._handle(notice.payload)
                    if self._stop.is_set():
                        break
                if connection.closed or connection.broken:  # pragma: no cover - notifies() raises first
                    raise ConnectionError("the LISTEN connection closed")

    def _handle(self, payload: str) -> None:
        self.received += 1
        queued = payload.endswith(QUEUED_SUFFIX)
        try:
            job_id = int(payload.removesuffix(QUEUED_SUFFIX))
        except ValueError:
            log.warning("job notifications: ignored payload %r", payload[:100])
            return
        try:
            self.on_change(job_id)
            if queued:
                self.on_queued()
        except Exception:  # noqa: BLE001 - a callback's failure must not end the listener
            log.exception("job notifications: handling job %s failed", job_id)

    def _set_connected(self, connected: bool) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("job notifications: listening on %s", NOTIFY_CHANNEL)
        try:
            self.on_connected(connected)
        except Exception:  # noqa: BLE001
            log.exception("job notifications: on_connected failed")
