"""Hosting the GPU worker: in a thread of the server, or in a child process that the server
restarts when it dies, so that a CUDA crash or a hard out-of-memory kills one job attempt,
not the API. Either way the worker reports through ``WorkerLink``, which lives in the server
process: it wakes waiting requests, feeds metrics and keeps the worker's last status.

Stopping (``begin_stop``, then ``stop``): the worker stops claiming at once and gets
``shutdown_grace_seconds`` to finish the job in hand (then puts it back in the queue itself);
a worker still busy STOP_SLACK_SECONDS past that is left (thread) or killed (process), and the
jobs it still ran go back to the queue. ``force_stop`` (a second signal) does that at once.

``WorkerPool``: the hosts of one server, one per GPU (each child process sees only its GPU),
each with its own link, so that one dying puts back, and restarts, only its own jobs."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.jobs.store import JobStore
from fluxserve.logs import configure as configure_logging
from fluxserve.metrics import Metrics
from fluxserve.signals import STOP_SIGNALS, OnSignal, exit_now
from fluxserve.worker.loop import FINISH_AFTER_GRACE_SECONDS
from fluxserve.worker.messages import Command, JobFinished, JobStarted, Outcome, Report, StatusReport

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue as ProcessQueue
    from multiprocessing.synchronize import Event as ProcessEvent

    from fluxserve.worker.loop import Worker

log = logging.getLogger(__name__)
STOP_SLACK_SECONDS = FINISH_AFTER_GRACE_SECONDS + 5.0  # past the grace period: the worker's jobs are taken back


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


def _put_back(jobs: JobStore, link: WorkerLink) -> list[int]:
    """The jobs a stopped worker was still running go back to the queue at once (the attempt
    not counted), so that the next start or another server takes them without waiting out a
    lease. Best effort: a job it can't put back is recovered after its lease."""
    running, link.running = link.running, {}
    released = []
    for job_id, token in running.items():
        try:
            if jobs.release(job_id, token, 0.0, waited=False):
                released.append(job_id)
        except Exception:  # noqa: BLE001 - e.g. the database is away: the lease brings it back
            log.warning("could not put job %s back in the queue; its lease will", job_id, exc_info=True)
        link.events.job_changed(job_id)
    if released:
        log.warning("jobs %s went back to the queue: the worker stopped before finishing them", released)
    return released


class _QueueSink:
    """The child process's end: reports travel to the server over a multiprocessing queue."""

    def __init__(self, reports: Any):
        self.reports = reports

    def report(self, report: Report) -> None:
        self.reports.put(report)


class ThreadWorkerHost:
    """The worker as a thread of the server process (simple; a hard crash takes the server too)."""

    mode = "thread"

    def __init__(self, settings: Settings, link: WorkerLink, jobs: JobStore, gpu: str | None = None):
        self.settings, self.link, self.jobs, self.gpu = settings, link, jobs, gpu
        self.commands: queue.Queue[Command] = queue.Queue()
        self.worker: Worker | None = None
        self._stop_deadline: float | None = None

    def start(self) -> None:
        from fluxserve.runtime import build_worker

        self.worker = build_worker(_thread_settings(self.settings, self.gpu), sink=self.link, commands=self.commands,
                                   gpu=self.gpu)
        self.worker.start()

    def begin_stop(self) -> None:
        """Stop claiming now; the job in hand gets the grace period. Returns at once."""
        grace = self.settings.shutdown_grace_seconds
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + grace + STOP_SLACK_SECONDS
        if self.worker is not None:
            self.worker.request_stop(grace)

    def stop(self) -> None:
        """``begin_stop``, then wait for the worker; what it still runs past the deadline goes
        back to the queue (the thread, a daemon, is left to the process's exit)."""
        self.begin_stop()
        assert self._stop_deadline is not None  # set by begin_stop
        worker = self.worker
        if worker is not None and not worker.join(max(0.0, self._stop_deadline - time.monotonic())):
            log.warning("the worker did not stop within the grace period")
        _put_back(self.jobs, self.link)
        self._stop_deadline = None  # a restart starts a fresh worker

    def force_stop(self) -> None:
        """A second signal: the jobs being run go back to the queue now (the process exits next)."""
        _put_back(self.jobs, self.link)

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
        return {"mode": self.mode, "alive": alive, "pid": os.getpid(), "restarts": 0, "gpu": self.gpu,
                "busy": bool(self.link.running)}


def _thread_settings(settings: Settings, gpu: str | None) -> Settings:
    """A thread shares the server's environment, so it can't be given its own
    CUDA_VISIBLE_DEVICES: with a GPU index and the device left to choose (auto, cuda), its
    device is that index (``cuda:N``)."""
    if gpu is None or not gpu.isdigit() or settings.device not in ("auto", "cuda"):
        return settings
    return settings.model_copy(update={"device": f"cuda:{gpu}"})


def _process_settings(settings: Settings, gpu: str | None) -> Settings:
    """A worker process given one GPU sees it as ``cuda:0``: a device set as ``cuda:N`` means that
    one GPU there."""
    if gpu is None or not settings.device.startswith("cuda:"):
        return settings
    return settings.model_copy(update={"device": "cuda:0"})


def _thread_lock_for_progress_bars() -> None:
    """tqdm (diffusers' and transformers' loading bars) otherwise makes a multiprocessing lock,
    a named semaphore this process registers with the server's resource tracker: when the
    worker is killed (a second signal, kill -9, a crash) it is never unlinked, and the tracker
    warns of a "leaked semaphore" when the server exits. The worker's bars are all drawn by its
    own threads: a thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - comes with huggingface_hub
        return
    tqdm.set_lock(threading.RLock())


def _child_main(settings_data: dict[str, Any], reports: Any, commands: Any, parent_pid: int,
                stop: Any = None, gpu: str | None = None) -> None:
    """Entry point of the worker process. With ``gpu``, it sees that GPU alone
    (CUDA_VISIBLE_DEVICES, set before anything initialises CUDA: it is cuda:0 here).
    It stops (gracefully: ``Worker.request_stop``) when the server sets ``stop`` or when a
    SIGTERM/SIGINT reaches it directly (Ctrl+C signals the whole process group, systemd the
    whole cgroup); a second signal puts its jobs back and exits."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    settings = _process_settings(Settings(**settings_data), gpu)
    configure_logging(logging.INFO, settings.log_format)
    _thread_lock_for_progress_bars()
    built: list[Worker] = []
    signalled = threading.Event()
    release = OnSignal("fluxserve-worker-release", lambda: built and built[0].release_held())
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            signalled.set()  # only an event: see fluxserve.signals
        else:
            exit_now(128 + signum, release)

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, on_signal)

    def stop_requested() -> bool:
        return signalled.is_set() or (stop is not None and stop.is_set())

    def watch() -> None:
        """Never outlive the server (e.g. after kill -9 of the server); pass a stop on to the
        worker at once, even while it generates (its loop looks only between jobs)."""
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            if built and stop_requested():
                built[0].request_stop()  # the first call counts; the grace period starts now
            time.sleep(0.1)

    threading.Thread(target=watch, name="fluxserve-worker-watch", daemon=True).start()
    from fluxserve.runtime import build_worker

    built.append(build_worker(settings, sink=_QueueSink(reports), commands=commands, stop_requested=stop_requested,
                              gpu=gpu))
    built[0].run()
    # stopped: the interpreter's teardown would garbage-collect every object torch and the
    # pipelines made (seconds on a busy CPU) for nothing; the report queue is still flushed
    gc.freeze()


class ProcessWorkerHost:
    """The worker in a spawned child process, restarted (with backoff) whenever it dies. The job
    it was running is requeued at once (or failed after ``max_job_attempts``)."""

    mode = "process"

    def __init__(self, settings: Settings, link: WorkerLink, jobs: JobStore, gpu: str | None = None):
        self.settings, self.link, self.jobs, self.gpu = settings, link, jobs, gpu
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._process: SpawnProcess | None = None
        self._reports: ProcessQueue[Report] | None = None  # these three are set (with the process) by _spawn
        self._commands: ProcessQueue[Command] | None = None
        self._stop_event: ProcessEvent | None = None  # tells the child to stop (see _child_main)
        self._stopping = threading.Event()
        self._stop_deadline: float | None = None
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
            if self._stopping.is_set():  # e.g. a planned restart overtaken by a shutdown
                return
            self._reports = self._context.Queue()
            self._commands = self._context.Queue()
            self._stop_event = self._context.Event()
            self._process = self._context.Process(
                target=_child_main, name="fluxserve-worker" if self.gpu is None else f"fluxserve-worker-gpu{self.gpu}",
                args=(self.settings.model_dump(mode="json"), self._reports, self._commands, os.getpid(),
                      self._stop_event, self.gpu),
                daemon=True,
            )
            self._process.start()
            log.info("worker process started (pid %s%s)", self._process.pid,
                     "" if self.gpu is None else f", CUDA_VISIBLE_DEVICES={self.gpu}")

    def begin_stop(self) -> None:
        """Tell the worker process to stop claiming now (it gets the grace period for the job in
        hand), and restart it no more. Returns at once."""
        with self._lock:
            if self._stop_deadline is None:
                self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_seconds + STOP_SLACK_SECONDS
            self._stopping.set()
            if self._stop_event is not None:
                self._stop_event.set()

    def stop(self) -> None:
        """``begin_stop``, then wait for the worker process to exit; one still running past the
        deadline is killed. Either way the jobs it still ran go back to the queue."""
        self.begin_stop()
        assert self._stop_deadline is not None  # set by begin_stop
        process = self._process
        if process is not None:
            process.join(max(0.0, self._stop_deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker process did not stop within the grace period; killing it")
                process.kill()
                process.join(5)
        if self._monitor is not None:
            self._monitor.join(5)  # it relays the reports until the process is gone
        self._drain_reports()
        _put_back(self.jobs, self.link)

    def force_stop(self) -> None:
        """A second signal: kill the worker process now and put the jobs it ran back in the queue."""
        self._stopping.set()
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(2)
        self._drain_reports()  # best effort: the monitor may be holding one
        _put_back(self.jobs, self.link)

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
                "pid": process.pid if process else None, "restarts": self.restarts, "gpu": self.gpu,
                "busy": bool(self.link.running)}

    # -- monitoring -----------------------------------------------------------------------------
    def _watch(self) -> None:
        """Relay the worker's reports; handle its death. While stopping, relay until it is gone
        (its last jobs finish meanwhile)."""
        while True:
            self._relay_reports()
            process = self._process
            if process is None or process.is_alive() or self._planned_restart:
                continue
            if self._stopping.is_set():
                return
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

    def _drain_reports(self) -> None:
        """Relay the reports still queued (those sent just before the worker exited count)."""
        if self._reports is None:
            return
        while True:
            try:
                report = self._reports.get_nowait()
            except (queue.Empty, OSError, EOFError, ValueError):
                return
            try:
                self.link.report(report)
            except Exception:  # noqa: BLE001
                log.exception("handling worker report %r failed", report)

    def _on_death(self, process) -> None:
        if process.exitcode == 0:  # it stopped on a signal of its own (its jobs went back to the queue)
            log.warning("worker process %s stopped (exit code 0); starting a new one", process.pid)
        else:
            log.error("worker process %s died (exit code %s)", process.pid, process.exitcode)
        self._drain_reports()
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


Host = ThreadWorkerHost | ProcessWorkerHost


class WorkerPool:
    """Every worker this server hosts: one per GPU (``fluxserve.gpus``), each a host of its own
    (thread or child process, restarted alone when it dies) with its own ``WorkerLink``, so the
    jobs of a dead or stopped worker, and only those, go back to the queue. It answers what the
    API and the lifecycle ask of a host, for all of them."""

    def __init__(self, hosts: list[Host]):
        if not hosts:
            raise ValueError("a worker pool needs at least one worker")
        self.hosts = hosts
        self.mode = hosts[0].mode

    def start(self) -> None:
        for host in self.hosts:
            host.start()

    def begin_stop(self) -> None:
        for host in self.hosts:  # all stop claiming now; their grace periods run together
            host.begin_stop()

    def stop(self) -> None:
        self.begin_stop()
        stoppers = [threading.Thread(target=host.stop, name=f"fluxserve-stop-{index}", daemon=True)
                    for index, host in enumerate(self.hosts)]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()

    def force_stop(self) -> None:
        for host in self.hosts:
            host.force_stop()

    def wake(self) -> None:
        for host in self.hosts:
            host.wake()

    def command(self, command: Command) -> None:
        for host in self.hosts:
            host.command(command)

    def restart(self, settings: Settings | None = None) -> None:
        for host in self.hosts:
            host.restart(settings)

    @property
    def busy(self) -> int:
        """How many of the workers have a job in hand."""
        return sum(1 for host in self.hosts if host.link.running)

    @property
    def jobs_in_hand(self) -> int:
        """How many jobs the workers are running (a batch: each of its jobs)."""
        return sum(len(host.link.running) for host in self.hosts)

    def describe(self) -> dict[str, Any]:
        """The first worker's fields at the top (one worker: as before), ``alive`` only if every
        worker is, ``restarts`` summed, and each worker under ``workers``."""
        each = [host.describe() for host in self.hosts]
        return {**each[0], "alive": all(one["alive"] for one in each), "restarts": sum(one["restarts"] for one in each),
                "busy": sum(1 for one in each if one["busy"]), "count": len(each), "workers": each}

    @property
    def last_status(self) -> dict[str, Any]:
        """The workers' last status reports together: every model any of them holds, what any of
        them finds away; the rest (device, memory, residency) is the first worker's."""
        reports = [host.link.last_status for host in self.hosts if host.link.last_status]
        if not reports:
            return {}
        models: list[str] = []
        away: dict[str, Any] = {}
        for report in reports:
            models += [name for name in report.get("models_loaded") or [] if name not in models]
            away.update(report.get("dependencies") or {})
        return {**reports[0], "models_loaded": models, "dependencies": away}
