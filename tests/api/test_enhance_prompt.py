"""enhance_prompt through the API: the rewritten prompt is used, both prompts are in meta, and a
failure falls back to the original prompt and says so."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.support.servers import chat_server, live_server

REALTIME = "/api/v1/enterprise/realtime/text2img"
ENHANCED = "a fluffy ginger cat on a weathered oak bench at golden hour, soft rim light, 35mm photo"


@pytest.fixture(scope="module")
def fake_llm():
    """An OpenAI-compatible chat endpoint on loopback."""
    with chat_server(ENHANCED) as (url, seen):
        yield url, seen


def body(key, **extra):
    return {"key": key, "prompt": "a cat on a bench", "width": 256, "height": 256, "num_inference_steps": 2,
            "seed": 5, **extra}


def pixels(client, url):
    return Image.open(io.BytesIO(client.get(url).content)).tobytes()


def test_enhanced_prompt_is_used_and_both_are_recorded(tmp_path, tiny_root, fake_llm):
    url, seen = fake_llm
    with live_server(tmp_path, tiny_root, enhance_openai_base_url=url, enhance_openai_model="test-model") as live:
        with live.client() as client:
            enhanced = client.post(REALTIME, json=body(live.key, enhance_prompt=True)).json()
            plain = client.post(REALTIME, json=body(live.key, enhance_prompt=False)).json()
            assert enhanced["status"] == "success"
            meta = enhanced["meta"]
            assert meta["enhance_prompt"] == "yes" and meta["enhance_prompt_status"] == "ok"
            assert meta["original_prompt"] == "a cat on a bench"
            assert meta["prompt"] == meta["enhanced_prompt"] == ENHANCED
            assert meta["enhance_prompt_source"] == "openai:test-model"
            assert seen[-1]["model"] == "test-model" and seen[-1]["messages"][-1]["content"] == "a cat on a bench"
            assert plain["meta"]["enhance_prompt"] == "no" and "original_prompt" not in plain["meta"]
            # same seed, different prompt: the rewritten prompt really drove the generation
            assert pixels(client, enhanced["output"][0]) != pixels(client, plain["output"][0])


def test_default_local_enhancer_records_its_outcome(server, client):
    """The default rewrites with the klein pipeline's own Qwen3 encoder. The tiny random encoder
    emits only blank lines, so here it falls back: the original prompt is used and meta says why."""
    result = client.post(REALTIME, json=body(server.key, enhance_prompt="yes")).json()
    assert result["status"] == "success"
    meta = result["meta"]
    assert meta["enhance_prompt"] == "yes" and meta["original_prompt"] == "a cat on a bench"
    if meta["enhance_prompt_status"] == "ok":
        assert meta["enhance_prompt_source"] == "qwen3-text-encoder" and meta["prompt"] == meta["enhanced_prompt"]
    else:
        assert meta["enhance_prompt_status"].startswith("failed, original prompt used: ")
        assert meta["prompt"] == "a cat on a bench"


def test_unreachable_enhancer_falls_back(tmp_path, tiny_root):
    with live_server(tmp_path, tiny_root, enhance_openai_base_url="http://127.0.0.1:9/v1",
                     enhance_timeout_seconds=2) as live, live.client() as client:
        result = client.post(REALTIME, json=body(live.key, enhance_prompt=True)).json()
        assert result["status"] == "success"
        assert result["meta"]["prompt"] == "a cat on a bench"
        assert result["meta"]["enhance_prompt_status"].startswith("failed, original prompt used: chat endpoint unreachable")
