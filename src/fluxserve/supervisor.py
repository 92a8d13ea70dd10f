"""Hosting the GPU worker: in a thread of the server, or in a child process that the server
restarts when it dies, so that a CUDA crash or a hard out-of-memory kills one job attempt,
not the API. Either way the worker reports through ``WorkerLink``, which lives in the server
process: it wakes waiting requests, feeds metrics and keeps the worker's last status."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.jobs.store import JobStore
from fluxserve.logs import configure as configure_logging
from fluxserve.metrics import Metrics
from fluxserve.worker.messages import Command, JobFinished, JobStarted, Outcome, Report, StatusReport

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue as ProcessQueue

    from fluxserve.worker.loop import Worker

log = logging.getLogger(__name__)


class WorkerLink:
    """The server-side end of the worker's reports (a ``worker.messages.Sink``)."""

    def __init__(self, events: JobEvents, metrics: Metrics):
        self.events = events
        self.metrics = metrics
        self.running: dict[int, str] = {}  # job id -> claim token, of every job being run (a batch: several)
        self.last_status: dict[str, Any] = {}

    def report(self, report: Report) -> None:
        if isinstance(report, JobStarted):
            self.running[report.job_id] = report.token
            self.events.job_changed(report.job_id)
        elif isinstance(report, JobFinished):
            self.running.pop(report.job_id, None)
            self.metrics.jobs_finished.labels(report.outcome.value).inc()
            if report.outcome is Outcome.SUCCEEDED and report.generation_time is not None:
                self.metrics.generation_seconds.observe(report.generation_time)
                self.metrics.queue_seconds.observe(report.queue_time)
            self.events.job_changed(report.job_id)
        elif isinstance(report, StatusReport):
            self.last_status = report.as_dict()
            self.metrics.set_gpu_memory(report.gpu_memory)


class _QueueSink:
    """The child process's end: reports travel to the server over a multiprocessing queue."""

    def __init__(self, reports: Any):
        self.reports = reports

    def report(self, report: Report) -> None:
        self.reports.put(report)


class ThreadWorkerHost:
    """The worker as a thread of the server process (simple; a hard crash takes the server too)."""

    mode = "thread"

    def __init__(self, settings: Settings, link: WorkerLink, jobs: JobStore):
        self.settings, self.link, self.jobs = settings, link, jobs
        self.commands: queue.Queue[Command] = queue.Queue()
        self.worker: Worker | None = None

    def start(self) -> None:
        from fluxserve.runtime import build_worker

        self.worker = build_worker(self.settings, sink=self.link, commands=self.commands)
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def wake(self) -> None:
        self.commands.put(Command.WAKE)

    def command(self, command: Command) -> None:
        self.commands.put(command)

    def restart(self, settings: Settings | None = None) -> None:
        """Models are dropped and load again on next use; queued jobs stay in the store."""
        if settings is not None and settings != self.settings:
            self.stop()
            self.settings = settings
            self.start()
        else:
            self.command(Command.CLEAR_CACHE)

    def describe(self) -> dict[str, Any]:
        alive = self.worker is not None and self.worker.alive
        return {"mode": self.mode, "alive": alive, "pid": os.getpid(), "restarts": 0}


def _child_main(settings_data: dict[str, Any], reports: Any, commands: Any, parent_pid: int) -> None:
    """Entry point of the worker process."""
    settings = Settings(**settings_data)
    configure_logging(logging.INFO, settings.log_format)

    def exit_with_parent() -> None:  # never outlive the server (e.g. after kill -9 of the server)
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    from fluxserve.runtime import build_worker

    worker = build_worker(settings, sink=_QueueSink(reports), commands=commands)
    worker.run()


class ProcessWorkerHost:
    """The worker in a spawned child process, restarted (with backoff) whenever it dies. The job
    it was running is requeued at once (or failed after ``max_job_attempts``)."""

    mode = "process"

    def __init__(self, settings: Settings, link: WorkerLink, jobs: JobStore):
        self.settings, self.link, self.jobs = settings, link, jobs
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._process: SpawnProcess | None = None
        self._reports: ProcessQueue[Report] | None = None  # these two are set (with the process) by _spawn
        self._commands: ProcessQueue[Command] | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self._deaths: list[float] = []
        self._planned_restart = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="fluxserve-worker-monitor", daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:
        with self._lock:
            self._reports = self._context.Queue()
            self._commands = self._context.Queue()
            self._process = self._context.Process(
                target=_child_main, name="fluxserve-worker",
                args=(self.settings.model_dump(mode="json"), self._reports, self._commands, os.getpid()),
                daemon=True,
            )
            self._process.start()
            log.info("worker process started (pid %s)", self._process.pid)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        self._stop_process(timeout)
        if self._monitor is not None:
            self._monitor.join(5)

    def _stop_process(self, timeout: float) -> None:
        process = self._process
        if process is None or not process.is_alive():
            return
        assert self._commands is not None  # spawned with the process
        self._commands.put(Command.STOP)  # finishes the job in hand first
        process.join(timeout)
        if process.is_alive():
            log.warning("worker did not stop within %.0fs; terminating it", timeout)
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

    def wake(self) -> None:
        self.command(Command.WAKE)

    def command(self, command: Command) -> None:
        if self._commands is None:  # not started yet
            return
        try:
            self._commands.put(command)
        except (AttributeError, ValueError, OSError):  # no live process right now
            pass

    def restart(self, settings: Settings | None = None) -> None:
        """A fresh worker process (new settings, models loaded anew); queued jobs stay queued."""
        def _restart() -> None:
            self._planned_restart = True  # the monitor must not treat this stop as a crash
            try:
                if settings is not None:
                    self.settings = settings
                self._stop_process(timeout=120)
                self._spawn()
            finally:
                self._planned_restart = False

        threading.Thread(target=_restart, name="fluxserve-worker-restart", daemon=True).start()


    def describe(self) -> dict[str, Any]:
        process = self._process
        return {"mode": self.mode, "alive": bool(process and process.is_alive()),
                "pid": process.pid if process else None, "restarts": self.restarts}

    # -- monitoring -----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._relay_reports()
            process = self._process
            if process is not None and not process.is_alive() and not self._planned_restart and not self._stopping.is_set():
                self._on_death(process)

    def _relay_reports(self) -> None:
        assert self._reports is not None  # the monitor starts after the first _spawn
        try:
            report = self._reports.get(timeout=0.2)
        except (queue.Empty, OSError, EOFError, ValueError):
            return
        try:
            self.link.report(report)
        except Exception:  # noqa: BLE001
            log.exception("handling worker report %r failed", report)

    def _on_death(self, process) -> None:
        log.error("worker process %s died (exit code %s)", process.pid, process.exitcode)
        assert self._reports is not None  # spawned with the process
        while True:  # reports sent just before dying still count
            try:
                self.link.report(self._reports.get_nowait())
            except (queue.Empty, OSError, EOFError, ValueError):
                break
        running, self.link.running = self.link.running, {}
        for job_id, token in running.items():
            outcome = self.jobs.recover(job_id, token, self.settings.max_job_attempts)
            log.warning("job %s was running in the dead worker: %s", job_id, outcome)
            if outcome == "failed":
                self.link.report(JobFinished(job_id, Outcome.FAILED))
            self.link.events.job_changed(job_id)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < 60] + [now]
        backoff = min(30.0, 0.5 * 2 ** (len(self._deaths) - 1))  # crash loops slow down
        if self._stopping.wait(backoff):
            return
        self.restarts += 1
        self.link.metrics.worker_restarts.inc()
        self._spawn()
