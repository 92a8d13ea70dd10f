"""Service vs bare pipeline: latency and throughput of fluxserve end to end (HTTP on loopback,
queue, worker, engine switches, PNG, store) against direct calls of the same diffusers pipeline,
with the same weights, prompts and seeds, in one run. Usage:

    python -m bench.service_vs_bare [--model klein|kontext] --scale tiny|small|true --size 256 \\
        [--steps N] --requests 16 [--clients 1,4,8] [--rounds 3] [--optimizations "none;default"] \\
        [--safety] [--threads N] [--setting max_batch_size=4] [--json bench/service_vs_bare.json]

--model (``bench.workloads``): klein (default) = FLUX.2 klein text2img, 4 steps by default;
kontext = Flux Kontext editing of one init image (sent as a base64 ``data:`` URI, --size square,
strength 1: the plain ``FluxKontextPipeline``), 28 steps by default (the service's defaults).

What runs (one process; every service is up throughout):
- one service per --optimizations spec (FLUXSERVE_OPTIMIZATIONS; "default" = the service's own
  defaults, "none" = the plain diffusers pipeline inside the service, so its rows are the
  service's own overhead and the other rows add the engine switches);
- warm-up: one bare call, and one request per service (its worker loads and optimizes the model);
- --rounds times, interleaved so that every mode sees the same background load:
  - bare: N sequential ``pipeline(prompt, height, width, num_inference_steps, guidance_scale,
    generator=torch.Generator("cpu").manual_seed(seed))`` calls (kontext: also image, negative_prompt,
    true_cfg_scale, max_area, _auto_resize), exactly the call the service's ``Generator`` makes
    (the service's default guidance), in a long-lived thread of its own like the service's worker;
  - per service, sequential: N requests one after the other: POST .../flux_klein/text2img
    (kontext: /api/v6/images/img2img, the init image in the body: the service decodes and stores
    it, the bare side gets it decoded), answered "success" within sync_wait, then GET of the
    PNG (the client holds the image, as after a bare call; --no-download leaves the GET out);
  - per service, throughput: for each C in --clients, N requests spread over C client threads;
- bare once more (so bare brackets every service run).
Each mode's figure is its median run. Request i of a run uses seed --seed + i and a prompt made
unique to the run (so the service's prompt-embedding cache never hits: --repeat-prompts lets it),
except that a round's bare run and its services' sequential runs share prompts: every image of a
sequential run is compared pixel for pixel with the bare image of the same prompt and seed (after
the timed section).

Same weights: tiny: bare and services load the model's tiny folder with ``from_pretrained`` (the
services through their registry, in the dtype their switches choose, as in production).
small / true: the pipeline is built once in memory (``bench.models``) and each service's
``PipelineCache`` is handed a pipeline (its ``_load`` is patched in this process for the source
``bench-injected:...``): the bare object itself for "none" (nothing is changed in place), a deep
copy (equal weights, own tensors: the switches change modules in place) for any other spec; so
no 16 GB save/load at true scale, and one extra copy in GPU memory per optimized service.
``--via-disk DIR`` instead saves it to DIR, and bare and services all load it with
``from_pretrained`` through ``model_overrides`` (the production path; slow, 16 GB of disk and one
copy in GPU memory per service plus bare at true scale; with "none" on CUDA the service loads
fp32).

Identity: with "none", service images equal bare images bit for bit (same kernels). Switches
that change the arithmetic (channels_last VAE, another attention kernel, bf16 VAE, fp8,
compile) can move pixels by a few levels: reported as the maximum difference.

Caveats: clients, servers and workers share one process (and the GIL); the idle services
(workers polling their queues) run beside the bare loop too; the bare loop has no concurrency of
its own, so "vs bare" of a throughput row compares the service under C clients with the bare
sequential rate. Absolute times hold only for the machine named with them; the ratio is the
figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    SCALES,
    THREADS_HELP,
    device_and_dtype,
    environment,
    load_folder,
    print_table,
    quiet_libraries,
    release_memory,
    run_command,
    set_threads,
)
from bench.workloads import WORKLOADS, data_uri

SYSTEM_DETAILS = "/api/v1/enterprise/flux_klein/system_details"
INJECTED = "bench-injected:"
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "a small cactus with a happy face in the Sahara desert",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "A cozy cabin in a snowy forest at night, warm light in the windows.",
]
TABLE_HEADERS = ["mode", "optimizations", "clients", "runs", "requests", "total s", "per image s", "range",
                 "p50 s", "p95 s", "images/s", "vs bare", "overhead %"]


class BenchError(RuntimeError):
    pass


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def _summary(latencies: list[float], total: float) -> dict[str, Any]:
    n = len(latencies)
    return {"requests": n, "total_s": total, "per_image_s": total / n, "p50_s": _percentile(latencies, 50),
            "p95_s": _percentile(latencies, 95), "images_per_s": n / total, "latencies_s": latencies}


@contextlib.contextmanager
def injected_pipelines(pipelines: dict[str, Any]) -> Iterator[None]:
    """In this process, every ``PipelineCache`` answers a spec whose source is a key of
    ``pipelines`` with that already-built pipeline instead of loading one from disk or hub."""
    from fluxserve.engine.loading import PipelineCache

    original = PipelineCache._load

    def _load(self, spec):
        if spec.source in pipelines:
            self._pipelines[(spec.pipeline, spec.source)] = pipelines[spec.source]
            return pipelines[spec.source]
        return original(self, spec)

    PipelineCache._load = _load
    try:
        yield
    finally:
        PipelineCache._load = original


def _own_copy(pipeline: Any) -> Any:
    """The same pipeline class over deep copies of its torch modules and scheduler (equal
    weights, own tensors), sharing only the tokenizer."""
    import torch

    parts = {name: copy.deepcopy(part) if isinstance(part, torch.nn.Module) or name == "scheduler" else part
             for name, part in pipeline.components.items()}
    twin = type(pipeline)(**parts)
    twin.set_progress_bar_config(disable=True)
    return twin


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.workload = WORKLOADS[args.model]
        self.spec = self.workload.spec  # the service's defaults (guidance, ...) for this model
        self.device, self.dtype = device_and_dtype()
        self.reference = self.workload.reference(args.size, args.seed)  # kontext's init image (bare side)
        self.reference_uri = data_uri(self.reference) if self.reference is not None else None  # (service side)
        self.tiny_root = work / "tiny-models"
        tiny_folder = self.workload.tiny_folder(self.tiny_root)  # the services need the tiny build in any case
        self.sources: dict[str, str] = {}  # optimization spec -> the source its service loads for the model
        self.inject: dict[str, Any] = {}
        if args.scale == "tiny":  # the services load the same folder
            self.pipeline = load_folder(tiny_folder, self.spec.pipeline, self.device, self.dtype)
        else:
            from bench.models import save_pipeline

            started = time.perf_counter()
            self.pipeline = self.workload.build(args.scale, self.device, self.dtype, seed=args.seed)
            self.build_s = time.perf_counter() - started
            if args.via_disk:
                # everyone loads the saved copy: bit-equal weights in freshly loaded tensors
                source = str(save_pipeline(self.pipeline, Path(args.via_disk)))
                del self.pipeline
                release_memory()
                self.pipeline = load_folder(Path(source), self.spec.pipeline, self.device, self.dtype)
                self.sources = {spec: source for spec in args.optimizations}
            else:
                for index, spec in enumerate(args.optimizations):
                    source = f"{INJECTED}{args.model}-{args.scale}-{index}"
                    self.sources[spec] = source
                    self.inject[source] = self.pipeline if split_spec(spec)[0] == "none" else _own_copy(self.pipeline)
        self.bare_images: dict[tuple[str, int], Any] = {}
        self._bare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-bare")
        self.identity = {spec: {"identical": False, "identical_images": 0, "compared_images": 0,
                                "max_pixel_difference": 0} for spec in args.optimizations}
        self.applied: dict[str, Any] = {}
        # images of the first round's throughput runs (where dynamic batching happens), to be
        # compared with the same service's solo answers for the same prompts and seeds
        self.concurrent_results: dict[str, list[tuple[str, int, bytes | None, dict]]] = {}
        self.batch_identity: dict[str, dict[str, Any]] = {}

    def jobs(self, tag: str) -> list[tuple[str, str, int]]:
        """(tag, prompt, seed) of each request of a run; the tag makes the prompts unique to it."""
        def prompt(i: int) -> str:
            base = PROMPTS[i % len(PROMPTS)]
            return base if self.args.repeat_prompts else f"{base} (run {tag}, image {i})"

        return [(tag, prompt(i), self.args.seed + i) for i in range(self.args.requests)]

    # -- bare ---------------------------------------------------------------------------------------
    def _bare_call(self, prompt: str, seed: int):
        from fluxserve.engine.generate import crop_to, seeded_generator

        call = self.workload.call(self.spec, prompt, self.args.size, self.args.steps, self.reference)
        image = self.pipeline(**call, generator=seeded_generator(seed)).images[0]
        return crop_to(image.convert("RGB"), self.args.size, self.args.size)

    def bare(self, tag: str) -> dict[str, Any]:
        """N sequential bare calls, in a long-lived thread of their own like the service's worker
        (with OpenMP, which OS thread runs torch can matter: keep both sides alike)."""
        return self._bare_thread.submit(self._bare_loop, tag).result()

    def _bare_loop(self, tag: str) -> dict[str, Any]:
        import numpy as np

        latencies = []
        started = time.perf_counter()
        for _, prompt, seed in self.jobs(tag):
            t0 = time.perf_counter()
            image = self._bare_call(prompt, seed)
            latencies.append(time.perf_counter() - t0)
            self.bare_images[(prompt, seed)] = np.asarray(image)
        return _summary(latencies, time.perf_counter() - started)

    # -- services -----------------------------------------------------------------------------------
    def _body(self, key: str, prompt: str, seed: int) -> dict[str, Any]:
        return {"key": key, "prompt": prompt, "width": self.args.size, "height": self.args.size,
                "num_inference_steps": self.args.steps, "seed": seed, "safety_checker": self.args.safety,
                **self.workload.body(self.reference_uri)}

    def _request(self, client, key: str, prompt: str, seed: int) -> tuple[float, dict, bytes | None]:
        t0 = time.perf_counter()
        response = client.post(self.workload.endpoint, json=self._body(key, prompt, seed))
        answer = response.json()
        if response.status_code != 200 or answer.get("status") != "success":
            raise BenchError(f"request for seed {seed} did not succeed: {response.status_code} {answer}")
        png = client.get(answer["output"][0]).content if not self.args.no_download else None
        return time.perf_counter() - t0, answer, png

    def service_run(self, live, spec: str, clients: int, tag: str, compare: bool) -> dict[str, Any]:
        """N requests over ``clients`` client threads; with ``compare``, the downloaded images are
        compared (after the timed section) with the bare images of the same prompts and seeds."""
        import httpx

        jobs = self.jobs(tag)
        lock = threading.Lock()
        latencies: list[float] = []
        results: list[tuple[str, int, bytes | None, dict]] = []
        errors: list[BaseException] = []

        def client_loop() -> None:
            with httpx.Client(base_url=live.base_url, timeout=self.args.sync_wait + 120) as client:
                while True:
                    with lock:
                        if not jobs or errors:
                            return
                        _, prompt, seed = jobs.pop(0)
                    try:
                        latency, answer, png = self._request(client, live.key, prompt, seed)
                    except BaseException as exc:  # noqa: BLE001 - reported after the run
                        with lock:
                            errors.append(exc)
                        return
                    with lock:
                        latencies.append(latency)
                        results.append((prompt, seed, png, answer))

        threads = [threading.Thread(target=client_loop, name=f"bench-client-{i}") for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = time.perf_counter() - started
        if errors:
            raise BenchError(f"service [{spec}], {clients} clients: {errors[0]}") from errors[0]
        summary = _summary(latencies, total)
        summary["clients"] = clients
        summary["server_generation_time_s"] = [answer["generationTime"] for *_, answer in results]
        if compare:
            self._compare(spec, results)
        elif tag.startswith("r0-"):
            self.concurrent_results.setdefault(spec, []).extend(results)
        return summary

    def check_batches(self, live, spec: str) -> None:
        """After the timed runs: each image of the first round's concurrent runs against the same
        service's answer to the same request sent alone (one client: nothing to batch with).
        With dynamic batching on, this is "batched image == solo image" on this device."""
        import httpx
        import numpy as np
        from PIL import Image

        check = {"compared_images": 0, "identical_images": 0, "batched_images": 0, "max_pixel_difference": 0}
        with httpx.Client(base_url=live.base_url, timeout=self.args.sync_wait + 120) as client:
            for prompt, seed, png, answer in self.concurrent_results.get(spec, []):
                if png is None:
                    continue
                _, _, solo_png = self._request(client, live.key, prompt, seed)
                concurrent, solo = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
                                    for data in (png, solo_png))
                check["compared_images"] += 1
                check["batched_images"] += (answer.get("meta") or {}).get("batch_size", 1) > 1
                if np.array_equal(concurrent, solo):
                    check["identical_images"] += 1
                else:
                    check["max_pixel_difference"] = max(check["max_pixel_difference"],
                                                        int(np.abs(concurrent - solo).max()))
        check["identical"] = check["compared_images"] > 0 and check["identical_images"] == check["compared_images"]
        self.batch_identity[spec] = check

    def _compare(self, spec: str, results: list[tuple[str, int, bytes | None, dict]]) -> None:
        import numpy as np
        from PIL import Image

        identity = self.identity[spec]
        for prompt, seed, png, _answer in results:
            if png is None:
                continue
            service = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            bare = self.bare_images[(prompt, seed)]
            identity["compared_images"] += 1
            if service.shape == bare.shape and np.array_equal(service, bare):
                identity["identical_images"] += 1
            else:
                worst = (int(np.abs(service.astype(np.int16) - bare.astype(np.int16)).max())
                         if service.shape == bare.shape else 255)
                identity["max_pixel_difference"] = max(identity["max_pixel_difference"], worst)

    def _applied(self, live) -> Any:
        """What the service's engine switched on (system_details; best effort)."""
        import httpx

        try:
            details = httpx.post(live.base_url + SYSTEM_DETAILS, json={"key": live.admin_key}, timeout=30).json()
            return details.get("optimizations")
        except Exception as exc:  # noqa: BLE001 - informative only
            return f"unknown: {type(exc).__name__}: {exc}"

    # -- the whole run ------------------------------------------------------------------------------
    def run(self) -> dict[str, list[dict[str, Any]]]:
        """Warm everything up, then ``rounds`` x (bare, then per service: sequential and each
        client count), then bare once more: every mode sees the same background load."""
        import httpx
        from tests.support.servers import live_server

        runs: dict[str, list[dict[str, Any]]] = {"bare": []}
        with contextlib.ExitStack() as stack:
            stack.enter_context(injected_pipelines(self.inject))
            services = {}
            for index, spec in enumerate(self.args.optimizations):
                switches, own_settings = split_spec(spec)
                settings = dict(self.args.settings)
                settings.update(
                    worker="thread", device=self.device, sync_wait_seconds=self.args.sync_wait,
                    max_queued_per_key=self.args.requests + 16, rate_limit_per_key="", rate_limit_per_address="",
                    optimizations="" if switches == "default" else switches,
                )
                settings.update(own_settings)
                if self.sources:
                    settings["model_overrides"] = {self.workload.model_id: {"source": self.sources[spec]}}
                services[spec] = stack.enter_context(live_server(self.work / f"data-{index}", self.tiny_root,
                                                                 **settings))
                runs[f"{spec}|sequential"] = []
                runs.update({f"{spec}|throughput {c}": [] for c in self.args.clients})
            self._bare_thread.submit(self._bare_call, PROMPTS[0], 10**6).result()  # warm-up
            for spec, live in services.items():
                with httpx.Client(base_url=live.base_url, timeout=self.args.sync_wait + 120) as client:
                    self._request(client, live.key, PROMPTS[0], 10**6)  # warm-up: load and optimize the model
                self.applied[spec] = self._applied(live)
            for round_index in range(self.args.rounds):
                tag = f"r{round_index}"
                runs["bare"].append(self.bare(tag))
                for spec, live in services.items():
                    runs[f"{spec}|sequential"].append(self.service_run(live, spec, 1, tag, compare=True))
                    for clients in self.args.clients:
                        runs[f"{spec}|throughput {clients}"].append(
                            self.service_run(live, spec, clients, f"{tag}-{spec}-c{clients}", compare=False))
            runs["bare"].append(self.bare(f"r{self.args.rounds}"))
            for spec, live in services.items():
                self.check_batches(live, spec)
        self._bare_thread.shutdown()
        for identity in self.identity.values():
            compared = identity["compared_images"]
            identity["identical"] = compared > 0 and identity["identical_images"] == compared
        return runs


def _rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: the median run (by time per image); ratios against the bare median."""
    def median_per_image(mode: str) -> float:
        return statistics.median(run["per_image_s"] for run in runs[mode])

    reference = median_per_image("bare")
    rows = []
    for mode, mode_runs in runs.items():
        spec, _, kind = mode.partition("|")
        if mode == "bare":
            label, spec, clients = "bare", "-", 1
        elif kind == "sequential":
            label, clients = "service sequential", 1
        else:
            label, clients = "service throughput", int(kind.split()[-1])
        per_image = median_per_image(mode)
        latencies = [latency for run in mode_runs for latency in run["latencies_s"]]
        per_run = [run["per_image_s"] for run in mode_runs]
        rows.append({"mode": label, "optimizations": spec, "clients": clients, "runs": len(mode_runs),
                     "requests": mode_runs[0]["requests"], "total_s": per_image * mode_runs[0]["requests"],
                     "per_image_s": per_image, "per_image_min_s": min(per_run), "per_image_max_s": max(per_run),
                     "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
                     "images_per_s": 1 / per_image, "ratio_to_bare": reference / per_image,
                     "overhead_pct": (per_image / reference - 1) * 100})
    return rows


def print_report(result: dict[str, Any]) -> None:
    config, env = result["config"], result["environment"]
    size = f"{config['size']}x{config['size']}"
    print(f"service vs bare pipeline: {WORKLOADS[config['model']].title}, scale {config['scale']}, {size}, "
          f"{config['steps']} steps, {config['requests']} requests per run, {config['rounds']} rounds, safety checker "
          f"{'on' if config['safety'] else 'off'}, weights: {config['weights']}")
    print(f"device {env['device']} ({env.get('gpu', env['machine'])}), {env['dtype']}, torch {env['torch']}, "
          f"diffusers {env['diffusers']}, {env['torch_threads']} torch threads"
          + (f", service settings {config['settings']}" if config["settings"] else ""))
    print()
    table = [[r["mode"], r["optimizations"], r["clients"], r["runs"], r["requests"], f"{r['total_s']:.3f}",
              f"{r['per_image_s']:.4f}", f"{r['per_image_min_s']:.4f}-{r['per_image_max_s']:.4f}",
              f"{r['p50_s']:.4f}", f"{r['p95_s']:.4f}", f"{r['images_per_s']:.2f}", f"{r['ratio_to_bare']:.3f}x",
              f"{r['overhead_pct']:+.1f}"] for r in result["rows"]]
    print_table(TABLE_HEADERS, table)
    print()
    print("total s / per image s: the median run (rounds interleave the modes; bare also runs once after the last "
          "round); range: fastest-slowest run; p50/p95: request latency over all runs (includes queueing under "
          "concurrency); vs bare: bare s per image / this row's; overhead %: this row's s per image over bare's")
    bare_p50 = next(r["p50_s"] for r in result["rows"] if r["mode"] == "bare")
    rest = ("HTTP, queue, database, init image upload/decode/store and download"
            if WORKLOADS[config["model"]].uses_reference else "HTTP, queue, database and download")
    for spec in config["optimizations"]:
        gen = [t for run in result["runs"][f"{spec}|sequential"] for t in run["server_generation_time_s"]]
        seq_p50 = next(r["p50_s"] for r in result["rows"]
                       if r["mode"] == "service sequential" and r["optimizations"] == spec)
        print(f"[{spec}] sequential p50: bare call {bare_p50:.4f} s; service {seq_p50:.4f} s = worker generationTime "
              f"(generate + safety + PNG + store) {_percentile(gen, 50):.4f} s + {rest} "
              f"{seq_p50 - _percentile(gen, 50):.4f} s")
        same = result["identity"][spec]
        if same["compared_images"]:
            verdict = "yes" if same["identical"] else f"no (max pixel difference {same['max_pixel_difference']})"
            print(f"[{spec}] identical: {verdict}: {same['identical_images']}/{same['compared_images']} service "
                  f"images equal the bare pipeline's for the same prompt and seed")
        else:
            print(f"[{spec}] identical: not checked (--no-download)")
        check = result.get("concurrent_vs_solo", {}).get(spec)
        if check and check["compared_images"]:
            verdict = "yes" if check["identical"] else f"no (max pixel difference {check['max_pixel_difference']})"
            print(f"[{spec}] concurrent == solo: {verdict}: {check['identical_images']}/{check['compared_images']} "
                  f"images of the first round's concurrent runs ({check['batched_images']} of them from batched "
                  f"calls) equal the service's answer to the same request sent alone")
        applied = result["applied"].get(spec)
        if isinstance(applied, dict):
            applied = "; ".join(f"{k}: {v}" for report in applied.values() if isinstance(report, dict)
                                for k, v in report.items()) or applied
        print(f"[{spec}] engine switches applied: {applied}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    set_threads(args.threads, device_and_dtype()[0])
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(args, work)
        result: dict[str, Any] = {
            "benchmark": "service_vs_bare",
            "command": "python -m bench.service_vs_bare " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "config": {"model": args.model, "model_id": bench.spec.name, "scale": args.scale, "size": args.size,
                       "steps": args.steps, "requests": args.requests,
                       "clients": args.clients, "rounds": args.rounds, "optimizations": args.optimizations,
                       "settings": args.settings, "safety": args.safety, "seed": args.seed,
                       "repeat_prompts": args.repeat_prompts, "download": not args.no_download,
                       "sync_wait_s": args.sync_wait, "guidance_scale": bench.spec.guidance,
                       "weights": ("tiny folder, from_pretrained" if args.scale == "tiny" else
                                   f"saved to {args.via_disk}, from_pretrained" if args.via_disk else
                                   "built in memory; bare's object for 'none', deep copies for other specs")},
            "environment": environment(bench.device, bench.dtype),
        }
        if hasattr(bench, "build_s"):
            result["config"]["build_s"] = bench.build_s
        result["runs"] = bench.run()
        result["applied"] = bench.applied
        result["identity"] = bench.identity
        result["identical"] = {spec: value["identical"] for spec, value in bench.identity.items()}
        result["concurrent_vs_solo"] = bench.batch_identity
        result["rows"] = _rows(result["runs"])
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """An --optimizations spec -> (its FLUXSERVE_OPTIMIZATIONS value, settings of that service
    alone): "default@max_batch_size=8@batch_wait_seconds=0.05" is the default switches with
    dynamic batching, so one run compares batching off and on with the same weights."""
    switches, *settings = spec.split("@")
    return switches.strip(), dict(_setting(text) for text in settings)


def _setting(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.service_vs_bare", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="klein",
                        help="klein: FLUX.2 klein text2img; kontext: Flux Kontext editing of one init image")
    parser.add_argument("--scale", choices=SCALES, default="tiny",
                        help="tiny: the tiny offline pipelines; small: bench.models small configs; "
                             "true: MODELS.md sizes, random bf16 weights (GPU)")
    parser.add_argument("--size", type=int, default=256, help="width = height, 256-1024, a multiple of 16")
    parser.add_argument("--steps", type=int, default=None, help="default: the service's (klein 4, kontext 28)")
    parser.add_argument("--requests", type=int, default=16, help="requests per run (each mode)")
    parser.add_argument("--clients", default="1,4,8",
                        help="concurrent client counts, comma-separated (\"\": sequential runs only)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode (median reported)")
    parser.add_argument("--optimizations", default="none;default",
                        help='one service per spec, ";"-separated FLUXSERVE_OPTIMIZATIONS values ("default": the '
                             'service\'s defaults, "none": plain diffusers, e.g. "none;default;compile"), each '
                             'optionally followed by settings of its service alone: "default;default@max_batch_size=8"')
    parser.add_argument("--setting", dest="settings", action="append", type=_setting, default=[],
                        metavar="NAME=VALUE", help="a further service setting (JSON value), e.g. max_batch_size=4")
    parser.add_argument("--safety", action="store_true", help="safety_checker on in the service's requests")
    parser.add_argument("--repeat-prompts", action="store_true",
                        help="every run uses the same prompts (the service's prompt cache then hits)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (request i uses seed + i)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--sync-wait", type=float, default=600.0, help="service's sync_wait_seconds")
    parser.add_argument("--no-download", action="store_true", help="do not GET the PNG (no identity check)")
    parser.add_argument("--via-disk", default=None, metavar="DIR",
                        help="small/true: save the pipeline to DIR; bare and services from_pretrained it")
    parser.add_argument("--work-dir", default=None, help="data and tiny models here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--force", action="store_true", help="run --scale true without a GPU")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    args.argv = argv
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    args.optimizations = list(dict.fromkeys(s.strip() for s in args.optimizations.split(";") if s.strip()))
    args.settings = dict(args.settings)
    if args.steps is None:
        args.steps = WORKLOADS[args.model].spec.steps
    if args.size % 16 or not 256 <= args.size <= 1024:
        parser.error("--size must be a multiple of 16 in 256..1024 (the API's range; no cropping)")
    if args.requests < 1 or args.rounds < 1 or args.steps < 1 or any(c < 1 for c in args.clients):
        parser.error("--requests, --rounds, --steps and --clients must be >= 1")
    if not args.optimizations:
        parser.error("--optimizations needs at least one spec")
    try:
        [split_spec(spec) for spec in args.optimizations]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--optimizations: {exc}")
    if args.via_disk and args.scale == "tiny":
        parser.error("--via-disk is for --scale small or true (tiny is always loaded from disk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(args, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
