"""Property-based fuzzing of every operation in the service's OpenAPI schema (schemathesis):
whatever the body, the server never answers 5xx. A short run in CI; a longer one with
FLUXSERVE_SCHEMATHESIS_EXAMPLES=500 (see README, Security)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.servers import live_server

EXAMPLES = int(os.environ.get("FLUXSERVE_SCHEMATHESIS_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, tiny_root, image_host):
    with live_server(tmp_path_factory.mktemp("fuzz"), tiny_root, sync_wait_seconds=0, openai_wait_seconds=0,
                     max_queued_per_key=3, rate_limit_per_key="", rate_limit_per_address="") as live:
        live.image_host = image_host
        yield live


def _aim_at_loopback(body: dict, target) -> None:
    """Keep fuzzed URLs on this machine: no request may leave loopback."""
    for field in ("init_image", "init_image_2"):
        if field in body and body[field] is not None:
            body[field] = [f"{target.image_host}/a.png"] if isinstance(body[field], list) else f"{target.image_host}/b.jpg"
    if body.get("webhook") is not None:
        body["webhook"] = "http://127.0.0.1:9/hook"


def _operations(base_url: str):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.endswith("/events"):  # a stream that rightly stays open until its job ends
            yield operation


def test_every_operation_answers_without_server_errors(fuzz_target):
    operations = list(_operations(fuzz_target.base_url))
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            _call(case, fuzz_target)

        check()


def _call(case, target) -> None:
    openai = case.path.startswith("/v1/")  # the OpenAI Images API: Bearer keys, OpenAI's error shape
    if openai and (hash(str(case.body)) % 5 or not case.headers):  # mostly a valid key, sometimes a random one
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {target.key}"}
    admin = case.path.startswith(("/api/fluxserve/webhooks/", "/api/fluxserve/admin/")) or "/enterprise/" in case.path and case.path.rsplit(
        "/", 1)[-1] in ("system_details", "clear_cache", "clear_queue", "restart_server", "update_server", "update")
    if isinstance(case.body, dict):
        if case.body.get("key") is not None or hash(str(case.body)) % 5:  # mostly valid keys, some random
            case.body["key"] = target.admin_key if admin else target.key
        _aim_at_loopback(case.body, target)
    elif admin:  # the webhook and operator admin routes without a body: the key in a header
        case.headers = {**(case.headers or {}), "Key": target.admin_key}
    elif case.path == "/api/fluxserve/jobs":  # the key's history
        case.headers = {**(case.headers or {}), "Key": target.key}
    response = case.call(base_url=target.base_url, timeout=30)
    content_type = str(response.headers.get("content-type") or "")  # schemathesis may give a list
    body = response.json() if "application/json" in content_type and response.status_code >= 400 else None
    # an OpenAI image request that is valid waits for its images, here 0 s: 504 naming the request
    timed_out = openai and response.status_code == 504 and body and body["error"]["code"] == "timeout"
    assert response.status_code < 500 or timed_out, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if body is not None and openai:
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["type"]
    elif body is not None:
        assert body["status"] == "error" and isinstance(body["message"], str)
