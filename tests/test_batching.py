"""Dynamic batching (opt-in): compatible queued text-to-image jobs share one pipeline call, each
keeps its own seeds, and a failing batch falls back to running its jobs one by one."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.generate import Generator
from tests.support.servers import live_server
from tests.support.waiting import wait_for_job

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FLUX1 = "/api/v1/enterprise/flux/text2img"


def _submit_and_wait(live, client, bodies, path=KLEIN):
    ids = [client.post(path, json=body).json()["id"] for body in bodies]
    deadline = time.monotonic() + 120  # for all of them together
    return [wait_for_job(client, live.key, job_id, timeout=deadline - time.monotonic()).json() for job_id in ids]


def _pixels(client, url):
    return np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("path", [KLEIN, FLUX1], ids=["klein", "flux1"])
def test_compatible_jobs_share_a_call_and_keep_their_seeds(tmp_path, tiny_root, path):
    with live_server(tmp_path, tiny_root, max_batch_size=4, batch_wait_seconds=0.5, sync_wait_seconds=0) as live:
        with live.client() as client:
            base = {"key": live.key, "width": 256, "height": 256, "num_inference_steps": 3, "safety_checker": False}
            bodies = [{**base, "prompt": f"prompt {i}", "seed": 100 * i, "samples": 1 + i % 2} for i in range(4)]
            batched = _submit_and_wait(live, client, bodies, path)
            assert all(r["status"] == "success" for r in batched)
            assert [r["meta"].get("batch_size") for r in batched] == [4, 4, 4, 4]
            for body, result in zip(bodies, batched):
                assert result["meta"]["seeds"] == [body["seed"] + i for i in range(body["samples"])]
                assert len(result["output"]) == body["samples"]
            # the same jobs one at a time (different size keys keep them apart: run sequentially)
            solo = [_submit_and_wait(live, client, [body], path)[0] for body in bodies]
            assert all("batch_size" not in r["meta"] for r in solo)
            for b, s in zip(batched, solo):
                for url_b, url_s in zip(b["output"], s["output"]):
                    # batch-invariant pipeline (engine.batch_invariance): equal bit for bit
                    assert np.array_equal(_pixels(client, url_b), _pixels(client, url_s))


def test_incompatible_jobs_do_not_batch(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, max_batch_size=4, batch_wait_seconds=0.5, sync_wait_seconds=0) as live:
        with live.client() as client:
            base = {"key": live.key, "prompt": "x", "num_inference_steps": 2, "safety_checker": False}
            results = _submit_and_wait(live, client, [{**base, "width": 256, "height": 256},
                                                      {**base, "width": 264, "height": 256},
                                                      {**base, "width": 256, "height": 256, "num_inference_steps": 3}])
            assert all(r["status"] == "success" and "batch_size" not in r["meta"] for r in results)


def test_a_failing_batch_falls_back_to_solo_runs(tmp_path, tiny_root, monkeypatch):
    def broken(self, spec, jobs, progress=None):
        raise RuntimeError("batch kernel failed")

    monkeypatch.setattr(Generator, "run_batch", broken)
    with live_server(tmp_path, tiny_root, max_batch_size=4, batch_wait_seconds=0.5, sync_wait_seconds=0) as live:
        with live.client() as client:
            base = {"key": live.key, "width": 256, "height": 256, "num_inference_steps": 2, "safety_checker": False}
            results = _submit_and_wait(live, client, [{**base, "prompt": f"p{i}", "seed": i} for i in range(3)])
            assert all(r["status"] == "success" and "batch_size" not in r["meta"] for r in results)
