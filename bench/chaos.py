"""Chaos benchmark: transient faults against a real ``fluxserve serve`` (tiny models, worker in its
own process) while client threads submit a steady stream of jobs the way real clients do: a
synchronous request with an ``Idempotency-Key``, sent again with the same key after a connection
error, after a 503 or 429 (honouring ``Retry-After``) and after a 500. Usage:

    python -m bench.chaos --faults object_store,disk_full,database,kill,slow_webhook --duration 20 \\
        --json bench/results/chaos.json

Faults (each on a fresh server and data directory):

- ``object_store``: the server's default bucket (``FLUXSERVE_S3_DEFAULT``) is on a moto server run as
  its own process; it is killed -9 for the duration, then started again on the same port (the
  bucket is created again before the port listens: moto keeps its state in memory).
- ``disk_full``: the data directory (SQLite file, outputs) is a tmpfs of ``--tmpfs-size``; a file
  fills it for the duration, then is deleted. Needs ``mount`` (root); skipped with a note if refused.
- ``database``: ``FLUXSERVE_DATABASE_URL`` on a durable throwaway PostgreSQL cluster, stopped in
  immediate mode for the duration, then started. Skipped with a note without the server binaries.
- ``kill``: during the window the server is killed -9 whenever clients are blocked in a request,
  and started again; the clients send their requests again with the same key.
- ``slow_webhook``: half of the jobs' webhooks go to a receiver that, during the window, answers
  after ``--slow-webhook-seconds`` (40); the other half to a fast one, whose delivery latency
  (arrival minus the job's finish) is reported for the jobs finished while a slow POST was held.
- ``sigterm``: like ``kill``, but a graceful stop: SIGTERM (the job in hand finishes within
  ``FLUXSERVE_SHUTDOWN_GRACE_SECONDS``, or goes back to the queue), then a start again.

Counted per fault, from the clients, the database, the files and the webhook receivers: jobs
accepted (ids the clients got), succeeded, failed, duplicated (a logical request that made two
jobs, or a job finished twice: more than one delivery row), the 503/500 answers the clients saw,
time to recover (from the fault's end until the last request first sent before it finished),
/health (degraded, and back), and the server's log (tracebacks vs "X unavailable"/"X is back").
Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from tests.support.process_server import ServerProcess
from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY
from tests.support.servers import free_port
from tests.support.waiting import KLEIN_FETCH, wait_for_job

ROOT = Path(__file__).resolve().parents[1]
KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FAULTS = ("object_store", "disk_full", "database", "kill", "slow_webhook", "sigterm")
NOT_COVERED: dict[str, str] = {}  # a fault named here is reported as not covered, with the reason
BUCKET = "outputs"
TERMINAL = ("succeeded", "failed", "cancelled")


def epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.astimezone(timezone.utc).timestamp()


# -- webhook receivers -----------------------------------------------------------------------------
class Receiver(ThreadingHTTPServer):
    """A loopback webhook receiver: when each job's webhooks arrived, how many times, and (with
    ``delay``) how long it holds a POST before answering 200."""

    daemon_threads = True

    def __init__(self, delay: Callable[[], float] = lambda: 0.0):
        self.arrivals: dict[int, list[float]] = {}
        self.held: list[tuple[float, float]] = []  # (start, end) of each POST held > 0 s
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                arrived = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.arrivals.setdefault(int(body["id"]), []).append(arrived)
                hold = delay()
                if hold > 0:  # recorded now: the run may be counted before the hold is over
                    with receiver.lock:
                        receiver.held.append((arrived, arrived + hold))
                    time.sleep(hold)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up on us (its deadline)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# -- clients ---------------------------------------------------------------------------------------
@dataclass
class Request:
    """One logical request: what a client means to submit once, however many times it sends it."""

    key: str  # its Idempotency-Key, also its track_id (how its jobs are found in the database)
    first_sent: float
    webhook: str
    sends: int = 0
    answers: Counter = field(default_factory=Counter)  # HTTP status (or "connection error") per send
    ids: set[int] = field(default_factory=set)
    accepted_at: float | None = None
    answered: str = ""  # the accepting answer's status: success, processing or failed
    gave_up: bool = False


class Clients:
    """A steady stream of ``rate`` requests a second (open loop: a new one arrives on time whatever
    the earlier ones are doing), each sent by a client thread of its own that waits for the answer
    (synchronous) and sends it again, with the same Idempotency-Key, as a careful client does:
    after a connection error (backing off 0.5-4 s), after a 503 or 429 (after Retry-After) and
    after another 5xx (after 1 s), until it is accepted or ``give_up_s`` has passed."""

    def __init__(self, base_url: str, key: str, rate: float, body: dict[str, Any],
                 webhook: Callable[[int], str], give_up_s: float = 180.0, max_threads: int = 400,
                 max_requests: int = 0):
        self.base_url, self.key, self.rate, self.body = base_url, key, rate, body
        self.max_requests = max_requests  # 0: no limit
        self.webhook, self.give_up_s, self.max_threads = webhook, give_up_s, max_threads
        self.requests: list[Request] = []
        self.in_flight = 0  # clients inside an HTTP request right now
        self.peak_in_flight = 0
        self.late_arrivals = 0  # arrivals delayed because max_threads clients were busy
        self.lock = threading.Lock()
        self._stop_new = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream = threading.Thread(target=self._arrivals, daemon=True)

    def start(self) -> None:
        self._stream.start()

    def stop(self, timeout: float) -> None:
        """No new requests; wait for the ones being sent (they may be retrying) to be answered."""
        self._stop_new.set()
        self._stream.join(10)
        end = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.1, end - time.monotonic()))

    def waiting(self) -> int:
        with self.lock:
            return self.in_flight

    def _arrivals(self) -> None:
        due = time.monotonic()
        serial = 0
        while not self._stop_new.is_set() and not (self.max_requests and serial >= self.max_requests):
            while sum(1 for t in self._threads if t.is_alive()) >= self.max_threads:
                self.late_arrivals += 1
                time.sleep(0.05)
            serial += 1
            request = Request(key=f"chaos-{serial}-{uuid.uuid4().hex[:8]}", first_sent=time.time(),
                              webhook=self.webhook(serial))
            with self.lock:
                self.requests.append(request)
            thread = threading.Thread(target=self._send, args=(request,), daemon=True)
            self._threads.append(thread)
            thread.start()
            due += 1.0 / self.rate
            self._stop_new.wait(max(0.0, due - time.monotonic()))

    def _send(self, request: Request) -> None:
        body = {**self.body, "key": self.key, "prompt": f"chaos {request.key}", "track_id": request.key,
                "webhook": request.webhook}
        backoff = 0.5
        with httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(90, connect=5)) as http:
            while True:
                if time.time() - request.first_sent > self.give_up_s:
                    request.gave_up = True
                    return
                request.sends += 1
                with self.lock:
                    self.in_flight += 1
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    answer = http.post(KLEIN, json=body, headers={"Idempotency-Key": request.key})
                except httpx.TransportError:  # refused, reset, cut off mid-answer, timed out
                    request.answers["connection error"] += 1
                    time.sleep(backoff)
                    backoff = min(4.0, backoff * 2)
                    continue
                finally:
                    with self.lock:
                        self.in_flight -= 1
                request.answers[answer.status_code] += 1
                try:
                    payload = answer.json()
                except ValueError:
                    payload = {}
                if answer.status_code == 200 and isinstance(payload.get("id"), int):
                    request.ids.add(payload["id"])
                    request.accepted_at = time.time()
                    request.answered = str(payload.get("status"))
                    return
                if answer.status_code in (429, 503):
                    time.sleep(_retry_after(answer))
                elif answer.status_code >= 500:  # the ModelsLab CLI sends a request that answered 5xx again
                    time.sleep(1.0)
                else:  # any other refusal is final (a bug in this script, or a 409 that should not happen)
                    return


def _retry_after(answer: httpx.Response) -> float:
    try:
        return max(0.0, float(answer.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


# -- /health ---------------------------------------------------------------------------------------
class HealthWatch:
    """Polls /health every ``every`` s: (time, "ok" | "degraded" | "unreachable", dependencies)."""

    def __init__(self, base_url: str, every: float = 0.5):
        self.base_url, self.every = base_url, every
        self.samples: list[tuple[float, str, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                try:
                    answer = http.get(self.base_url + "/health")
                    body = answer.json()
                    state = "ok" if answer.status_code == 200 else "degraded"
                    self.samples.append((time.time(), state, sorted(body.get("dependencies") or {})))
                except (httpx.HTTPError, ValueError):
                    self.samples.append((time.time(), "unreachable", []))
                self._stop.wait(self.every)

    def summary(self, fault_start: float, fault_end: float) -> dict[str, Any]:
        after = [s for s in self.samples if s[0] >= fault_start]
        degraded = [s for s in after if s[1] == "degraded"]
        dependencies = sorted({d for s in degraded for d in s[2]})
        result: dict[str, Any] = {"degraded": bool(degraded), "dependencies": dependencies,
                                  "unreachable_samples": sum(1 for s in after if s[1] == "unreachable"),
                                  "ok_at_end": bool(after) and after[-1][1] == "ok"}
        if degraded:
            result["degraded_after_s"] = round(degraded[0][0] - fault_start, 1)
            back = [s for s in after if s[0] > degraded[-1][0] and s[1] == "ok"]
            result["back_after_fault_end_s"] = round(back[0][0] - fault_end, 1) if back else None
        return result


# -- the faults ------------------------------------------------------------------------------------
class Skip(Exception):
    """This fault can't be produced here (said why); nothing is faked."""


class Fault:
    """A fault's set-up (``prepare``: where the data lives, the server's environment), its start
    (``begin``), its middle (``hold``: by default, just wait) and its end (``end``)."""

    name = ""
    settings: dict[str, str] = {}

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.notes: dict[str, Any] = {}

    def prepare(self, stack: ExitStack, work: Path) -> tuple[Path, dict[str, str]]:
        return work / "data", {}

    def attach(self, server: ServerProcess, clients: Clients) -> None:
        self.server, self.clients = server, clients

    def begin(self) -> None: ...

    def hold(self, duration: float) -> None:
        time.sleep(duration)

    def end(self) -> None: ...

    def webhook(self, fast: Receiver, serial: int) -> str:
        return fast.url


class ObjectStoreDown(Fault):
    name = "object_store"

    def prepare(self, stack, work):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "moto.log", "ab")
        stack.callback(self.log.close)
        self.moto = self._start_moto()
        stack.callback(lambda: self._kill(self.moto))
        self._wait_for_moto(self.moto)
        default = {"public_url": "https://cdn.example.test/out", "endpoint_url": self.endpoint,
                   "region_name": "us-east-1", "aws_access_key_id": DUMMY_ACCESS_KEY,
                   "aws_secret_access_key": DUMMY_SECRET_KEY, "image_directory": f"{BUCKET}/gen"}
        return work / "data", {"FLUXSERVE_S3_DEFAULT": json.dumps(default)}

    def _start_moto(self, bind_at: float = 0.0) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bench.moto_process", str(self.port), BUCKET, str(bind_at)],
                                cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def _wait_for_moto(self, process: subprocess.Popen, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"moto exited with {process.returncode}")
            try:
                if httpx.get(f"{self.endpoint}/{BUCKET}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("moto did not start")

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    def begin(self):
        self._kill(self.moto)  # kill -9: uploads in flight are cut off
        # its replacement starts now (Python is slow to start on a busy box) and opens the port when the outage ends
        self.moto = self._start_moto(bind_at=time.time() + self.args.duration)

    def end(self):
        self._wait_for_moto(self.moto)


class DiskFull(Fault):
    name = "disk_full"

    def prepare(self, stack, work):
        data = work / "data"
        data.mkdir(parents=True)
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_size}", "tmpfs", str(data)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            raise Skip(f"could not mount a tmpfs for the data directory ({mount.stderr.strip() or mount.returncode}); "
                       "the full disk is not simulated instead")
        stack.callback(lambda: subprocess.run(["umount", "-l", str(data)], capture_output=True))
        self.filler = data / "filler"
        self.notes["tmpfs_size"] = self.args.tmpfs_size
        return data, {}

    def begin(self):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        written = 0
        try:
            for chunk in (1 << 20, 4096, 1):
                block = b"\0" * chunk
                try:
                    while True:
                        written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)
        usage = shutil.disk_usage(self.filler.parent)
        self.notes["filled_bytes"], self.notes["free_bytes_when_full"] = written, usage.free

    def end(self):
        self.filler.unlink()


class DatabaseDown(Fault):
    name = "database"

    def prepare(self, stack, work):
        from tests.support.postgres import PostgresUnavailable, postgres_cluster

        try:
            self.cluster = stack.enter_context(postgres_cluster(work, durable=True))
        except PostgresUnavailable as exc:
            raise Skip(f"no PostgreSQL server here: {exc}") from None
        return work / "data", {"FLUXSERVE_DATABASE_URL": self.cluster.url}

    def begin(self):
        self.cluster.stop("immediate")

    def end(self):
        self.cluster.start()


class ServerKilled(Fault):
    """kill -9 the server while clients are blocked in their synchronous requests, start it again,
    and do it again until the window is over (at least once)."""

    name = "kill"

    def hold(self, duration):
        end = time.monotonic() + duration
        kills: list[dict[str, Any]] = []
        while not kills or time.monotonic() < end:
            waiting = self._wait_for_waiting_clients(timeout=5.0)
            killed_at = time.time()
            self.stop_server()
            down = time.time()
            time.sleep(self.args.down_seconds)
            self.server.start()
            kills.append({"clients_waiting": waiting, "down_s": round(time.time() - killed_at, 1),
                          "kill_took_s": round(down - killed_at, 1)})
            time.sleep(min(2.0, max(0.0, end - time.monotonic())))
        self.notes["kills"] = kills

    def stop_server(self) -> None:
        self.server.kill()

    def _wait_for_waiting_clients(self, timeout: float) -> int:
        """Until at least two clients are blocked in a request (one, once ``timeout`` passed; any
        number, after a minute)."""
        start = time.monotonic()
        while True:
            waiting = self.clients.waiting()
            elapsed = time.monotonic() - start
            if waiting >= 2 or (waiting and elapsed > timeout) or elapsed > 60:
                return waiting
            time.sleep(0.005)


class ServerStopped(ServerKilled):
    """SIGTERM (a graceful stop: the job in hand finishes or goes back to the queue) while clients
    are blocked in their synchronous requests, then a start again; as often as ``kill``."""

    name = "sigterm"

    def stop_server(self) -> None:
        status, seconds = self.server.terminate(timeout=300)
        self.notes.setdefault("exits", []).append({"status": status, "stop_s": round(seconds, 1)})


class SlowWebhook(Fault):
    name = "slow_webhook"

    def prepare(self, stack, work):
        self.slow_now = False
        self.slow = Receiver(delay=lambda: self.args.slow_webhook_seconds if self.slow_now else 0.0)
        stack.callback(self.slow.close)
        self.notes["webhook_timeout_seconds"] = self.args.webhook_timeout
        self.notes["slow_receiver_answers_after_s"] = self.args.slow_webhook_seconds
        return work / "data", {"FLUXSERVE_WEBHOOK_TIMEOUT_SECONDS": str(self.args.webhook_timeout)}

    def webhook(self, fast, serial):
        return self.slow.url if serial % 2 else fast.url

    def begin(self):
        self.slow_now = True

    def end(self):
        self.slow_now = False


FAULT_TYPES: dict[str, type[Fault]] = {kind.name: kind for kind in
                                       (ObjectStoreDown, DiskFull, DatabaseDown, ServerKilled, ServerStopped, SlowWebhook)}


# -- one fault, end to end -------------------------------------------------------------------------
def run_fault(name: str, args: argparse.Namespace, tiny: Path) -> dict[str, Any]:
    if name in NOT_COVERED:
        return {"fault": name, "covered": False, "note": NOT_COVERED[name]}
    fault = FAULT_TYPES[name](args)
    work = Path(tempfile.mkdtemp(prefix=f"fluxserve-chaos-{name}-"))
    began = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{name}] {time.monotonic() - began:6.1f} s  {what}", flush=True)

    with ExitStack() as stack:
        try:
            data_dir, env = fault.prepare(stack, work)
        except Skip as exc:
            return {"fault": name, "covered": False, "note": str(exc)}
        threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        # the per-key queue limit is not what is measured: one key sends the whole stream here
        env = {"FLUXSERVE_MAX_QUEUED_PER_KEY": "1000", **env, **threads, **dict(args.env)}
        server = ServerProcess(data_dir, tiny, **env)
        key = server.create_key()
        fast = Receiver()
        stack.callback(fast.close)
        server.start()
        stack.callback(server.stop)
        progress("server up")
        db_url = env.get("FLUXSERVE_DATABASE_URL") or f"sqlite:///{(data_dir / 'fluxserve.db').resolve()}"
        body = {"width": args.size, "height": args.size, "num_inference_steps": args.steps, "samples": 1,
                "safety_checker": False}
        _warm_up(server, key, body)
        progress("warm-up job done; the stream starts")
        clients = Clients(server.base_url, key, args.rate, body, webhook=lambda serial: fault.webhook(fast, serial),
                          max_requests=args.max_requests)
        fault.attach(server, clients)
        health = HealthWatch(server.base_url)
        log_offset = server.log_path.stat().st_size if server.log_path.exists() else 0
        started = time.time()
        health.start()
        clients.start()
        time.sleep(args.before)
        fault.begin()
        fault_start = time.time()  # the fault is on (for a full disk: once the filler is written)
        progress("fault on")
        fault.hold(args.duration)
        fault.end()
        fault_end = time.time()
        progress("fault over")
        time.sleep(args.after)
        clients.stop(timeout=clients.give_up_s + 60)
        progress(f"stream stopped; every request answered or given up ({len(clients.requests)} requests)")
        drained = _drain(db_url, clients, args.drain)
        progress("drained" if drained else "drain deadline passed")
        health.stop()
        counts = _count(db_url, clients, fast, fault, fault_start, fault_end, data_dir)
        log = _log_lines(server.log_path, log_offset)
        result = {
            "fault": name, "covered": True, "duration_s": args.duration,
            "fault_window_s": round(fault_end - fault_start, 1),
            **counts,
            "drained": drained,
            "health": health.summary(fault_start, fault_end),
            "log": log,
            "settings": {k: v for k, v in env.items() if k != "FLUXSERVE_S3_DEFAULT"},
            "notes": fault.notes,
            "seconds": round(time.time() - started, 1),
            "work_dir": str(work),
        }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        result.pop("work_dir")
    return result


def _warm_up(server: ServerProcess, key: str, body: dict[str, Any]) -> None:
    """One job before the clients start (the model loads on first use); not counted."""
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        answer = http.post(KLEIN, json={**body, "key": key, "prompt": "warm-up", "track_id": "warm-up"}).json()
        if answer.get("status") == "processing":
            answer = wait_for_job(http, key, answer["id"], timeout=600, fetch=KLEIN_FETCH).json()
    if answer.get("status") != "success":
        raise RuntimeError(f"warm-up failed: {answer}")


def _sessions(db_url: str):
    from fluxserve.jobs.database import open_database

    return open_database(db_url)


def _drain(db_url: str, clients: Clients, deadline_s: float) -> bool:
    """Until every accepted job is finished and its webhook delivered (or given up on)."""
    from fluxserve.jobs.tables import Job, WebhookDelivery

    ids = {i for r in clients.requests for i in r.ids}
    end = time.monotonic() + deadline_s
    sessions = _sessions(db_url)
    while time.monotonic() < end:
        try:
            with sessions() as session:
                open_jobs = session.scalar(select(Job.id).where(Job.id.in_(ids), Job.status.notin_(TERMINAL)).limit(1))
                pending = session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending").limit(1))
            if open_jobs is None and pending is None:
                return True
        except Exception:  # noqa: BLE001 - the database may still be coming back
            pass
        time.sleep(0.5)
    return False


def _count(db_url: str, clients: Clients, fast: Receiver, fault: Fault, fault_start: float, fault_end: float,
           data_dir: Path) -> dict[str, Any]:
    from fluxserve.jobs.tables import Job, WebhookDelivery

    requests = list(clients.requests)
    with _sessions(db_url)() as session:
        jobs = [job for job in session.scalars(select(Job)) if (job.track_id or "").startswith("chaos-")]
        deliveries = Counter(session.scalars(select(WebhookDelivery.job_id)))
        delivery_states = Counter(session.scalars(select(WebhookDelivery.status)))
    by_id = {job.id: job for job in jobs}
    by_track: dict[str, list[Job]] = {}
    for job in jobs:
        by_track.setdefault(job.track_id, []).append(job)
    accepted = {i for r in requests for i in r.ids}
    status = Counter(by_id[i].status for i in accepted if i in by_id)
    answers = Counter()
    for request in requests:
        answers.update(request.answers)
    duplicated_requests = sorted(track for track, made in by_track.items() if len(made) > 1)
    duplicated_finishes = sorted(job.id for job in jobs if deliveries[job.id] > 1)
    failed = [job for job in jobs if job.status == "failed"]
    # recovery: the requests first sent before the fault ended, until the last of them finished
    before_end = [r for r in requests if r.first_sent < fault_end]
    finishes = [epoch(by_id[i].finished_at) for r in before_end for i in r.ids if i in by_id]
    unfinished_before_end = sum(1 for r in before_end if not r.ids or any(
        i not in by_id or by_id[i].finished_at is None for i in r.ids))
    recover = round(max(f for f in finishes if f is not None) - fault_end, 1) \
        if finishes and None not in finishes and not unfinished_before_end else None
    files = {p.name for p in (data_dir / "outputs").iterdir()} if (data_dir / "outputs").exists() else set()
    missing_files = sum(1 for job in jobs if job.status == "succeeded" for name in job.outputs if name not in files)
    result: dict[str, Any] = {
        "requests": len(requests),
        "jobs_accepted": len(accepted),
        "succeeded": status["succeeded"],
        "failed": status["failed"],
        "cancelled": status["cancelled"],
        "unfinished": len(accepted) - sum(status[s] for s in TERMINAL),
        "lost": len(accepted - set(by_id)),  # accepted, and no record
        "duplicated": len(duplicated_requests) + len(duplicated_finishes),
        "duplicated_requests": duplicated_requests,
        "duplicated_finishes": duplicated_finishes,
        "jobs_in_database": len(jobs),
        "jobs_never_answered": sorted(set(by_id) - accepted),  # made, but the client never got the id
        "requests_given_up": sum(1 for r in requests if r.gave_up),
        "accepting_answers": dict(Counter(r.answered for r in requests if r.ids)),
        "clients_peak_waiting": clients.peak_in_flight,
        "late_arrivals": clients.late_arrivals,
        "requests_refused": sum(1 for r in requests if not r.ids and not r.gave_up),
        "answers": {str(k): v for k, v in sorted(answers.items(), key=str)},
        "answers_503": answers[503],
        "answers_500": sum(v for k, v in answers.items() if isinstance(k, int) and k >= 500 and k != 503),
        "sends": sum(r.sends for r in requests),
        "requests_sent_more_than_once": sum(1 for r in requests if r.sends > 1),
        "recover_s": recover,
        # how long a request took to be accepted before the fault (the box keeping up with the stream)
        "accept_latency_before_fault_p50_s": _p50([r.accepted_at - r.first_sent for r in requests
                                                   if r.accepted_at and r.first_sent < fault_start]),
        "requests_before_fault_end": len(before_end),
        "retried_jobs": sum(1 for job in jobs if job.attempts > 1),
        "put_back_jobs": sum(1 for job in jobs if job.waits),
        "failures": [{"id": job.id, "error": (job.error or "")[:300], "created_at": epoch(job.created_at),
                      "finished_at": epoch(job.finished_at)} for job in failed],
        "missing_files": missing_files,
        "webhook_deliveries": dict(delivery_states),
        "webhooks_received_twice": sum(1 for times in fast.arrivals.values() if len(times) > 1),
    }
    if isinstance(fault, SlowWebhook):
        result["fast_webhook"] = _fast_latency(jobs, fast, fault.slow)
    return result


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _fast_latency(jobs, fast: Receiver, slow: Receiver) -> dict[str, Any]:
    """The fast receiver's latency (first arrival minus the job's finish), for jobs finished while
    the slow receiver held a POST ("under it"), and for the others."""
    held = list(slow.held)
    under, other = [], []
    for job in jobs:
        arrivals = fast.arrivals.get(job.id)
        finished = epoch(job.finished_at)
        if not arrivals or finished is None:
            continue
        latency = min(arrivals) - finished
        (under if any(start <= finished <= stop for start, stop in held) else other).append(latency)

    def stats(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"jobs": 0}
        return {"jobs": len(values), "p50_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}

    return {"under_slow": stats(under), "otherwise": stats(other), "slow_posts_held": len(held),
            "slow_receiver_jobs": len(slow.arrivals),
            "slow_receiver_got_twice": sum(1 for times in slow.arrivals.values() if len(times) > 1)}


OUTAGE = re.compile(r"(\w+) (unavailable:|is back after)")


def _log_lines(path: Path, offset: int) -> dict[str, Any]:
    """The server's log from the fault's start: tracebacks against the outage lines."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    outage = [line for line in lines if OUTAGE.search(line)]
    noteworthy = [line for line in lines if (" ERROR " in line or " WARNING " in line or " CRITICAL " in line)
                  and not OUTAGE.search(line)]
    return {
        "lines": len(lines),
        "tracebacks": sum(1 for line in lines if line.startswith("Traceback (most recent call last)")),
        "unavailable_lines": sum(1 for line in outage if "unavailable:" in line),
        "back_lines": sum(1 for line in outage if "is back after" in line),
        "outage_lines": [line[:300] for line in outage[:12]],
        "other_warnings": len(noteworthy),
        "other_warning_samples": [line[:300] for line in _distinct(noteworthy)[:10]],
    }


def _distinct(lines: list[str]) -> list[str]:
    """Lines with distinct messages (the part after the logger name)."""
    seen, kept = set(), []
    for line in lines:
        message = re.sub(r"\d+", "N", line.split(": ", 1)[-1])
        if message not in seen:
            seen.add(message)
            kept.append(line)
    return kept


# -- the report ------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    import platform

    from bench.common import environment as torch_environment
    from fluxserve import __version__

    info = torch_environment("cpu", __import__("torch").float32)
    info.update({"fluxserve": __version__, "date": time.strftime("%Y-%m-%d"), "platform": platform.platform()})
    for package in ("fastapi", "sqlalchemy", "moto", "httpx"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001 - informational
            pass
    try:
        from tests.support.postgres import find_bindir

        info["postgresql"] = find_bindir().parent.name
    except Exception:  # noqa: BLE001 - informational
        pass
    return info


HEADERS = ["fault", "duration", "accepted", "succeeded", "failed", "duplicated", "503s", "500s", "recover s",
           "/health", "log: tracebacks / outage lines"]


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in results:
        if not r.get("covered"):
            rows.append([r["fault"], "-", "-", "-", "-", "-", "-", "-", "-", "-", r["note"]])
            continue
        rows.append([r["fault"], _duration(r), r["jobs_accepted"], r["succeeded"], r["failed"], r["duplicated"],
                     r["answers_503"], r["answers_500"], "-" if r["recover_s"] is None else r["recover_s"],
                     _health(r["health"]),
                     f"{r['log']['tracebacks']} / {r['log']['unavailable_lines']} + {r['log']['back_lines']}"])
    return rows


def _duration(r: dict[str, Any]) -> str:
    if r["fault"] in ("kill", "sigterm"):
        kills = r["notes"].get("kills", [])
        down = ", ".join(f"{k['down_s']:g}" for k in kills)
        what = "kill" if r["fault"] == "kill" else "stop"
        return f"{len(kills)} {what}{'s' if len(kills) != 1 else ''}, down {down} s"
    return f"{r['fault_window_s']:g} s"


def _health(h: dict[str, Any]) -> str:
    if not h["degraded"]:
        unreachable = f" ({h['unreachable_samples']} unreachable)" if h["unreachable_samples"] else ""
        return f"never degraded{unreachable}"
    back = h.get("back_after_fault_end_s")
    back_text = "not back" if back is None else f"ok {back:+g} s"
    return f"degraded ({', '.join(h['dependencies']) or 'worker'}) -> {back_text}"


def print_report(result: dict[str, Any]) -> None:
    from bench.common import print_table

    config = result["config"]
    print(f"chaos: ~{config['rate']:g} requests/s, {config['size']}² x {config['steps']} "
          f"step(s), {config['before']:g} s before / {config['duration']:g} s fault / {config['after']:g} s after")
    print_table(HEADERS, table_rows(result["results"]))
    for r in result["results"]:
        if not r.get("covered"):
            continue
        extra = []
        if r["fault"] == "slow_webhook":
            fw = r["fast_webhook"]
            under = fw["under_slow"]
            extra.append(f"fast webhook under the slow one: p50 {under.get('p50_s', '-')} s, "
                         f"max {under.get('max_s', '-')} s over {under['jobs']} jobs "
                         f"(otherwise p50 {fw['otherwise'].get('p50_s', '-')} s)")
        if r["fault"] == "kill":
            extra.append("clients waiting at each kill: " + ", ".join(str(k["clients_waiting"])
                                                                     for k in r["notes"].get("kills", [])))
        if r["failures"]:
            extra.append(f"failed jobs: {[f['id'] for f in r['failures']][:20]}: {r['failures'][0]['error'][:160]}")
        if r["duplicated"]:
            extra.append(f"duplicated requests {r['duplicated_requests'][:10]}, finishes {r['duplicated_finishes'][:10]}")
        if r["unfinished"] or r["lost"] or not r["drained"]:
            extra.append(f"unfinished {r['unfinished']}, lost {r['lost']}, drained {r['drained']}")
        if r["requests_given_up"] or r["requests_refused"]:
            extra.append(f"requests given up {r['requests_given_up']}, refused {r['requests_refused']}")
        extra.append(f"answers {r['answers']}; webhook deliveries {r['webhook_deliveries']}")
        print(f"  {r['fault']}: " + "; ".join(extra))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", default="object_store,disk_full,database,kill,slow_webhook,sigterm",
                        help=f"comma-separated, from: {', '.join(FAULTS)}")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each fault lasts")
    parser.add_argument("--before", type=float, default=10.0, help="seconds of steady load before the fault")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after the fault ends")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for the queue and webhooks")
    parser.add_argument("--rate", type=float, default=3.0, help="requests a second, all clients together")
    parser.add_argument("--max-requests", type=int, default=0, help="end the stream after this many (0: no limit)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (OMP_NUM_THREADS; 0: torch's own). 1 by default, as the other "
                             "CPU benchmarks: on a shared 2-core box larger OpenMP teams stall")
    parser.add_argument("--tmpfs-size", default="128m", help="disk_full: size of the data directory's tmpfs")
    parser.add_argument("--down-seconds", type=float, default=1.0, help="kill: how long the killed server stays down")
    parser.add_argument("--slow-webhook-seconds", type=float, default=40.0)
    parser.add_argument("--webhook-timeout", type=float, default=30.0, help="FLUXSERVE_WEBHOOK_TIMEOUT_SECONDS")
    parser.add_argument("--env", action="append", default=[], metavar="FLUXSERVE_X=VALUE",
                        type=lambda s: tuple(s.split("=", 1)), help="more server settings (repeatable)")
    parser.add_argument("--tiny", type=Path, default=None, help="a tiny-model build to reuse (else built here)")
    parser.add_argument("--keep", action="store_true", help="keep each fault's work directory (logs, database)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fluxserve.engine.tiny import build_tiny_models

    with _tiny_root(args.tiny) as tiny:
        build_tiny_models(tiny)
        results = []
        for name in args.faults:
            results.append(run_fault(name, args, tiny))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"config": config, "environment": environment(), "results": results}
    from bench.common import report_and_save

    report_and_save(result, print_report, args.json)
    return 0


@contextmanager
def _tiny_root(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    folder = Path(tempfile.mkdtemp(prefix="fluxserve-chaos-tiny-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
