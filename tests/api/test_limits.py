"""Hostile requests: huge or slow bodies, control characters and odd unicode in every field,
rate limits per address and per key, CORS."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.servers import live_server

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
KONTEXT = "/api/v6/images/img2img"


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("limits"), tiny_root, max_body_bytes=4096, body_timeout_seconds=1,
                     sync_wait_seconds=0, rate_limit_per_key="", rate_limit_per_address="",
                     cors_origins=["https://app.example.test"]) as live:
        yield live


def test_body_over_the_cap_by_content_length(strict):
    with strict.client() as client:
        body = json.dumps({"key": strict.key, "prompt": "x" * 5000})
        response = client.post(KLEIN, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json() == {"status": "error", "message": "Request body too large (at most 4096 bytes)"}


def test_body_over_the_cap_while_streaming(strict):
    def chunks():
        yield b'{"key": "' + strict.key.encode() + b'", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    with strict.client() as client:
        response = client.post(KLEIN, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["status"] == "error"


def test_slow_body_is_cut_off(strict):
    host, port = strict.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a server that waited forever fails here
        sock.sendall(f"POST {KLEIN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"key\":".encode())
        reply = b""
        while chunk := sock.recv(65536):  # the server answers and closes
            reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408")
    assert json.loads(reply.split("\r\n\r\n", 1)[1]) == {"status": "error",
                                                         "message": "Request body not received within 1 seconds"}


TEXT_FIELDS = ["prompt", "negative_prompt", "track_id", "webhook", "model_id", "init_image", "init_image_2", "key"]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("bad,message", [("a\x00b", "must not contain control characters"),
                                         ("a\x1bb", "must not contain control characters"),
                                         ("a\ud800b", "must be valid Unicode text")],
                         ids=["nul", "escape", "lone-surrogate"])
def test_control_characters_and_broken_unicode_in_every_field(strict, image_host, field, bad, message):
    body = {"key": strict.key, "prompt": "a cat", "model_id": "flux-kontext-dev", "init_image": f"{image_host}/a.png",
            "width": 256, "height": 256, "num_inference_steps": 1}
    body[field] = bad
    before = strict.job_count()
    with strict.client() as client:
        raw = json.dumps(body)  # json.dumps escapes the surrogate as \ud800, as a hostile client would send it
        response = client.post(KONTEXT, content=raw, headers={"content-type": "application/json"})
    assert strict.job_count() == before
    if field == "key":
        assert response.status_code == 401 and response.json() == {"status": "error", "message": "Invalid API key"}
    else:
        assert response.status_code == 400
        assert response.json() == {"status": "error", "message": f"{field} {message}"}


@pytest.mark.parametrize("prompt", ["一只坐在长椅上的猫", "قطة تجلس على مقعد", "🐱 on a bench ✨", "cafe\u0301 zero\u200bwidth",
                                    "tabs\tand\nnewlines"])
def test_unicode_prompts_are_accepted_and_kept(strict, prompt):
    with strict.client() as client:
        answer = client.post(KLEIN, json={"key": strict.key, "prompt": prompt, "width": 256, "height": 256,
                                          "num_inference_steps": 1}).json()
    assert answer["status"] == "processing" and answer["meta"]["prompt"] == prompt.strip()


@pytest.mark.parametrize("field,value,message", [
    ("prompt", "x" * 8001, "prompt is too long (at most 8000 characters)"),
    ("negative_prompt", "x" * 8001, "negative_prompt is too long (at most 8000 characters)"),
    ("track_id", "t" * 201, "track_id is too long (at most 200 characters)"),
    ("webhook", "http://h/" + "p" * 2048, "webhook is too long (at most 2048 characters)"),
])
def test_length_caps(tmp_path, tiny_root, field, value, message):
    with live_server(tmp_path, tiny_root, sync_wait_seconds=0) as live, live.client() as client:
        response = client.post(KLEIN, json={"key": live.key, "prompt": "a", field: value})
        assert response.status_code == 400 and response.json() == {"status": "error", "message": message}


def test_rate_limits_per_address_and_per_key(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, rate_limit_per_key="3/minute", rate_limit_per_address="5/minute") as live:
        with live.client() as client:
            fetch = "/api/v1/enterprise/flux/fetch/1"
            codes = [client.post(fetch, json={"key": live.key}).status_code for _ in range(3)]
            assert codes == [404, 404, 404]
            by_key = client.post(fetch, json={"key": live.key})  # 4th for the key: over 3/minute
            assert by_key.status_code == 429
            assert by_key.json()["message"] == "Rate limit exceeded: at most 3 per 1 minute per key."
            assert client.post(fetch, json={"key": live.other_key}).status_code == 404  # 5th from the address
            by_address = client.post(fetch, json={"key": "wrong"})  # 6th: refused before the key is even checked
            assert by_address.status_code == 429
            body = by_address.json()
            assert body["message"] == "Rate limit exceeded: at most 5 per 1 minute per client address."
            assert 1 <= body["retry_after"] <= 60
            assert client.get("/health").status_code == 200  # outside /api/: not limited


def test_rate_limit_per_key_message(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, rate_limit_per_key="2/minute", rate_limit_per_address="") as live:
        with live.client() as client:
            fetch = "/api/v1/enterprise/flux/fetch/1"
            [client.post(fetch, json={"key": live.key}) for _ in range(2)]
            limited = client.post(fetch, json={"key": live.key})
            assert limited.status_code == 429
            assert limited.json()["message"] == "Rate limit exceeded: at most 2 per 1 minute per key."
            assert client.post(fetch, json={"key": live.other_key}).status_code == 404  # other keys unaffected


def test_cors_off_by_default_and_on_when_configured(server, strict):
    preflight = {"Origin": "https://app.example.test", "Access-Control-Request-Method": "POST"}
    with server.client() as client:
        response = client.options(KLEIN, headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with strict.client() as client:
        response = client.options(KLEIN, headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example.test"
        other = client.options(KLEIN, headers={**preflight, "Origin": "https://evil.example.test"})
        assert "access-control-allow-origin" not in other.headers
