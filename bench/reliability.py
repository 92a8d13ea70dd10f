"""Reliability benchmark: a real server (worker in its own process) takes a stream of jobs
while this script kill -9s the worker or the whole server at random moments, then restarts it.
Reports jobs submitted / finished / lost / duplicated, from the database, the files on disk
and a webhook receiver. Usage:

    python -m bench.reliability --jobs 200 --kills 10 [--json bench/reliability.json]

Loopback only; bounded in jobs and time; uses the tiny offline models.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import select
from tests.support.process_server import ServerProcess
from tests.test_crash_safety import Receiver

from fluxserve.engine.tiny import build_tiny_models
from fluxserve.jobs.database import open_database
from fluxserve.jobs.tables import Job, WebhookDelivery, utcnow

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


def _wait_for_running_job(db_url: str, timeout: float) -> bool:
    """Until a job is really being generated: running, with a heartbeat in the last second (a
    row left "running" by the previous kill does not count)."""
    sessions = open_database(db_url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fresh = utcnow() - timedelta(seconds=1)
        with sessions() as session:
            if session.scalar(select(Job.id).where(Job.status == "running", Job.heartbeat_at > fresh).limit(1)):
                return True
        time.sleep(0.05)
    return False


def run(jobs: int, kills: int, seed: int, deadline_s: float) -> dict:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fluxserve-reliability-"))
    tiny = work / "tiny"
    build_tiny_models(tiny)
    server = ServerProcess(work / "data", tiny, FLUXSERVE_LEASE_SECONDS="3", FLUXSERVE_HEARTBEAT_SECONDS="0.5",
                           FLUXSERVE_MAX_QUEUED_PER_KEY=str(jobs + 1), FLUXSERVE_SYNC_WAIT_SECONDS="0",
                           FLUXSERVE_MAX_JOB_ATTEMPTS="10")
    key = server.create_key()
    receiver = Receiver()
    server.start()
    db_url = f"sqlite:///{(work / 'data' / 'fluxserve.db').resolve()}"
    submitted: dict[int, int] = {}
    kill_log: list[str] = []
    started = time.monotonic()
    kill_at = sorted(rng.sample(range(1, jobs), min(kills, jobs - 1)))
    with httpx.Client(timeout=30) as client:
        for index in range(jobs):
            if kill_at and index == kill_at[0]:
                kill_at.pop(0)
                _wait_for_running_job(db_url, timeout=60)  # kill work in progress, not a starting worker
                time.sleep(rng.uniform(0, 0.3))
                what = rng.choice(["worker", "server"])
                try:
                    server.kill_worker() if what == "worker" else server.kill()
                except httpx.HTTPError:
                    what = "server"
                    server.kill()
                kill_log.append(what)
                if what == "server":
                    server.start()
            samples = rng.randint(1, 3)
            body = {"key": key, "prompt": f"job {index}", "width": 512, "height": 512, "samples": samples,
                    "num_inference_steps": rng.randint(4, 12), "seed": index, "webhook": receiver.url,
                    "safety_checker": False}
            for _ in range(100):  # the server may be restarting: retry until it takes the job
                try:
                    answer = client.post(server.base_url + KLEIN, json=body).json()
                    submitted[answer["id"]] = samples
                    break
                except (httpx.HTTPError, KeyError):
                    time.sleep(0.2)
            time.sleep(rng.uniform(0, 0.15))
    sessions = open_database(db_url)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with sessions() as session:
            open_jobs = session.scalar(select(Job.id).where(Job.status.in_(("queued", "running"))).limit(1))
        if open_jobs is None and set(receiver.received) >= set(submitted):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    server.stop()
    receiver.shutdown()
    with sessions() as session:
        rows = list(session.scalars(select(Job)))
        deliveries = Counter(session.scalars(select(WebhookDelivery.job_id)))
    by_status = Counter(job.status for job in rows)
    files = {p.name for p in (work / "data" / "outputs").iterdir() if not p.name.startswith(".tmp-")}
    expected = {name for job in rows for name in job.outputs}
    return {
        "jobs_submitted": len(submitted),
        "jobs_finished": by_status["succeeded"] + by_status["failed"],
        "succeeded": by_status["succeeded"],
        "failed": by_status["failed"],
        "unfinished_at_deadline": by_status["queued"] + by_status["running"],
        "lost": len(set(submitted) - {job.id for job in rows}),  # accepted, then no record at all
        "duplicated_finishes": sum(1 for job in rows if deliveries[job.id] > 1),
        "duplicated_or_stray_files": len(files - expected),
        "missing_files": len(expected - files),
        "webhooks_received_ids": len(receiver.received),
        "webhook_duplicates_received": sum(n - 1 for n in receiver.received.values()),
        "retried_jobs": sum(1 for job in rows if job.attempts > 1),
        "kills": dict(Counter(kill_log)),
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds to wait for the queue to drain")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.jobs, args.kills, args.seed, args.deadline)
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
