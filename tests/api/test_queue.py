"""Per-key queue limit, cancellation and the progress stream (our additions)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.servers import live_server
from tests.support.waiting import wait_for_job

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("queue"), tiny_root, sync_wait_seconds=0, max_queued_per_key=3) as live:
        yield live


def slow_body(key, **extra):
    return {"key": key, "prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 12,
            "safety_checker": False, **extra}


def test_queue_limit_per_key_cancel_and_fifo(queue_server):
    with queue_server.client() as client:
        key = queue_server.key
        running = client.post(KLEIN, json=slow_body(key)).json()
        deadline = time.monotonic() + 30
        while queue_server.jobs.get(running["id"]).status != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        first = client.post(KLEIN, json=slow_body(key)).json()
        second = client.post(KLEIN, json=slow_body(key, num_inference_steps=1, width=256, height=256)).json()
        assert first["id"] < second["id"]
        before = queue_server.job_count()
        refused = client.post(KLEIN, json=slow_body(key))
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == str(refused.json()["retry_after"])
        assert int(refused.headers["X-RateLimit-Reset"]) >= time.time() + refused.json()["retry_after"] - 1
        body = refused.json()
        assert body["status"] == "error"
        assert body["message"] == "Rate limit exceeded. Maximum 3 queued requests allowed."
        assert isinstance(body["retry_after"], int) and body["retry_after"] >= 1
        assert queue_server.job_count() == before
        # another key has its own limit
        assert client.post(KLEIN, json=slow_body(queue_server.other_key, width=256, height=256,
                                                 num_inference_steps=1)).json()["status"] == "processing"
        # cancelling a queued job frees a slot; a running one cannot be cancelled; nor can others' jobs
        assert client.post(f"/api/fluxserve/jobs/{first['id']}/cancel", json={"key": queue_server.other_key}).status_code == 404
        cancelled = client.post(f"/api/fluxserve/jobs/{first['id']}/cancel", json={"key": key})
        assert cancelled.json() == {"status": "success", "id": first["id"], "message": "Request cancelled"}
        assert client.post(f"/api/fluxserve/jobs/{running['id']}/cancel", json={"key": key}).status_code == 409
        assert client.post(KLEIN, json=slow_body(key, width=256, height=256, num_inference_steps=1)).json()["status"] == "processing"
        fetched = client.post(f"/api/v6/images/fetch/{first['id']}", json={"key": key})
        assert fetched.status_code == 200 and fetched.json() == {
            "status": "failed", "id": first["id"], "message": "Request was cancelled", "track_id": None}
        assert wait_for_job(client, key, second["id"], timeout=120).json()["status"] == "success"
        assert wait_for_job(client, key, running["id"], timeout=120).json()["status"] == "success"


def test_progress_stream_reports_queue_position_steps_and_done(queue_server):
    with queue_server.client() as client:
        key = queue_server.key
        ahead = client.post(KLEIN, json=slow_body(key)).json()
        job = client.post(KLEIN, json=slow_body(key, num_inference_steps=8, samples=2)).json()
        events = []
        with client.stream("GET", f"/api/fluxserve/jobs/{job['id']}/events", headers={"Key": key}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and name:
                    events.append((name, json.loads(line.split(":", 1)[1])))
                    if name == "done":
                        break
        kinds = [name for name, _ in events]
        assert kinds[0] == "queued" and events[0][1]["position"] >= 2
        assert kinds[-1] == "done" and events[-1][1]["status"] == "success" and events[-1][1]["id"] == job["id"]
        steps = [data for name, data in events if name == "progress" and data["total"]]
        assert steps, kinds
        assert all(data["total"] == 16 for data in steps)  # 8 steps x 2 images
        assert [data["step"] for data in steps] == sorted(data["step"] for data in steps)
        wait_for_job(client, key, ahead["id"], timeout=120)


def test_progress_stream_is_scoped_to_the_key(queue_server):
    with queue_server.client() as client:
        job = client.post(KLEIN, json=slow_body(queue_server.key, width=256, height=256, num_inference_steps=1)).json()
        response = client.get(f"/api/fluxserve/jobs/{job['id']}/events", headers={"Key": queue_server.other_key})
        assert response.status_code == 404 and response.json()["status"] == "error"
        assert client.get(f"/api/fluxserve/jobs/{job['id']}/events").status_code == 401
