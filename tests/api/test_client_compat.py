"""What client code from the ModelsLab ecosystem does, unchanged: poll a failed job until its own
loop ends, follow base64 answers' URLs, send init images as raw base64 or data: URIs with a space,
read the answer fields typed clients read, ask the realtime paths for small sizes."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests
from modelslab_py.core.apis.community import Community
from modelslab_py.core.client import Client
from modelslab_py.schemas.community import Text2Image
from PIL import Image

from tests.support.servers import live_server

FLUX_T2I = "/api/v6/images/text2img"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 1}
MODELSLAB = Path(sys.executable).parent / "modelslab"


@pytest.fixture(scope="module")
def failing(tmp_path_factory, tiny_root):
    """A server whose "flux" model has no weights: every flux job fails (a result, not a refusal)."""
    folder = tmp_path_factory.mktemp("failing")
    with live_server(folder, tiny_root, model_overrides={"flux": {"source": str(folder / "no-weights")}}) as live:
        yield live


def _failed(answer: dict, job_id: int | None = None) -> None:
    assert answer["status"] == "failed", answer
    assert answer["message"].startswith("Model flux could not be loaded")
    assert set(answer) == {"status", "id", "message", "track_id"}  # the failure webhook's body
    if job_id is not None:
        assert answer["id"] == job_id


def test_a_failed_job_answers_200_failed_on_every_fetch_path(failing):
    with failing.client() as client:
        first = client.post(FLUX_T2I, json={"key": failing.key, "prompt": "x", "model_id": "flux", "track_id": "t1",
                                            **SMALL})
        assert first.status_code == 200
        _failed(first.json())
        job_id = first.json()["id"]
        assert first.json()["track_id"] == "t1"
        fetches = [f"/api/v1/enterprise/{s}/fetch/{job_id}" for s in ("flux_klein", "realtime", "flux", "images")]
        fetches += [f"/api/v6/images/fetch/{job_id}", f"/api/v6/realtime/fetch/{job_id}", f"/api/v7/images/fetch/{job_id}",
                    f"/api/v6/fetch/{job_id}", f"/api/v6/image_editing/fetch/{job_id}"]
        for path in fetches:
            answer = client.post(path, json={"key": failing.key})
            assert answer.status_code == 200, path
            _failed(answer.json(), job_id)
        for path in ("/api/v6/images/fetch", "/api/v1/enterprise/fetch"):
            answer = client.post(path, json={"key": failing.key, "request_id": job_id})
            assert answer.status_code == 200
            _failed(answer.json(), job_id)
        # a request that can't be served keeps its 4xx: an unknown id, another key's job
        assert client.post("/api/v6/images/fetch/99999999", json={"key": failing.key}).status_code == 404
        assert client.post(f"/api/v6/images/fetch/{job_id}", json={"key": failing.other_key}).status_code == 404


def test_the_sdk_polls_a_failed_job_without_raising(failing):
    """modelslab-py raises on any non-200: a failed job used to be a 500 (an exception mid-poll)."""
    sdk = Client(api_key=failing.key, fetch_retry=2, fetch_timeout=0.05)
    sdk.base_url = failing.base_url + "/api/"
    api = Community(sdk)
    result = api.text_to_image(Text2Image(model_id="flux", prompt="x", width=256, height=256, num_inference_steps=1))
    _failed(result)
    _failed(api.fetch(str(result["id"])), result["id"])


def test_a_requests_polling_loop_stops_on_failed(failing):
    """The docs' own loop: POST, then fetch until the status is no longer processing."""
    queued = requests.post(failing.base_url + FLUX_T2I, json={"key": failing.key, "prompt": "x", "model_id": "flux",
                                                              "instant_response": True, **SMALL}, timeout=30).json()
    deadline, answer = time.monotonic() + 30, queued
    while answer["status"] == "processing" and time.monotonic() < deadline:
        time.sleep(0.1)
        answer = requests.post(queued["fetch_result"], json={"key": failing.key}, timeout=30).json()
    _failed(answer, queued["id"])


def test_the_cli_ends_on_a_failed_job_instead_of_polling_until_its_timeout(failing, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSLAB_")}
    env.update(HOME=str(tmp_path), NO_COLOR="1")
    started = time.monotonic()
    result = subprocess.run([str(MODELSLAB), "--no-update-check", "--base-url", failing.base_url, "--api-key",
                             failing.key, "generate", "image", "--prompt", "x", "--model", "flux", "--width", "256",
                             "--height", "256", "--steps", "1", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 60  # its timeout is 5 minutes
    assert "could not be loaded" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


# -- base64 answers, followed the way client code does ----------------------------------------------
def test_requests_code_follows_base64_urls(server):
    answer = requests.post(server.base_url + FLUX_T2I, json={"key": server.key, "prompt": "a fox", "model_id": "flux",
                                                             "base64": True, "samples": 2, **SMALL}, timeout=60).json()
    assert answer["status"] == "success"
    for url, png_url in zip(answer["output"], answer["proxy_links"]):
        body = requests.get(url, timeout=30).text
        if body.startswith("data:"):
            body = body.split(",", 1)[1]
        image = Image.open(io.BytesIO(base64.b64decode(body)))
        assert image.format == "PNG" and image.size == (256, 256)
        assert base64.b64decode(body) == requests.get(png_url, timeout=30).content


def test_base64_files_expire_with_the_images(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, retention_seconds=1, janitor_interval_seconds=0.2) as live, \
            live.client() as client:
        answer = client.post(FLUX_T2I, json={"key": live.key, "prompt": "x", "base64": True, **SMALL}).json()
        url = answer["output"][0]
        assert client.get(url).status_code == 200
        deadline = time.monotonic() + 20
        while client.get(url).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get(url).status_code == 404 and client.get(answer["proxy_links"][0]).status_code == 404


# -- init and mask images as clients send them -------------------------------------------------------
def _encoded(client, image_host: str, name: str = "a.png") -> str:
    return base64.b64encode(client.get(f"{image_host}/{name}").content).decode()


@pytest.mark.parametrize("form", ["raw", "raw-urlsafe", "data-uri", "data-uri-space", "raw-with-newlines"])
def test_init_images_in_every_form_clients_send(server, client, image_host, form):
    raw = _encoded(client, image_host)
    image = {"raw": raw, "raw-urlsafe": raw.replace("+", "-").replace("/", "_").rstrip("="),
             "data-uri": "data:image/png;base64," + raw, "data-uri-space": "data:image/png;base64, " + raw,
             "raw-with-newlines": "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))}[form]
    body = {"key": server.key, "prompt": "a cat", "init_image": image, "strength": 0, **SMALL}
    answer = client.post("/api/v1/enterprise/realtime/img2img", json=body).json()
    assert answer["status"] == "success", answer
    out = Image.open(io.BytesIO(client.get(answer["output"][0]).content)).convert("RGB")
    assert out.tobytes() == Image.open(io.BytesIO(client.get(f"{image_host}/a.png").content)).convert("RGB").tobytes()


def test_a_raw_base64_mask(server, client, image_host):
    body = {"key": server.key, "prompt": "a cat", "init_image": _encoded(client, image_host),
            "mask_image": _encoded(client, image_host, "mask.png"), **SMALL}
    assert client.post("/api/v6/realtime/inpaint", json=body).json()["status"] == "success"


@pytest.mark.parametrize("image,message", [
    (base64.b64encode(b"this is text, not a picture at all").decode(), "Unable to decode the init image: not a valid image file"),
    ("data:image/png;base64, bm90IGFuIGltYWdl", "Unable to decode the init image: not a valid image file"),
    ("QUJD" * 3 + "!" * 3, "Unable to fetch image from provided URL: only http and https URLs are accepted"),
    ("AAAAA" * 5, "base64 image is not valid base64"),
])
def test_inline_images_that_are_not_images_are_refused_clearly(server, client, image, message):
    before = server.job_count()
    answer = client.post("/api/v1/enterprise/realtime/img2img", json={"key": server.key, "prompt": "x",
                                                                       "init_image": image, **SMALL})
    assert answer.status_code == 400 and answer.json() == {"status": "error", "message": message}
    assert server.job_count() == before


# -- answer fields ---------------------------------------------------------------------------------
def test_answer_fields_typed_clients_read(server, client):
    done = client.post(FLUX_T2I, json={"key": server.key, "prompt": "x", **SMALL}).json()
    assert done["warning"] == "" and done["tip"] == "" and done["webhook_status"] == ""
    meta = done["meta"]
    assert meta["negative_prompt"] == ""  # a string even when not sent
    assert meta["safety_checker_type"] == "black" and meta["watermark"] == "no" and meta["outdir"] == "outputs"
    assert meta["webhook"] is None and meta["enhance_style"] is None
    queued = client.post(FLUX_T2I, json={"key": server.key, "prompt": "x", "instant_response": True,
                                         "webhook": "http://127.0.0.1:9/hook", **SMALL}).json()
    assert queued["status"] == "processing" and queued["tip"] and queued["tip_1"]
    assert queued["webhook_status"] == "pending" and queued["meta"]["webhook"] == "http://127.0.0.1:9/hook"


def test_missing_and_wrong_keys(server):
    assert httpx.post(server.base_url + FLUX_T2I, json={"prompt": "x"}).json()["message"] == "API key required"
    assert httpx.post(server.base_url + FLUX_T2I, json={"key": "fs_nope", "prompt": "x"}).json()["message"] == "Invalid API key"


# -- realtime sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (100, 75), (64, 1024), (250, 130)])
def test_realtime_paths_answer_small_sizes_exactly(server, client, image_host, size):
    width, height = size
    for path, extra in (("/api/v1/enterprise/realtime/text2img", {}),
                        ("/api/v6/realtime/img2img", {"init_image": f"{image_host}/a.png"})):
        answer = client.post(path, json={"key": server.key, "prompt": "x", "width": width, "height": height,
                                         "num_inference_steps": 1, **extra}).json()
        assert answer["status"] == "success", answer
        image = Image.open(io.BytesIO(client.get(answer["output"][0]).content))
        assert image.size == (width, height) and answer["meta"]["width"] == width


@pytest.mark.parametrize("path,size,message", [
    ("/api/v1/enterprise/realtime/text2img", 32, "width must be between 64 and 1024"),
    ("/api/v1/enterprise/flux_klein/text2img", 128, "width must be between 256 and 1024"),
    ("/api/v1/enterprise/flux_klein/text2img", 260, "width must be divisible by 8"),
])
def test_sizes_outside_a_paths_range_are_refused(server, client, path, size, message):
    answer = client.post(path, json={"key": server.key, "prompt": "x", "width": size})
    assert answer.status_code == 400 and answer.json() == {"status": "error", "message": message}
