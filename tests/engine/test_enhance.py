"""Prompt enhancement (fluxserve.engine.enhance): the klein pipeline's own Qwen3 text encoder
as a local rewriter, an OpenAI-compatible endpoint (a loopback fake), and the facade.

The tiny random-weight models produce gibberish; these tests check the mechanics (bounds,
determinism, fallbacks, leaving the pipeline untouched), not the quality of the rewrite.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fluxserve.engine.enhance import (
    LOCAL_SOURCE,
    SYSTEM_PROMPT,
    Enhanced,
    LocalQwenEnhancer,
    OpenAIEnhancer,
    PromptEnhancer,
    clean_output,
)

diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a cat sitting on a red chair"
API_KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models are a few kilobytes: intra-op threads only add overhead, and on a busy
    machine spinning OpenMP workers make them hundreds of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_klein(tiny_root):
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(str(tiny_root / "flux2-klein"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein(tiny_root):
    """The tiny klein pipeline exactly as built."""
    return _load_klein(tiny_root)


@pytest.fixture(scope="module")
def talking(tiny_root):
    """The tiny klein pipeline with a separate random LM head on its text encoder.

    The tiny encoder ties its LM head to its input embeddings, and with random weights that
    just repeats the last prompt token (the chat template's "\\n") forever: whitespace only.
    An untied random head makes it emit (deterministic) gibberish instead.  The pipeline reads
    hidden states only, never the LM head, so its images are unchanged.
    """
    pipe = _load_klein(tiny_root)
    encoder = pipe.text_encoder
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(encoder.lm_head.weight.shape, generator=generator)
    encoder.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    assert encoder.lm_head.weight is not encoder.model.embed_tokens.weight
    return pipe


def _image(pipe, seed: int = 7) -> np.ndarray:
    out = pipe(
        prompt=PROMPT,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    return np.asarray(out.images[0])


@contextmanager
def _spy_generate(model):
    """Record what ``model.generate`` returns (an instance attribute, removed afterwards)."""
    calls: list[dict] = []
    original = model.generate

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append({"kwargs": kwargs, "result": result})
        return result

    model.generate = spy
    try:
        yield calls
    finally:
        del model.generate
    assert "generate" not in vars(model)


# --------------------------------------------------------------------------------------
# local: the klein text encoder
# --------------------------------------------------------------------------------------


def test_local_enhancement_is_bounded_deterministic_and_ok(talking):
    enhancer = LocalQwenEnhancer()
    first = enhancer.enhance(talking, PROMPT)
    second = enhancer.enhance(talking, PROMPT)
    assert isinstance(first, Enhanced)
    assert first.ok is True and first.error is None
    assert first.source == LOCAL_SOURCE == "qwen3-text-encoder"
    assert first.original == PROMPT
    assert first.prompt and first.prompt != PROMPT
    assert len(first.prompt) <= 1000
    assert first.prompt == first.prompt.strip() and "  " not in first.prompt and "\n" not in first.prompt
    assert first.seconds >= 0
    assert second.prompt == first.prompt  # greedy decoding: deterministic


def test_local_generation_arguments(talking):
    encoder = talking.text_encoder
    with _spy_generate(encoder) as calls:
        LocalQwenEnhancer(max_new_tokens=7, max_seconds=3.0).enhance(talking, PROMPT)
    (call,) = calls
    kwargs = call["kwargs"]
    assert kwargs["max_new_tokens"] == 7 and kwargs["do_sample"] is False and kwargs["max_time"] == 3.0
    assert kwargs["attention_mask"].shape == kwargs["input_ids"].shape
    assert kwargs["pad_token_id"] is not None
    assert talking.tokenizer.convert_tokens_to_ids("<|im_end|>") in kwargs["eos_token_id"]
    prompt_text = talking.tokenizer.decode(kwargs["input_ids"][0])
    assert SYSTEM_PROMPT in prompt_text and PROMPT in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False


def test_max_new_tokens_is_respected(talking):
    encoder = talking.text_encoder
    with _spy_generate(encoder) as calls:
        short = LocalQwenEnhancer(max_new_tokens=5).enhance(talking, PROMPT)
    new_tokens = calls[0]["result"].shape[1] - calls[0]["kwargs"]["input_ids"].shape[1]
    assert 1 <= new_tokens <= 5
    full = LocalQwenEnhancer(max_new_tokens=120).enhance(talking, PROMPT)
    assert short.ok and full.ok
    assert len(short.prompt) < len(full.prompt)
    assert len(talking.tokenizer(short.prompt, add_special_tokens=False)["input_ids"]) <= 5 + 2


def test_character_cap(talking):
    capped = LocalQwenEnhancer(max_chars=20).enhance(talking, PROMPT)
    assert capped.ok and 0 < len(capped.prompt) <= 20


def test_max_seconds_bounds_generation(talking):
    started = time.perf_counter()
    result = LocalQwenEnhancer(max_new_tokens=10_000, max_seconds=0.01).enhance(talking, PROMPT)
    assert time.perf_counter() - started < 10  # generous: it must stop, not hang
    assert result.original == PROMPT
    if result.ok:
        assert result.prompt and len(result.prompt) <= 1000
    else:
        assert result.prompt == PROMPT and result.error


def test_enhancing_leaves_the_pipeline_unchanged(talking):
    encoder = talking.text_encoder
    config = encoder.config.to_dict()
    generation_config = encoder.generation_config.to_dict()
    before = _image(talking)
    assert LocalQwenEnhancer().enhance(talking, PROMPT).ok
    assert LocalQwenEnhancer(max_new_tokens=3).enhance(talking, "a dog").ok
    after = _image(talking)
    assert np.array_equal(before, after)  # bit-identical, same seed
    assert encoder.training is False
    assert encoder.config.to_dict() == config
    assert encoder.generation_config.to_dict() == generation_config
    assert all(not p.requires_grad or p.grad is None for p in encoder.parameters())


def test_a_train_mode_encoder_is_put_back_in_train_mode(talking):
    encoder = talking.text_encoder
    encoder.train()
    try:
        assert LocalQwenEnhancer(max_new_tokens=3).enhance(talking, PROMPT).ok
        assert encoder.training is True
    finally:
        encoder.eval()


def test_whitespace_only_output_falls_back(klein):
    # The unmodified tiny encoder (tied random head) only repeats the template's trailing "\n".
    result = LocalQwenEnhancer(max_new_tokens=8).enhance(klein, PROMPT)
    assert result.ok is False
    assert result.prompt == PROMPT == result.original
    assert result.source == LOCAL_SOURCE
    assert "empty" in result.error


class _Exploding(torch.nn.Module):
    def get_output_embeddings(self):
        return torch.nn.Linear(2, 2)

    def generate(self, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")


@pytest.mark.parametrize(
    "make_pipeline, error_part",
    [
        (lambda klein: object(), "text_encoder"),
        (lambda klein: types.SimpleNamespace(text_encoder=klein.text_encoder.model, tokenizer=klein.tokenizer), "causal"),
        (lambda klein: types.SimpleNamespace(text_encoder=_Exploding(), tokenizer=klein.tokenizer), "out of memory"),
        (lambda klein: types.SimpleNamespace(text_encoder=klein.text_encoder, tokenizer=None), "tokenizer"),
    ],
    ids=["no-encoder", "not-a-causal-lm", "generate-raises", "no-tokenizer"],
)
def test_broken_pipelines_fall_back(klein, make_pipeline, error_part):
    result = LocalQwenEnhancer().enhance(make_pipeline(klein), PROMPT)
    assert result.ok is False
    assert result.prompt == PROMPT == result.original
    assert error_part in result.error and len(result.error) <= 200


def test_empty_prompt_is_not_enhanced(talking):
    result = LocalQwenEnhancer().enhance(talking, "   ")
    assert result.ok is False and result.prompt == "   " and result.error == "empty prompt"


def test_clean_output():
    assert clean_output('  "<think>plan</think>\n A red\tfox,\n\n snowy forest. "  ') == "A red fox, snowy forest."
    assert clean_output("a\x00b\ufffd c\x7f") == "ab c"
    assert clean_output("word " * 50, max_chars=23) == "word word word word"
    assert clean_output("x" * 50, max_chars=10) == "x" * 10
    assert clean_output(" \n\t ") == ""


def test_local_validates_its_limits():
    for bad in ({"max_new_tokens": 0}, {"max_seconds": 0}, {"max_chars": 0}):
        with pytest.raises(ValueError):
            LocalQwenEnhancer(**bad)


# --------------------------------------------------------------------------------------
# OpenAI-compatible endpoint (loopback fake)
# --------------------------------------------------------------------------------------


class _FakeChat(http.server.BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``; the server's ``mode`` picks the behaviour."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        server.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
        mode = server.mode
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
        elif mode == "ok":
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": server.content}}]}
            self._send(200, json.dumps(reply).encode())
        elif mode == "parts":
            content = [{"type": "text", "text": "A tabby cat"}, {"type": "text", "text": "on a red chair."}]
            self._send(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())
        elif mode == "401":  # echoes the key, as some servers do
            self._send(401, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode())
        elif mode == "500":
            self._send(500, b'{"error": "boom"}')
        elif mode == "slow":
            time.sleep(2.0)
            self._send(200, b'{"choices": [{"message": {"content": "too late"}}]}')
        elif mode == "drip":  # headers at once, then one byte every 0.1 s for ~3 s
            payload = b'{"choices": [{"message": {"content": "' + b"x" * 30 + b'"}}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for i in range(len(payload)):
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        elif mode == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "unterminated')
        elif mode == "html":
            self._send(200, b"<html>gateway</html>", "text/html")
        elif mode == "no-choices":
            self._send(200, b'{"choices": []}')
        elif mode == "empty":
            self._send(200, b'{"choices": [{"message": {"content": "  \\n "}}]}')
        else:
            self._send(400, b"{}")


@pytest.fixture(scope="module")
def fake_chat():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # clients that gave up (timeouts)
    server.requests = []
    server.mode = "ok"
    server.content = "A tabby cat on a red velvet chair, soft window light, cozy interior, photorealistic."
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def chat(fake_chat):
    fake_chat.requests.clear()
    fake_chat.mode = "ok"
    return fake_chat


def _openai(server, **kwargs) -> OpenAIEnhancer:
    host, port = server.server_address[:2]
    options = {"base_url": f"http://{host}:{port}/v1/", "model": "rewriter-1", "api_key": API_KEY, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIEnhancer(**options)


def test_openai_success(chat):
    result = _openai(chat).enhance(PROMPT)
    assert result.ok is True and result.error is None
    assert result.prompt == chat.content
    assert result.original == PROMPT
    assert result.source == "openai:rewriter-1"
    (request,) = chat.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    body = request["json"]
    assert body["model"] == "rewriter-1"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 200
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": PROMPT},
    ]


def test_openai_without_key_sends_no_authorization(chat):
    assert _openai(chat, api_key=None).enhance(PROMPT).ok
    assert "Authorization" not in chat.requests[0]["headers"]


def test_openai_content_parts_and_cap(chat):
    chat.mode = "parts"
    assert _openai(chat).enhance(PROMPT).prompt == "A tabby cat on a red chair."
    chat.mode = "ok"
    capped = _openai(chat, max_chars=16).enhance(PROMPT)
    assert capped.ok and len(capped.prompt) <= 16


@pytest.mark.parametrize(
    "mode, error_part",
    [
        ("401", "HTTP 401"),
        ("500", "HTTP 500"),
        ("malformed", "invalid JSON"),
        ("html", "invalid JSON"),
        ("no-choices", "no message content"),
        ("empty", "empty"),
    ],
)
def test_openai_failures_fall_back(chat, mode, error_part):
    chat.mode = mode
    enhancer = _openai(chat)
    result = enhancer.enhance(PROMPT)
    assert result.ok is False
    assert result.prompt == PROMPT == result.original
    assert result.source == "openai:rewriter-1"
    assert error_part in result.error
    assert API_KEY not in result.error and API_KEY not in repr(result) and API_KEY not in repr(enhancer)


@pytest.mark.parametrize("mode", ["slow", "drip"])
def test_openai_timeout_falls_back_quickly(chat, mode):
    chat.mode = mode
    started = time.perf_counter()
    result = _openai(chat, timeout=0.3).enhance(PROMPT)
    elapsed = time.perf_counter() - started
    assert result.ok is False and result.prompt == PROMPT
    assert "timed out" in result.error and API_KEY not in result.error
    assert elapsed < 1.5  # the server would take 2-3 s


def test_openai_unreachable_falls_back():
    from tests.support.servers import free_port

    enhancer = OpenAIEnhancer(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", api_key=API_KEY, timeout=2)
    result = enhancer.enhance(PROMPT)
    assert result.ok is False and result.prompt == PROMPT
    assert "unreachable" in result.error and API_KEY not in result.error


# --------------------------------------------------------------------------------------
# facade
# --------------------------------------------------------------------------------------


def test_facade_prefers_openai(chat, talking):
    getter_calls = []

    def getter():
        getter_calls.append(1)
        return talking

    result = PromptEnhancer(openai=_openai(chat), local=LocalQwenEnhancer()).enhance(PROMPT, getter)
    assert result.ok and result.source == "openai:rewriter-1" and result.prompt == chat.content
    assert getter_calls == []  # the klein pipeline isn't even loaded


def test_facade_uses_the_klein_encoder(talking):
    result = PromptEnhancer(local=LocalQwenEnhancer(max_new_tokens=10)).enhance(PROMPT, lambda: talking)
    assert result.ok and result.source == LOCAL_SOURCE
    assert result.prompt == LocalQwenEnhancer(max_new_tokens=10).enhance(talking, PROMPT).prompt


def test_facade_getter_failure_falls_back():
    def getter():
        raise RuntimeError("Model klein could not be loaded")

    result = PromptEnhancer(local=LocalQwenEnhancer()).enhance(PROMPT, getter)
    assert result.ok is False and result.prompt == PROMPT and result.source == LOCAL_SOURCE
    assert "could not be loaded" in result.error


def test_facade_with_nothing_available():
    for enhancer, getter in ((PromptEnhancer(), lambda: None), (PromptEnhancer(local=LocalQwenEnhancer()), None)):
        result = enhancer.enhance(PROMPT, getter)
        assert result.ok is False and result.prompt == PROMPT
        assert result.source == "none" and result.error == "no prompt enhancer available"
