"""The endpoints behind the playground and the operator view, over HTTP: the catalog (derived from
the path table and the registry), a key's history, the admin listings (failures, queue) and the
admin cancel; the pages and the docs served from this server with no outside reference, and every
generation path documented with an example body."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fluxserve.api.paths import ADMIN_SERVERS, PATH_FAMILIES
from fluxserve.models import DEFAULT_REGISTRY
from tests.support.servers import live_server
from tests.support.waiting import wait_for_job, wait_until

STATIC = Path(__file__).parents[2] / "src" / "fluxserve" / "api" / "static"
KLEIN = "/api/v1/enterprise/flux_klein/text2img"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 1, "safety_checker": False}
MISSING_HUB_LORA = "fluxserve-test/not-in-the-cache"  # allowed, never downloaded (HF_HUB_OFFLINE): its jobs fail


@pytest.fixture(scope="module")
def web(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("playground-api"), tiny_root, lora_hub_ids=[MISSING_HUB_LORA]) as live:
        yield live


@pytest.fixture
def http(web):
    with web.client() as client:
        yield client


# -- the catalog --------------------------------------------------------------------------------
def test_the_catalog_is_the_path_table_and_the_registry(http):
    answer = http.get("/api/fluxserve/catalog")  # public, like /openapi.json
    assert answer.status_code == 200
    catalog = answer.json()
    by_path = {item["path"]: item for item in catalog["paths"]}
    expected = [f"{family.prefix}/{action.name}" for family in PATH_FAMILIES for action in family.actions]
    assert [item["path"] for item in catalog["paths"]] == expected
    for family in PATH_FAMILIES:
        for action in family.actions:
            item = by_path[f"{family.prefix}/{action.name}"]
            assert item["task"] == action.task.value and item["takes_model_id"] == action.takes_model_id
            assert item["min_side"] == family.min_side and item["side_multiple"] == family.side_multiple
            assert item["fetch"] == family.fetch_path
            able = sorted(name for name, spec in DEFAULT_REGISTRY.items() if spec.supports(action.task))
            if action.model:
                assert item["models"] == [action.model]
            else:
                assert sorted(item["models"]) == able
                if action.default_model:
                    assert item["models"][0] == action.default_model == item["default_model"]
    models = {model["name"]: model for model in catalog["models"]}
    assert set(models) == set(DEFAULT_REGISTRY)
    for name, spec in DEFAULT_REGISTRY.items():
        assert models[name]["steps"] == spec.steps and models[name]["aliases"] == list(spec.aliases)
        assert models[name]["second_image"] == spec.family.limits.second_image
        assert set(models[name]["tasks"]) == {task.value for task in spec.family.tasks}
    assert catalog["admin_servers"] == list(ADMIN_SERVERS)
    assert [task["task"] for task in catalog["tasks"]] == ["text2img", "img2img", "inpaint"]


def test_the_pages_hold_no_second_list_of_models_or_paths():
    """The playground's lists come from the catalog: no model name or path prefix is written in its code."""
    code = "\n".join(path.read_text() for path in STATIC.glob("*.js")) + (STATIC / "index.html").read_text()
    names = {alias for spec in DEFAULT_REGISTRY.values() for alias in (spec.name, *spec.aliases)}
    for name in names:
        for quote in "'\"`":
            assert f"{quote}{name}{quote}" not in code, name
    for family in PATH_FAMILIES:
        assert family.prefix not in code, family.prefix


# -- history ------------------------------------------------------------------------------------
def test_history_lists_the_keys_own_jobs_newest_first_as_fetch_answers_them(web, http):
    mine = [http.post(KLEIN, json={"key": web.key, "prompt": f"history {i}", "seed": i, **SMALL}).json() for i in range(3)]
    theirs = http.post(KLEIN, json={"key": web.other_key, "prompt": "not yours", **SMALL}).json()
    assert all(job["status"] == "success" for job in [*mine, theirs])
    answer = http.get("/api/fluxserve/jobs", params={"limit": 2}, headers={"Key": web.key})
    assert answer.status_code == 200
    listing = answer.json()
    assert listing["status"] == "ok" and listing["limit"] == 2
    assert [job["id"] for job in listing["jobs"]] == [mine[2]["id"], mine[1]["id"]]
    for job in listing["jobs"]:
        fetched = http.post(f"/api/v6/fetch/{job['id']}", json={"key": web.key}).json()
        assert job["answer"] == fetched
        assert job["state"] == "succeeded" and job["model"] == "flux-klein" and job["task"] == "text2img"
        assert job["created_at"] and job["finished_at"]
    everything = http.get("/api/fluxserve/jobs", headers={"Authorization": f"Bearer {web.key}"}).json()["jobs"]
    ids = [job["id"] for job in everything]
    assert theirs["id"] not in ids and ids == sorted(ids, reverse=True) and len(ids) <= 20
    assert [job["id"] for job in http.get("/api/fluxserve/jobs", headers={"Key": web.other_key}).json()["jobs"]][0] == theirs["id"]


def test_history_needs_a_key_and_a_sane_limit(web, http):
    assert http.get("/api/fluxserve/jobs").status_code == 401
    assert http.get("/api/fluxserve/jobs", headers={"Key": "nope"}).json() == {"status": "error", "message": "Invalid API key"}
    for limit in (0, 101, "x"):
        refused = http.get("/api/fluxserve/jobs", params={"limit": limit}, headers={"Key": web.key})
        assert refused.status_code == 400 and refused.json()["status"] == "error"


# -- the operator's endpoints -----------------------------------------------------------------------
def test_recent_failures_are_listed_for_admins_with_their_messages(web, http):
    failed = http.post(KLEIN, json={"key": web.key, "prompt": "x", "lora_model": MISSING_HUB_LORA, **SMALL}).json()
    assert failed["status"] == "failed"
    assert http.get("/api/fluxserve/admin/failures", headers={"Key": web.key}).status_code == 403
    assert http.get("/api/fluxserve/admin/failures").status_code == 401
    answer = http.get("/api/fluxserve/admin/failures", params={"limit": 5}, headers={"Key": web.admin_key})
    assert answer.status_code == 200
    newest = answer.json()["failures"][0]
    key_id = web.keys.authenticate(web.key).id
    assert newest["id"] == failed["id"] and newest["model"] == "flux-klein" and newest["key_id"] == key_id
    assert newest["key_name"] == "test" and newest["message"] == failed["message"] and newest["time"]
    assert MISSING_HUB_LORA in newest["message"]
    assert web.key not in answer.text  # never a key


def test_the_admin_queue_lists_every_keys_jobs_and_admins_cancel_any_queued_one(web, http):
    slow = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 12, "safety_checker": False,
            "instant_response": True}
    running = http.post(KLEIN, json={"key": web.other_key, **slow}).json()
    wait_until(lambda: web.jobs.get(running["id"]).status == "running", 60, "the slow job to run")
    queued = http.post(KLEIN, json={"key": web.key, "prompt": "waits", **SMALL, "instant_response": True}).json()
    assert queued["status"] == "processing", queued
    assert http.get("/api/fluxserve/admin/queue", headers={"Key": web.key}).status_code == 403
    listing = http.get("/api/fluxserve/admin/queue", headers={"Key": web.admin_key}).json()
    rows = {row["id"]: row for row in listing["jobs"]}
    assert [row["id"] for row in listing["jobs"]][:2] == [running["id"], queued["id"]]  # running first
    assert rows[running["id"]]["status"] == "running" and "step" in rows[running["id"]]
    assert rows[queued["id"]]["status"] == "queued" and rows[queued["id"]]["key_name"] == "test"
    assert listing["queue_depth"] >= 1 and listing["running"] == 1
    # another key's job: 404 for a user (scoped), cancelled by an admin
    assert http.post(f"/api/fluxserve/admin/jobs/{queued['id']}/cancel", json={"key": web.other_key}).status_code == 403
    cancelled = http.post(f"/api/fluxserve/admin/jobs/{queued['id']}/cancel", headers={"Key": web.admin_key})
    assert cancelled.json() == {"status": "success", "id": queued["id"], "message": "Request cancelled"}
    fetched = http.post(f"/api/v6/fetch/{queued['id']}", json={"key": web.key}).json()
    assert fetched["status"] == "failed" and fetched["message"] == "Request was cancelled by an administrator"
    again = http.post(f"/api/fluxserve/admin/jobs/{running['id']}/cancel", headers={"Key": web.admin_key})
    assert again.status_code == 409 and "only queued requests" in again.json()["message"]
    assert http.post("/api/fluxserve/admin/jobs/999999/cancel", headers={"Key": web.admin_key}).status_code == 404
    # cancelled requests are not failures
    failures = http.get("/api/fluxserve/admin/failures", headers={"Key": web.admin_key}).json()["failures"]
    assert queued["id"] not in {row["id"] for row in failures}
    assert wait_for_job(http, web.other_key, running["id"], timeout=180).json()["status"] == "success"


# -- pages and docs: everything from this server ------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("page", ["/", "/operator", "/docs", "/redoc"])
def test_every_page_loads_its_assets_from_this_server(http, page):
    answer = http.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    urls = _links(answer.text)
    assert urls, "the page names its scripts and styles"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} links to {url}"
        assert http.get(url).status_code == 200, url
    assert not re.search(r"(src|href)=['\"]?https?:", answer.text)
    assert "cdn" not in answer.text.lower() and "fonts.googleapis" not in answer.text
    policy = answer.headers["content-security-policy"]  # the browser itself refuses anything else
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert "img-src 'self' data:" in policy if page in ("/docs", "/redoc") else "img-src *" in policy


def test_the_scripts_and_styles_fetch_nothing_from_elsewhere():
    for path in [*STATIC.glob("*.js"), *STATIC.glob("*.css")]:
        assert not re.search(r"https?://", path.read_text()), path.name


def test_docs_show_an_example_body_and_the_real_answers_for_every_generation_path(http):
    openapi = http.get("/openapi.json").json()
    schemas = openapi["components"]["schemas"]
    for family in PATH_FAMILIES:
        for action in family.actions:
            operation = openapi["paths"][f"{family.prefix}/{action.name}"]["post"]
            body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            example = schemas[body]["example"]
            assert example["prompt"] and example["key"], (family.prefix, action.name)
            if action.task.value != "text2img":
                assert example["init_image"], (family.prefix, action.name)
            if action.task.value == "inpaint":
                assert example["mask_image"], (family.prefix, action.name)
            assert {"200", "400", "401", "404", "429", "500"} <= set(operation["responses"])
    assert "/" not in openapi["paths"] and "/operator" not in openapi["paths"]
    for path in ("/api/fluxserve/catalog", "/api/fluxserve/jobs", "/api/fluxserve/admin/failures",
                 "/api/fluxserve/admin/queue", "/api/fluxserve/admin/jobs/{job_id}/cancel"):
        assert path in openapi["paths"], path


def test_the_operator_page_itself_is_public_but_its_data_is_admin_only(web, http):
    assert http.get("/operator").status_code == 200  # a shell: every call it makes needs an admin key
    for path in ("/api/fluxserve/admin/failures", "/api/fluxserve/admin/queue"):
        assert http.get(path, headers={"Key": web.key}).json() == {"status": "error", "message": "This endpoint needs an admin key"}
    assert http.get("/api/fluxserve/admin/queue", headers={"Key": web.admin_key}).status_code == 200
