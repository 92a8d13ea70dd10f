"""Enterprise admin endpoints (admin keys only), health and metrics."""

from __future__ import annotations

import time

import pytest

from tests.support.servers import live_server
from tests.support.waiting import KLEIN_FETCH, wait_for_job

ACTIONS = ("system_details", "clear_cache", "clear_queue", "restart_server", "update_server", "update")
KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory, tiny_root):
    env_file = tmp_path_factory.mktemp("conf") / "fluxserve.env"
    env_file.write_text("FLUXSERVE_MAX_QUEUED_PER_KEY=10\n")
    with live_server(tmp_path_factory.mktemp("admin"), tiny_root, env_file=env_file, sync_wait_seconds=0) as live:
        live.env_file = env_file
        yield live


@pytest.mark.parametrize("action", ACTIONS)
def test_admin_endpoints_refuse_user_keys_and_bad_keys(admin_server, action):
    with admin_server.client() as client:
        for server in ("flux_klein", "realtime", "flux", "images"):
            response = client.post(f"/api/v1/enterprise/{server}/{action}", json={"key": admin_server.key})
            assert response.status_code == 403
            assert response.json() == {"status": "error", "message": "This endpoint needs an admin key"}
        bad = client.post(f"/api/v1/enterprise/realtime/{action}", json={"key": "nope"})
        assert bad.status_code == 401


def test_system_details_clear_cache_and_restart(admin_server):
    with admin_server.client() as client:
        body = {"key": admin_server.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
        job = client.post(KLEIN, json=body).json()
        assert wait_for_job(client, admin_server.key, job["id"], fetch=KLEIN_FETCH).json()["status"] == "success"
        details = client.post("/api/v1/enterprise/flux_klein/system_details", json={"key": admin_server.admin_key}).json()
        assert details["status"] == "ok" and details["model_count"] >= 1
        assert any("flux2-klein" in name for name in details["models_loaded"])
        assert details["queue_depth"] == 0 and details["queue_time"] == 0 and details["worker"]["alive"]
        assert "gpu_memory" in details and details["device"] == "cpu"
        cleared = client.post("/api/v1/enterprise/realtime/clear_cache", json={"key": admin_server.admin_key}).json()
        assert cleared == {"status": "success", "message": "Cache cleared successfully"}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the worker clears between jobs and reports back
            details = client.post("/api/v1/enterprise/realtime/system_details", json={"key": admin_server.admin_key}).json()
            if details["model_count"] == 0:
                break
            time.sleep(0.05)
        assert details["model_count"] == 0
        restarted = client.post("/api/v1/enterprise/flux/restart_server", json={"key": admin_server.admin_key}).json()
        assert restarted["status"] == "success"
        again = client.post(KLEIN, json=body).json()  # models load again on use
        assert wait_for_job(client, admin_server.key, again["id"], fetch=KLEIN_FETCH).json()["status"] == "success"


def test_clear_queue_cancels_queued_jobs_and_notifies_webhooks(admin_server):
    with admin_server.client() as client:
        slow = {"key": admin_server.key, "prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 20,
                "safety_checker": False}
        running = client.post(KLEIN, json=slow).json()
        queued = [client.post(KLEIN, json={**slow, "webhook": "http://127.0.0.1:9/hook", "track_id": f"q{i}"}).json()
                  for i in range(3)]
        result = client.post("/api/v1/enterprise/flux_klein/clear_queue", json={"key": admin_server.admin_key}).json()
        assert result["status"] == "success" and result["message"] == "Queue cleared, server is restarting"
        assert {job["id"] for job in queued} <= set(result["cancelled"])
        for job in queued:
            answer = client.post(f"/api/v1/enterprise/flux_klein/fetch/{job['id']}", json={"key": admin_server.key})
            assert answer.status_code == 200 and answer.json()["status"] == "failed"  # served: the job was cancelled
            assert answer.json()["message"].startswith("Request was cancelled") and answer.json()["id"] == job["id"]
            assert answer.json()["track_id"] == job["meta"]["track_id"]  # the failure webhook's own body
            assert admin_server.jobs.webhook_status(job["id"]) in ("pending", "failed")  # a failure webhook was queued
        assert wait_for_job(client, admin_server.key, running["id"], timeout=120, fetch=KLEIN_FETCH).json()["status"] == "success"


def test_update_server_reloads_configuration(admin_server):
    with admin_server.client() as client:
        admin_server.env_file.write_text('FLUXSERVE_MAX_QUEUED_PER_KEY=1\nFLUXSERVE_MODEL_OVERRIDES={"flux-klein": {"steps": 3}}\n')
        result = client.post("/api/v1/enterprise/realtime/update_server", json={"key": admin_server.admin_key}).json()
        assert result["status"] == "success"
        assert result["applied"] == ["max_queued_per_key", "model_overrides"] and result["needs_process_restart"] == []
        again = client.post("/api/v1/enterprise/realtime/update", json={"key": admin_server.admin_key}).json()
        assert again["status"] == "success" and again["applied"] == []  # nothing changed since
        body = {"key": admin_server.key, "prompt": "x", "width": 256, "height": 256, "instant_response": True}
        first = client.post(KLEIN, json=body).json()
        assert first["meta"]["num_inference_steps"] == 3  # new default from the reloaded registry
        refused = client.post(KLEIN, json=body)
        assert refused.status_code == 429  # new per-key limit of 1
        wait_for_job(client, admin_server.key, first["id"], fetch=KLEIN_FETCH)
        admin_server.env_file.write_text("FLUXSERVE_MAX_QUEUED_PER_KEY=10\n")
        client.post("/api/v1/enterprise/realtime/update", json={"key": admin_server.admin_key})


def test_update_server_refuses_a_typo_naming_the_variable_and_changes_nothing(admin_server):
    with admin_server.client() as client:
        admin_server.env_file.write_text("FLUXSERVE_MAX_QUEUED_PER_KEY=1\nFLUXSERVE_OPTIMIZATIONS=compil\n"
                                         'FLUXSERVE_MODEL_OVERRIDES={"flux-klein": {"stpes": 3}}\n')
        try:
            response = client.post("/api/v1/enterprise/flux_klein/update_server", json={"key": admin_server.admin_key})
        finally:
            admin_server.env_file.write_text("FLUXSERVE_MAX_QUEUED_PER_KEY=10\n")
        assert response.status_code == 400
        message = response.json()["message"]
        assert message.startswith("Configuration is invalid; nothing was changed: FLUXSERVE_MODEL_OVERRIDES: "), message
        assert "unknown fields ['stpes']" in message
        assert "; FLUXSERVE_OPTIMIZATIONS: unknown optimization 'compil'; known: " in message
        # max_queued_per_key=1 was not applied either: re-reading the restored file changes nothing
        assert client.post("/api/v1/enterprise/flux_klein/update", json={"key": admin_server.admin_key}).json()["applied"] == []


def test_health_and_metrics(admin_server):
    with admin_server.client() as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["worker"]["mode"] == "thread"
        text = client.get("/metrics").text
        for name in ("fluxserve_queue_depth", "fluxserve_generation_seconds_bucket", "fluxserve_jobs_finished_total",
                     "fluxserve_webhook_deliveries", "fluxserve_jobs_submitted_total", "fluxserve_gpu_memory_bytes"):
            assert name in text, name
        assert 'fluxserve_jobs_finished_total{outcome="succeeded"}' in text
