"""The GPU run's driver (bench/gpu/run.py), without a GPU: every stage's command parses at both
scales, the true-size stages fit an H200's memory, a stage that cannot fit the budget is skipped
and listed, a stage past its timeout is stopped with everything it started, and the report
reads what the driver writes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import pytest
from bench.gpu import report, run

H200_BYTES = 139 * 2**30  # the device's CUDA-visible memory (KINDS.md: ~139 GiB)


def _benchmark_args(stage: run.Stage, scale: str):
    argv = stage.argv[scale]
    assert argv[:2] == [sys.executable, "-m"]
    module = importlib.import_module(argv[2])
    return module, module.parse_args(argv[3:] + ["--json", "/dev/null"])


@pytest.mark.parametrize("scale", ["true", "small"])
def test_every_stage_command_parses(scale):
    names = [stage.name for stage in run.STAGES]
    assert names[0] == "tests" and len(set(names)) == len(names)
    for stage in run.STAGES:
        assert stage.est_s[scale] <= stage.cap_s[scale]
        if stage.kind == "bench":
            module, args = _benchmark_args(stage, scale)
            assert args.scale == scale
            if scale == "small":
                assert args.size <= 512


def test_true_size_stages_fit_the_gpu():
    """bare's pipeline plus one copy per service that changes the weights (every spec but
    "none"), in bf16, must leave room for activations on a ~139 GiB H200."""
    from bench.models import parameter_counts
    from bench.service_vs_bare import split_spec

    sizes = {model: 2 * sum(parameter_counts("true", model).values()) for model in ("klein", "kontext")}
    for stage in run.STAGES:
        if stage.kind != "bench" or stage.argv["true"][2] != "bench.service_vs_bare":
            continue
        _, args = _benchmark_args(stage, "true")
        copies = 1 + sum(split_spec(spec)[0] != "none" for spec in args.optimizations)
        assert copies * sizes[args.model] < 0.8 * H200_BYTES, (stage.name, copies, sizes[args.model])


def test_a_stage_that_cannot_fit_is_skipped_and_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("GPU_RUN_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("GPU_RUN_BUDGET_S", "30")
    monkeypatch.setenv("GPU_RUN_T0", str(time.time()))
    monkeypatch.setenv("GPU_RUN_STAGES", "compile_1024")
    driver = run.Run()
    assert [s.name for s in driver.stages] == ["compile_1024"]
    driver.run_stage(driver.stages[0])
    saved = json.loads((tmp_path / "out" / "gpu-results.json").read_text())
    entry = saved["stages"][0]
    assert entry["status"] == "skipped" and "left of the budget" in entry["reason"]
    assert (tmp_path / "out" / "logs.tar.gz").exists()
    assert report.headline(entry) == entry["reason"]
    assert "status **skipped**" in report.markdown(saved)
    monkeypatch.setenv("GPU_RUN_STAGES", "no_such_stage")
    with pytest.raises(SystemExit):
        run.Run()


def test_a_stage_past_its_timeout_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              f"child = subprocess.Popen(['sleep', '60'])\nopen({str(marker)!r}, 'w').write(str(child.pid))\n"
              "print('started', flush=True)\ntime.sleep(60)\n")
    started = time.time()
    returncode, timed_out = run._run_logged([sys.executable, "-c", script], {}, tmp_path / "log", timeout=3)
    assert timed_out and returncode != 0 and time.time() - started < 30
    assert "started" in (tmp_path / "log").read_text()
    child = int(marker.read_text())
    alive = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert alive in ("", "Z"), alive  # gone (or a zombie waiting for its reaper)


def test_the_tests_stage_runs_every_gpu_test_file():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert sorted(run.GPU_TEST_FILES) == sorted(str(p.relative_to(root)) for p in (root / "tests/gpu").glob("test_*.py"))
