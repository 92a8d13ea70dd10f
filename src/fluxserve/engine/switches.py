"""The engine switches as settings text: the :class:`Optimizations` dataclass and the grammar
of ``FLUXSERVE_OPTIMIZATIONS`` (:meth:`Optimizations.from_strings`).

Torch-free on purpose: the settings (``fluxserve.config``) check the text when ``serve`` starts,
in the HTTP process, which never imports torch.  What the switches *do* to a pipeline, and
everything that needs torch, is in :mod:`fluxserve.engine.optimize`, which re-exports these names.

Attention backend names are checked here only for their form (letters, digits, ``_``): the
list of names diffusers knows needs diffusers, hence torch.  An unknown, well-formed name is
reported by ``optimize.apply`` as ``unavailable`` with the known names; it never stops a worker.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SWITCHES", "Optimizations"]

#: Report keys, in the order ``apply`` runs them -> the ``Optimizations`` field that drives each.
SWITCHES: dict[str, str] = {
    "bf16": "bf16_everywhere",
    "truncate_text_encoder": "truncate_text_encoder",
    "channels_last_vae": "channels_last_vae",
    "attention_backend": "attention_backend",
    "fp8": "fp8",
    "compile": "compile",
    "prompt_cache": "prompt_cache_size",
}

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}
_DEFAULT_PROMPT_CACHE_SIZE = 256
#: The form of an attention backend name (diffusers' names: ``flash``, ``_native_cudnn``, ``_flash_3``...).
_BACKEND_NAME = re.compile(r"[a-z0-9_]+")


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimizations:
    """Which speed-ups to apply.  The defaults are what the service runs with."""

    bf16_everywhere: bool = True
    truncate_text_encoder: bool = True
    prompt_cache_size: int = _DEFAULT_PROMPT_CACHE_SIZE
    compile: bool = False
    fp8: bool = False
    attention_backend: str = "auto"
    channels_last_vae: bool = True
    #: Cast to bf16 on CPU too (bf16_everywhere alone applies on CUDA only; bf16 is slow on CPU).
    force_bf16: bool = False
    #: ``dynamic=`` for torch.compile: None lets dynamo decide (static, dynamic after a 2nd shape).
    compile_dynamic: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_cache_size, int) or self.prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be an integer >= 0, not {self.prompt_cache_size!r}")
        if not isinstance(self.attention_backend, str) or not self.attention_backend.strip():
            raise ValueError("attention_backend must be 'auto', 'off', 'native' or a diffusers backend name")
        object.__setattr__(self, "attention_backend", self.attention_backend.strip().lower())

    @classmethod
    def none(cls) -> Optimizations:
        """Every switch off: the plain diffusers pipeline, the baseline to measure against."""
        return cls(
            bf16_everywhere=False, truncate_text_encoder=False, prompt_cache_size=0, compile=False,
            fp8=False, attention_backend="off", channels_last_vae=False,
        )

    @classmethod
    def all(cls) -> Optimizations:
        """Every switch on, compile and fp8 included."""
        return cls(compile=True, fp8=True)

    @classmethod
    def from_strings(
        cls, spec: str | Mapping[str, Any] | Iterable[str] | None = None, *, base: Optimizations | None = None
    ) -> Optimizations:
        """Parse settings text such as ``"compile,fp8,-truncate,attention=flash,prompt_cache=64"``.

        Items are separated by commas (or given as an iterable / a mapping of name -> value).  ``name``
        turns a switch on, ``-name`` / ``no-name`` / ``name=off`` turns it off, ``name=value`` sets
        it.  Names are the field names or the report keys of :data:`SWITCHES`, plus the short
        forms ``truncate``, ``cache``, ``attention``, ``channels_last``.  ``none`` (all off),
        ``all`` (all on) and ``default`` reset everything before the items that follow.
        ``prompt_cache=on`` means the default size.  Starts from ``base`` (default: the defaults).
        """
        opts = base or cls()
        if spec is None:
            return opts
        if isinstance(spec, Mapping):
            items: list[tuple[str, Any]] = [(str(k), v) for k, v in spec.items()]
        else:
            texts = spec.split(",") if isinstance(spec, str) else list(spec)
            items = [_split_item(str(text)) for text in texts if str(text).strip()]
        changes: dict[str, Any] = {}
        for raw_name, value in items:
            name = raw_name.strip().lower().replace("-", "_")
            if name in ("none", "all", "default", "defaults") and value is True:
                opts = {"none": cls.none(), "all": cls.all()}.get(name, cls())
                changes.clear()
                continue
            field = _FIELD_NAMES.get(name)
            if field is None:
                known = sorted(set(_FIELD_NAMES) | {"none", "all", "default"})
                raise ValueError(f"unknown optimization {raw_name!r}; known: {', '.join(known)}")
            changes[field] = _parse_value(field, value)
        return dataclasses.replace(opts, **changes)

    def describe(self) -> str:
        """A ``from_strings`` spec that gives these settings back (for logs and /admin)."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            parts.append(f"{field.name}={'auto' if value is None else str(value).lower()}")
        return ",".join(parts)


_FIELD_NAMES: dict[str, str] = {f: f for f in Optimizations.__dataclass_fields__}
_FIELD_NAMES.update(SWITCHES)
_FIELD_NAMES.update(
    truncate="truncate_text_encoder", cache="prompt_cache_size", attention="attention_backend",
    channels_last="channels_last_vae", bf16_force="force_bf16",
)


def _split_item(text: str) -> tuple[str, Any]:
    text = text.strip()
    if "=" in text:
        name, value = text.split("=", 1)
        return name.strip(), value.strip()
    for prefix in ("-", "no-", "no_"):
        if text.lower().startswith(prefix):
            return text[len(prefix):], False
    return text, True


def _parse_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{field}: expected on/off, not {value!r}")


def _parse_value(field: str, value: Any) -> Any:
    if field == "prompt_cache_size":
        if isinstance(value, bool):
            return _DEFAULT_PROMPT_CACHE_SIZE if value else 0
        text = str(value).strip().lower()
        if text in _TRUE - {"1"}:
            return _DEFAULT_PROMPT_CACHE_SIZE
        if text in _FALSE - {"0"}:
            return 0
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"prompt_cache_size: expected a number or on/off, not {value!r}") from None
        if size < 0:
            raise ValueError("prompt_cache_size must be >= 0")
        return size
    if field == "attention_backend":
        if value is True:
            return "auto"
        if value is False:
            return "off"
        name = str(value).strip().lower()
        if not _BACKEND_NAME.fullmatch(name):  # known names: checked by apply (needs diffusers)
            raise ValueError(
                f"attention_backend: {value!r} is not a backend name; use auto, off, native or a diffusers "
                "backend name such as flash, _flash_3 or _native_cudnn"
            )
        return name
    if field == "compile_dynamic":
        if str(value).strip().lower() in ("auto", "none", "default"):
            return None
        return _parse_bool(field, value)
    return _parse_bool(field, value)
