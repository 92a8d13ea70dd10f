"""The wait bound, processing answers, and an API that keeps answering while a job runs."""

from __future__ import annotations

import time

import pytest

from tests.support.servers import live_server

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, tiny_root):
    """A server that never waits: every submission answers processing at once."""
    with live_server(tmp_path_factory.mktemp("impatient"), tiny_root, sync_wait_seconds=0) as live:
        yield live


def _wait_success(client, url, key, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = client.post(url, json={"key": key}).json()
        if result["status"] != "processing":
            return result
        time.sleep(0.05)
    raise AssertionError(f"job did not finish within {timeout}s")


def test_wait_bound_answers_processing_with_exact_future_links(impatient):
    with impatient.client() as client:
        body = {"key": impatient.key, "prompt": "a cat", "width": 256, "height": 256, "samples": 3,
                "num_inference_steps": 2, "seed": 11}
        queued = client.post(KLEIN, json=body).json()
        assert queued["status"] == "processing"
        assert set(queued) >= {"tip", "eta", "message", "fetch_result", "id", "output", "meta", "future_links"}
        assert queued["meta"]["seeds"] == [11, 12, 13]
        done = _wait_success(client, queued["fetch_result"], impatient.key)
        assert done["status"] == "success" and done["output"] == queued["future_links"]
        assert all(client.get(url).status_code == 200 for url in done["output"])


def test_api_keeps_answering_while_a_generation_runs(impatient):
    with impatient.client() as client:
        long_job = {"key": impatient.key, "prompt": "slow", "width": 1024, "height": 1024, "samples": 1,
                    "num_inference_steps": 30, "safety_checker": False}
        running = client.post(KLEIN, json=long_job).json()
        seen_running = False
        for _ in range(2000):
            answer = client.post(running["fetch_result"], json={"key": impatient.key}).json()
            if answer["status"] != "processing":
                break
            if "being generated" in answer["tip"]:
                seen_running = True
                break
        assert seen_running, "never observed the job while it was running"
        # while it runs: a new submission is accepted and queued behind it, other fetches answer
        behind = client.post(KLEIN, json={**long_job, "width": 256, "height": 256, "samples": 1,
                                          "num_inference_steps": 1}).json()
        assert behind["status"] == "processing" and behind["id"] > running["id"]
        assert "queued" in behind["tip"]
        assert behind["eta"] > 0
        still = client.post(running["fetch_result"], json={"key": impatient.key}).json()
        assert still["status"] in ("processing", "success")
        assert client.get("/health").json()["status"] == "ok"
        assert _wait_success(client, behind["fetch_result"], impatient.key)["status"] == "success"
        assert _wait_success(client, running["fetch_result"], impatient.key)["status"] == "success"


def test_ids_increase_and_are_never_reused_across_restart(tmp_path, tiny_root):
    ids = []
    for _ in range(2):  # same data dir, two server lifetimes
        with live_server(tmp_path, tiny_root, sync_wait_seconds=0) as live, live.client() as client:
            for _ in range(2):
                body = {"key": live.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
                ids.append(client.post(KLEIN, json=body).json()["id"])
            _wait_success(client, f"/api/v6/images/fetch/{ids[-1]}", live.key)
    assert ids == sorted(ids) and len(set(ids)) == 4


def test_public_base_url_is_used_for_every_returned_url(tmp_path, tiny_root):
    public = "https://images.example.test/gen"
    with live_server(tmp_path, tiny_root, public_base_url=public + "/", sync_wait_seconds=0) as live:
        with live.client() as client:
            body = {"key": live.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
            queued = client.post(KLEIN, json=body).json()
            assert queued["fetch_result"] == f"{public}/api/v1/enterprise/flux_klein/fetch/{queued['id']}"
            assert all(link.startswith(f"{public}/outputs/") for link in queued["future_links"])
            done = _wait_success(client, f"/api/v1/enterprise/flux_klein/fetch/{queued['id']}", live.key)
            assert done["output"] == queued["future_links"]
            local = done["output"][0].replace(public, "")  # the proxy forwards this path to us
            assert client.get(local).status_code == 200
