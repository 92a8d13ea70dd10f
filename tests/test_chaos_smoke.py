"""The chaos benchmark (bench/chaos.py) runs end to end on its two cheapest faults, so the script
can't rot: a real ``fluxserve serve`` is killed -9, then stopped with SIGTERM, while clients wait on
their synchronous requests, started again, and the clients' retries (same Idempotency-Key) make no
second job. No timing is asserted: exit code, table, JSON keys, and the counts that must hold
whatever the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_kill_fault_runs_end_to_end_and_duplicates_nothing(tmp_path, tiny_root):
    out = tmp_path / "chaos.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--faults", "kill,sigterm", "--duration", "0", "--before", "1",
         "--after", "0", "--rate", "5", "--drain", "120", "--tiny", str(tiny_root), "--json", str(out),
         "--env", "FLUXSERVE_LEASE_SECONDS=2", "--env", "FLUXSERVE_HEARTBEAT_SECONDS=0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fault" in done.stdout and "duplicated" in done.stdout and "recover s" in done.stdout
    result = json.loads(out.read_text())
    assert {"config", "environment", "results"} <= set(result)
    kill, sigterm = result["results"]
    assert sigterm["fault"] == "sigterm" and sigterm["covered"] is True
    assert [exit["status"] for exit in sigterm["notes"]["exits"]] == [0]  # a graceful stop exits 0
    assert sigterm["failed"] == 0 and sigterm["duplicated"] == 0 and sigterm["lost"] == 0
    assert sigterm["succeeded"] == sigterm["jobs_accepted"] and sigterm["drained"] is True
    assert kill["fault"] == "kill" and kill["covered"] is True
    assert len(kill["notes"]["kills"]) == 1 and kill["notes"]["kills"][0]["clients_waiting"] >= 1
    assert kill["jobs_accepted"] >= 1 and kill["drained"] is True
    assert kill["succeeded"] == kill["jobs_accepted"]  # a kill fails nothing: the jobs are retried
    assert kill["duplicated"] == 0 and kill["lost"] == 0 and kill["unfinished"] == 0
    assert kill["answers"].get("connection error", 0) >= 1  # the waiting clients were cut off, and sent again
    assert {"answers_503", "answers_500", "recover_s", "health", "log"} <= set(kill)
    assert {"tracebacks", "unavailable_lines", "back_lines"} <= set(kill["log"])
