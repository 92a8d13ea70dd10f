"""Every generation endpoint over HTTP against a live server with the tiny pipelines."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.support.servers import live_server
from tests.support.waiting import wait_for_job

SEED_BODIES = Path(__file__).parent / "seed_bodies"

# endpoint -> (seed example file, fetch path prefix)
SEED_EXAMPLES = {
    "/api/v1/enterprise/flux_klein/text2img": ("flux_klein_text2img.json", "/api/v1/enterprise/flux_klein/fetch/"),
    "/api/v1/enterprise/flux_klein/img2img": ("flux_klein_img2img.json", "/api/v1/enterprise/flux_klein/fetch/"),
    "/api/v1/enterprise/realtime/img2img": ("realtime_img2img.json", "/api/v1/enterprise/realtime/fetch/"),
    "/api/v1/enterprise/flux/img2img": ("flux_img2img.json", "/api/v1/enterprise/flux/fetch/"),
    "/api/v6/images/img2img": ("v6_images_img2img.json", "/api/v6/images/fetch/"),
}

# A small valid body per endpoint (256 px, few steps: fast on CPU)
SMALL = {
    "/api/v1/enterprise/flux_klein/text2img": {},
    "/api/v1/enterprise/realtime/text2img": {},
    "/api/v6/realtime/text2img": {},
    "/api/v1/enterprise/flux_klein/img2img": {"init_image": ["{host}/a.png", "{host}/b.jpg"]},
    "/api/v1/enterprise/realtime/img2img": {"init_image": "{host}/a.png", "strength": 0.6},
    "/api/v6/realtime/img2img": {"init_image": "{host}/c.webp"},
    "/api/v1/enterprise/flux/img2img": {"init_image": "{host}/a.png", "strength": "0.7"},
    "/api/v6/images/img2img": {"model_id": "flux-kontext-dev", "init_image": "{host}/a.png", "num_inference_steps": 3},
}


def small_body(path: str, key: str, host: str, **extra) -> dict:
    body = {"key": key, "prompt": "a cat sitting on a bench", "width": 256, "height": 256, "num_inference_steps": 2}
    for name, value in SMALL[path].items():
        body[name] = json.loads(json.dumps(value).replace("{host}", host))
    body.update(extra)
    return body


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("path", sorted(SEED_EXAMPLES))
def test_seed_example_bodies_are_accepted_as_written(server, client, image_host, path):
    """The literal example bodies from the ModelsLab pages, with only key and image URLs swapped."""
    filename, fetch_prefix = SEED_EXAMPLES[path]
    body = json.loads((SEED_BODIES / filename).read_text())
    body["key"] = server.key
    if "init_image" in body:
        body["init_image"] = [f"{image_host}/a.png"] if isinstance(body["init_image"], list) else f"{image_host}/a.png"
    if "init_image_2" in body:
        body["init_image_2"] = f"{image_host}/b.jpg"
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "success", result
    assert isinstance(result["id"], int)
    assert len(result["output"]) == 1
    image = png(client.get(result["output"][0]).content)
    assert image.size == (512, 512)
    meta = result["meta"]
    assert meta["prompt"] == body["prompt"]
    assert meta["negative_prompt"] == body["negative_prompt"]
    assert isinstance(meta["seed"], int)  # seed null -> drawn and reported
    assert meta["width"] == 512 and meta["height"] == 512
    assert result["generationTime"] > 0
    fetched = client.post(fetch_prefix + str(result["id"]), json={"key": server.key}).json()
    assert fetched["status"] == "success" and fetched["output"] == result["output"]


@pytest.mark.parametrize("path", sorted(SMALL))
def test_every_endpoint_generates_and_reports_meta(server, client, image_host, path):
    body = small_body(path, server.key, image_host, seed=1234, samples=2)
    result = client.post(path, json=body).json()
    assert result["status"] == "success", result
    assert len(result["output"]) == 2 and result["proxy_links"] == result["output"]
    meta = result["meta"]
    assert meta["seeds"] == [1234, 1235] and meta["seed"] == 1234 and meta["n_samples"] == 2
    assert meta["num_inference_steps"] == (3 if "v6/images" in path else 2)
    assert meta["safety_checker"] == "yes" and meta["base64"] == "no"
    assert "key" not in meta
    if "img2img" in path:
        assert 0 <= meta["strength"] <= 1 and meta["init_image"]
    images = [png(client.get(url).content) for url in result["output"]]
    assert all(image.size == (256, 256) for image in images)
    assert images[0].tobytes() != images[1].tobytes()  # each sample has its own seed


@pytest.mark.parametrize("path", sorted(SMALL))
def test_width_and_height_are_honoured(server, client, image_host, path):
    """Non-square, and a side that is a multiple of 8 but not of 16."""
    body = small_body(path, server.key, image_host, width=264, height=320, seed=3)
    result = client.post(path, json=body).json()
    assert result["status"] == "success", result
    assert png(client.get(result["output"][0]).content).size == (264, 320)


@pytest.mark.parametrize("path", sorted(SMALL))
def test_same_seed_gives_bit_identical_images(server, client, image_host, path):
    body = small_body(path, server.key, image_host, seed=77)
    first = client.post(path, json=body).json()
    second = client.post(path, json=body).json()
    assert first["id"] != second["id"]
    a, b = (client.get(r["output"][0]).content for r in (first, second))
    assert png(a).tobytes() == png(b).tobytes()
    other = client.post(path, json={**body, "seed": 78}).json()
    assert png(client.get(other["output"][0]).content).tobytes() != png(a).tobytes()


@pytest.mark.parametrize("path", ["/api/v1/enterprise/flux/img2img", "/api/v6/images/img2img", "/api/v1/enterprise/flux_klein/text2img"])
def test_each_sample_reproduces_alone_with_its_own_seed(server, client, image_host, path):
    batch = client.post(path, json=small_body(path, server.key, image_host, seed=500, samples=3)).json()
    alone = client.post(path, json=small_body(path, server.key, image_host, seed=502, samples=1)).json()
    assert batch["meta"]["seeds"][2] == 502
    third = png(client.get(batch["output"][2]).content)
    single = png(client.get(alone["output"][0]).content)
    assert third.tobytes() == single.tobytes()


def test_base64_answers_the_urls_of_base64_files_as_modelslab_does(server, client, image_host):
    """Client code GETs output[i], strips an optional data: prefix and decodes: it gets the PNG."""
    path = "/api/v1/enterprise/flux_klein/text2img"
    queued = client.post(path, json=small_body(path, server.key, image_host, seed=9, samples=2, base64="true",
                                               instant_response=True)).json()
    assert all(link.endswith(".base64") for link in queued["future_links"])
    assert all(link.endswith(".png") for link in queued["proxy_links"])
    result = wait_for_job(client, server.key, queued["id"]).json()
    assert result["status"] == "success" and result["meta"]["base64"] == "yes"
    assert result["output"] == queued["future_links"]  # the exact URLs promised
    for url, link in zip(result["output"], result["proxy_links"]):
        assert url.endswith(".base64") and link.endswith(".png")
        served = client.get(url)
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
        text = served.text.split(",", 1)[-1]  # what clients do: drop an optional data: prefix
        decoded = base64.b64decode(text, validate=True)
        assert decoded == client.get(link).content
        assert png(decoded).size == (256, 256)


def test_base64_inline_when_the_server_is_set_to(tmp_path, tiny_root, image_host):
    with live_server(tmp_path, tiny_root, base64_inline=True) as live, live.client() as client:
        path = "/api/v1/enterprise/flux_klein/text2img"
        result = client.post(path, json=small_body(path, live.key, image_host, seed=9, base64=True)).json()
        assert base64.b64decode(result["output"][0], validate=True) == client.get(result["proxy_links"][0]).content


def test_instant_response_then_fetch_on_every_fetch_route(server, client, image_host):
    path = "/api/v1/enterprise/realtime/text2img"
    queued = client.post(path, json=small_body(path, server.key, image_host, instant_response=True, samples=2)).json()
    assert queued["status"] == "processing", queued
    assert queued["output"] == [] and isinstance(queued["eta"], (int, float)) and queued["eta"] > 0
    assert queued["fetch_result"] == f"{server.base_url}/api/v1/enterprise/realtime/fetch/{queued['id']}"
    assert len(queued["future_links"]) == 2
    done = None
    for _ in range(600):
        done = client.post(queued["fetch_result"], json={"key": server.key}).json()
        if done["status"] == "success":
            break
    assert done["status"] == "success"
    assert done["output"] == queued["future_links"]  # future_links were the exact URLs
    for route in ("/api/v1/enterprise/flux_klein/fetch/{id}", "/api/v1/enterprise/flux/fetch/{id}",
                  "/api/v6/images/fetch/{id}", "/api/v6/realtime/fetch/{id}"):
        again = client.post(route.format(id=queued["id"]), json={"key": server.key}).json()
        assert again["output"] == done["output"]
    by_body = client.post("/api/v6/images/fetch", json={"key": server.key, "request_id": str(queued["id"])}).json()
    assert by_body["output"] == done["output"]


def test_a_key_sees_only_its_own_jobs(server, client, image_host):
    path = "/api/v1/enterprise/flux_klein/text2img"
    mine = client.post(path, json=small_body(path, server.key, image_host)).json()
    for route in (f"/api/v1/enterprise/flux_klein/fetch/{mine['id']}", f"/api/v6/images/fetch/{mine['id']}"):
        response = client.post(route, json={"key": server.other_key})
        assert response.status_code == 404
        assert response.json() == {"status": "error", "message": "Request not found"}
    response = client.post("/api/v6/images/fetch", json={"key": server.other_key, "request_id": mine["id"]})
    assert response.status_code == 404


def test_fetch_of_unknown_or_malformed_ids(server, client):
    huge = str(10**30)  # found by schemathesis: overflowed SQLite's INTEGER (a 500)
    for route in ("/api/v1/enterprise/flux/fetch/999999", "/api/v1/enterprise/flux/fetch/abc",
                  f"/api/v1/enterprise/flux/fetch/{huge}", "/api/v1/enterprise/flux/fetch/-1"):
        response = client.post(route, json={"key": server.key})
        assert response.status_code == 404 and response.json()["status"] == "error"
    for request_id in (10**30, -5, 0):
        response = client.post("/api/v6/images/fetch", json={"key": server.key, "request_id": request_id})
        assert response.status_code == 404 and response.json()["status"] == "error"
    for path in (f"/api/fluxserve/jobs/{huge}/cancel",):
        assert client.post(path, json={"key": server.key}).status_code == 404
    assert client.get(f"/api/fluxserve/jobs/{huge}/events", headers={"Key": server.key}).status_code == 404
    response = client.post("/api/v6/images/fetch", json={"key": server.key})
    assert response.status_code == 400 and response.json()["message"] == "request_id is required"


def test_negative_prompt_is_recorded_and_applied_only_where_supported(server, client, image_host):
    klein = "/api/v1/enterprise/flux_klein/text2img"
    result = client.post(klein, json=small_body(klein, server.key, image_host, negative_prompt="blurry")).json()
    assert result["meta"]["negative_prompt"] == "blurry" and result["meta"]["negative_prompt_applied"] is False
    flux = "/api/v1/enterprise/flux/img2img"
    body = small_body(flux, server.key, image_host, negative_prompt="blurry", true_cfg_scale=2, seed=4)
    applied = client.post(flux, json=body).json()
    assert applied["status"] == "success" and applied["meta"]["negative_prompt_applied"] is True
    plain = client.post(flux, json={**body, "true_cfg_scale": None}).json()
    assert plain["meta"]["negative_prompt_applied"] is False
    a, b = (png(client.get(r["output"][0]).content).tobytes() for r in (applied, plain))
    assert a != b  # the negative prompt changed the image


def test_strength_zero_returns_the_init_image(server, client, image_host):
    path = "/api/v1/enterprise/flux/img2img"
    result = client.post(path, json=small_body(path, server.key, image_host, strength=0)).json()
    out = png(client.get(result["output"][0]).content).convert("RGB")
    init = Image.open(io.BytesIO(client.get(f"{image_host}/a.png").content)).convert("RGB")
    assert out.tobytes() == init.tobytes()


def test_init_images_as_data_uris(server, client, image_host):
    raw = client.get(f"{image_host}/a.png").content
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    path = "/api/v1/enterprise/realtime/img2img"
    result = client.post(path, json=small_body(path, server.key, image_host, init_image=uri)).json()
    assert result["status"] == "success", result


def test_output_files_are_served_and_unknown_ones_are_404(server, client, image_host):
    path = "/api/v1/enterprise/flux_klein/text2img"
    result = client.post(path, json=small_body(path, server.key, image_host)).json()
    response = client.get(result["output"][0])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    name = result["output"][0].rsplit("/", 1)[1]
    assert len(name.split("-0.png")[0]) >= 32  # unguessable uuid prefix
    for bad in ("/outputs/nope.png", "/outputs/..%2Ffluxserve.db", "/outputs/.hidden"):
        missing = client.get(bad)
        assert missing.status_code == 404 and missing.json()["status"] == "error"


def test_curl_style_bodies_without_json_content_type(server, client, image_host):
    path = "/api/v1/enterprise/flux_klein/text2img"
    content = json.dumps(small_body(path, server.key, image_host))
    response = client.post(path, content=content, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["status"] == "success"


def test_key_may_come_in_a_key_header(server, client, image_host):
    path = "/api/v1/enterprise/flux_klein/text2img"
    body = small_body(path, server.key, image_host)
    del body["key"]
    response = client.post(path, json=body, headers={"Key": server.key})
    assert response.json()["status"] == "success"
