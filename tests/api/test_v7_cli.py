"""The ModelsLab CLI (modelslab-cli 0.2.2, binary ``modelslab``) against a live fluxserve server:
``generate image``, ``generate image-to-image`` and ``generate fetch`` go through the v7 image
routes and download real PNGs; then the same routes driven directly over HTTP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.servers import live_server

MODELSLAB = Path(sys.executable).parent / "modelslab"
T2I = "/api/v7/images/text-to-image"
I2I = "/api/v7/images/image-to-image"
FETCH = "/api/v7/images/fetch/{id}"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


# -- the CLI --------------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path):
    """Run ``modelslab`` with a throwaway HOME (no real config read or written), in tmp_path."""
    assert MODELSLAB.is_file(), f"{MODELSLAB} is missing: pip install modelslab-cli==0.2.2"
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MODELSLAB_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), NO_COLOR="1")

    def run(live, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
        command = [str(MODELSLAB), "--no-update-check", "--base-url", live.base_url,
                   "--api-key", key or live.key, *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    return run


def json_out(result: subprocess.CompletedProcess) -> dict:
    """The JSON document `-o json` prints (after any "Saved to" lines)."""
    return json.loads(result.stdout[result.stdout.index("{"):])


def saved_pngs(folder: Path, size: tuple[int, int], count: int = 1) -> list[Path]:
    """The CLI saves each output as ``<output-dir>/image_<millis>[_<i>].png``."""
    files = sorted(folder.glob("image_*.png"))
    assert len(files) == count, files
    for path in files:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == size
    return files


@pytest.fixture(scope="module")
def polling_server(tmp_path_factory, tiny_root):
    """Answers every submission "processing" at once, so the CLI has to poll the fetch route."""
    with live_server(tmp_path_factory.mktemp("v7-polling"), tiny_root, sync_wait_seconds=0) as live:
        yield live


def test_cli_generate_image_downloads_the_png(server, cli, tmp_path):
    out = tmp_path / "out"
    result = cli(server, "-o", "json", "generate", "image", "--prompt", "a lighthouse at dusk",
                 "--width", "256", "--height", "256", "--steps", "2", "--seed", "7", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    saved_pngs(out, (256, 256))
    answer = json_out(result)
    assert answer["status"] == "success"
    assert answer["meta"]["model_id"] == "flux-klein"  # the CLI sends no model_id without --model
    assert answer["meta"]["seed"] == 7 and answer["meta"]["num_inference_steps"] == 2
    assert server.jobs.get(answer["id"]).server == "v7"


def test_cli_generate_image_polls_fetch_until_done(polling_server, cli, tmp_path):
    out = tmp_path / "out"
    result = cli(polling_server, "-o", "json", "generate", "image", "--prompt", "a red apple",
                 "--model", "flux-klein", "--samples", "2", "--width", "256", "--height", "256", "--steps", "2",
                 "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    saved_pngs(out, (256, 256), count=2)
    assert json_out(result)["status"] == "success"


@pytest.mark.parametrize("model,expected", [(None, "flux-kontext-dev"), ("flux-klein", "flux-klein")])
def test_cli_generate_image_to_image(server, cli, image_host, tmp_path, model, expected):
    out = tmp_path / "out"
    args = ["-o", "json", "generate", "image-to-image", "--prompt", "make it blue",
            "--init-image", f"{image_host}/a.png", "--strength", "0.6", "--output-dir", str(out)]
    result = cli(server, *args, *(["--model", model] if model else []))
    assert result.returncode == 0, result.stderr
    saved_pngs(out, (512, 512))  # the CLI has no size flags for image-to-image: the server default
    answer = json_out(result)
    assert answer["meta"]["model_id"] == expected
    assert answer["meta"]["strength"] == 0.6


@pytest.mark.parametrize("model,expected", [(None, "flux-klein"), ("flux", "flux"), ("flux-fill", "flux-fill")])
def test_cli_generate_inpaint(server, cli, image_host, tmp_path, model, expected):
    """``modelslab generate inpaint`` posts init_image, mask_image (and model_id with --model) to
    /api/v7/images/inpaint, then downloads the result."""
    out = tmp_path / "out"
    args = ["-o", "json", "generate", "inpaint", "--prompt", "a cat in a hat", "--init-image", f"{image_host}/a.png",
            "--mask-image", f"{image_host}/mask.png", "--output-dir", str(out)]
    result = cli(server, *args, *(["--model", model] if model else []))
    assert result.returncode == 0, result.stderr
    saved_pngs(out, (512, 512))  # no size flags for inpaint either: the server default
    answer = json_out(result)
    assert answer["meta"]["model_id"] == expected and answer["meta"]["mask_image"] == f"{image_host}/mask.png"


def test_cli_generate_fetch_downloads_a_finished_job(server, cli, tmp_path):
    first = cli(server, "-o", "json", "generate", "image", "--prompt", "a bench", "--width", "256",
                "--height", "256", "--steps", "2", "--download=false", "--output-dir", str(tmp_path / "none"))
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "none").exists()
    job_id = json_out(first)["id"]

    out = tmp_path / "fetched"
    result = cli(server, "-o", "json", "generate", "fetch", "--id", str(job_id), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    saved_pngs(out, (256, 256))
    assert json_out(result)["id"] == job_id


def test_cli_reports_refusals(server, cli, image_host):
    wrong_key = cli(server, "generate", "image", "--prompt", "a cat", key="not-a-key")
    assert wrong_key.returncode == 3 and "Invalid API key" in wrong_key.stderr  # 401 -> the CLI's auth exit code
    unknown = cli(server, "generate", "image-to-image", "--prompt", "x", "--init-image", f"{image_host}/a.png",
                  "--model", "sdxl")
    assert unknown.returncode == 5 and "Model not found: sdxl" in unknown.stderr  # 404 -> not-found exit code


# -- the routes over HTTP (Key header, as the CLI sends it) ----------------------------------------
@pytest.fixture
def v7(server):
    with server.client(headers={"Key": server.key}) as http:
        yield http


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_text_to_image_then_fetch(v7):
    response = v7.post(T2I, json={"prompt": "a cat", "model_id": "flux-2-klein", **SMALL})  # key only in the header
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success" and body["meta"]["model_id"] == "flux-klein"
    assert png_size(httpx.get(body["output"][0]).content) == (256, 256)

    fetched = v7.post(FETCH.format(id=body["id"]), json={})
    assert fetched.status_code == 200
    assert fetched.json()["status"] == "success" and fetched.json()["output"] == body["output"]


def test_processing_answer_points_at_the_v7_fetch_route(server, v7):
    response = v7.post(T2I, json={"prompt": "a cat", "instant_response": True, **SMALL})
    body = response.json()
    assert response.status_code == 200 and body["status"] in ("processing", "success")
    if body["status"] == "processing":
        assert body["fetch_result"] == server.base_url + FETCH.format(id=body["id"])
    deadline = time.monotonic() + 30
    while body["status"] == "processing" and time.monotonic() < deadline:
        time.sleep(0.2)
        body = v7.post(FETCH.format(id=body["id"])).json()
    assert body["status"] == "success"


@pytest.mark.parametrize("model_id,expected", [
    ("flux-kontext-dev", "flux-kontext-dev"), ("flux", "flux"), ("realtime", "realtime"),
    ("flux-2-klein", "flux-klein"),
])
def test_image_to_image_models(v7, image_host, model_id, expected):
    body = {"prompt": "a cat", "init_image": f"{image_host}/b.jpg", "model_id": model_id, **SMALL}
    response = v7.post(I2I, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success" and response.json()["meta"]["model_id"] == expected


@pytest.mark.parametrize("path,body,status,message", [
    (T2I, {"prompt": "a cat", "model_id": "sdxl"}, 404, "Model not found: sdxl"),
    (T2I, {"prompt": "a cat", "model_id": "flux-fill"}, 404,  # inpainting only: no silent swap
     "Model not found: flux-fill (text-to-image models here: flux, flux-klein, flux-kontext-dev, realtime)"),
    (I2I, {"prompt": "a cat", "init_image": "{host}/a.png", "model_id": "sdxl"}, 404, "Model not found: sdxl"),
    (T2I, {"width": 256}, 400, "prompt is required"),
    (I2I, {"prompt": "", "init_image": "{host}/a.png"}, 400, "prompt is required"),  # the CLI without --prompt
    (I2I, {"prompt": "a cat"}, 400, "init_image is required"),
    (I2I, {"prompt": "a cat", "init_image": ["{host}/a.png"] * 2, "model_id": "flux"}, 400,
     "init_image accepts at most 1 image URL(s) for flux"),
    (I2I, {"prompt": "a cat", "init_image": "{host}/a.png", "init_image_2": "{host}/b.jpg", "model_id": "realtime"},
     400, "init_image_2 is only supported by flux-kontext-dev"),
    (FETCH.format(id=987654), {}, 404, "Request not found"),
])
def test_refusals(server, v7, image_host, path, body, status, message):
    body = json.loads(json.dumps(body).replace("{host}", image_host))
    before = server.job_count()
    response = v7.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json() == {"status": "error", "message": message}
    assert server.job_count() == before


@pytest.mark.parametrize("path", [T2I, I2I, FETCH.format(id=1)])
def test_wrong_key_is_401(server, image_host, path):
    with server.client(headers={"Key": "not-a-key"}) as http:
        response = http.post(path, json={"prompt": "a cat", "init_image": f"{image_host}/a.png"})
    assert response.status_code == 401
    assert response.json() == {"status": "error", "message": "Invalid API key"}
