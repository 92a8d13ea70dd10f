"""Service vs bare pipeline: latency and throughput of fluxserve end to end (HTTP on loopback,
queue, worker, PNG, store) against direct calls of the same diffusers pipeline, with the same
weights, prompts and seeds, in one run. Usage:

    python -m bench.service_vs_bare --scale tiny|small|true --size 256 --steps 4 --requests 16 \\
        [--clients 1,4,8] [--safety] [--threads N] [--json bench/service_vs_bare.json]

What runs, in this order (one process):
1. bare, before: N sequential ``pipeline(prompt, height, width, num_inference_steps, guidance_scale,
   generator=torch.Generator("cpu").manual_seed(seed))`` calls, exactly the call the service's
   ``Generator`` makes (klein text2img), after one warm-up call.
2. the service: the real app (``tests.support.servers.live_server``: uvicorn on 127.0.0.1, thread
   worker, SQLite) with one warm-up request, then
   - sequential: N requests one after the other (POST .../flux_klein/text2img, answered "success"
     within sync_wait, then GET of the PNG: the client holds the image, as after a bare call);
   - concurrent: for each C in --clients, N requests spread over C client threads (httpx).
3. bare, after: the bare loop again (shows drift between the two; the reference is their mean).
Request i uses prompt PROMPTS[i % len] and seed --seed + i in every run, bare and service, and
each downloaded service image is compared pixel for pixel with the bare image of its seed.

Same weights: tiny: both load the tiny klein folder with ``from_pretrained`` (the service through
its registry, as in production). small / true: the pipeline is built once in memory
(``bench.models``) and the service's ``PipelineCache`` is handed that very object (its ``_load`` is
patched in this process for the source ``bench-injected:...``), so bare and service run the same
tensors; no 16 GB save/load at true scale. ``--via-disk DIR`` instead saves it to DIR and lets the
service load it with ``from_pretrained`` through ``model_overrides`` (the production path; slow
and 16 GB of disk at true scale).

Caveats: clients, server and worker share one process (and the GIL); the bare loop has no
concurrency of its own, so "vs bare" of a concurrent row compares the service's throughput under
C clients with the bare sequential rate. Absolute times hold only for the machine named with
them; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    GPU_ONLY_MESSAGE, SCALES, device_and_dtype, environment, load_tiny_klein, print_table, quiet_libraries,
    tiny_klein_folder,
)

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
INJECTED = "bench-injected:"
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "a small cactus with a happy face in the Sahara desert",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "A cozy cabin in a snowy forest at night, warm light in the windows.",
]
TABLE_HEADERS = ["mode", "clients", "requests", "total s", "per image s", "p50 s", "p95 s", "images/s",
                 "vs bare", "overhead %"]


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


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        import torch

        from fluxserve.models import KLEIN as KLEIN_MODEL, Registry

        self.args, self.work = args, work
        self.device, self.dtype = device_and_dtype()
        self.guidance = Registry.build().get(KLEIN_MODEL).guidance  # the service's default for klein
        self.jobs = [(PROMPTS[i % len(PROMPTS)], args.seed + i) for i in range(args.requests)]
        self.tiny_root = work / "tiny-models"
        tiny_folder = tiny_klein_folder(self.tiny_root)  # the service needs the tiny build in any case
        self.overrides: dict[str, dict[str, Any]] = {}
        self.inject: dict[str, Any] = {}
        if args.scale == "tiny":
            self.pipeline = load_tiny_klein(tiny_folder, self.device, self.dtype)  # the service loads the same folder
        else:
            from bench.models import build_klein_pipeline, save_pipeline

            started = time.perf_counter()
            self.pipeline = build_klein_pipeline(args.scale, self.device, self.dtype, seed=args.seed)
            self.build_s = time.perf_counter() - started
            if args.via_disk:
                source = str(save_pipeline(self.pipeline, Path(args.via_disk)))
            else:
                source = f"{INJECTED}klein-{args.scale}"
                self.inject[source] = self.pipeline
            self.overrides = {KLEIN_MODEL: {"source": source}}
        self.bare_images: dict[int, Any] = {}

    # -- bare ---------------------------------------------------------------------------------------
    def _bare_call(self, prompt: str, seed: int):
        from fluxserve.engine.generate import _crop_to, _generator, _latent_size

        size = _latent_size(self.args.size)
        image = self.pipeline(prompt=prompt, height=size, width=size, num_inference_steps=self.args.steps,
                              guidance_scale=self.guidance, output_type="pil", generator=_generator(seed)).images[0]
        return _crop_to(image.convert("RGB"), self.args.size, self.args.size)

    def bare(self) -> dict[str, Any]:
        import numpy as np

        self._bare_call(PROMPTS[0], 10**6)  # warm-up
        latencies = []
        started = time.perf_counter()
        for prompt, seed in self.jobs:
            t0 = time.perf_counter()
            image = self._bare_call(prompt, seed)
            latencies.append(time.perf_counter() - t0)
            self.bare_images.setdefault(seed, np.asarray(image))
        return _summary(latencies, time.perf_counter() - started)

    # -- service ------------------------------------------------------------------------------------
    def _body(self, key: str, prompt: str, seed: int) -> dict[str, Any]:
        return {"key": key, "prompt": prompt, "width": self.args.size, "height": self.args.size,
                "num_inference_steps": self.args.steps, "seed": seed, "safety_checker": self.args.safety}

    def _request(self, client, key: str, prompt: str, seed: int) -> tuple[float, dict, bytes | None]:
        t0 = time.perf_counter()
        response = client.post(KLEIN, json=self._body(key, prompt, seed))
        answer = response.json()
        if response.status_code != 200 or answer.get("status") != "success":
            raise BenchError(f"request for seed {seed} did not succeed: {response.status_code} {answer}")
        png = client.get(answer["output"][0]).content if not self.args.no_download else None
        return time.perf_counter() - t0, answer, png

    def _run_clients(self, live, clients: int) -> tuple[dict[str, Any], list[tuple[int, bytes | None, dict]]]:
        import httpx

        jobs = list(self.jobs)
        lock = threading.Lock()
        latencies: list[float] = []
        results: list[tuple[int, bytes | None, dict]] = []
        errors: list[BaseException] = []

        def client_loop() -> None:
            with httpx.Client(base_url=live.base_url, timeout=self.args.sync_wait + 120) as client:
                while True:
                    with lock:
                        if not jobs or errors:
                            return
                        prompt, seed = jobs.pop(0)
                    try:
                        latency, answer, png = self._request(client, live.key, prompt, seed)
                    except BaseException as exc:  # noqa: BLE001 - reported after the run
                        with lock:
                            errors.append(exc)
                        return
                    with lock:
                        latencies.append(latency)
                        results.append((seed, png, answer))

        threads = [threading.Thread(target=client_loop, name=f"bench-client-{i}") for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = time.perf_counter() - started
        if errors:
            raise BenchError(f"{clients} clients: {errors[0]}") from errors[0]
        summary = _summary(latencies, total)
        summary["clients"] = clients
        summary["server_generation_time_s"] = [answer["generationTime"] for _, _, answer in results]
        return summary, results

    def service(self) -> tuple[dict[str, Any], list[tuple[int, bytes | None, dict]]]:
        import httpx

        from tests.support.servers import live_server

        settings = dict(
            worker="thread", device=self.device, sync_wait_seconds=self.args.sync_wait,
            max_queued_per_key=self.args.requests + 16, rate_limit_per_key="", rate_limit_per_address="",
            model_overrides=self.overrides,
        )
        results: dict[str, Any] = {"concurrent": {}}
        downloaded: list[tuple[int, bytes | None, dict]] = []
        with injected_pipelines(self.inject), live_server(self.work / "data", self.tiny_root, **settings) as live:
            with httpx.Client(base_url=live.base_url, timeout=self.args.sync_wait + 120) as client:
                self._request(client, live.key, PROMPTS[0], 10**6)  # warm-up: the worker loads the model
            sequential, got = self._run_clients(live, 1)
            results["sequential"] = sequential
            downloaded += got
            for clients in self.args.clients:
                summary, got = self._run_clients(live, clients)
                results["concurrent"][str(clients)] = summary
                downloaded += got
        return results, downloaded

    def compare(self, downloaded: list[tuple[int, bytes | None, dict]]) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        compared = same = 0
        worst = 0
        for seed, png, _answer in downloaded:
            if png is None:
                continue
            service = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            bare = self.bare_images[seed]
            compared += 1
            if service.shape == bare.shape and np.array_equal(service, bare):
                same += 1
            elif service.shape == bare.shape:
                worst = max(worst, int(np.abs(service.astype(np.int16) - bare.astype(np.int16)).max()))
            else:
                worst = 255
        return {"identical": compared > 0 and same == compared, "identical_images": same,
                "compared_images": compared, "max_pixel_difference": worst}


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    before, after = result["bare"]["before"], result["bare"]["after"]
    reference = (before["per_image_s"] + after["per_image_s"]) / 2
    rows = []

    def add(mode: str, clients: int, summary: dict[str, Any]) -> None:
        rows.append({"mode": mode, "clients": clients, "requests": summary["requests"],
                     "total_s": summary["total_s"], "per_image_s": summary["per_image_s"],
                     "p50_s": summary["p50_s"], "p95_s": summary["p95_s"], "images_per_s": summary["images_per_s"],
                     "ratio_to_bare": reference / summary["per_image_s"],
                     "overhead_pct": (summary["per_image_s"] / reference - 1) * 100})

    add("bare (before)", 1, before)
    add("bare (after)", 1, after)
    add("service sequential", 1, result["service"]["sequential"])
    for clients, summary in result["service"]["concurrent"].items():
        add("service throughput", int(clients), summary)
    return rows


def print_report(result: dict[str, Any]) -> None:
    config, env = result["config"], result["environment"]
    print(f"service vs bare pipeline: FLUX.2 klein text2img, scale {config['scale']}, {config['size']}x{config['size']}, "
          f"{config['steps']} steps, {config['requests']} requests per run, safety checker "
          f"{'on' if config['safety'] else 'off'}, weights via {config['weights']}")
    print(f"device {env['device']} ({env.get('gpu', env['machine'])}), {env['dtype']}, torch {env['torch']}, "
          f"diffusers {env['diffusers']}, {env['torch_threads']} torch threads")
    print()
    table = [[r["mode"], r["clients"], r["requests"], f"{r['total_s']:.3f}", f"{r['per_image_s']:.4f}",
              f"{r['p50_s']:.4f}", f"{r['p95_s']:.4f}", f"{r['images_per_s']:.2f}", f"{r['ratio_to_bare']:.3f}x",
              f"{r['overhead_pct']:+.1f}"] for r in result["rows"]]
    print_table(TABLE_HEADERS, table)
    print()
    print("vs bare: bare time per image (mean of the two bare runs) / this row's; overhead %: this row's time "
          "per image over bare's")
    gen = result["service"]["sequential"]["server_generation_time_s"]
    print(f"server-reported generationTime (generate + safety + PNG + store), sequential p50: "
          f"{_percentile(gen, 50):.4f} s")
    same = result["identity"]
    if same["compared_images"]:
        verdict = "yes" if same["identical"] else f"no (max pixel difference {same['max_pixel_difference']})"
        print(f"identical: {verdict}: {same['identical_images']}/{same['compared_images']} service images equal the "
              f"bare pipeline's for the same seed")
    else:
        print("identical: not checked (--no-download)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(args, work)
        result: dict[str, Any] = {
            "benchmark": "service_vs_bare",
            "command": "python -m bench.service_vs_bare " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "config": {"scale": args.scale, "size": args.size, "steps": args.steps, "requests": args.requests,
                       "clients": args.clients, "safety": args.safety, "seed": args.seed,
                       "download": not args.no_download, "sync_wait_s": args.sync_wait,
                       "guidance_scale": bench.guidance,
                       "weights": ("tiny folder, from_pretrained" if args.scale == "tiny" else
                                   f"saved to {args.via_disk}, from_pretrained" if args.via_disk else
                                   "one in-memory pipeline shared by bare and service")},
            "environment": environment(bench.device, bench.dtype),
        }
        if hasattr(bench, "build_s"):
            result["config"]["build_s"] = bench.build_s
        before = bench.bare()
        service, downloaded = bench.service()
        after = bench.bare()
        result["bare"] = {"before": before, "after": after}
        result["service"] = service
        result["identity"] = bench.compare(downloaded)
        result["identical"] = result["identity"]["identical"]
        result["rows"] = _rows(result)
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.service_vs_bare", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, default="tiny",
                        help="tiny: the tiny offline pipelines; small: bench.models small configs; "
                             "true: MODELS.md sizes, random bf16 weights (GPU)")
    parser.add_argument("--size", type=int, default=256, help="width = height, 256-1024, a multiple of 16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests per run (each mode)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent client counts, comma-separated")
    parser.add_argument("--safety", action="store_true", help="safety_checker on in the service's requests")
    parser.add_argument("--seed", type=int, default=0, help="first seed (request i uses seed + i)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--sync-wait", type=float, default=600.0, help="service's sync_wait_seconds")
    parser.add_argument("--no-download", action="store_true", help="do not GET the PNG (no identity check)")
    parser.add_argument("--via-disk", default=None, metavar="DIR",
                        help="small/true: save the pipeline to DIR and let the service from_pretrained it")
    parser.add_argument("--work-dir", default=None, help="data and tiny models here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--force", action="store_true", help="run --scale true without a GPU")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    args.argv = argv
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if args.size % 16 or not 256 <= args.size <= 1024:
        parser.error("--size must be a multiple of 16 in 256..1024 (the API's range; no cropping)")
    if args.requests < 1 or any(c < 1 for c in args.clients):
        parser.error("--requests and --clients must be >= 1")
    if args.via_disk and args.scale == "tiny":
        parser.error("--via-disk is for --scale small or true (tiny is always loaded from disk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scale == "true" and not args.force:
        import torch

        if not torch.cuda.is_available():
            print(GPU_ONLY_MESSAGE, file=sys.stderr)
            return 2
    result = run(args)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
