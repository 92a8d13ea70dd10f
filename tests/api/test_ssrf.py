"""Through the API, on a server with no allowlist: init images and webhooks that point into
the server's own network are refused (the fetcher's full vector table is tests/test_fetching.py)."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.support.servers import live_server

FLUX = "/api/v1/enterprise/flux/img2img"
KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture(scope="module")
def closed(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("ssrf"), tiny_root, fetch_allow=[]) as live:
        yield live


@pytest.mark.parametrize("url", [
    "{host}/a.png",  # our own loopback image server: refused without an allowlist
    "http://169.254.169.254/latest/meta-data/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
])
def test_init_images_into_our_network_are_refused(closed, image_host, url):
    before = closed.job_count()
    with closed.client() as client:
        response = client.post(FLUX, json={"key": closed.key, "prompt": "x", "init_image": url.format(host=image_host)})
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "error" and body["message"].startswith("Unable to fetch image from provided URL: ")
    assert closed.job_count() == before


def test_a_refusal_says_how_to_allow_the_host_and_that_advice_works(closed, image_host, tmp_path, tiny_root):
    url = image_host.replace("127.0.0.1", "localhost") + "/a.png"
    with closed.client() as client:
        refused = client.post(FLUX, json={"key": closed.key, "prompt": "x", "init_image": url})
    assert refused.status_code == 400
    message = refused.json()["message"]
    advice = re.search(r"FLUXSERVE_FETCH_ALLOW='(\[.*?\])'", message)
    assert advice is not None, message
    allow = json.loads(advice.group(1))
    assert allow == ["localhost"]
    with live_server(tmp_path / "allowed", tiny_root, fetch_allow=allow) as allowed, allowed.client() as client:
        body = {"key": allowed.key, "prompt": "x", "init_image": url, "num_inference_steps": 1, "width": 256, "height": 256}
        answer = client.post(FLUX, json=body)
    assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text


def test_webhooks_into_our_network_are_refused_not_sent(closed):
    with closed.client() as client:
        body = {"key": closed.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1,
                "webhook": "http://169.254.169.254/hook"}
        job = client.post(KLEIN, json=body).json()
        assert job["status"] == "success"
        deadline = time.monotonic() + 20
        while closed.jobs.webhook_status(job["id"]) == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert closed.jobs.webhook_status(job["id"]) == "failed"
        answer = client.post(f"/api/v1/enterprise/flux_klein/fetch/{job['id']}", json={"key": closed.key}).json()
        assert answer["webhook_status"] == "failed"
