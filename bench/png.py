"""PNG encoding on the request path: the service's ``encode_png`` (on all cores, and held to one)
against Pillow's defaults, side by side in one run, on three kinds of picture (random noise: what random-weight models make and
the worst case; a smooth gradient with grain; a detailed fractal with noise). Usage:

    python -m bench.png [--size 1024] [--repeats 7] [--json bench/results/png.json]

Per row: the fastest of --repeats encodes (the least disturbed by the machine), the file size,
and the ratios against Pillow's default (zlib level 6, adaptive filters). Every file is decoded
back and compared with the source pixels (lossless).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import environment, print_table, report_and_save
from fluxserve import png_encoding
from fluxserve.png_encoding import encode_png


def pictures(size: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)
    smooth = np.stack([np.outer(ramp, ramp), np.outer(1 - ramp, ramp), np.outer(ramp, 1 - ramp)], -1) * 255
    smooth = (smooth + rng.normal(0, 3, smooth.shape)).clip(0, 255).astype(np.uint8)
    fractal = Image.effect_mandelbrot((size, size), (-2, -1.5, 1, 1.5), 60).convert("RGB")
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        "smooth + grain": Image.fromarray(smooth),
        "fractal + noise": Image.blend(fractal, Image.effect_noise((size, size), 20).convert("RGB"), 0.3),
    }


def pillow_default(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def one_strip(image: Image.Image) -> bytes:
    """The service's encoder held to one strip (one core): what the strips buy on this machine."""
    workers = png_encoding._WORKERS
    png_encoding._WORKERS = 1
    try:
        return encode_png(image)
    finally:
        png_encoding._WORKERS = workers


ENCODERS = {"pillow default": pillow_default, "fluxserve, one strip": one_strip,
            f"fluxserve, {png_encoding._WORKERS} strips": encode_png}


def _fastest(encode, image: Image.Image, repeats: int) -> tuple[float, bytes]:
    times, data = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode(image)
        times.append(time.perf_counter() - started)
    return min(times), data


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for picture, image in pictures(args.size).items():
        baseline = None
        for encoder, encode in ENCODERS.items():
            seconds, data = _fastest(encode, image, args.repeats)
            lossless = np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))
            baseline = baseline or (seconds, len(data))
            rows.append({"picture": picture, "encoder": encoder, "seconds": seconds, "bytes": len(data),
                         "speedup": baseline[0] / seconds, "size_ratio": len(data) / baseline[1],
                         "lossless": lossless})
    return {"benchmark": "png", "size": args.size, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
            "environment": environment("cpu", None), "rows": rows}


def print_report(result: dict[str, Any]) -> None:
    print(f"PNG encoding of a {result['size']}x{result['size']} RGB image, fastest of {result['repeats']}")
    print_table(["picture", "encoder", "ms", "KB", "speedup", "size", "lossless"],
                [[r["picture"], r["encoder"], f"{r['seconds'] * 1000:.1f}", r["bytes"] // 1024,
                  f"{r['speedup']:.2f}x", f"{r['size_ratio']:.2f}x", "yes" if r["lossless"] else "NO"]
                 for r in result["rows"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.png", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report_and_save(run(args), print_report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
