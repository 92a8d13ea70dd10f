"""Control-plane benchmark (issue 13, scale-out): the job table as the queue, on one real
PostgreSQL, with a SIMULATED engine that sleeps for a GPU's time instead of computing (no torch,
no HTTP on the worker side). Each simulated worker is a thread with its own pooled connection in
a worker process (``--threads-per-process`` per process, so 64 workers are not 64 threads under
one GIL); it loops through the real ``JobStore``: ``claim_next`` -> sleep half the job ->
``heartbeat`` -> sleep the other half -> ``succeed``, and beats in the real ``WorkerRegistry``
every ``--beat-seconds``, as a real worker does. Usage:

    nice -n 10 python -m bench.control_plane --json bench/results/control_plane.json
    python -m bench.control_plane --quick          # a smoke run of every section, ~30 s

Sections (each on a fresh database of one throwaway cluster, or of ``--database-url``):

1. ``scaling``: jobs/s and claim latency p50/p99 as workers grow (1, 4, 16, 32, 64) at 1 s jobs.
   A feeder keeps ``--queue-depth`` jobs queued, so workers never wait for work ("empty claims"
   counts the times one did). The figure is the ratio achieved/ideal, ideal = workers / job_seconds.
   CPU is reported beside it: the worker processes', PostgreSQL's and the machine's.
2. ``queue_depth``: one worker's claim latency with 100, 1000, 10000 jobs queued (the claim
   query's cost grows with the queue; this shows where it bends).
3. ``api``: the real FastAPI app (``create_app``, no worker: an API replica of the scale-out
   design) under uvicorn in a subprocess on the same PostgreSQL; open-loop submissions with
   ``instant_response`` at rising rates; p50/p99 latency and errors; simulated workers drain.
4. ``affinity``: workers hold one model at a time and pay ``--swap-seconds`` to change it, on a
   workload mixing 3 models; swaps and throughput with ``affinity_seconds`` 0 (no preference) and
   30, and how long jobs waited (affinity must not starve a model).

Every section checks what must hold whatever the machine: each claimed job finished exactly
once, nothing left running, every accepted submission is a job. The exit code is 1 if one fails.
Loopback only; bounded in time (about 8 minutes at full settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

MODELS = ("flux-klein", "flux", "flux-kontext-dev")  # registry names: the API accepts them, workers fake them
KEYS = 4  # submissions rotate over this many API keys, so the fair-share ordering has work to do
API_PATH = "/api/v1/enterprise/flux_klein/text2img"


# -- small helpers ---------------------------------------------------------------------------------
def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _psycopg_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sessions(url: str, pool_size: int = 5):
    """A session factory like ``open_database``'s (pre-ping on), with a pool sized to the
    threads that share it: every simulated worker keeps its own connection, none is reopened."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    engine = create_engine(_psycopg_url(url), pool_pre_ping=True, pool_size=pool_size, max_overflow=0)
    return sessionmaker(engine, expire_on_commit=False)


def _fresh_database(server_url: str, name: str) -> str:
    """A new database on the cluster, with the service's tables (``open_database`` creates them)."""
    from tests.support.postgres import create_database

    from fluxserve.jobs.database import open_database

    url = create_database(server_url, f"{name}_{uuid.uuid4().hex[:8]}")
    open_database(url).kw["bind"].dispose()
    return url


def _make_keys(url: str) -> list[tuple[int, str]]:
    """KEYS API keys: (id, plaintext)."""
    from fluxserve.keys import KeyStore

    sessions = _sessions(url, 1)
    keys = KeyStore(sessions)
    made = [keys.create(f"bench-{i}") for i in range(KEYS)]
    sessions.kw["bind"].dispose()
    return [(row.id, plaintext) for row, plaintext in made]


# -- CPU accounting --------------------------------------------------------------------------------
TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def process_cpu_seconds(pid: int, children_reaped: bool = True) -> float:
    """utime+stime (+ cutime+cstime: children it has reaped) of one process, in seconds."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children_reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def postgres_cpu_seconds(postmaster: int | None) -> float:
    """CPU of the whole server: the postmaster, its live children (backends, checkpointer...) and
    the children it reaped (closed connections' backends)."""
    if postmaster is None:
        return 0.0
    total = process_cpu_seconds(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (every user's load, not only ours)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def postmaster_pid(url: str) -> int | None:
    """The server's postmaster (its data directory's postmaster.pid), if this machine can read it."""
    import psycopg

    try:
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        return int(Path(row[0], "postmaster.pid").read_text().split()[0]) if row else None
    except (OSError, ValueError, psycopg.Error):
        return None


class CpuMeter:
    """Cores used over a window: PostgreSQL, this process, an optional extra process, the machine."""

    def __init__(self, postmaster: int | None, extra_pid: int | None = None):
        self.postmaster, self.extra_pid = postmaster, extra_pid

    def __enter__(self) -> CpuMeter:
        self._t = time.monotonic()
        self._pg = postgres_cpu_seconds(self.postmaster)
        self._me = sum(os.times()[:2])
        self._extra = process_cpu_seconds(self.extra_pid) if self.extra_pid else 0.0
        self._busy, self._total = machine_cpu()
        self._load = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._t
        self.postgres = postgres_cpu_seconds(self.postmaster) - self._pg
        self.me = sum(os.times()[:2]) - self._me
        self.extra = (process_cpu_seconds(self.extra_pid) if self.extra_pid else 0.0) - self._extra
        busy, total = machine_cpu()
        self.machine_busy = (busy - self._busy) / max(1.0, total - self._total)
        self.load = (self._load, os.getloadavg()[0])

    def report(self, worker_cpu: float, extra_name: str | None = None) -> dict[str, Any]:
        per = max(1e-9, self.seconds)
        out = {
            "window_s": round(self.seconds, 2),
            "cores_workers": round(worker_cpu / per, 2),
            "cores_postgres": round(self.postgres / per, 2) if self.postmaster else None,
            "cores_bench_main": round(self.me / per, 2),  # the feeder / load generator
            "machine_busy_pct": round(100 * self.machine_busy, 1),  # all users of this machine
            "loadavg_1m": [round(v, 2) for v in self.load],
        }
        if extra_name:
            out[f"cores_{extra_name}"] = round(self.extra / per, 2)
        return out


# -- the simulated workers -------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    url: str
    threads: int
    job_seconds: float
    swap_seconds: float = 0.0  # paid when a claimed job's model differs from the one held (and to load the first)
    affinity_seconds: float | None = None  # None: claim without naming a held model (the worker loop's call today)
    beat_seconds: float = 2.0  # WorkerRegistry.beat, as FLUXSERVE_HEARTBEAT_SECONDS
    poll_seconds: float = 0.05  # sleep after an empty claim


def _simulated_worker(store, registry, plan: WorkerPlan, name: str, start_at: float, stop_at: float) -> dict[str, Any]:
    """claim -> (swap) -> half a job -> heartbeat -> half a job -> succeed, until ``stop_at``;
    the job in hand when it comes is finished. Returns what happened, in wall-clock times."""
    worker_id = registry.register(gpu=name)
    time.sleep(max(0.0, start_at - time.time()))
    held: str | None = None
    jobs: list[dict[str, Any]] = []
    empty_claims: list[float] = []
    loads = swaps = lost = 0
    last_beat = time.monotonic()
    while time.time() < stop_at:
        began = time.perf_counter()
        loaded = [held] if (plan.affinity_seconds is not None and held) else []
        job = store.claim_next(loaded=loaded, affinity_seconds=plan.affinity_seconds or 0.0)
        claim_s = time.perf_counter() - began
        if job is None:
            empty_claims.append(claim_s)
            time.sleep(plan.poll_seconds)
            continue
        claimed_at = time.time()
        if job.model != held:
            if held is None:
                loads += 1
            else:
                swaps += 1
            held = job.model
            time.sleep(plan.swap_seconds)
        time.sleep(plan.job_seconds / 2)
        began = time.perf_counter()
        alive = store.heartbeat(job.id, job.claim_token, step=1, total=2)
        heartbeat_s = time.perf_counter() - began
        time.sleep(plan.job_seconds / 2)
        began = time.perf_counter()
        finished = store.succeed(job.id, job.claim_token, outputs=[], nsfw_detected=False,
                                 generation_time=plan.job_seconds, meta=job.meta)
        finish_s = time.perf_counter() - began
        if not (alive and finished):
            lost += 1
        jobs.append({"id": job.id, "model": job.model, "created_at": job.created_at.timestamp(),
                     "claimed_at": claimed_at, "claim_s": claim_s,
                     "heartbeat_s": heartbeat_s, "finish_s": finish_s, "finished_at": time.time(),
                     "finished": finished, "waited_s": (job.started_at - job.created_at).total_seconds()
                     if job.started_at else None})
        if time.monotonic() - last_beat >= plan.beat_seconds:
            registry.beat(worker_id, [held] if held else [], {"simulated": True})
            last_beat = time.monotonic()
    registry.leave(worker_id)
    return {"jobs": jobs, "empty_claims": empty_claims, "loads": loads, "swaps": swaps, "lost": lost}


def _worker_process(plan: WorkerPlan, index: int, ready, go, clock, results) -> None:
    """One worker process: ``plan.threads`` simulated workers sharing a pool of as many connections."""
    from fluxserve.jobs.store import JobStore
    from fluxserve.jobs.workers import WorkerRegistry

    sessions = _sessions(plan.url, plan.threads)
    store, registry = JobStore(sessions), WorkerRegistry(sessions)
    store.ping()
    ready.put(index)
    go.wait()
    cpu_before = sum(os.times()[:2])
    start_at, stop_at = clock[0], clock[1]
    outcomes: list[dict[str, Any] | None] = [None] * plan.threads

    def run(slot: int) -> None:
        outcomes[slot] = _simulated_worker(store, registry, plan, f"sim-{index}-{slot}", start_at, stop_at)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(plan.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put({"index": index, "cpu_s": sum(os.times()[:2]) - cpu_before, "workers": outcomes})
    sessions.kw["bind"].dispose()


class WorkerFleet:
    """``workers`` simulated workers in ceil(workers / threads_per_process) spawned processes,
    started together at ``start_at`` (after every process is connected) for ``duration`` s."""

    def __init__(self, plan: WorkerPlan, workers: int, threads_per_process: int):
        self.context = multiprocessing.get_context("spawn")  # no fork of a process holding threads and sockets
        self.ready, self.results = self.context.Queue(), self.context.Queue()
        self.go = self.context.Event()
        self.clock = self.context.Array("d", 2)
        sizes = [threads_per_process] * (workers // threads_per_process)
        if workers % threads_per_process:
            sizes.append(workers % threads_per_process)
        self.processes = [
            self.context.Process(target=_worker_process, daemon=True,
                                 args=(WorkerPlan(**{**asdict(plan), "threads": size}), index, self.ready, self.go,
                                       self.clock, self.results))
            for index, size in enumerate(sizes)
        ]

    def start(self, duration: float, lead: float = 0.3) -> tuple[float, float]:
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self.ready.get(timeout=120)
        start_at = time.time() + lead
        self.clock[0], self.clock[1] = start_at, start_at + duration
        self.go.set()
        return start_at, start_at + duration

    def collect(self, timeout: float) -> tuple[list[dict[str, Any]], float]:
        """Every simulated worker's record, and the worker processes' CPU seconds."""
        gathered = [self.results.get(timeout=timeout) for _ in self.processes]
        for process in self.processes:
            process.join(30)
        workers = [w for g in gathered for w in g["workers"]]
        if any(w is None for w in workers):
            raise RuntimeError("a simulated worker thread died (see its traceback above)")
        return workers, sum(g["cpu_s"] for g in gathered)


class Feeder:
    """Keeps ``depth`` jobs queued, models drawn from ``models``, keys in turn; counts what it
    created. The jobs missing are inserted in one transaction (rows as ``JobStore.create`` makes
    them): inserting one per transaction, this process fell behind 64 workers on the loaded
    2-core box and the queue ran dry (the API section measures inserts one by one)."""

    def __init__(self, url: str, depth: int, models: tuple[str, ...], seed: int):
        from fluxserve.jobs.store import JobStore

        self.sessions = _sessions(url, 2)
        self.store, self.depth, self.models = JobStore(self.sessions), depth, models
        self.keys = [key_id for key_id, _ in _make_keys(url)]
        self.rng = random.Random(seed)
        self.created = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def top_up(self) -> None:
        from fluxserve.jobs.status import JobStatus
        from fluxserve.jobs.tables import Job

        missing = max(0, self.depth - self.store.queued_count())
        if not missing:
            return
        with self.sessions.begin() as session:
            session.add_all([
                Job(key_id=self.keys[(self.created + i) % len(self.keys)], server="flux_klein",
                    model=self.rng.choice(self.models), task="text2img", status=JobStatus.QUEUED.value,
                    params={"seeds": [0]}, meta={}, file_prefix=uuid.uuid4().hex, outputs=[])
                for i in range(missing)])
        self.created += missing

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.top_up()

    def __enter__(self) -> Feeder:
        self.top_up()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sessions.kw["bind"].dispose()


# -- what must hold --------------------------------------------------------------------------------
def check_ledger(url: str, workers: list[dict[str, Any]], created: int | None = None) -> dict[str, Any]:
    """Each claimed job finished exactly once (by the workers' records and the database), nothing
    left running; with ``created``, every job created is in the table."""
    from sqlalchemy import func, select

    from fluxserve.jobs.tables import Job

    claimed = Counter(job["id"] for w in workers for job in w["jobs"])
    sessions = _sessions(url, 1)
    with sessions() as session:
        by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        succeeded = set(session.scalars(select(Job.id).where(Job.status == "succeeded")))
        total = session.scalar(select(func.count()).select_from(Job)) or 0
    sessions.kw["bind"].dispose()
    ledger = {
        "claimed": sum(claimed.values()),
        "claimed_twice": sum(1 for n in claimed.values() if n > 1),
        "finish_refused": sum(w["lost"] for w in workers),  # heartbeat or succeed found the job not ours
        "succeeded_in_db": len(succeeded),
        "claimed_not_succeeded": len(set(claimed) - succeeded),
        "succeeded_not_claimed": len(succeeded - set(claimed)),
        "running_left": by_status.get("running", 0),
        "jobs_in_db": total,
    }
    ledger["ok"] = (ledger["claimed_twice"] == 0 and ledger["finish_refused"] == 0 and ledger["running_left"] == 0
                    and ledger["claimed_not_succeeded"] == 0 and ledger["succeeded_not_claimed"] == 0
                    and (created is None or total == created))
    return ledger


def _latencies(workers: list[dict[str, Any]], window: tuple[float, float] | None = None) -> dict[str, Any]:
    jobs = [job for w in workers for job in w["jobs"]]
    inside = [job for job in jobs if window is None or window[0] <= job["claimed_at"] <= window[1]]
    claims = [job["claim_s"] for job in inside]
    finishes = [job["finish_s"] for job in inside]
    return {
        "claim_ms_p50": ms(percentile(claims, 0.5)), "claim_ms_p99": ms(percentile(claims, 0.99)),
        "claim_ms_max": ms(max(claims, default=None)),
        "finish_ms_p50": ms(percentile(finishes, 0.5)), "finish_ms_p99": ms(percentile(finishes, 0.99)),
        "heartbeat_ms_p99": ms(percentile([job["heartbeat_s"] for job in inside], 0.99)),
        "empty_claims": sum(len(w["empty_claims"]) for w in workers),
    }


# -- 1. scaling --------------------------------------------------------------------------------------
def run_scaling(args: argparse.Namespace, server_url: str, postmaster: int | None) -> list[dict[str, Any]]:
    rows = []
    for workers in args.workers:
        url = _fresh_database(server_url, f"scale{workers}")
        plan = WorkerPlan(url=url, threads=1, job_seconds=args.job_seconds, beat_seconds=args.beat_seconds)
        fleet = WorkerFleet(plan, workers, args.threads_per_process)
        depth = max(args.queue_depth, 2 * workers)
        with Feeder(url, depth, MODELS[:1], args.seed) as feeder:
            start_at, stop_at = fleet.start(args.duration)
            window = (start_at + args.warmup, stop_at)
            time.sleep(max(0.0, window[0] - time.time()))
            registered: list[int] = []
            waits: Counter[str] = Counter()
            samples = 0
            with CpuMeter(postmaster) as meter, _activity_sampler(url) as sample:
                while time.time() < window[1]:
                    registered.append(_alive_workers(url))
                    waits.update(sample())
                    samples += 1
                    time.sleep(min(0.5, max(0.0, window[1] - time.time())))
            done, worker_cpu = fleet.collect(timeout=args.duration + 120)
        seconds = window[1] - window[0]
        jobs_done = _jobs_in(done, window)
        achieved = jobs_done / seconds
        ideal = workers / args.job_seconds
        worker_cpu_in_window = worker_cpu * seconds / max(1e-9, stop_at - start_at)
        row = {
            "workers": workers, "processes": len(fleet.processes), "queue_depth": depth,
            "jobs_per_s": round(achieved, 2), "ideal_jobs_per_s": round(ideal, 2),
            "ratio": round(achieved / ideal, 3), "window_s": round(seconds, 2),
            **_latencies(done, window),
            "registered_max": max(registered, default=0),
            "cpu": meter.report(worker_cpu_in_window),
            # CPU per job done: what a cluster pays per job wherever its processes run
            "cpu_ms_per_job_workers": round(1000 * worker_cpu_in_window / max(1e-9, jobs_done), 2),
            "cpu_ms_per_job_postgres": round(1000 * meter.postgres / max(1e-9, jobs_done), 2) if postmaster else None,
            # the database's busy backends, sampled every 0.5 s: on CPU (or waiting for it) vs waiting on a lock
            "pg_active_backends_mean": round(sum(waits.values()) / max(1, samples), 2),
            "pg_active_by_wait": {kind: round(count / max(1, samples), 2) for kind, count in waits.most_common()},
            "ledger": check_ledger(url, done, feeder.created),
        }
        rows.append(row)
        print(f"scaling: {workers} workers: {row['jobs_per_s']} jobs/s of {ideal:g} ({row['ratio']:.1%}), "
              f"claim p50 {row['claim_ms_p50']} ms p99 {row['claim_ms_p99']} ms; cores: workers "
              f"{row['cpu']['cores_workers']}, postgres {row['cpu']['cores_postgres']}; ledger ok: "
              f"{row['ledger']['ok']}", flush=True)
    return rows


def _jobs_in(workers: list[dict[str, Any]], window: tuple[float, float]) -> float:
    """Jobs done in ``window``, each counted by the fraction of its run (claim returned -> finish
    returned) inside it: no +-1 job of rounding at the window's edges (5% of 1 worker's 20 jobs).
    The claim itself falls between runs, so its cost lowers the figure as it should."""
    done = 0.0
    for job in (job for w in workers for job in w["jobs"]):
        length = job["finished_at"] - job["claimed_at"]
        inside = min(job["finished_at"], window[1]) - max(job["claimed_at"], window[0])
        done += max(0.0, inside) / length if length > 0 else 0.0
    return done


@contextmanager
def _activity_sampler(url: str) -> Iterator[Any]:
    """A function returning the database's active backends (other than its own) by what they wait
    on: "CPU" for none (running, or runnable and waiting for a core), else pg_stat_activity's
    wait_event_type:wait_event (Lock:transactionid would be a lock convoy, Client:ClientRead is a
    backend waiting for its client's next message)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        def sample() -> Counter[str]:
            rows = conn.execute(
                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid() GROUP BY 1"
            ).fetchall()
            return Counter({kind: count for kind, count in rows})

        yield sample


def _alive_workers(url: str) -> int:
    from fluxserve.jobs.workers import WorkerRegistry

    sessions = _sessions(url, 1)
    try:
        return len(WorkerRegistry(sessions).alive(lease_seconds=15))
    finally:
        sessions.kw["bind"].dispose()


# -- 2. claim latency vs queue depth --------------------------------------------------------------
def run_queue_depth(args: argparse.Namespace, server_url: str) -> list[dict[str, Any]]:
    """One worker claims and finishes ``--depth-claims`` jobs at each queue depth (the queue is
    filled in bulk first: setup, not measured)."""
    from sqlalchemy import func, insert, select

    from fluxserve.jobs.store import JobStore
    from fluxserve.jobs.tables import Job

    url = _fresh_database(server_url, "depth")
    keys = [key_id for key_id, _ in _make_keys(url)]
    sessions = _sessions(url, 1)
    store = JobStore(sessions)
    rows = []
    for depth in args.depths:
        with sessions() as session:
            queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
        with sessions.begin() as session:
            missing = depth + args.depth_claims - queued
            if missing > 0:
                session.execute(insert(Job), [
                    {"key_id": keys[i % len(keys)], "server": "flux_klein", "model": MODELS[i % len(MODELS)],
                     "task": "text2img", "status": "queued", "params": {"seeds": [0]}, "meta": {},
                     "file_prefix": uuid.uuid4().hex, "outputs": []} for i in range(missing)])
        claims, finishes = [], []
        for _ in range(args.depth_claims):
            began = time.perf_counter()
            job = store.claim_next(loaded=[MODELS[0]], affinity_seconds=30.0)
            claims.append(time.perf_counter() - began)
            assert job is not None, "the queue was filled"
            began = time.perf_counter()
            store.succeed(job.id, job.claim_token, outputs=[], nsfw_detected=False, generation_time=0.0, meta={})
            finishes.append(time.perf_counter() - began)
        row = {"queued": depth, "claims": len(claims), "claim_ms_p50": ms(percentile(claims, 0.5)),
               "claim_ms_p99": ms(percentile(claims, 0.99)), "finish_ms_p50": ms(percentile(finishes, 0.5)),
               **_query_side_by_side(sessions, args.depth_claims)}
        rows.append(row)
        print(f"queue depth {depth}: claim p50 {row['claim_ms_p50']} ms, p99 {row['claim_ms_p99']} ms; the query "
              f"alone (server time): {row['query_ms_p50']} ms, its previous form {row['previous_query_ms_p50']} ms", flush=True)
    sessions.kw["bind"].dispose()
    return rows


def previous_next_job_query(now: datetime, loaded: list[str], affinity_seconds: float):
    """``next_job_query`` as it was before this benchmark: the key's last service as a correlated
    subquery in the ORDER BY, run once per queued job. Kept here only to time it side by side."""
    from sqlalchemy import case, func, or_, select
    from sqlalchemy.orm import aliased

    from fluxserve.jobs.store import _claimable
    from fluxserve.jobs.tables import Job

    served = aliased(Job)
    last_served = (select(func.max(served.started_at))
                   .where(served.key_id == Job.key_id, served.started_at.is_not(None)).scalar_subquery())
    waited_enough = Job.created_at <= now - timedelta(seconds=affinity_seconds)
    order = case((or_(Job.model.in_(loaded), waited_enough), 0), else_=1)
    return select(Job.id).where(_claimable(now)).order_by(order, last_served.asc().nulls_first(), Job.id).limit(1)


def _query_side_by_side(sessions, repeats: int) -> dict[str, Any]:
    """The claim's SELECT ... FOR UPDATE SKIP LOCKED alone, the current form and the previous one in
    turn on the same queue, timed by the server (EXPLAIN ANALYZE, TIMING OFF: planning + execution,
    no round trip, so the box's load adds less noise); both must pick the same job."""
    from fluxserve.jobs.store import next_job_query
    from fluxserve.jobs.tables import Job, utcnow

    with sessions.begin() as session:  # fresh statistics, as autovacuum's analyze would give
        session.connection().exec_driver_sql("ANALYZE jobs")
    times: dict[str, list[float]] = {"current": [], "previous": []}
    same = True
    for repeat in range(repeats):
        now = utcnow()
        picked = {}
        pair = [("current", next_job_query(now, loaded=[MODELS[0]], affinity_seconds=30.0)),
                ("previous", previous_next_job_query(now, [MODELS[0]], 30.0))]
        for name, query in pair[::-1] if repeat % 2 else pair:  # in turn: neither always goes first
            query = query.with_for_update(of=Job, skip_locked=True)
            with sessions() as session:
                picked[name] = session.scalar(query)
                session.rollback()
                compiled = query.compile(dialect=session.get_bind().dialect,
                                         compile_kwargs={"render_postcompile": True})
                plan = session.connection().exec_driver_sql(
                    f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {compiled}", compiled.params).scalar()
                times[name].append((plan[0]["Planning Time"] + plan[0]["Execution Time"]) / 1000)
                session.rollback()
        same = same and picked["current"] == picked["previous"]
    return {"query_ms_p50": ms(percentile(times["current"], 0.5)),
            "previous_query_ms_p50": ms(percentile(times["previous"], 0.5)), "same_job_picked": same}


# -- 3. the API under rising request rates --------------------------------------------------------
def serve_api_replica(database_url: str, port: int, data_dir: Path) -> None:
    """The real app (``create_app``) without a worker: an API replica of the scale-out design.
    Rate limits and the per-key queue limit are off: the benchmark measures the path, not them."""
    import uvicorn

    from fluxserve.api.app import create_app
    from fluxserve.config import Settings
    from fluxserve.jobs.database import open_database
    from fluxserve.models import Registry

    settings = Settings(data_dir=data_dir, database_url=database_url, port=port, rate_limit_per_key="",
                        rate_limit_per_address="", max_queued_per_key=10**9, sync_wait_seconds=0)
    app = create_app(settings, Registry.build(settings.model_overrides), sessions=open_database(database_url))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def api_replica(database_url: str, work: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    from tests.support.servers import free_port

    port = free_port()
    log = open(work / "api.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.control_plane", "--serve-api", database_url, "--port", str(port),
         "--data-dir", str(work / "api-data")],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:  # any answer: /health says 503 "degraded" here, as it finds no worker beside this API
                httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API replica did not start: {(work / 'api.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def _open_loop(base: str, keys: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``seconds``, each at its scheduled time whatever the answers
    (open loop); latency is from the actual send, lag is how late the send was."""
    import httpx

    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    ids: list[int] = []
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=1000)) as client:

        async def one(index: int, due: float) -> None:
            lags.append(time.perf_counter() - due)
            began = time.perf_counter()
            try:
                answer = await client.post(API_PATH, json={
                    "key": keys[index % len(keys)], "prompt": f"control plane {index}", "width": 512, "height": 512,
                    "samples": 1, "instant_response": True})
                body = answer.json()
                if answer.status_code != 200 or body.get("status") not in ("processing", "success"):
                    errors[f"{answer.status_code} {str(body.get('message', body.get('status')))[:80]}"] += 1
                else:
                    ids.append(int(body["id"]))
            except (httpx.HTTPError, ValueError) as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - began)

        start = time.perf_counter() + 0.05
        count = int(rate * seconds)
        tasks = []
        for index in range(count):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"rate": rate, "sent": count, "ok": len(ids), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "achieved_rate": round(count / elapsed, 1), "latency_ms_p50": ms(percentile(latencies, 0.5)),
            "latency_ms_p99": ms(percentile(latencies, 0.99)), "latency_ms_max": ms(max(latencies, default=None)),
            "send_lag_ms_p99": ms(percentile(lags, 0.99)), "ids": ids}


def run_api(args: argparse.Namespace, server_url: str, postmaster: int | None, work: Path) -> dict[str, Any]:
    from fluxserve.jobs.store import JobStore

    url = _fresh_database(server_url, "api")
    keys = [plaintext for _, plaintext in _make_keys(url)]
    seconds_total = len(args.rates) * args.api_seconds + 5
    plan = WorkerPlan(url=url, threads=1, job_seconds=args.api_job_seconds, beat_seconds=args.beat_seconds)
    fleet = WorkerFleet(plan, args.api_workers, args.threads_per_process)
    steps = []
    with api_replica(url, work) as (base, process):
        warm = asyncio.run(_open_loop(base, keys, 10, 1))  # first requests pay imports and connections
        fleet.start(seconds_total)
        for rate in args.rates:
            with CpuMeter(postmaster, process.pid) as meter:
                step = asyncio.run(_open_loop(base, keys, rate, args.api_seconds))
            step["cpu"] = meter.report(0.0, "api_replica")
            step["cpu"].pop("cores_workers")  # measured for the whole phase below
            steps.append(step)
            print(f"api: {rate} req/s: p50 {step['latency_ms_p50']} ms, p99 {step['latency_ms_p99']} ms, "
                  f"errors {step['errors']}; cores: api {step['cpu']['cores_api_replica']}, "
                  f"postgres {step['cpu']['cores_postgres']}", flush=True)
        done, worker_cpu = fleet.collect(timeout=seconds_total + 120)
    sessions = _sessions(url, 1)
    queued_left = JobStore(sessions).queued_count()
    sessions.kw["bind"].dispose()
    accepted = len(warm["ids"]) + sum(len(step["ids"]) for step in steps)
    ledger = check_ledger(url, done)
    ledger["accepted_answers"] = accepted
    # a request the client gave up on (timeout) may still have been committed: at most one job each
    errors = sum(step["errors"] for step in steps)
    ledger["ok"] = ledger["ok"] and accepted <= ledger["jobs_in_db"] <= accepted + errors
    for step in steps:
        step.pop("ids")
    return {"steps": steps, "workers": args.api_workers, "job_seconds": args.api_job_seconds,
            "drained_jobs": ledger["claimed"], "queued_left": queued_left, "worker_claims": _latencies(done),
            "ledger": ledger}


# -- 4. model affinity ---------------------------------------------------------------------------------
def run_affinity(args: argparse.Namespace, server_url: str) -> list[dict[str, Any]]:
    rows = []
    for affinity in args.affinity:
        url = _fresh_database(server_url, f"affinity{int(affinity)}")
        plan = WorkerPlan(url=url, threads=1, job_seconds=args.job_seconds, swap_seconds=args.swap_seconds,
                          affinity_seconds=affinity, beat_seconds=args.beat_seconds)
        fleet = WorkerFleet(plan, args.affinity_workers, args.threads_per_process)
        with Feeder(url, max(args.affinity_depth, args.affinity_workers), MODELS, args.seed) as feeder:
            start_at, stop_at = fleet.start(args.affinity_duration)
            done, _ = fleet.collect(timeout=args.affinity_duration + 120)
        jobs = [job for w in done for job in w["jobs"] if job["finished_at"] <= stop_at]
        # queued after the workers started: the first jobs also waited for the processes to start
        waited = [job["waited_s"] for w in done for job in w["jobs"]
                  if job["waited_s"] is not None and job["created_at"] >= start_at]
        per_model = Counter(job["model"] for job in jobs)
        row = {
            "affinity_seconds": affinity, "workers": args.affinity_workers,
            "jobs_done": len(jobs), "jobs_per_s": round(len(jobs) / (stop_at - start_at), 2),
            "swaps": sum(w["swaps"] for w in done), "first_loads": sum(w["loads"] for w in done),
            "jobs_per_model": dict(per_model),
            "waited_s_p50": round(percentile(waited, 0.5) or 0, 2), "waited_s_p99": round(percentile(waited, 0.99) or 0, 2),
            "waited_s_max": round(max(waited, default=0), 2),
            "ledger": check_ledger(url, done, feeder.created),
        }
        rows.append(row)
        print(f"affinity {affinity:g} s: {row['jobs_done']} jobs ({row['jobs_per_s']}/s), {row['swaps']} swaps, "
              f"wait p99 {row['waited_s_p99']} s", flush=True)
    return rows


# -- report ----------------------------------------------------------------------------------------
def environment(server_url: str) -> dict[str, Any]:
    import psycopg
    import sqlalchemy

    with psycopg.connect(server_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                     "('max_connections', 'fsync', 'synchronous_commit', 'shared_buffers')").fetchall())
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0],
        "sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__,
        "postgresql": row[0] if row else None, "postgresql_settings": settings, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "nice": os.nice(0), "command": " ".join(["python -m bench.control_plane", *sys.argv[1:]]),
    }


def print_report(result: dict[str, Any]) -> None:
    from bench.common import print_table

    env = result["environment"]
    print(f"\nPostgreSQL {env['postgresql']}, {env['cpu_count']} CPUs, load at start {env['loadavg_at_start']}, "
          f"nice {env['nice']}")
    if result.get("scaling"):
        print(f"\nscaling at {result['config']['job_seconds']} s jobs (ideal jobs/s = workers / job seconds)")
        print_table(
            ["workers", "procs", "jobs/s", "ideal", "ratio", "claim p50 ms", "claim p99 ms", "finish p99 ms",
             "cores workers", "cores pg", "cpu ms/job workers", "cpu ms/job pg", "pg active", "pg lock waits",
             "empty claims", "machine busy %", "ledger"],
            [[r["workers"], r["processes"], r["jobs_per_s"], r["ideal_jobs_per_s"], f"{r['ratio']:.3f}",
              r["claim_ms_p50"], r["claim_ms_p99"], r["finish_ms_p99"], r["cpu"]["cores_workers"],
              r["cpu"]["cores_postgres"], r["cpu_ms_per_job_workers"], r["cpu_ms_per_job_postgres"],
              r["pg_active_backends_mean"], _lock_waits(r), r["empty_claims"], r["cpu"]["machine_busy_pct"],
              "ok" if r["ledger"]["ok"] else "BROKEN"]
             for r in result["scaling"]])
    if result.get("queue_depth"):
        print("\nclaim latency vs jobs queued (one worker); the claim's SELECT alone (server time), now and before")
        print_table(["queued", "claim p50 ms", "claim p99 ms", "finish p50 ms", "query p50 ms", "previous p50 ms",
                     "same job"],
                    [[r["queued"], r["claim_ms_p50"], r["claim_ms_p99"], r["finish_ms_p50"], r["query_ms_p50"],
                      r["previous_query_ms_p50"], r["same_job_picked"]] for r in result["queue_depth"]])
    if result.get("api"):
        api = result["api"]
        print(f"\nAPI replica (create_app, no worker), open-loop instant_response submissions; {api['workers']} "
              f"simulated workers draining at {api['job_seconds']} s jobs")
        print_table(["req/s", "sent", "errors", "p50 ms", "p99 ms", "max ms", "send lag p99 ms", "cores api",
                     "cores pg", "cores client"],
                    [[s["rate"], s["sent"], s["errors"], s["latency_ms_p50"], s["latency_ms_p99"], s["latency_ms_max"],
                      s["send_lag_ms_p99"], s["cpu"]["cores_api_replica"], s["cpu"]["cores_postgres"],
                      s["cpu"]["cores_bench_main"]] for s in api["steps"]])
        print(f"drained {api['drained_jobs']} jobs, {api['queued_left']} left queued; worker claim p99 "
              f"{api['worker_claims']['claim_ms_p99']} ms; ledger ok: {api['ledger']['ok']}")
    if result.get("affinity"):
        print(f"\nmodel affinity: {len(MODELS)} models mixed, swap {result['config']['swap_seconds']} s, "
              f"job {result['config']['job_seconds']} s")
        print_table(["affinity s", "workers", "jobs", "jobs/s", "swaps", "first loads", "wait p50 s", "wait p99 s",
                     "wait max s", "ledger"],
                    [[r["affinity_seconds"], r["workers"], r["jobs_done"], r["jobs_per_s"], r["swaps"],
                      r["first_loads"], r["waited_s_p50"], r["waited_s_p99"], r["waited_s_max"],
                      "ok" if r["ledger"]["ok"] else "BROKEN"] for r in result["affinity"]])


def _lock_waits(row: dict[str, Any]) -> float:
    """Mean backends waiting on a heavyweight lock (Lock:*) per sample."""
    return round(sum(v for k, v in row["pg_active_by_wait"].items() if k.startswith("Lock:")), 2)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


QUICK = {"workers": [1, 2], "job_seconds": 0.05, "duration": 1.5, "warmup": 0.3, "queue_depth": 8,
         "depths": [10, 100], "depth_claims": 5, "rates": [5.0, 10.0], "api_seconds": 1.0, "api_workers": 2,
         "api_job_seconds": 0.05, "affinity_workers": 2, "affinity_duration": 1.5, "swap_seconds": 0.1,
         "affinity_depth": 6, "affinity": [0.0, 30.0], "threads_per_process": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts and 0.05 s jobs")
    parser.add_argument("--sections", default="scaling,queue_depth,api,affinity")
    parser.add_argument("--database-url", help="a PostgreSQL server to use (databases are created on it); "
                                               "default: a throwaway cluster from the Debian binaries")
    parser.add_argument("--workers", type=_ints, default=[1, 4, 16, 32, 64])
    parser.add_argument("--threads-per-process", type=int, default=8)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=25.0, help="seconds each worker count runs")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at the start not counted")
    parser.add_argument("--queue-depth", type=int, default=128, help="jobs kept queued (at least 2x workers)")
    parser.add_argument("--beat-seconds", type=float, default=2.0)
    parser.add_argument("--depths", type=_ints, default=[100, 1000, 10000])
    parser.add_argument("--depth-claims", type=int, default=30)
    parser.add_argument("--rates", type=_floats, default=[10.0, 50.0, 100.0, 200.0])
    parser.add_argument("--api-seconds", type=float, default=10.0, help="seconds at each request rate")
    parser.add_argument("--api-workers", type=int, default=16)
    parser.add_argument("--api-job-seconds", type=float, default=1.0)
    parser.add_argument("--affinity", type=_floats, default=[0.0, 30.0], help="affinity_seconds values compared")
    parser.add_argument("--affinity-workers", type=int, default=8)
    parser.add_argument("--affinity-duration", type=float, default=40.0)
    parser.add_argument("--affinity-depth", type=int, default=32)
    parser.add_argument("--swap-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-api", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    return args


@contextmanager
def _server(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    from tests.support.postgres import postgres_cluster

    with tempfile.TemporaryDirectory(prefix="fluxserve-ctlbench-") as tmp, postgres_cluster(tmp) as cluster:
        yield cluster.url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_api:
        serve_api_replica(args.serve_api, args.port, args.data_dir)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    config = {k: v for k, v in vars(args).items() if k not in ("json", "serve_api", "port", "data_dir")}
    config["json"] = str(args.json) if args.json else None
    result: dict[str, Any] = {"config": config}
    with ExitStack() as stack:
        try:
            server_url = stack.enter_context(_server(args.database_url))
        except Exception as exc:  # noqa: BLE001 - no server binaries: say so, exit 2
            print(f"no PostgreSQL to run on: {exc}", file=sys.stderr)
            return 2
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fluxserve-ctlbench-work-")))
        result["environment"] = environment(server_url)
        postmaster = postmaster_pid(server_url)
        if "scaling" in sections:
            result["scaling"] = run_scaling(args, server_url, postmaster)
        if "queue_depth" in sections:
            result["queue_depth"] = run_queue_depth(args, server_url)
        if "api" in sections:
            result["api"] = run_api(args, server_url, postmaster, work)
        if "affinity" in sections:
            result["affinity"] = run_affinity(args, server_url)
        result["environment"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    ledgers = [r["ledger"] for r in result.get("scaling", []) + result.get("affinity", [])]
    ledgers += [result["api"]["ledger"]] if "api" in result else []
    result["all_ledgers_ok"] = all(ledger["ok"] for ledger in ledgers)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    if not result["all_ledgers_ok"]:
        print("BROKEN: a job was lost, duplicated or left running (see the ledgers)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
