"""The official ModelsLab Python SDK (modelslab-py 0.2.3) pointed at a live fluxserve server.

Used exactly as a user would: build the SDK's ``Client`` with a fluxserve key, set its
``base_url`` to this server's ``/api/``, and call the realtime and image-editing helpers and
their ``fetch``.
"""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from modelslab_py.core.apis.community import Community
from modelslab_py.core.apis.realtime import Realtime
from modelslab_py.core.client import Client
from modelslab_py.schemas.community import Image2Image, Inpainting, Text2Image
from modelslab_py.schemas.realtime import RealtimeImage2ImageSchema, RealtimeInpaintingSchema, RealtimeText2ImageSchema
from PIL import Image

SIZE = 256
STEPS = 2
PROMPT = "a cat sitting on a bench"


def sdk_client(server, api_key: str | None = None, *, fetch_retry: int = 300, fetch_timeout: float = 0.1) -> Client:
    """An SDK client aimed at our server; the fetch loop sleeps ``fetch_timeout`` s between tries."""
    client = Client(api_key=api_key or server.key, fetch_retry=fetch_retry, fetch_timeout=fetch_timeout)
    client.base_url = server.base_url + "/api/"
    return client


def assert_pngs(urls: list[str], size: tuple[int, int] = (SIZE, SIZE), count: int = 1) -> list[bytes]:
    assert len(urls) == count, urls
    blobs = []
    for url in urls:
        response = httpx.get(url, timeout=60)
        assert response.status_code == 200, (url, response.text)
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG"
        assert image.size == size
        blobs.append(response.content)
    return blobs


def text_schema(**extra) -> RealtimeText2ImageSchema:
    return RealtimeText2ImageSchema(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, **extra)


def realtime_img2img_schema(image_host: str, **extra) -> RealtimeImage2ImageSchema:
    return RealtimeImage2ImageSchema(
        prompt=PROMPT, init_image=f"{image_host}/a.png", width=SIZE, height=SIZE, num_inference_steps=STEPS,
        strength=0.6, **extra,
    )


def kontext_schema(image_host: str, **extra) -> Image2Image:
    return Image2Image(
        model_id="flux-kontext-dev", prompt="make the cat wear a hat", init_image=f"{image_host}/a.png",
        width=SIZE, height=SIZE, num_inference_steps=STEPS, **extra,
    )


# -- realtime: enterprise (/api/v1/enterprise/realtime/...) and v6 (/api/v6/realtime/...) -------
@pytest.mark.parametrize("enterprise", [True, False], ids=["enterprise", "v6"])
def test_realtime_text_to_image_and_fetch(server, enterprise):
    api = Realtime(sdk_client(server), enterprise=enterprise)
    expected_prefix = "v1/enterprise/realtime/" if enterprise else "v6/realtime/"
    assert api.base_url == f"{server.base_url}/api/{expected_prefix}"

    result = api.text_to_image(text_schema(seed=11))
    assert result["status"] == "success", result
    assert isinstance(result["id"], int)
    assert result["meta"]["width"] == SIZE and result["meta"]["height"] == SIZE
    assert result["meta"]["seed"] == 11 and result["meta"]["num_inference_steps"] == STEPS
    assert_pngs(result["output"])

    fetched = api.fetch(str(result["id"]))
    assert fetched["status"] == "success", fetched
    assert fetched["id"] == result["id"]
    assert fetched["output"] == result["output"]


@pytest.mark.parametrize("enterprise", [True, False], ids=["enterprise", "v6"])
def test_realtime_image_to_image_and_fetch(server, image_host, enterprise):
    api = Realtime(sdk_client(server), enterprise=enterprise)
    result = api.image_to_image(realtime_img2img_schema(image_host, seed=12))
    assert result["status"] == "success", result
    assert result["meta"]["strength"] == 0.6
    assert result["meta"]["init_image"] == f"{image_host}/a.png"
    assert_pngs(result["output"])

    fetched = api.fetch(str(result["id"]))
    assert fetched["status"] == "success", fetched
    assert fetched["output"] == result["output"]


def test_realtime_samples_and_base64_through_the_sdk(server):
    """The schema's own ``samples`` and boolean ``base64`` fields are honoured."""
    api = Realtime(sdk_client(server), enterprise=True)
    result = api.text_to_image(text_schema(seed=5, samples=2, base64=True))
    assert result["status"] == "success", result
    assert result["meta"]["base64"] == "yes" and result["meta"]["seeds"] == [5, 6]
    blobs = assert_pngs(result["proxy_links"], count=2)
    # output holds the URLs of .base64 text files (ModelsLab's way): GET and decode gives the PNGs
    assert [base64.b64decode(httpx.get(url).text) for url in result["output"]] == blobs


# -- image editing: Flux Kontext through Community (/api/v6/images/img2img) --------------------------
def test_community_kontext_image_to_image_and_fetch(server, image_host):
    api = Community(sdk_client(server))
    assert api.base_url == f"{server.base_url}/api/v6/images/"
    result = api.image_to_image(kontext_schema(image_host, seed=21))
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == "flux-kontext-dev"
    assert result["meta"]["num_inference_steps"] == STEPS
    assert_pngs(result["output"])

    fetched = api.fetch(str(result["id"]))
    assert fetched["status"] == "success", fetched
    assert fetched["output"] == result["output"]


# -- Community: FLUX.1 text-to-image, image-to-image and inpainting by model_id ------------------------
@pytest.mark.parametrize("enterprise", [False, True], ids=["v6", "enterprise"])
def test_community_flux_text_to_image_and_fetch(server, enterprise):
    """The SDK docs' own call: Community(...).text_to_image with model_id "flux"."""
    api = Community(sdk_client(server), enterprise=enterprise)
    assert api.base_url == f"{server.base_url}/api/" + ("v1/enterprise/images/" if enterprise else "v6/images/")
    result = api.text_to_image(Text2Image(model_id="flux", prompt=PROMPT, width=SIZE, height=SIZE, samples=2,
                                          num_inference_steps=STEPS, seed=31, safety_checker="no"))
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == "flux" and result["meta"]["seeds"] == [31, 32]
    assert result["meta"]["safety_checker"] == "no"
    assert_pngs(result["output"], count=2)
    fetched = api.fetch(str(result["id"]))
    assert fetched["status"] == "success" and fetched["output"] == result["output"]


@pytest.mark.parametrize("enterprise", [False, True], ids=["v6", "enterprise"])
def test_community_flux_inpainting(server, image_host, enterprise):
    api = Community(sdk_client(server), enterprise=enterprise)
    result = api.inpainting(Inpainting(model_id="flux", prompt=PROMPT, init_image=f"{image_host}/a.png",
                                       mask_image=f"{image_host}/mask.png", width=SIZE, height=SIZE,
                                       num_inference_steps=STEPS))
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == "flux" and result["meta"]["mask_image"] == f"{image_host}/mask.png"
    assert_pngs(result["output"])


def test_community_flux_image_to_image_on_v6(server, image_host):
    """/api/v6/images/img2img with model_id "flux" is FLUX.1 image-to-image."""
    result = Community(sdk_client(server)).image_to_image(Image2Image(
        model_id="flux", prompt=PROMPT, init_image=f"{image_host}/a.png", width=SIZE, height=SIZE,
        num_inference_steps=STEPS))
    assert result["status"] == "success" and result["meta"]["model_id"] == "flux", result
    assert_pngs(result["output"])


@pytest.mark.parametrize("enterprise", [True, False], ids=["enterprise", "v6"])
def test_realtime_inpainting_and_fetch(server, image_host, enterprise):
    api = Realtime(sdk_client(server), enterprise=enterprise)
    result = api.inpainting(RealtimeInpaintingSchema(
        prompt=PROMPT, init_image=f"{image_host}/a.png", mask_image=f"{image_host}/mask.png", width=SIZE,
        height=SIZE, num_inference_steps=STEPS, strength=0.9, seed=4))
    assert result["status"] == "success", result
    assert result["meta"]["model_id"] == "realtime" and result["meta"]["strength"] == 0.9
    assert_pngs(result["output"])
    assert api.fetch(str(result["id"]))["output"] == result["output"]


# -- instant_response (an extra field the schemas let through) then fetch until success -----------
def _instant(server, image_host, helper: str):
    client = sdk_client(server)
    if helper == "realtime-enterprise":
        api = Realtime(client, enterprise=True)
        return api, api.text_to_image(text_schema(instant_response=True))
    if helper == "realtime-v6":
        api = Realtime(client, enterprise=False)
        return api, api.image_to_image(realtime_img2img_schema(image_host, instant_response=True))
    api = Community(client)
    return api, api.image_to_image(kontext_schema(image_host, instant_response=True))


@pytest.mark.parametrize("helper", ["realtime-enterprise", "realtime-v6", "community-kontext"])
def test_instant_response_then_sdk_fetch_until_success(server, image_host, helper):
    api, queued = _instant(server, image_host, helper)
    assert queued["status"] == "processing", queued
    assert queued["output"] == [] and len(queued["future_links"]) == 1
    assert queued["fetch_result"] == f"{api.base_url}fetch/{queued['id']}"

    done = api.fetch(str(queued["id"]))  # the SDK's own retry loop
    assert done["status"] == "success", done
    assert done["id"] == queued["id"]
    assert done["output"] == queued["future_links"]
    assert_pngs(done["output"])


# -- errors surface as the SDK's exception ------------------------------------------------------------
def test_wrong_api_key_raises_the_sdk_exception(server, image_host):
    client = sdk_client(server, api_key="fs_not-a-real-key")
    for call in (
        lambda: Realtime(client, enterprise=True).text_to_image(text_schema()),
        lambda: Realtime(client, enterprise=False).image_to_image(realtime_img2img_schema(image_host)),
        lambda: Community(client).image_to_image(kontext_schema(image_host)),
        lambda: Realtime(client, enterprise=True).fetch("1"),
    ):
        with pytest.raises(Exception, match="Invalid API key") as info:
            call()
        assert "401" in str(info.value)


def test_fetch_of_another_users_job_raises(server):
    mine = Realtime(sdk_client(server), enterprise=True).text_to_image(text_schema())
    assert mine["status"] == "success", mine
    other = Realtime(sdk_client(server, api_key=server.other_key, fetch_retry=1), enterprise=True)
    with pytest.raises(Exception, match="Request not found"):
        other.fetch(str(mine["id"]))
