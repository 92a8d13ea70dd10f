"""How soon a waiting request on one API replica answers once a worker elsewhere finishes its
job: PostgreSQL LISTEN/NOTIFY (``jobs.notify``) against the polling fallback.

One throwaway PostgreSQL server, one worker "node" (its own data dir, the tiny engine on CPU, a
thread of this process) and, per mode, a fresh API replica without a worker (its own data dir):
``notify`` runs the replica's database listener, ``polling`` does not (waiters re-read the store
every ``generation.POLL_SECONDS``). Each job is a synchronous request to the replica; its wake
latency is the time the answer arrived minus the job's ``finished_at`` (written by the worker's
commit; one clock: same machine). The answer's own work (one read, the JSON) is in both modes.

    python -m bench.wake_latency --jobs 50 --json bench/wake_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.postgres import running_postgres
from tests.support.replicas import api_replica, worker_node

from fluxserve.api.generation import POLL_SECONDS
from fluxserve.engine.tiny import build_tiny_models
from fluxserve.keys import KeyStore

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(root: Path, tiny: Path, database: str, mode: str, jobs: int, key: str) -> list[float]:
    settings = dict(database_url=database, sync_wait_seconds=60)
    lags = []
    with api_replica(root / f"api-{mode}", tiny, listen=mode == "notify", **settings) as replica:
        body = {"key": key, "prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 1,
                "safety_checker": False}
        with replica.client() as client:
            for _ in range(jobs):
                answer = client.post(KLEIN, json=body)
                arrived = time.time()
                job = answer.json()
                if job.get("status") != "success":
                    raise RuntimeError(f"job did not succeed: {job}")
                finished = replica.jobs.get(job["id"]).finished_at
                lags.append(arrived - finished.timestamp())
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wake-latency-") as folder:
        root = Path(folder)
        tiny = root / "tiny"
        build_tiny_models(tiny)
        with running_postgres(root) as database:
            from fluxserve.jobs.database import open_database

            key = KeyStore(open_database(database)).create("bench")[1]
            with worker_node(root / "worker", tiny, database_url=database):
                # warm-up: the worker loads the model once, outside the figures
                measure(root, tiny, database, "warm", 2, key)
                results = {mode: measure(root, tiny, database, mode, args.jobs, key) for mode in ("notify", "polling")}
    rows = []
    print(f"{'mode':<8} {'jobs':>4} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for mode, lags in results.items():
        row = {"mode": mode, "jobs": len(lags), "p50_ms": round(1000 * statistics.median(lags), 1),
               "p90_ms": round(1000 * percentile(lags, 0.9), 1), "max_ms": round(1000 * max(lags), 1),
               "mean_ms": round(1000 * statistics.fmean(lags), 1)}
        rows.append(row)
        print(f"{mode:<8} {row['jobs']:>4} {row['p50_ms']:>8} {row['p90_ms']:>8} {row['max_ms']:>8} {row['mean_ms']:>8}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": {"jobs": args.jobs, "polling_seconds": POLL_SECONDS, "database": "postgresql (loopback)",
                       "worker": "tiny klein, CPU, 256x256, 1 step, another data dir (thread)"},
            "environment": {"python": platform.python_version(), "machine": platform.machine()},
            "rows": rows, "raw_seconds": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
