"""What the benchmarks share: loading a saved pipeline, the environment they ran in, tables, the
command tail. Model-specific facts are in ``bench.workloads``."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import platform
import sys
from pathlib import Path
from typing import Any

import torch

SCALES = ("tiny", "small", "true")

GPU_ONLY_MESSAGE = (
    "--scale true builds the true-size {true_size}; this machine has none. Use --scale small to prove the same "
    "code path on CPU, or --force to try anyway (fp32 on CPU: twice the bf16 size in RAM, minutes per image)."
)


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from diffusers/transformers in the tables."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


THREADS_HELP = ("torch intra-op threads (torch.set_num_threads); default: 1 on CPU (on a shared machine with few "
                "cores, OpenMP teams of 2+ threads stall at barriers and times swing by 10-40x), torch's own on GPU; "
                "0: torch's own")


def set_threads(threads: int | None, device: str) -> None:
    if threads is None:
        threads = 1 if device == "cpu" else 0
    if threads:
        torch.set_num_threads(threads)


def device_and_dtype() -> tuple[str, torch.dtype]:
    """What the service would pick (``fluxserve.engine.loading``): cuda+bf16, else cpu+fp32."""
    from fluxserve.engine.loading import pick_device, pick_dtype

    device = pick_device("auto")
    return device, pick_dtype(device)


def load_folder(folder: Path, pipeline_class: str, device: str, dtype: torch.dtype) -> Any:
    """A saved pipeline loaded as the service loads it (``from_pretrained`` in the service's
    dtype), then put on ``device``."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class).from_pretrained(folder, dtype=dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device: str, dtype: torch.dtype) -> dict[str, Any]:
    import diffusers
    import transformers

    info = {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def run_command(args, run, print_report) -> int:
    """The shared tail of every speed benchmark: refuse true scale without a GPU (unless
    --force), run, print the table, write the raw numbers."""
    if args.scale == "true" and not args.force and not torch.cuda.is_available():
        from bench.workloads import WORKLOADS

        print(GPU_ONLY_MESSAGE.format(true_size=WORKLOADS[args.model].true_size), file=sys.stderr)
        return 2
    report_and_save(run(args), print_report, args.json)
    return 0


def report_and_save(result: dict[str, Any], print_report, json_path: Path | None) -> None:
    """Print the table; write the raw numbers to ``json_path`` when given."""
    print_report(result)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"raw numbers: {json_path}")
