"""Every limit is refused with a ModelsLab-shaped JSON error and a fitting HTTP status,
before any job is queued."""

from __future__ import annotations

import pytest

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
KLEIN_I2I = "/api/v1/enterprise/flux_klein/img2img"
REALTIME_I2I = "/api/v1/enterprise/realtime/img2img"
FLUX_I2I = "/api/v1/enterprise/flux/img2img"
KONTEXT = "/api/v6/images/img2img"
INPAINT = "/api/v6/images/inpaint"

# (case id, path, body changes (None value deletes the field), status, message)
REFUSALS = [
    ("missing prompt", KLEIN, {"prompt": None}, 400, "prompt is required"),
    ("blank prompt", KLEIN, {"prompt": "   "}, 400, "prompt is required"),
    ("width over 1024", KLEIN, {"width": 1032}, 400, "width must be between 256 and 1024"),
    ("width under 256", KLEIN, {"width": "128"}, 400, "width must be between 256 and 1024"),
    ("height over 1024", KLEIN, {"height": 2048}, 400, "height must be between 256 and 1024"),
    ("width not multiple of 8", KLEIN, {"width": 260}, 400, "width must be divisible by 8"),
    ("height not multiple of 8", KLEIN, {"height": "513"}, 400, "height must be divisible by 8"),
    ("width not a number", KLEIN, {"width": "wide"}, 400, "width must be an integer"),
    ("width fractional", KLEIN, {"width": 512.5}, 400, "width must be an integer"),
    ("samples 0", KLEIN, {"samples": 0}, 400, "samples must be between 1 and 4"),
    ("samples 5", KLEIN, {"samples": "5"}, 400, "samples must be between 1 and 4"),
    ("negative seed", KLEIN, {"seed": -1}, 400, "seed must be between 0 and 4294967295"),
    ("steps 0", KLEIN, {"num_inference_steps": 0}, 400, "num_inference_steps must be between 1 and 50"),
    ("steps 51", KONTEXT, {"num_inference_steps": "51"}, 400, "num_inference_steps must be between 1 and 50"),
    ("guidance_scale 21", KLEIN, {"guidance_scale": 21}, 400, "guidance_scale must be between 0 and 20"),
    ("guidance -1", KONTEXT, {"guidance": "-1"}, 400, "guidance must be between 0 and 20"),
    ("guidance NaN", KONTEXT, {"guidance": "nan"}, 400, "guidance must be a number"),
    ("strength 1.5", FLUX_I2I, {"strength": 1.5}, 400, "strength must be between 0 and 1"),
    ("strength negative", REALTIME_I2I, {"strength": "-0.1"}, 400, "strength must be between 0 and 1"),
    ("bad boolean", KLEIN, {"base64": "maybe"}, 400, "base64 must be a boolean (true/false, yes/no, 1/0)"),
    ("five init images", KLEIN_I2I, {"init_image": ["{host}/a.png"] * 5}, 400,
     "init_image accepts at most 4 image URL(s) for flux-klein"),
    ("two images on realtime", REALTIME_I2I, {"init_image": ["{host}/a.png"] * 2}, 400,
     "init_image accepts at most 1 image URL(s) for realtime"),
    ("second image on realtime", REALTIME_I2I, {"init_image_2": "{host}/b.jpg"}, 400,
     "init_image_2 is only supported by flux-kontext-dev"),
    ("no init image", FLUX_I2I, {"init_image": None}, 400, "init_image is required"),
    ("empty init list", KLEIN_I2I, {"init_image": []}, 400, "init_image is required"),
    ("init image not a string", FLUX_I2I, {"init_image": 5}, 400, "init_image must be an image URL or an array of image URLs"),
    ("missing model_id", KONTEXT, {"model_id": None}, 400, "model_id is required"),
    ("unknown model_id", KONTEXT, {"model_id": "sdxl"}, 404, "Model not found: sdxl"),
    ("model without image-to-image on v6", KONTEXT, {"model_id": "flux-fill"}, 404,
     "Model not found: flux-fill (image-to-image models here: flux, flux-klein, flux-kontext-dev, realtime)"),
    ("alias of a model", KONTEXT, {"model_id": "FLUX-KONTEXT", "init_image": "{host}/missing.png"}, 400,
     "Unable to fetch image from provided URL: it answered HTTP 404"),  # resolved (then the image fails)
    ("inpaint without mask", INPAINT, {"mask_image": None}, 400, "mask_image is required"),
    ("inpaint without init image", INPAINT, {"init_image": None}, 400, "init_image is required"),
    ("mask not an image", INPAINT, {"mask_image": "{host}/not-an-image.png"}, 400,
     "Unable to decode the mask: not a valid image file"),
    ("mask unreachable", INPAINT, {"mask_image": "{host}/missing.png"}, 400,
     "Unable to fetch image from provided URL: it answered HTTP 404"),
    ("unknown model on images inpaint", INPAINT, {"model_id": "sdxl"}, 404, "Model not found: sdxl"),
    ("unreachable image", FLUX_I2I, {"init_image": "http://127.0.0.1:9/x.png"}, 400,
     "Unable to fetch image from provided URL: could not connect to '127.0.0.1'"),
    ("image 404", FLUX_I2I, {"init_image": "{host}/missing.png"}, 400,
     "Unable to fetch image from provided URL: it answered HTTP 404"),
    ("not an image", FLUX_I2I, {"init_image": "{host}/not-an-image.png"}, 400,
     "Unable to decode the init image: not a valid image file"),
    ("file scheme", FLUX_I2I, {"init_image": "file:///etc/passwd"}, 400,
     "Unable to fetch image from provided URL: only http and https URLs are accepted"),
    ("bad data uri", FLUX_I2I, {"init_image": "data:image/png;base64,@@@"}, 400, "data: URI is not valid base64"),
    ("webhook not http", KLEIN, {"webhook": "ftp://example.test/hook"}, 400, "webhook must be an http or https URL"),
    ("enhance_prompt not a boolean", REALTIME_I2I, {"enhance_prompt": "maybe"}, 400,
     "enhance_prompt must be a boolean (true/false, yes/no, 1/0)"),
]

VALID = {
    KLEIN: {"prompt": "a cat"},
    KLEIN_I2I: {"prompt": "a cat", "init_image": ["{host}/a.png"]},
    REALTIME_I2I: {"prompt": "a cat", "init_image": "{host}/a.png"},
    FLUX_I2I: {"prompt": "a cat", "init_image": "{host}/a.png"},
    KONTEXT: {"prompt": "a cat", "init_image": "{host}/a.png", "model_id": "flux-kontext-dev"},
    INPAINT: {"prompt": "a cat", "init_image": "{host}/a.png", "mask_image": "{host}/b.jpg", "model_id": "flux"},
}


def _fill(value, host):
    if isinstance(value, str):
        return value.replace("{host}", host)
    if isinstance(value, list):
        return [_fill(item, host) for item in value]
    if isinstance(value, dict):
        return {name: _fill(item, host) for name, item in value.items()}
    return value


@pytest.mark.parametrize("case,path,changes,status,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(server, client, image_host, case, path, changes, status, message):
    body = {"key": server.key, "width": 256, "height": 256, **VALID[path]}
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    before = server.job_count()
    response = client.post(path, json=_fill(body, image_host))
    assert response.status_code == status, response.text
    assert response.json() == {"status": "error", "message": message}
    assert server.job_count() == before  # refused before any work was queued


@pytest.mark.parametrize("key,message", [(None, "API key required"), ("", "API key required"),
                                         ("  ", "API key required"), ("fs_wrong", "Invalid API key"),
                                         (12345, "Invalid API key")])
def test_missing_or_wrong_key_is_401(server, client, key, message):
    body = {"prompt": "a cat"} if key is None else {"key": key, "prompt": "a cat"}
    before = server.job_count()
    response = client.post(KLEIN, json=body)
    assert response.status_code == 401
    assert response.json() == {"status": "error", "message": message}
    assert server.job_count() == before


def test_revoked_key_is_401(server, client):
    _row, plaintext = server.keys.create("short-lived")
    assert client.post(KLEIN, json={"key": plaintext, "prompt": "x", "width": 256, "height": 256}).status_code == 200
    server.keys.revoke(plaintext[:10])
    assert client.post(KLEIN, json={"key": plaintext, "prompt": "x"}).status_code == 401


@pytest.mark.parametrize("raw,message", [
    (b"not json", "Request body is not valid JSON"),
    (b"[1, 2]", "Request body must be a JSON object"),
    (b"", "Request body must be a JSON object"),
])
def test_bodies_that_are_not_json_objects(server, client, raw, message):
    response = client.post(KLEIN, content=raw, headers={"Key": server.key, "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"status": "error", "message": message}


def test_unknown_routes_and_methods_answer_json(server, client):
    missing = client.post("/api/v1/enterprise/nope/text2img", json={"key": server.key})
    assert missing.status_code == 404 and missing.json()["status"] == "error"
    wrong_method = client.get(KLEIN)
    assert wrong_method.status_code == 405 and wrong_method.json() == {"status": "error", "message": "Method not allowed"}


def test_unknown_fields_are_ignored(server, client):
    body = {"key": server.key, "prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 1,
            "clip_skip": 2, "lora_model": None, "scheduler": "DPM", "multi_lingual": "no", "panorama": "no"}
    assert client.post(KLEIN, json=body).json()["status"] == "success"


@pytest.mark.parametrize("value,expected", [(True, "yes"), ("true", "yes"), ("yes", "yes"), (1, "yes"), ("1", "yes"),
                                            (False, "no"), ("false", "no"), ("no", "no"), (0, "no"), ("0", "no")])
def test_boolean_forms(server, client, value, expected):
    body = {"key": server.key, "prompt": "a cat", "width": "256", "height": "256", "num_inference_steps": "1",
            "safety_checker": value, "samples": "1", "guidance_scale": "1.0"}
    result = client.post(KLEIN, json=body).json()
    assert result["status"] == "success" and result["meta"]["safety_checker"] == expected
