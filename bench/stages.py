"""Where the time of one FLUX.2 klein or Flux Kontext generation goes, stage by stage, and how
close each denoising step is to the GPU's roofline. Usage:

    python -m bench.stages [--model klein|kontext] --scale small|true|tiny --size 1024 [--steps N] \\
        [--repeats 3] [--optimizations none|default|SPEC] [--peak-tflops 989] [--threads N] \\
        [--json bench/stages.json]
    python -m bench.stages [--model kontext] --scale true --size 1024 --flops-only   # no GPU needed

--model (``bench.workloads``): klein (default; 4 steps by default) or kontext (editing one
--size x --size init image, a seeded gradient with noise; 28 steps by default).

Stages, timed inside one ordinary ``pipeline(...)`` call (the call the service's ``Generator``
makes: klein text2img, or Kontext with one reference), after one warm-up generation, median of
--repeats; with --optimizations, after the service's engine switches
(``fluxserve.engine.optimize.apply``) were applied to the pipeline, as its cache does (each
generation has a prompt of its own, so a prompt cache never hits):
  text encoding   ``pipeline.encode_prompt`` (klein: tokenize + Qwen3 forward + stacking layers
                  9/18/27; kontext: CLIP (77 tokens, pooled) + T5 (512 tokens))
  reference encode  kontext only: ``pipeline.vae.encode`` of the (preprocessed) init image
  step i          transformer forward + scheduler step of step i (from a forward pre-hook on the
                  transformer to ``callback_on_step_end``)
  vae decode      ``pipeline.vae.decode``
  to PIL          ``image_processor.postprocess`` (device -> host copy, uint8, PIL)
  other           the rest of the call (latent prep, timesteps, unpacking, gaps between stages)
then, on the host, as the service's worker does them:
  safety check    ``fluxserve.safety.SafetyChecker.filter`` (opennsfw ONNX)
  png encode      ``fluxserve.images.encode_png``
  store           ``fluxserve.storage.local.LocalStorage.save`` (atomic write + fsync)
On CUDA the in-pipeline marks are CUDA events on the current stream (no synchronisation inside
the call, so timing does not perturb it); on CPU they are ``time.perf_counter``.

Roofline: FLOPs per step are counted by running the transformer on the meta device under
torch's FlopCounterMode for this size (``bench.flops``: 34.8 TFLOP for klein-4B at 1024^2: 28.3
linear + 6.5 attention; 165.5 TFLOP for Kontext at 1024^2 with a 1024^2 reference, 8704 tokens:
112.4 linear + 53.1 attention); fraction = FLOPs / step seconds / peak (989 TFLOP/s: H100 bf16
dense). On CPU the fraction is printed but is not meaningful. With random weights the images are noise, which
PNG compresses badly: the png stage is pessimistic compared with real pictures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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
    run_command,
    set_threads,
)
from bench.workloads import WORKLOADS

PROMPT = "a photo of a cat sitting on a red chair"
TEXT_LAYERS = (9, 18, 27)  # the Qwen3 hidden states klein reads
TABLE_HEADERS = ["stage", "ms", "% of total", "FLOP", "% of peak"]
#: stage name -> (attribute path of the owner on the pipeline, method) timed around each call
TIMED = {"text_encoding": ("", "encode_prompt"), "reference_encode": ("vae", "encode"),
         "vae_decode": ("vae", "decode"), "to_pil": ("image_processor", "postprocess")}
FLOPS_LABELS = {"text_encoding": "text encoding", "reference_encode": "reference enc.", "step": "one step",
                "vae_decode": "vae decode"}


def _si(flops: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f}"


def _tokens(step: dict[str, Any]) -> str:
    reference = f" + {step['reference_tokens']} reference" if step.get("reference_tokens") else ""
    return f"{step['tokens']} tokens ({step['image_tokens']} image{reference} + {step['text_tokens']} text)"


class Marks:
    """Named time points: CUDA events (read after one synchronize) or host perf_counter."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self._torch = torch
        self.points: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds of each point since the first."""
        if self.cuda:
            self._torch.cuda.synchronize()
            first = self.points[0][1]
            return {name: first.elapsed_time(event) / 1000 for name, event in self.points}
        first = self.points[0][1]
        return {name: t - first for name, t in self.points}


def build_pipeline(workload, scale: str, device: str, dtype, work: Path, seed: int):
    if scale == "tiny":
        return load_folder(workload.tiny_folder(work / "tiny-models"), workload.pipeline_class, device, dtype)
    return workload.build(scale, device, dtype, seed)


@contextlib.contextmanager
def _wrapped(owner: Any, name: str, wrap) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(owner.name)`` for the block; an instance attribute that
    was there before (e.g. the prompt cache's wrapper) is put back, else the class's shows again."""
    had = name in owner.__dict__
    previous = owner.__dict__.get(name)
    setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        if had:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


def one_generation(pipeline, args, safety, storage, cuda: bool, index: int, reference=None) -> dict[str, float]:
    """Run one instrumented generation (kontext: editing ``reference``); return seconds per stage."""
    import torch

    from fluxserve.png_encoding import encode_png

    workload = WORKLOADS[args.model]
    timed_stages = [name for name in workload.stages if name != "steps"]

    marks = Marks(cuda)
    step = {"i": 0}

    def timed(name):
        def wrap(fn):
            def wrapper(*a, **k):
                marks.mark(f"{name}:start")
                out = fn(*a, **k)
                marks.mark(f"{name}:end")
                return out
            return wrapper
        return wrap

    def pre_hook(_module, _args, _kwargs):
        marks.mark(f"step{step['i']}:start")

    def on_step_end(_pipeline, i, _t, callback_kwargs):
        marks.mark(f"step{i}:end")
        step["i"] = i + 1
        return callback_kwargs

    # a prompt of its own per generation: a prompt cache (--optimizations) must not hit
    call = workload.call(workload.spec, f"{PROMPT} ({index})", args.size, args.steps, reference)
    with contextlib.ExitStack() as stack:
        for name in timed_stages:
            path, method = TIMED[name]
            owner = pipeline if not path else getattr(pipeline, path)
            stack.enter_context(_wrapped(owner, method, timed(name)))
        stack.callback(pipeline.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        marks.mark("call:start")
        image = pipeline(**call, callback_on_step_end=on_step_end,
                         generator=torch.Generator("cpu").manual_seed(args.seed + index)).images[0]
        marks.mark("call:end")
    at = marks.seconds()
    stages = {}
    for name in workload.stages:  # in call order
        if name == "steps":
            stages.update({f"step_{i + 1}": at[f"step{i}:end"] - at[f"step{i}:start"] for i in range(args.steps)})
        else:
            stages[name] = at[f"{name}:end"] - at[f"{name}:start"]
    stages["other"] = at["call:end"] - at["call:start"] - sum(stages.values())

    image = image.convert("RGB")
    t0 = time.perf_counter()
    safety.filter([image])
    t1 = time.perf_counter()
    png = encode_png(image)
    t2 = time.perf_counter()
    storage.save(f"bench-{index}.png", png)
    t3 = time.perf_counter()
    stages.update(safety_check=t1 - t0, png_encode=t2 - t1, store=t3 - t2)
    return stages


def flops_for(pipeline_or_scale, size: int, text_layers: int | None = None, model: str = "klein") -> dict[str, dict]:
    from bench.flops import pipeline_flops

    return pipeline_flops(pipeline_or_scale, size, size, text_layers=text_layers, model=model)


def apply_optimizations(pipeline, spec: str, device: str) -> dict[str, str]:
    """The service's engine switches (``fluxserve.engine.optimize``), applied in place as its
    pipeline cache does; "none" leaves the plain diffusers pipeline."""
    if spec == "none":
        return {}
    from fluxserve.engine.optimize import Optimizations, apply

    return apply(pipeline, Optimizations.from_strings("" if spec == "default" else spec), device=device)


def _flops_lines(flops: dict[str, dict]) -> None:
    for name, f in flops.items():
        parts = " + ".join(f"{k} {_si(f[k])}" for k in ("linear", "attention", "convolution", "other") if f[k])
        if "t5" in f:
            parts += f"; CLIP {_si(f['clip'])}, T5 {_si(f['t5'])}"
        print(f"  {FLOPS_LABELS.get(name, name):<14} {_si(f['total']):>9}FLOP  ({parts})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    device, dtype = device_and_dtype()
    set_threads(args.threads, device)
    cuda = device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="fluxserve-stages-"))
    try:
        return _measure(args, device, dtype, cuda, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, device: str, dtype, cuda: bool, work: Path) -> dict[str, Any]:
    from fluxserve.safety import SafetyChecker
    from fluxserve.storage.local import LocalStorage

    workload = WORKLOADS[args.model]
    reference = workload.reference(args.size, args.seed)
    started = time.perf_counter()
    pipeline = build_pipeline(workload, args.scale, device, dtype, work, args.seed)
    build_s = time.perf_counter() - started
    applied = apply_optimizations(pipeline, args.optimizations, device)
    truncated = str(applied.get("truncate_text_encoder", "")).startswith("on")
    flops = flops_for(pipeline, args.size, text_layers=max(TEXT_LAYERS) if truncated else None)
    safety = SafetyChecker(args.nsfw_threshold)
    storage = LocalStorage(work / "outputs", "http://127.0.0.1")
    one_generation(pipeline, args, safety, storage, cuda, -1, reference)  # warm-up (kernels, ONNX model load)
    runs = [one_generation(pipeline, args, safety, storage, cuda, i, reference) for i in range(args.repeats)]
    median = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    total = sum(median.values())
    peak = args.peak_tflops * 1e12
    step_names = [f"step_{i + 1}" for i in range(args.steps)]
    step_s = statistics.median(median[name] for name in step_names)
    stage_flops = {name: f["total"] for name, f in flops.items() if name != "step"}  # keys are stage names
    stage_flops.update({name: flops["step"]["total"] for name in step_names})
    rows = []
    for name, seconds in median.items():
        f = stage_flops.get(name)
        rows.append({"stage": name, "ms": seconds * 1000, "pct_of_total": 100 * seconds / total,
                     "tflop": f / 1e12 if f else None,
                     "pct_of_peak": 100 * f / seconds / peak if f and seconds > 0 else None})
    result = {
        "benchmark": "stages",
        "command": "python -m bench.stages " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": {"model": args.model, "model_id": workload.model_id, "scale": args.scale, "size": args.size,
                   "steps": args.steps, "repeats": args.repeats,
                   "optimizations": args.optimizations, "applied": applied,
                   "seed": args.seed, "peak_tflops": args.peak_tflops,
                   "timer": "cuda events" if cuda else "perf_counter",
                   "build_s": build_s},
        "environment": environment(device, dtype),
        "flops": flops,
        "runs_s": runs,
        "median_s": median,
        "total_s": total,
        "rows": rows,
        "step_s": step_s,
        "step_flops": flops["step"]["total"],
        "roofline_fraction": flops["step"]["total"] / step_s / peak,
        "roofline_meaningful": cuda,
    }
    return result


def print_report(result: dict[str, Any]) -> None:
    config, env = result["config"], result["environment"]
    size = f"{config['size']}x{config['size']}"
    print(f"stages of one {WORKLOADS[config['model']].title} generation: scale {config['scale']}, {size}, "
          f"{config['steps']} steps, median of {config['repeats']} after a warm-up, timer {config['timer']}")
    print(f"device {env['device']} ({env.get('gpu', env['machine'])}), {env['dtype']}, torch {env['torch']}, "
          f"diffusers {env['diffusers']}, {env['torch_threads']} torch threads")
    applied = "; ".join(f"{k}: {v}" for k, v in config["applied"].items()) or "none (the plain diffusers pipeline)"
    print(f"engine switches: {applied}")
    print()
    table = [[r["stage"], f"{r['ms']:.2f}", f"{r['pct_of_total']:.1f}",
              _si(r["tflop"] * 1e12) if r["tflop"] is not None else "",
              f"{r['pct_of_peak']:.3g}" if r["pct_of_peak"] is not None else ""] for r in result["rows"]]
    table.append(["total", f"{result['total_s'] * 1000:.2f}", "100.0", "", ""])
    print_table(TABLE_HEADERS, table)
    print()
    flops = result["flops"]
    print(f"FLOPs (counted on the meta device, {_tokens(flops['step'])} per step):")
    _flops_lines(flops)
    label = "" if result["roofline_meaningful"] else "  (CPU: not meaningful)"
    print(f"roofline: step {result['step_s'] * 1000:.2f} ms (median) for {_si(result['step_flops'])}FLOP -> "
          f"{100 * result['roofline_fraction']:.3g}% of {config['peak_tflops']:.0f} TFLOP/s{label}")


def flops_only(args: argparse.Namespace) -> int:
    """Print the FLOP counts of a scale at a size (meta device: no weights, no GPU)."""
    flops = flops_for(args.scale, args.size, model=args.model)
    print(f"FLOPs of {WORKLOADS[args.model].title}, scale {args.scale}, {args.size}x{args.size}, counted on the "
          f"meta device, {_tokens(flops['step'])} per step:")
    _flops_lines(flops)
    step = flops["step"]["total"]
    print(f"at {args.peak_tflops:.0f} TFLOP/s: one step >= {1000 * step / (args.peak_tflops * 1e12):.2f} ms, "
          f"{args.steps} steps >= {1000 * args.steps * step / (args.peak_tflops * 1e12):.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "stages-flops", "model": args.model, "scale": args.scale,
                                         "size": args.size, "steps": args.steps, "flops": flops}, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="klein",
                        help="klein: FLUX.2 klein text2img; kontext: Flux Kontext editing of one init image")
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--size", type=int, default=1024, help="width = height, a multiple of 16")
    parser.add_argument("--steps", type=int, default=None, help="default: the service's (klein 4, kontext 28)")
    parser.add_argument("--repeats", type=int, default=3, help="measured generations (median), after a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="roofline peak (H100/H200 bf16 dense: 989)")
    parser.add_argument("--optimizations", default="none",
                        help='the service\'s engine switches to apply first (FLUXSERVE_OPTIMIZATIONS syntax; '
                             '"default": the service\'s defaults; default here: "none", the plain pipeline)')
    parser.add_argument("--nsfw-threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--flops-only", action="store_true", help="print FLOP counts and exit (no GPU needed)")
    parser.add_argument("--force", action="store_true", help="run --scale true without a GPU")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.steps is None:
        args.steps = WORKLOADS[args.model].spec.steps
    if args.size % 16 or args.size < 16:
        parser.error("--size must be a multiple of 16")
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        if args.scale == "tiny":
            print("--flops-only needs --scale small or true", file=sys.stderr)
            return 2
        return flops_only(args)
    return run_command(args, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
