"""Every JSON answer ends with "\n" (so that curl's output doesn't glue the shell prompt to it),
with a Content-Length that matches; event streams and files are untouched."""

from __future__ import annotations

import http.client

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fluxserve.api.errors import install_error_handlers
from fluxserve.api.json_newline import JsonNewlineMiddleware


def assert_json_line(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.content.endswith(b"}\n") or response.content.endswith(b"]\n"), response.content[-40:]
    assert not response.content.endswith(b"\n\n")
    assert int(response.headers["content-length"]) == len(response.content)
    response.json()  # still one JSON document


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/health", {}, 200),
    ("GET", "/api/fluxserve/catalog", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("GET", "/no/such/route", {}, 404),
    ("GET", "/outputs/no-such-file.png", {}, 404),
    ("POST", "/api/v1/enterprise/flux_klein/text2img", {"json": {"prompt": "x"}}, 401),
    ("POST", "/api/v1/enterprise/flux_klein/text2img", {"content": b"{not json"}, 400),
    ("GET", "/v1/models", {}, 401),
    ("POST", "/v1/images/generations", {"json": {"prompt": 5}}, 401),
])
def test_answers_and_refusals_end_with_a_newline(client, method, path, kwargs, status):
    assert_json_line(client.request(method, path, **kwargs), status)


def test_validation_errors_turned_400_end_with_a_newline(server, client):
    response = client.post("/api/v1/enterprise/flux_klein/text2img", json={"key": server.key, "prompt": "x", "width": 7})
    assert_json_line(response, 400)
    openai = client.post("/v1/images/generations", json={"prompt": "x", "n": 99},
                         headers={"Authorization": f"Bearer {server.key}"})
    assert_json_line(openai, 400)
    assert "error" in openai.json()


def test_a_middleware_refusal_ends_with_a_newline(server):
    """413 from the body limit, before any route: the declared length alone is too much."""
    url = httpx.URL(server.base_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        connection.putrequest("POST", "/api/v1/enterprise/flux_klein/text2img")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()
        answer = connection.getresponse()
        content = answer.read()
    finally:
        connection.close()
    assert answer.status == 413 and answer.getheader("content-type").startswith("application/json")
    assert content.endswith(b"}\n") and int(answer.getheader("content-length")) == len(content)


def test_generation_fetch_and_openai_answers_end_with_a_newline_files_and_streams_do_not(server, client):
    body = {"key": server.key, "prompt": "a fox", "width": 256, "height": 256, "num_inference_steps": 1, "seed": 3}
    answer = client.post("/api/v1/enterprise/flux_klein/text2img", json=body)
    assert_json_line(answer, 200)
    job = answer.json()
    assert job["status"] == "success"
    assert_json_line(client.post(f"/api/v1/enterprise/flux_klein/fetch/{job['id']}", json={"key": server.key}), 200)
    assert_json_line(client.get("/v1/models", headers={"Authorization": f"Bearer {server.key}"}), 200)

    picture = client.get(job["output"][0])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.endswith(b"IEND\xaeB`\x82")  # the PNG as written, nothing appended
    assert int(picture.headers["content-length"]) == len(picture.content)

    stream = client.get(f"/api/fluxserve/jobs/{job['id']}/events", headers={"Key": server.key})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.startswith("event:") and "data: {" in stream.text


def test_an_unhandled_error_500_ends_with_a_newline():
    """Starlette answers it from outside every middleware: the response class does it itself."""
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(JsonNewlineMiddleware)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/boom")
    assert response.status_code == 500
    assert response.content.endswith(b"}\n") and int(response.headers["content-length"]) == len(response.content)


def test_a_json_body_sent_in_pieces_gets_one_newline_and_the_right_length():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": b'{"a":', "more_body": True})
        await send({"type": "http.response.body", "body": b' [1, 2]}', "more_body": False})

    response = TestClient(JsonNewlineMiddleware(app)).get("/")  # no lifespan: a bare ASGI app
    assert response.content == b'{"a": [1, 2]}\n' and response.headers["content-length"] == "14"
