"""The OpenAI Images API (/v1/images/generations, /v1/images/edits, /v1/models) against a live
server, through the official ``openai`` Python SDK as a user would call it, and over plain HTTP
for the error shapes. Small and fast: 256² images, 1-2 steps (``extra_body``)."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image
from sqlalchemy import select

from fluxserve.jobs.tables import Job
from fluxserve.models import DEFAULT_REGISTRY
from tests.conftest import make_test_image
from tests.support.servers import chat_server, live_server
from tests.support.waiting import wait_until

SIZE = 256
FAST = {"num_inference_steps": 1}
KLEIN = "/api/v1/enterprise/flux_klein/text2img"
ERROR_KEYS = {"message", "type", "param", "code"}


def sdk(live, api_key: str | None = None, **kwargs) -> OpenAI:
    """The official client aimed at ``live``; no retries unless asked (errors are asserted at once)."""
    kwargs.setdefault("max_retries", 0)
    return OpenAI(base_url=live.base_url + "/v1", api_key=api_key or live.key, timeout=120, **kwargs)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def latest_job(live) -> Job:
    with live.jobs._sessions() as session:
        return session.scalars(select(Job).order_by(Job.id.desc()).limit(1)).one()


def jobs_of(live, model: str) -> list[Job]:
    with live.jobs._sessions() as session:
        return list(session.scalars(select(Job).where(Job.model == model)))


def openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """Asserts OpenAI's error shape and returns its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error")
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- generations ------------------------------------------------------------------------------------
def test_generate_b64_json_two_images(server):
    result = sdk(server).images.generate(model="flux-klein", prompt="a red fox", n=2, size="256x256",
                                         response_format="b64_json", extra_body=FAST)
    assert isinstance(result.created, int) and result.created > 1_700_000_000
    assert len(result.data) == 2
    images = [decoded(item.b64_json) for item in result.data]
    assert all(image.size == (SIZE, SIZE) for image in images)
    assert all(item.url is None and item.revised_prompt is None for item in result.data)
    assert images[0].tobytes() != images[1].tobytes()  # image i uses seed + i
    job = latest_job(server)
    assert job.server == "openai" and job.model == "flux-klein" and job.status == "succeeded"


def test_generate_url_any_case_alias_and_defaults(server):
    result = sdk(server).images.generate(model="FLUX-2-Klein", prompt="a lighthouse", size="256x256", extra_body=FAST)
    assert len(result.data) == 1 and result.data[0].b64_json is None
    response = httpx.get(result.data[0].url, timeout=60)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    assert latest_job(server).model == "flux-klein"
    # no model: the default (flux-klein); "auto" size: 512²
    auto = sdk(server).images.generate(prompt="a lighthouse", size="auto", response_format="b64_json", extra_body=FAST)
    assert decoded(auto.data[0].b64_json).size == (512, 512)
    assert latest_job(server).model == "flux-klein"


def test_seed_extension_reproduces_bit_for_bit(server):
    client = sdk(server)

    def one(seed: int) -> bytes:
        result = client.images.generate(model="flux", prompt="a cat on a bench", size="256x256", response_format="b64_json",
                                        extra_body={"seed": seed, "num_inference_steps": 2})
        return decoded(result.data[0].b64_json).tobytes()

    first = one(7)
    assert one(7) == first
    assert one(8) != first
    assert latest_job(server).meta["seeds"] == [8]


# -- edits ------------------------------------------------------------------------------------------
def transparent_square_mask(side: int = SIZE) -> Image.Image:
    """Opaque (keep) with a fully transparent (edit) square over the middle half: OpenAI's mask."""
    mask = Image.new("RGBA", (side, side), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return mask


def test_edit_with_mask_keeps_the_opaque_pixels(server, tmp_path):
    init = make_test_image()
    (tmp_path / "a.png").write_bytes(png_bytes(init))
    (tmp_path / "mask.png").write_bytes(png_bytes(transparent_square_mask()))
    with open(tmp_path / "a.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
        result = sdk(server).images.edit(image=image, mask=mask, prompt="a red square", size="256x256",
                                         response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 3})
    out = np.asarray(decoded(result.data[0].b64_json).convert("RGB"), dtype=np.int16)
    before = np.asarray(init, dtype=np.int16)
    edit = np.zeros((SIZE, SIZE), bool)
    edit[SIZE // 4:3 * SIZE // 4, SIZE // 4:3 * SIZE // 4] = True
    edge = np.zeros_like(edit)  # two pixels either side of the square's border
    edge[SIZE // 4 - 2:3 * SIZE // 4 + 2, SIZE // 4 - 2:3 * SIZE // 4 + 2] = True
    edge[SIZE // 4 + 2:3 * SIZE // 4 - 2, SIZE // 4 + 2:3 * SIZE // 4 - 2] = False
    assert np.abs(out - before)[~edit & ~edge].max() <= 2, "pixels outside the transparent area changed"
    assert np.abs(out - before)[edit & ~edge].mean() > 10, "nothing was repainted inside the transparent area"
    job = latest_job(server)
    assert job.task == "inpaint" and job.model == "flux-klein" and job.server == "openai"
    assert job.meta["init_image"] == "upload:a.png" and job.meta["mask_image"] == "upload:mask.png"


def test_edit_with_several_images_uses_them_all(server, tmp_path):
    """klein takes up to 4 references (sent by the SDK as repeated image[] fields); auto size is the
    first image's size."""
    paths = []
    for index, (width, height) in enumerate([(384, 256), (256, 256), (256, 384)]):
        path = tmp_path / f"ref{index}.png"
        path.write_bytes(png_bytes(make_test_image(width, height, seed=index)))
        paths.append(path)
    files = [open(path, "rb") for path in paths]
    try:
        result = sdk(server).images.edit(image=files, prompt="the three together", model="flux-klein",
                                         response_format="b64_json", extra_body=FAST)
    finally:
        for file in files:
            file.close()
    assert decoded(result.data[0].b64_json).size == (384, 256)
    job = latest_job(server)
    assert job.task == "img2img" and len(job.params["inputs"]) == 3
    assert job.meta["init_image"] == ["upload:ref0.png", "upload:ref1.png", "upload:ref2.png"]
    # a model that takes one image refuses three, naming those that take them
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server).images.edit(image=[path.read_bytes() for path in paths], prompt="x", model="flux")
    assert refused.value.body["param"] == "image" and "flux-klein" in refused.value.body["message"]


def test_edit_repeated_plain_image_fields_over_http(server):
    """Clients that repeat a plain ``image`` field (curl -F image=@a -F image=@b) work too."""
    files = [("image", ("a.png", png_bytes(make_test_image()), "image/png")),
             ("image", ("b.png", png_bytes(make_test_image(seed=2)), "image/png"))]
    response = httpx.post(f"{server.base_url}/v1/images/edits", headers={"Authorization": f"Bearer {server.key}"},
                          files=files, data={"prompt": "both", "num_inference_steps": "1", "size": "256x256"}, timeout=120)
    assert response.status_code == 200, response.text
    assert set(response.json()["data"][0]) == {"url"}
    assert len(latest_job(server).params["inputs"]) == 2


@pytest.mark.parametrize("files,data,message", [
    ([], {"prompt": "x"}, "image is required"),
    ([("image", ("a.png", b"this is text, not a picture", "image/png"))], {"prompt": "x"},
     "Unable to decode the uploaded image: not a valid image file"),
    ([("image", ("a.png", b"", "image/png")), ], {"prompt": "x"}, "Unable to decode the uploaded image: the file is empty"),
    ([("image", ("a.png", png_bytes(make_test_image()), "image/png")),
      ("mask", ("m.png", png_bytes(Image.new("L", (SIZE, SIZE), 255)), "image/png"))], {"prompt": "x"},
     "The mask has no transparency"),
    ([("image", ("a.png", png_bytes(make_test_image()), "image/png"))], {}, "prompt is required"),
], ids=["no-image", "not-an-image", "empty", "mask-without-alpha", "no-prompt"])
def test_edit_refusals(server, files, data, message):
    response = httpx.post(f"{server.base_url}/v1/images/edits", headers={"Authorization": f"Bearer {server.key}"},
                          files=files or None, data=data, timeout=60)
    error = openai_error(response, 400, param=None if message.startswith(("Unable", "The mask")) else
                         "image" if "image" in message else "prompt")
    assert error["message"].startswith(message), error


# -- models -----------------------------------------------------------------------------------------
def test_models_list_and_retrieve(server):
    client = sdk(server)
    listed = client.models.list()
    assert [model.id for model in listed.data] == sorted(DEFAULT_REGISTRY)
    assert all(model.object == "model" and model.owned_by == "fluxserve" for model in listed.data)
    assert client.models.retrieve("FLUX-DEV").id == "flux"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


# -- errors through the SDK's own exception types ---------------------------------------------------
def test_sdk_exception_types(server):
    with pytest.raises(openai.AuthenticationError) as bad_key:
        sdk(server, api_key="fs_wrong").images.generate(prompt="x", size="256x256")
    assert bad_key.value.status_code == 401 and bad_key.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk(server).images.generate(prompt="x", size="300x300")
    assert bad_size.value.param == "size" and "divisible by 8" in bad_size.value.message
    with pytest.raises(openai.BadRequestError, match="between 256 and 1024"):
        sdk(server).images.generate(prompt="x", size="1536x1024")
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk(server).images.generate(model="dall-e-3", prompt="x", size="256x256")
    assert unknown.value.code == "model_not_found" and "flux-klein" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as unable:  # FLUX.1 Fill only inpaints
        sdk(server).images.generate(model="flux-fill", prompt="x", size="256x256")
    assert unable.value.param == "model" and "flux-klein" in unable.value.message


@pytest.mark.parametrize("body,param,message", [
    ({"prompt": "x", "size": "big"}, "size", "Invalid size 'big'"),
    ({"prompt": "x", "size": "256x1032"}, "size", "Invalid size '256x1032': height must be between 256 and 1024"),
    ({"prompt": "x", "n": 5}, "n", "n must be between 1 and 4"),
    ({"prompt": "x", "n": "two"}, "n", "n must be an integer"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format", "Invalid response_format"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "num_inference_steps must be between 1 and 50"),
    ({"prompt": "x", "stream": True}, "stream", "stream is not supported"),
    ({"prompt": "a\x00b"}, "prompt", "prompt must not contain control characters"),
    ({"n": 1}, "prompt", "prompt is required"),
], ids=["size-words", "size-range", "n-range", "n-type", "format", "steps", "stream", "control", "no-prompt"])
def test_generation_refusals_over_http(server, body, param, message):
    response = httpx.post(f"{server.base_url}/v1/images/generations", json=body,
                          headers={"Authorization": f"Bearer {server.key}"}, timeout=60)
    error = openai_error(response, 400, param=param)
    assert error["message"].startswith(message), error


def test_error_shapes_over_http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        openai_error(http.post("/v1/images/generations", json={"prompt": "x"}), 401, code="invalid_api_key")
        openai_error(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
        upload = {"image": ("a.png", png_bytes(make_test_image()), "image/png")}  # a form, no key: read once, still 401
        openai_error(http.post("/v1/images/edits", files=upload, data={"prompt": "x"}), 401, code="invalid_api_key")
        openai_error(http.post("/v1/images/generations", data={"prompt": "x"}), 401, code="invalid_api_key")
        auth = {"Authorization": f"Bearer {server.key}"}
        invalid = openai_error(http.post("/v1/images/generations", content=b"{not json", headers={
            **auth, "Content-Type": "application/json"}), 400)
        assert invalid["message"] == "Request body is not valid JSON"
        openai_error(http.post("/v1/images/generations", json={"prompt": "x", "model": "nope"}, headers=auth), 404,
                     param="model", code="model_not_found")
        openai_error(http.get("/v1/no-such-route", headers=auth), 404)
        openai_error(http.get("/v1/images/generations", headers=auth), 405)
        # the ModelsLab paths keep their own shape
        modelslab = http.post(KLEIN, json={"key": "nope", "prompt": "x"})
        assert modelslab.status_code == 401 and modelslab.json() == {"status": "error", "message": "Invalid API key"}


# -- limits, failures, waiting and the admin endpoints ---------------------------------------------
@pytest.fixture(scope="module")
def tight(tmp_path_factory, tiny_root):
    """One queued request per key, answers without waiting, small bodies."""
    with live_server(tmp_path_factory.mktemp("openai-tight"), tiny_root, max_queued_per_key=1, sync_wait_seconds=0,
                     openai_wait_seconds=0, max_body_bytes=65536) as live:
        yield live


def slow_job(live, key: str) -> int:
    """A ModelsLab job that keeps the worker busy for a while."""
    body = {"key": key, "prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 20,
            "safety_checker": False, "instant_response": True}
    answer = httpx.post(live.base_url + KLEIN, json=body, timeout=60).json()
    wait_until(lambda: live.jobs.get(answer["id"]).status == "running", 30, "the slow job to start")
    return answer["id"]


def test_wait_bound_queue_limit_and_admin_visibility(tight):
    slow = slow_job(tight, tight.other_key)
    auth = {"Authorization": f"Bearer {tight.key}"}
    with httpx.Client(base_url=tight.base_url, timeout=60) as http:
        # not ready within FLUXSERVE_OPENAI_WAIT_SECONDS (0 here): 504 naming the request to fetch, no retry
        once = {**auth, "Idempotency-Key": "lighthouse-1"}
        late = http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", **FAST}, headers=once)
        error = openai_error(late, 504, code="timeout")
        assert late.headers["x-should-retry"] == "false"
        job_id = latest_job(tight).id
        assert f"request {job_id} is still queued" in error["message"] and f"/fetch/{job_id}" in error["message"]
        assert tight.jobs.get(job_id).server == "openai"
        # sent again with the same Idempotency-Key: the same job, waited for again (no second job)
        again = http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", **FAST}, headers=once)
        assert f"request {job_id} is still queued" in openai_error(again, 504, code="timeout")["message"]
        assert again.headers["Idempotent-Replayed"] == "true" and latest_job(tight).id == job_id
        other = http.post("/v1/images/generations", json={"prompt": "other", "size": "256x256"}, headers=once)
        openai_error(other, 409)
        # the key's queue limit (1) applies to OpenAI requests too: the SDK raises RateLimitError
        with pytest.raises(openai.RateLimitError) as limited:
            sdk(tight).images.generate(prompt="y", size="256x256", extra_body=FAST)
        assert limited.value.code == "rate_limit_exceeded"
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert limited.value.body["message"] == "Rate limit exceeded. Maximum 1 queued requests allowed."
        # an ordinary job: counted by system_details, cancelled by clear_queue, fetched with the ModelsLab routes
        admin = {"key": tight.admin_key}
        details = http.post("/api/v1/enterprise/flux_klein/system_details", json=admin).json()
        assert details["queue_depth"] >= 1
        cleared = http.post("/api/v1/enterprise/flux_klein/clear_queue", json=admin).json()
        assert job_id in cleared["cancelled"]
        fetched = http.post(f"/api/v6/images/fetch/{job_id}", json={"key": tight.key})
        assert fetched.status_code == 200 and fetched.json()["status"] == "failed"  # ModelsLab serves a cancelled job
        assert tight.jobs.get(slow).status in ("running", "succeeded")


def test_body_too_large_is_openai_shaped_on_v1_only(tight):
    big = {"image": ("a.png", b"\0" * 70_000, "image/png")}
    with httpx.Client(base_url=tight.base_url, timeout=60) as http:
        response = http.post("/v1/images/edits", files=big, data={"prompt": "x"},
                             headers={"Authorization": f"Bearer {tight.key}"})
        openai_error(response, 413, code="request_too_large")
        modelslab = http.post(KLEIN, content=json.dumps({"key": tight.key, "prompt": "x" * 70_000}))
        assert modelslab.status_code == 413 and modelslab.json()["status"] == "error"


def test_rate_limit_per_key_is_openai_shaped_with_retry_after(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, rate_limit_per_key="2/minute") as live:
        client = sdk(live)
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            client.models.list()
        assert 1 <= int(limited.value.response.headers["Retry-After"]) <= 60
        assert limited.value.body["type"] == "requests"


@pytest.fixture(scope="module")
def fake_llm():
    """An OpenAI-compatible chat endpoint on loopback (the enhance_prompt rewriter)."""
    with chat_server("a fox, golden hour") as (url, _seen):
        yield url


@pytest.fixture(scope="module")
def odd(tmp_path_factory, tiny_root, fake_llm):
    """A prompt rewriter that answers, and a model whose weights are missing (its jobs fail)."""
    data = tmp_path_factory.mktemp("openai-odd")
    broken = {"flux": {"source": str(data / "no-such-weights")}}
    with live_server(data / "data", tiny_root, enhance_openai_base_url=fake_llm, model_overrides=broken) as live:
        yield live


def test_revised_prompt(odd):
    result = sdk(odd).images.generate(prompt="a fox", size="256x256", extra_body={"enhance_prompt": True, **FAST})
    assert result.data[0].revised_prompt == "a fox, golden hour"
    plain = sdk(odd).images.generate(prompt="a fox", size="256x256", extra_body=FAST)
    assert plain.data[0].revised_prompt is None


def test_failed_job_answers_500_with_its_message_and_no_retry(odd):
    """(A retry by the SDK would queue the same failure again.)"""
    with pytest.raises(openai.InternalServerError) as failed:
        sdk(odd, max_retries=2).images.generate(model="flux", prompt="a fox", size="256x256", extra_body=FAST)
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert failed.value.code == "generation_failed"
    job = latest_job(odd)
    assert job.status == "failed" and failed.value.body["message"] == job.error
    assert len(jobs_of(odd, "flux")) == 1  # not retried by the SDK


def test_cancelled_while_waiting_answers_410(odd):
    slow_job(odd, odd.other_key)
    outcome: dict = {}

    def call():
        try:
            sdk(odd).images.generate(prompt="never made", size="256x256", extra_body=FAST)
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    waiting = threading.Thread(target=call)
    waiting.start()
    job = wait_until(lambda: (j := latest_job(odd)).server == "openai" and j.status == "queued" and j, 30, "the job")
    cleared = httpx.post(odd.base_url + "/api/v1/enterprise/flux_klein/clear_queue", json={"key": odd.admin_key}).json()
    assert job.id in cleared["cancelled"]
    waiting.join(60)
    error = outcome["error"]
    assert error.status_code == 410 and error.code == "request_cancelled" and f"Request {job.id}" in error.body["message"]
