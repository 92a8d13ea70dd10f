"""An init image that is one of the server's own outputs is read from its disk: it works with
the default fetch policy (which refuses loopback) and without any network, here behind a public
base URL that does not resolve at all."""

from __future__ import annotations

import pytest

from tests.support.servers import live_server

PUBLIC = "https://fluxserve.invalid"  # .invalid never resolves: a fetch of it could only fail
KLEIN = "/api/v1/enterprise/flux_klein/text2img"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def offline(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("own-outputs"), tiny_root, fetch_allow=[], public_base_url=PUBLIC) as live:
        yield live


def generate(live, client, **extra) -> dict:
    answer = client.post(KLEIN, json={"key": live.key, "prompt": "a red fox", "seed": 5, **SMALL, **extra})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "success", body
    return body


@pytest.mark.parametrize(("path", "extra"), [
    ("/api/v1/enterprise/realtime/img2img", {"strength": 0.7}),
    ("/api/v6/images/img2img", {"model_id": "flux-kontext-dev"}),
    ("/api/v1/enterprise/flux_klein/img2img", {"strength": 0.7}),
])
def test_an_output_url_is_an_init_image_without_a_fetch(offline, path, extra):
    with offline.client() as client:
        made = generate(offline, client)
        url = made["output"][0]
        assert url.startswith(f"{PUBLIC}/outputs/")
        edited = client.post(path, json={"key": offline.key, "prompt": "at night", "init_image": url, **SMALL, **extra})
    assert edited.status_code == 200, edited.text
    assert edited.json()["status"] == "success", edited.json()


def test_inpainting_with_an_output_as_image_and_another_as_mask(offline):
    with offline.client() as client:
        image = generate(offline, client)["output"][0]
        mask = generate(offline, client, prompt="a white square", seed=9)["output"][0]
        answer = client.post("/api/v1/enterprise/realtime/inpaint", json={
            "key": offline.key, "prompt": "a bench", "init_image": image, "mask_image": mask, **SMALL})
    assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text


def test_a_base64_output_url_is_decoded(offline):
    with offline.client() as client:
        made = generate(offline, client, base64=True)
        url = made["output"][0]
        assert url.endswith(".base64")
        edited = client.post("/api/v1/enterprise/realtime/img2img",
                             json={"key": offline.key, "prompt": "x", "init_image": url, **SMALL})
    assert edited.status_code == 200 and edited.json()["status"] == "success", edited.text


@pytest.mark.parametrize(("name", "says"), [
    ("00000000-0000-0000-0000-000000000000-0.png", "no such output on this server"),
    ("..%2Fsecret.key", "not an output of this server"),
    ("a/../../secret.key", "not an output of this server"),
])
def test_an_unknown_or_unsafe_output_name_is_a_400(offline, name, says):
    before = offline.job_count()
    with offline.client() as client:
        answer = client.post("/api/v1/enterprise/realtime/img2img",
                             json={"key": offline.key, "prompt": "x", "init_image": f"{PUBLIC}/outputs/{name}"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["status"] == "error" and says in answer.json()["message"]
    assert offline.job_count() == before


def test_other_urls_on_the_same_host_are_still_fetched_and_refused(offline):
    """Only /outputs/ is read locally; anything else is an ordinary URL under the fetch policy."""
    with offline.client() as client:
        answer = client.post("/api/v1/enterprise/realtime/img2img",
                             json={"key": offline.key, "prompt": "x", "init_image": f"{offline.base_url}/outputs/x.png"})
    assert answer.status_code == 400
    assert "FLUXSERVE_FETCH_ALLOW" in answer.json()["message"]
