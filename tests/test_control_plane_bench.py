"""The control-plane benchmark (bench/control_plane.py) runs end to end in ``--quick`` mode on a
real PostgreSQL (the session's server; skipped without the binaries unless
FLUXSERVE_REQUIRE_POSTGRES=1), so the script can't rot. No timing is asserted: exit code, tables,
JSON keys, and the counts that must hold whatever the machine: every claimed job finished exactly
once, nothing left running, every accepted submission is a job, every worker was registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_quick_run_covers_every_section_and_loses_or_duplicates_nothing(tmp_path, postgres_server):
    out = tmp_path / "control_plane.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.control_plane", "--quick", "--database-url", postgres_server, "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    for heading in ("scaling at", "claim latency vs jobs queued", "API replica", "model affinity"):
        assert heading in done.stdout
    result = json.loads(out.read_text())
    assert {"config", "environment", "scaling", "queue_depth", "api", "affinity", "all_ledgers_ok"} <= set(result)
    assert result["all_ledgers_ok"] is True
    assert {"postgresql", "cpu_count", "loadavg_at_start", "loadavg_at_end"} <= set(result["environment"])

    assert [row["workers"] for row in result["scaling"]] == [1, 2]
    for row in result["scaling"]:
        assert {"jobs_per_s", "ideal_jobs_per_s", "ratio", "claim_ms_p50", "claim_ms_p99", "cpu"} <= set(row)
        assert row["ideal_jobs_per_s"] == row["workers"] / 0.05
        ledger = row["ledger"]
        assert ledger["claimed"] >= row["workers"]  # each worker ran at least one job in 1.5 s
        assert ledger["claimed"] == ledger["succeeded_in_db"]
        assert ledger["claimed_twice"] == ledger["finish_refused"] == ledger["running_left"] == 0
        assert ledger["claimed_not_succeeded"] == ledger["succeeded_not_claimed"] == 0
        assert row["registered_max"] == row["workers"]  # every simulated worker was in the WorkerRegistry

    assert [row["queued"] for row in result["queue_depth"]] == [10, 100]
    assert all(row["claims"] == 5 and row["same_job_picked"] is True for row in result["queue_depth"])

    api = result["api"]
    assert [step["rate"] for step in api["steps"]] == [5.0, 10.0]
    assert all(step["errors"] == 0 and step["ok"] == step["sent"] for step in api["steps"])
    assert api["ledger"]["jobs_in_db"] == api["ledger"]["accepted_answers"]  # every accepted request is a job, no more
    assert api["ledger"]["claimed"] == api["ledger"]["succeeded_in_db"] == api["drained_jobs"]
    assert api["ledger"]["running_left"] == api["ledger"]["claimed_twice"] == 0

    assert [row["affinity_seconds"] for row in result["affinity"]] == [0.0, 30.0]
    for row in result["affinity"]:
        assert row["ledger"]["ok"] is True and row["ledger"]["running_left"] == 0
        assert 1 <= row["first_loads"] <= row["workers"]
        assert sum(row["jobs_per_model"].values()) == row["jobs_done"]
