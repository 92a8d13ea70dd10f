"""The benchmarks in bench/ run end to end at their smallest scales and write their raw numbers;
the true-size configs match MODELS.md and PERFORMANCE.md (built on the meta device: no memory).
No timing is asserted: only exit codes, tables, JSON keys, sizes and FLOP counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_service_vs_bare_runs_end_to_end_on_the_tiny_pipelines(tmp_path):
    out = tmp_path / "service_vs_bare.json"
    done = _run("bench.service_vs_bare", "--scale", "tiny", "--size", "256", "--steps", "2", "--requests", "4",
                "--clients", "1,4", "--rounds", "1", "--optimizations", "none;default", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mode" in done.stdout and "per image s" in done.stdout and "vs bare" in done.stdout
    # the plain pipeline inside the service: same weights, prompts and seeds -> same pixels, over HTTP too
    assert "[none] identical: yes" in done.stdout
    assert "[default] identical:" in done.stdout
    result = json.loads(out.read_text())
    assert {"config", "environment", "runs", "rows", "identical", "identity", "applied"} <= set(result)
    assert result["identical"]["none"] is True
    assert result["identity"]["none"]["compared_images"] == 4
    assert set(result["identity"]["default"]) == {"identical", "identical_images", "compared_images",
                                                  "max_pixel_difference"}
    modes = [(row["mode"], row["optimizations"], row["clients"]) for row in result["rows"]]
    assert modes == [("bare", "-", 1),
                     ("service sequential", "none", 1), ("service throughput", "none", 1),
                     ("service throughput", "none", 4),
                     ("service sequential", "default", 1), ("service throughput", "default", 1),
                     ("service throughput", "default", 4)]
    for row in result["rows"]:
        assert {"total_s", "per_image_s", "p50_s", "p95_s", "images_per_s", "ratio_to_bare", "overhead_pct"} <= set(row)
        assert row["requests"] == 4 and row["total_s"] > 0 and row["runs"] >= 1
    assert len(result["runs"]["bare"]) == 2  # bare brackets the service runs
    assert [len(run["latencies_s"]) for run in result["runs"]["none|sequential"]] == [4]


def test_service_vs_bare_checks_batched_images_against_solo_answers(tmp_path):
    out = tmp_path / "batching.json"
    done = _run("bench.service_vs_bare", "--scale", "tiny", "--size", "256", "--steps", "2", "--requests", "6",
                "--clients", "6", "--rounds", "1", "--optimizations", "none", "--setting", "max_batch_size=6",
                "--setting", "batch_wait_seconds=0.3", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads(out.read_text())["concurrent_vs_solo"]["none"]
    assert check["compared_images"] == 6 and check["batched_images"] >= 2
    assert check["identical"] is True and check["identical_images"] == 6  # batch-invariant engine (CPU)
    assert "[none] concurrent == solo: yes: 6/6" in done.stdout


def test_stages_runs_end_to_end_at_small_scale(tmp_path):
    out = tmp_path / "stages.json"
    done = _run("bench.stages", "--scale", "small", "--size", "256", "--steps", "2", "--repeats", "1",
                "--optimizations", "default", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage" in done.stdout and "% of total" in done.stdout and "% of peak" in done.stdout
    assert "(CPU: not meaningful)" in done.stdout
    assert "engine switches: " in done.stdout
    result = json.loads(out.read_text())
    assert {"config", "environment", "flops", "rows", "median_s", "total_s", "step_s", "step_flops",
            "roofline_fraction"} <= set(result)
    stages = [row["stage"] for row in result["rows"]]
    assert stages == ["text_encoding", "step_1", "step_2", "vae_decode", "to_pil", "other", "safety_check",
                      "png_encode", "store"]
    assert result["step_flops"] == result["flops"]["step"]["total"] > 0
    assert result["flops"]["step"]["tokens"] == (256 // 16) ** 2 + 512


def test_true_scale_components_have_the_published_sizes():
    import torch
    from bench.models import build_klein_pipeline

    pipeline = build_klein_pipeline("true", device="meta", dtype=torch.bfloat16)  # the GPU build, without memory
    counts = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("transformer", "text_encoder", "vae")}
    assert round(counts["transformer"] / 1e9, 2) == 3.88
    assert round(counts["text_encoder"] / 1e9, 2) == 4.02
    assert 80e6 < counts["vae"] < 90e6
    assert {p.dtype for p in pipeline.transformer.parameters()} == {torch.bfloat16}
    assert len(pipeline.tokenizer) <= pipeline.text_encoder.config.vocab_size
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_true_scale_step_flops_match_the_roofline_in_performance_md():
    from bench.flops import pipeline_flops

    flops = pipeline_flops("true", 1024, 1024)
    assert flops["step"]["total"] == pytest.approx(34.8e12, rel=0.005)
    assert flops["step"]["linear"] == pytest.approx(28.3e12, rel=0.005)
    assert flops["step"]["attention"] == pytest.approx(6.5e12, rel=0.01)
    assert flops["vae_decode"]["total"] == pytest.approx(10.5e12, rel=0.01)
    assert flops["text_encoding"]["total"] == pytest.approx(4.27e12, rel=0.01)  # 36 layers + LM head
    truncated = pipeline_flops("true", 1024, 1024, text_layers=27)["text_encoding"]  # the service's view
    assert truncated["total"] == pytest.approx(2.9e12, rel=0.01)


def test_true_scale_is_refused_on_cpu_without_force(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: true scale runs")
    from bench import service_vs_bare, stages

    assert service_vs_bare.main(["--scale", "true"]) == 2
    assert stages.main(["--scale", "true"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# -- Flux Kontext (--model kontext) --------------------------------------------------------------


def test_service_vs_bare_runs_kontext_end_to_end_on_the_tiny_pipelines(tmp_path):
    out = tmp_path / "kontext.json"
    done = _run("bench.service_vs_bare", "--model", "kontext", "--scale", "tiny", "--size", "256", "--steps", "2",
                "--requests", "2", "--clients", "2", "--rounds", "1", "--optimizations", "none", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Flux Kontext" in done.stdout
    # the v6 img2img request with a data: URI init image = the Generator's Kontext call, pixel for pixel
    assert "[none] identical: yes" in done.stdout
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "kontext" and result["config"]["model_id"] == "flux-kontext-dev"
    assert result["config"]["steps"] == 2 and result["config"]["guidance_scale"] == 2.5
    assert result["identical"] == {"none": True} and result["identity"]["none"]["compared_images"] == 2
    modes = [(row["mode"], row["optimizations"], row["clients"]) for row in result["rows"]]
    assert modes == [("bare", "-", 1), ("service sequential", "none", 1), ("service throughput", "none", 2)]


def test_stages_runs_kontext_end_to_end_at_small_scale(tmp_path):
    out = tmp_path / "kontext_stages.json"
    done = _run("bench.stages", "--model", "kontext", "--scale", "small", "--size", "128", "--steps", "2",
                "--repeats", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Flux Kontext" in done.stdout and "(CPU: not meaningful)" in done.stdout
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "kontext"
    stages = [row["stage"] for row in result["rows"]]
    assert stages == ["text_encoding", "reference_encode", "step_1", "step_2", "vae_decode", "to_pil", "other",
                      "safety_check", "png_encode", "store"]
    flops = result["flops"]
    assert set(flops) == {"text_encoding", "reference_encode", "step", "vae_decode"}
    assert flops["step"]["tokens"] == 2 * (128 // 16) ** 2 + 512  # image + reference + T5 tokens
    assert result["step_flops"] == flops["step"]["total"] > 0
    by_stage = {row["stage"]: row for row in result["rows"]}
    assert by_stage["reference_encode"]["tflop"] * 1e12 == flops["reference_encode"]["total"] > 0


def test_kontext_true_scale_components_have_the_published_sizes():
    import torch
    from bench.models import build_kontext_pipeline, parameter_counts

    counts = parameter_counts("true", "kontext")
    published = {"transformer": 11.9e9, "text_encoder_2": 4.76e9, "text_encoder": 123e6, "vae": 84e6}
    assert set(counts) == set(published)
    for name, size in published.items():
        assert counts[name] == pytest.approx(size, rel=0.02), name
    pipeline = build_kontext_pipeline("true", device="meta", dtype=torch.bfloat16)  # the GPU build, without memory
    assert parameter_counts(pipeline) == counts  # the model is told by the pipeline's class
    assert {p.dtype for p in pipeline.transformer.parameters()} == {torch.bfloat16}
    assert len(pipeline.tokenizer) <= pipeline.text_encoder.config.vocab_size
    assert len(pipeline.tokenizer_2) <= pipeline.text_encoder_2.config.vocab_size
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    assert parameter_counts("true") == parameter_counts("true", "klein")  # klein stays the default


def test_kontext_true_scale_flops():
    from bench.flops import flux1_step_flops, pipeline_flops
    from bench.models import meta_components

    flops = pipeline_flops("true", 1024, 1024, model="kontext")
    # 4096 image + 4096 reference + 512 T5 tokens through 19 double + 38 single blocks of width 3072
    assert flops["step"]["tokens"] == 8704
    assert flops["step"]["linear"] == pytest.approx(2 * 6.455e9 * 8704, rel=0.005)
    assert flops["step"]["attention"] == pytest.approx(4 * 8704**2 * 3072 * 57, rel=0.001)
    # T5-XXL over 512 tokens: its 4.63 B non-embedding weights, plus attention (24 layers, width 4096)
    assert flops["text_encoding"]["t5"] == pytest.approx(2 * 4.63e9 * 512 + 4 * 512**2 * 4096 * 24, rel=0.005)
    assert flops["reference_encode"]["total"] > 0 and flops["vae_decode"]["total"] > flops["reference_encode"]["total"]
    # without a reference the same transformer is FLUX.1-dev: 74.4 TFLOP/step (PERFORMANCE.md)
    flux1_dev = flux1_step_flops(meta_components("true", "kontext")["transformer"], 1024, 1024, reference_tokens=0)
    assert flux1_dev["total"] == pytest.approx(74.4e12, rel=0.005)


def test_kontext_true_scale_is_refused_on_cpu_without_force(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: true scale runs")
    from bench import service_vs_bare, stages

    assert service_vs_bare.main(["--model", "kontext", "--scale", "true"]) == 2
    assert stages.main(["--model", "kontext", "--scale", "true"]) == 2
    assert "Flux Kontext dev pipeline" in capsys.readouterr().err


def test_png_benchmark_runs_and_every_encoding_is_lossless(tmp_path):
    out = tmp_path / "png.json"
    done = _run("bench.png", "--size", "128", "--repeats", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["picture"], r["encoder"]) for r in rows][:2] == [("noise", "pillow default"), ("noise", "fluxserve, one strip")]
    assert len(rows) == 9 and all(r["lossless"] and r["seconds"] > 0 for r in rows)


def test_a_spec_can_carry_settings_of_its_own_service():
    """`default;default@max_batch_size=8`: one run compares batching off and on (bench/gpu/run.sh)."""
    from bench.service_vs_bare import parse_args, split_spec

    args = parse_args(["--optimizations", "default;default@max_batch_size=8@batch_wait_seconds=0.05", "--clients", ""])
    assert args.clients == []
    assert [split_spec(spec) for spec in args.optimizations] == [
        ("default", {}), ("default", {"max_batch_size": 8, "batch_wait_seconds": 0.05})]
    with pytest.raises(SystemExit):
        parse_args(["--optimizations", "default@max_batch_size"])


def test_wake_latency_runs_end_to_end(tmp_path):
    from tests.support.postgres import PostgresUnavailable, find_bindir, postgres_required

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    out = tmp_path / "wake_latency.json"
    done = _run("bench.wake_latency", "--jobs", "2", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p50 ms" in done.stdout and "notify" in done.stdout and "polling" in done.stdout
    result = json.loads(out.read_text())
    assert [row["mode"] for row in result["rows"]] == ["notify", "polling"]
    assert all(row["jobs"] == 2 for row in result["rows"])
    assert {len(v) for v in result["raw_seconds"].values()} == {2}
