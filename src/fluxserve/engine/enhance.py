"""Prompt enhancement: rewrite a short image prompt into a richer one with a language model.

Two backends, both bounded in time and length and both failing soft (on any failure the
original prompt is returned with ``ok=False`` and a short, safe error):

* :class:`LocalQwenEnhancer` reuses the Qwen3 text encoder that the FLUX.2 klein pipeline
  already holds.  ``Flux2KleinPipeline.text_encoder`` is a full ``Qwen3ForCausalLM`` (the
  pipeline only reads some hidden layers of it, but the LM head is there), so it can
  ``generate`` with no extra model loaded.  Decoding is greedy, hence deterministic.
* :class:`OpenAIEnhancer` calls an operator-configured OpenAI-compatible
  ``/chat/completions`` endpoint with ``temperature: 0``.

:class:`PromptEnhancer` is the facade the worker calls: OpenAI when configured, otherwise the
local model.  Nothing here imports the web framework.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SYSTEM_PROMPT",
    "LOCAL_SOURCE",
    "Enhanced",
    "LocalQwenEnhancer",
    "OpenAIEnhancer",
    "PromptEnhancer",
]

SYSTEM_PROMPT = (
    "You rewrite prompts for an image generator. Rewrite the user's prompt as one richer, "
    "concrete description of a single image: the subject, the setting, the lighting and the "
    "style. Keep the user's intent, every detail they asked for, and their language. "
    "Reply with the description only: no preamble, no quotes, no lists, at most 80 words."
)

#: ``Enhanced.source`` for the local backend.
LOCAL_SOURCE = "qwen3-text-encoder"

#: Default cap, in characters, on an enhanced prompt.
DEFAULT_MAX_CHARS = 1000
#: At most this much of the user's prompt is shown to the language model.
MAX_INPUT_CHARS = 4000
#: Longest error text put in ``Enhanced.error``.
MAX_ERROR_CHARS = 200

_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_THINK_TAG = re.compile(r"</?think>")
_WHITESPACE = re.compile(r"\s+")
_QUOTES = ('"', "'", "\u201c", "\u201d", "\u2018", "\u2019", "`")


@dataclass
class Enhanced:
    """The outcome of one enhancement: ``prompt`` is the prompt to generate with."""

    prompt: str
    original: str
    source: str  # "qwen3-text-encoder" | "openai:<model>" | "none"
    ok: bool
    error: str | None
    seconds: float


def _short(text: str, secret: str | None = None) -> str:
    """A one-line error of bounded length, with ``secret`` (an api key) removed."""
    text = _WHITESPACE.sub(" ", str(text)).strip()
    if secret:
        text = text.replace(secret, "***")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text or "unknown error"


def _describe(exc: BaseException, secret: str | None = None) -> str:
    message = str(exc)
    return _short(f"{type(exc).__name__}: {message}" if message else type(exc).__name__, secret)


def clean_output(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Model output -> a one-line prompt: no thinking block, no control characters or U+FFFD
    (from a cut multi-byte character), no wrapping quotes, collapsed whitespace, at most
    ``max_chars`` characters (cut at a word boundary when one is near)."""
    text = _THINK_TAG.sub(" ", _THINK_BLOCK.sub(" ", text))
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or (ch != "\ufffd" and unicodedata.category(ch) != "Cc")
    )
    text = _WHITESPACE.sub(" ", text).strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = (cut[:space] if space >= max_chars // 2 else cut).rstrip()
    return text


def _succeeded(original: str, prompt: str, source: str, started: float) -> Enhanced:
    return Enhanced(prompt=prompt, original=original, source=source, ok=True, error=None,
                    seconds=time.perf_counter() - started)


def _fallback(original: str, source: str, error: str, started: float) -> Enhanced:
    return Enhanced(
        prompt=original,
        original=original,
        source=source,
        ok=False,
        error=error,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------
# local: the klein pipeline's Qwen3 text encoder
# --------------------------------------------------------------------------------------


def _execution_device(module: Any) -> Any:
    """The device inputs must be on (the onload device under CPU offloading)."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except Exception:  # noqa: BLE001 - older diffusers, or an unusual module
        pass
    device = getattr(module, "device", None)
    if device is not None:
        return device
    for tensor in module.parameters():
        return tensor.device
    return "cpu"


def _stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos (``<|im_end|>`` for Qwen) and ``<|endoftext|>``.

    The klein text encoder's config may carry no eos id at all (the pipeline never generates),
    so without these generation would run to ``max_new_tokens`` every time.
    """
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    for token in ("<|im_end|>", "<|endoftext|>"):
        try:
            if token in tokenizer.get_vocab():
                candidates.append(tokenizer.convert_tokens_to_ids(token))
        except Exception:  # noqa: BLE001 - a tokenizer without these helpers
            pass
    for candidate in candidates:
        if isinstance(candidate, int) and candidate >= 0 and candidate not in ids:
            ids.append(candidate)
    return ids


class LocalQwenEnhancer:
    """Rewrites prompts with the Qwen3 causal LM the klein pipeline already holds.

    Greedy decoding (deterministic), at most ``max_new_tokens`` new tokens and about
    ``max_seconds`` of generation (checked after every token), under ``torch.inference_mode``.
    The pipeline is not modified: no config change, the encoder stays in eval mode, and a
    generation run after enhancing gives the same image as one without.
    """

    source = LOCAL_SOURCE

    def __init__(
        self,
        *,
        max_new_tokens: int = 120,
        max_seconds: float = 10.0,
        max_chars: int = DEFAULT_MAX_CHARS,
    ):
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if max_seconds <= 0:
            raise ValueError("max_seconds must be positive")
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        self.max_seconds = float(max_seconds)
        self.max_chars = int(max_chars)

    def enhance(self, pipeline: Any, prompt: str) -> Enhanced:
        started = time.perf_counter()
        if not isinstance(prompt, str) or not prompt.strip():
            return _fallback(prompt if isinstance(prompt, str) else "", self.source, "empty prompt", started)
        try:
            text = self._generate(pipeline, prompt)
        except Exception as exc:  # noqa: BLE001 - enhancement must never fail a job
            return _fallback(prompt, self.source, _describe(exc), started)
        if not text:
            return _fallback(prompt, self.source, "the language model returned an empty prompt", started)
        return _succeeded(prompt, text, self.source, started)

    def _generate(self, pipeline: Any, prompt: str) -> str:
        import torch

        model = getattr(pipeline, "text_encoder", None)
        tokenizer = getattr(pipeline, "tokenizer", None)
        if model is None or tokenizer is None:
            raise TypeError("the pipeline has no text_encoder/tokenizer")
        get_head = getattr(model, "get_output_embeddings", None)
        if not callable(getattr(model, "generate", None)) or not callable(get_head) or get_head() is None:
            raise TypeError(f"the text encoder ({type(model).__name__}) is not a causal language model")
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise TypeError("the tokenizer has no chat template")

        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt.strip()[:MAX_INPUT_CHARS]},
        ]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        device = _execution_device(model)
        input_ids = inputs["input_ids"].to(device)
        attention_mask = inputs["attention_mask"].to(device)

        stop_ids = _stop_token_ids(tokenizer)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None and stop_ids:
            pad_id = stop_ids[0]

        was_training = bool(getattr(model, "training", False))
        if was_training:
            model.eval()
        try:
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    max_time=self.max_seconds,
                    eos_token_id=stop_ids or None,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
        finally:
            if was_training:
                model.train()
        sequences = getattr(output, "sequences", output)
        new_tokens = sequences[0, input_ids.shape[1] :].tolist()
        decoded = tokenizer.decode(new_tokens, skip_special_tokens=True)
        return clean_output(decoded, self.max_chars)


# --------------------------------------------------------------------------------------
# remote: an OpenAI-compatible chat endpoint
# --------------------------------------------------------------------------------------

#: Largest response body read from the chat endpoint.
MAX_RESPONSE_BYTES = 1 << 20


class _Failure(Exception):
    """An error whose message is already short and safe to show."""


class OpenAIEnhancer:
    """Rewrites prompts with an OpenAI-compatible ``POST {base_url}/chat/completions``.

    ``timeout`` bounds connecting, sending, each read and the whole response download; the
    api key is only ever sent in ``Authorization: Bearer`` and never appears in an error.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        max_tokens: int = 200,
        max_chars: int = DEFAULT_MAX_CHARS,
    ):
        if not base_url:
            raise ValueError("base_url is required")
        if not model:
            raise ValueError("model is required")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or None
        self.timeout = float(timeout)
        self.max_tokens = int(max_tokens)
        self.max_chars = int(max_chars)

    @property
    def source(self) -> str:
        return f"openai:{self.model}"

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEnhancer(base_url={self.base_url!r}, model={self.model!r}, api_key={'***' if self.api_key else None})"

    def enhance(self, prompt: str) -> Enhanced:
        started = time.perf_counter()
        if not isinstance(prompt, str) or not prompt.strip():
            return _fallback(prompt if isinstance(prompt, str) else "", self.source, "empty prompt", started)
        try:
            text = clean_output(self._complete(prompt), self.max_chars)
        except _Failure as exc:
            return _fallback(prompt, self.source, _short(str(exc), self.api_key), started)
        except Exception as exc:  # noqa: BLE001 - enhancement must never fail a job
            return _fallback(prompt, self.source, _describe(exc, self.api_key), started)
        if not text:
            return _fallback(prompt, self.source, "the chat endpoint returned an empty prompt", started)
        return _succeeded(prompt, text, self.source, started)

    def _complete(self, prompt: str) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt.strip()[:MAX_INPUT_CHARS]},
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": False,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + self.timeout
        try:
            with httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=False, trust_env=False) as client:
                with client.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=headers) as resp:
                    if not 200 <= resp.status_code < 300:
                        raise _Failure(f"chat endpoint answered HTTP {resp.status_code}")
                    chunks: list[bytes] = []
                    size = 0
                    for chunk in resp.iter_bytes():
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise _Failure("chat endpoint response too large")
                        if time.monotonic() > deadline:
                            raise _Failure(f"chat endpoint timed out after {self.timeout:g}s")
                        chunks.append(chunk)
        except httpx.TimeoutException:
            raise _Failure(f"chat endpoint timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise _Failure(f"chat endpoint unreachable ({type(exc).__name__})") from None
        try:
            data = json.loads(b"".join(chunks))
        except ValueError:
            raise _Failure("chat endpoint returned invalid JSON") from None
        return self._content(data)

    @staticmethod
    def _content(data: Any) -> str:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Failure("chat endpoint returned no message content") from None
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            content = " ".join(
                part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        if not isinstance(content, str):
            raise _Failure("chat endpoint returned no message content")
        return content


# --------------------------------------------------------------------------------------
# facade
# --------------------------------------------------------------------------------------


class PromptEnhancer:
    """What the worker calls: the OpenAI backend when configured, else the local Qwen3 one.

    Pass ``local=LocalQwenEnhancer()`` for the default behaviour (reuse the klein encoder);
    with neither backend, every call falls back with "no prompt enhancer available".
    ``enhance`` never raises.
    """

    def __init__(self, openai: OpenAIEnhancer | None = None, local: LocalQwenEnhancer | None = None):
        self.openai = openai
        self.local = local

    def enhance(self, prompt: str, klein_pipeline_getter: Callable[[], Any] | None) -> Enhanced:
        started = time.perf_counter()
        if self.openai is not None:
            return self.openai.enhance(prompt)
        if self.local is not None and klein_pipeline_getter is not None:
            try:
                pipeline = klein_pipeline_getter()
            except Exception as exc:  # noqa: BLE001 - e.g. the klein weights can't be loaded
                return _fallback(prompt, LOCAL_SOURCE, _describe(exc), started)
            result = self.local.enhance(pipeline, prompt)
            result.seconds = time.perf_counter() - started  # loading the pipeline counts too
            return result
        return _fallback(prompt, "none", "no prompt enhancer available", started)
