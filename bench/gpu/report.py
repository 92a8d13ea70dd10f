"""Markdown tables from a GPU run's ``gpu-results.json`` (``bench/gpu/run.sh``), for BENCHMARKS.md,
and the raw results split into ``bench/results/gpu-*.json`` for committing. Usage:

    python -m bench.gpu.report /work/.device/.../gpu-results.json            # tables to stdout
    python -m bench.gpu.report gpu-results.json --split bench/results        # + gpu-<stage>.json files

Every number printed is read from the file; nothing is computed but ratios of its own numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result.get("rows") or []


def _svb_headline(result: dict[str, Any]) -> str:
    parts = []
    for row in _rows(result):
        if row["mode"] == "bare":
            parts.append(f"bare {row['per_image_s']:.3f} s/img")
        elif row["mode"] == "service sequential":
            parts.append(f"[{row['optimizations']}] {row['per_image_s']:.3f} s/img ({row['overhead_pct']:+.1f}%)")
        else:
            parts.append(f"[{row['optimizations']}] {row['clients']} clients {row['images_per_s']:.2f} img/s")
    for spec, check in (result.get("concurrent_vs_solo") or {}).items():
        if check.get("batched_images"):
            parts.append(f"[{spec}] batched == solo: {'yes' if check['identical'] else 'NO'} "
                         f"(max {check['max_pixel_difference']} levels)")
    return "; ".join(parts)


def _stages_headline(result: dict[str, Any]) -> str:
    return (f"step {result['step_s'] * 1000:.1f} ms = {100 * result['roofline_fraction']:.1f}% of "
            f"{result['config']['peak_tflops']:.0f} TFLOP/s; one image {result['total_s'] * 1000:.0f} ms")


def _tests_headline(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(result.get("counts", {}).items()))
    failed = [t["test"].rsplit("::", 1)[-1] for t in result.get("tests", []) if t["outcome"] in ("failed", "error")]
    return counts + (f"; failed: {', '.join(failed)}" if failed else "")


def headline(entry: dict[str, Any]) -> str:
    """One line per stage for the run's summary."""
    if entry.get("status") == "skipped":
        return entry.get("reason", "")
    result = entry.get("result")
    if not result:
        return entry.get("reason") or f"no result (returncode {entry.get('returncode')}; see its log)"
    try:
        if entry["name"] == "tests":
            return _tests_headline(result)
        if result.get("benchmark") == "stages":
            return _stages_headline(result)
        return _svb_headline(result)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return f"(unreadable result: {exc!r})"


def _svb_table(result: dict[str, Any]) -> list[str]:
    lines = ["| mode | switches | clients | per image s | range | p50 s | images/s | vs bare | overhead | identical to bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    identity = result.get("identity") or {}
    sequential = {r["optimizations"]: r for r in _rows(result) if r["mode"] == "service sequential"}
    for row in _rows(result):
        same = ""
        if row["mode"] == "service sequential":
            check = identity.get(row["optimizations"]) or {}
            if check.get("compared_images"):
                same = (f"yes, {check['identical_images']}/{check['compared_images']}" if check.get("identical")
                        else f"no: max {check['max_pixel_difference']} levels")
        throughput = ""
        if row["mode"] == "service throughput" and row["optimizations"] in sequential:
            throughput = f" ({row['images_per_s'] / sequential[row['optimizations']]['images_per_s']:.2f}x sequential)"
        overhead = "-" if row["mode"] == "bare" else f"{row['overhead_pct']:+.1f}%"
        lines.append(f"| {row['mode']} | {row['optimizations']} | {row['clients']} | {_f(row['per_image_s'])} | "
                     f"{_f(row['per_image_min_s'])}-{_f(row['per_image_max_s'])} | {_f(row['p50_s'])} | "
                     f"{row['images_per_s']:.2f}{throughput} | {row['ratio_to_bare']:.3f}x | "
                     f"{overhead} | {same} |")
    throughput = {(r["optimizations"], r["clients"]): r for r in _rows(result) if r["mode"] == "service throughput"}
    for (spec, clients), row in throughput.items():
        base = spec.split("@")[0]
        if "@" in spec and (base, clients) in throughput:  # the same switches, other service settings
            ratio = row["images_per_s"] / throughput[(base, clients)]["images_per_s"]
            lines.append(f"\n[{spec}] vs [{base}] at {clients} clients: {ratio:.2f}x the images per second")
    for spec, check in (result.get("concurrent_vs_solo") or {}).items():
        if check.get("compared_images"):
            lines.append(f"\n[{spec}] concurrent == solo: {'yes' if check['identical'] else 'no'}: "
                         f"{check['identical_images']}/{check['compared_images']} images "
                         f"({check['batched_images']} from batched calls), max {check['max_pixel_difference']} levels")
    for spec, applied in (result.get("applied") or {}).items():
        if isinstance(applied, dict):
            for report in applied.values():
                if isinstance(report, dict):
                    switches = "; ".join(f"{k}: {v}" for k, v in report.items())
                    lines.append(f"\n[{spec}] switches: {switches}")
                    break
    config = result.get("config") or {}
    if config.get("build_s") is not None:
        lines.append(f"\nbuild of the random-weight pipeline: {config['build_s']:.1f} s")
    return lines


def _stages_table(result: dict[str, Any]) -> list[str]:
    lines = ["| stage | ms | % of total | TFLOP | % of peak |", "|---|---|---|---|---|"]
    for row in _rows(result):
        tflop = "" if row["tflop"] is None else f"{row['tflop']:.3g}"
        peak = "" if row["pct_of_peak"] is None else f"{row['pct_of_peak']:.3g}"
        lines.append(f"| {row['stage']} | {row['ms']:.2f} | {row['pct_of_total']:.1f} | {tflop} | {peak} |")
    lines.append(f"| total | {result['total_s'] * 1000:.2f} | 100 | | |")
    lines.append(f"\n{_stages_headline(result)} (timer: {result['config']['timer']}; switches: "
                 f"{'; '.join(f'{k}: {v}' for k, v in result['config']['applied'].items()) or 'none'})")
    return lines


def _tests_table(result: dict[str, Any]) -> list[str]:
    lines = ["| test | outcome | s | message |", "|---|---|---|---|"]
    for test in result.get("tests", []):
        message = (test.get("message") or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {test['test'].rsplit('.', 1)[-1]} | {test['outcome']} | {test['seconds']:.1f} | {message} |")
    for name, report in (result.get("reports") or {}).items():
        lines.append(f"\n{name}: `{json.dumps({k: v for k, v in report.items() if k not in ('test', 'system_details')})[:1500]}`")
    return lines


def markdown(results: dict[str, Any]) -> str:
    env, run = results.get("env") or {}, results.get("run") or {}
    out = [f"**Machine:** {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB, capability "
           f"{env.get('capability', '-')}), {env.get('cpu_count')} CPUs. **Versions:** Python {env.get('python')}, "
           f"torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, transformers "
           f"{env.get('transformers')}, torchao {env.get('torchao')}, triton {env.get('triton')}. "
           f"**Date:** {run.get('started')}. **Commit:** {run.get('commit')}. **Run:** `{run.get('command')}`, "
           f"scale {run.get('scale')}, budget {run.get('budget_s')} s, {run.get('elapsed_s')} s used."]
    for entry in results.get("stages", []):
        out.append(f"\n### {entry['title']}\n")
        out.append(f"status **{entry['status']}**" + (f" in {entry['seconds']:.0f} s" if "seconds" in entry else "")
                   + (f": {entry['reason']}" if entry.get("reason") else "")
                   + (f"; command `{entry['command']}`" if entry.get("command") else ""))
        result = entry.get("result")
        if not result:
            continue
        out.append("")
        if entry["name"] == "tests":
            out.extend(_tests_table(result))
        elif result.get("benchmark") == "stages":
            out.extend(_stages_table(result))
        else:
            out.extend(_svb_table(result))
    return "\n".join(out) + "\n"


def split(results: dict[str, Any], folder: Path) -> list[Path]:
    """``gpu-<stage>.json`` per stage with a result (the benchmark's own JSON: device, versions,
    command and date inside), plus ``gpu-run.json``: the run, its environment and stage statuses."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in results.get("stages", []):
        if entry.get("result"):
            path = folder / f"gpu-{entry['name']}.json"
            path.write_text(json.dumps({**entry["result"], "gpu_run_stage": {k: v for k, v in entry.items()
                                                                               if k not in ("result", "log_tail")}},
                                       indent=2) + "\n")
            written.append(path)
    path = folder / "gpu-run.json"
    path.write_text(json.dumps({"run": results.get("run"), "env": results.get("env"),
                                "stages": [{k: v for k, v in e.items() if k not in ("result", "log_tail")}
                                           for e in results.get("stages", [])]}, indent=2) + "\n")
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="gpu-results.json from the device's $OUT")
    parser.add_argument("--split", type=Path, default=None, metavar="DIR",
                        help="also write gpu-<stage>.json and gpu-run.json into DIR (e.g. bench/results)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(markdown(results))
    if args.split:
        for path in split(results, args.split):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
