"""The worker's failure handling: out-of-memory fails one job with a clear message, memory is
released, and the next job runs."""

from __future__ import annotations

import torch

from fluxserve.engine.generate import Generator
from tests.support.servers import live_server
from tests.support.waiting import wait_for_job

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


def test_out_of_memory_fails_that_job_and_the_next_one_runs(tmp_path, tiny_root, monkeypatch):
    real_run = Generator.run
    released = []

    def run(self, spec, params, *args, **kwargs):
        if params.prompt == "too big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_run(self, spec, params, *args, **kwargs)

    monkeypatch.setattr(Generator, "run", run)
    from fluxserve.engine import loading

    monkeypatch.setattr(loading.PipelineCache, "release_memory", staticmethod(lambda: released.append(True)))
    with live_server(tmp_path, tiny_root) as live, live.client() as client:
        body = {"key": live.key, "prompt": "too big", "width": 256, "height": 256, "num_inference_steps": 1}
        failed = client.post(KLEIN, json=body)
        assert failed.status_code == 200 and failed.json()["status"] == "failed"
        assert failed.json()["message"].startswith("Out of GPU memory while generating; the memory was released.")
        assert released
        ok = client.post(KLEIN, json={**body, "prompt": "fine"}).json()
        assert ok["status"] == "success"
        assert client.get("/health").json()["worker"]["alive"]


def test_a_store_that_cannot_record_a_finish_leaves_the_job_to_the_lease(tmp_path, tiny_root, monkeypatch):
    """If neither the success nor the failure can be written, the claim stops beating (it does
    not keep the job 'running' forever): the lease expires, the job is requeued and runs again."""
    from fluxserve.jobs.store import JobStore

    real_succeed, broken = JobStore.succeed, []

    def flaky(self, job_id, *args, **kwargs):
        if not broken:
            broken.append(job_id)
            raise RuntimeError("database went away")
        return real_succeed(self, job_id, *args, **kwargs)

    monkeypatch.setattr(JobStore, "succeed", flaky)
    monkeypatch.setattr(JobStore, "fail", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("still away")))
    with live_server(tmp_path, tiny_root, worker="thread", lease_seconds=1.5, heartbeat_seconds=0.2,
                     sync_wait_seconds=0) as live, live.client() as client:
        body = {"key": live.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
        job_id = client.post(KLEIN, json=body).json()["id"]
        answer = wait_for_job(client, live.key, job_id).json()
        assert broken == [job_id] and answer["status"] == "success"
        assert client.get("/health").json()["worker"]["alive"]
