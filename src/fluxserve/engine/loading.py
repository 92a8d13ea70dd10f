"""Loading diffusers pipelines lazily, once, on the right device and dtype, with errors a
user can act on instead of tracebacks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from fluxserve.engine.batch_invariance import make_batch_invariant
from fluxserve.engine.errors import ModelLoadError
from fluxserve.engine.lora import Adapters
from fluxserve.engine.optimize import Optimizations, apply, warm_up
from fluxserve.engine.residency import Residency
from fluxserve.models import ModelSpec

log = logging.getLogger(__name__)


def pick_device(setting: str = "auto") -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA (what FLUX is trained and served in); fp32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def explain_load_failure(spec: ModelSpec, exc: BaseException) -> str:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"Model {spec.name} could not be loaded from {spec.source}"
    hint = (
        "download the weights to a folder and point FLUXSERVE_MODEL_OVERRIDES "
        f'(e.g. {{"{spec.name}": {{"source": "/path/to/folder"}}}}) at it, or serve --models tiny'
    )
    if isinstance(exc, GatedRepoError):
        return f"{where}: the repository is gated; accept its licence on the hub and set HF_TOKEN, or {hint}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{where}: no such repository on the hub; {hint}"
    if isinstance(exc, (LocalEntryNotFoundError, OSError, EnvironmentError)):
        return f"{where}: the weights are not available locally and the hub could not provide them; {hint}"
    if "neither a valid local path nor a valid repo id" in str(exc):
        return f"{where}: no such local folder, and it is not a hub id; {hint}"
    return f"{where}: {type(exc).__name__}: {exc}; {hint}"


class PipelineCache:
    """One loaded pipeline per (class, weights source); variants share weights via from_pipe.
    Pipelines load on the host; ``Residency`` moves each onto the accelerator just before use,
    evicting the least recently used ones when the memory budget would be exceeded."""

    def __init__(
        self, device: str, dtype: torch.dtype, residency: Residency | None = None,
        optimizations: Optimizations | None = None, warm_sizes: tuple[int, ...] = (), warm_batch: int = 1,
        adapters: Adapters | None = None,
    ):
        self.device = device
        self.dtype = dtype
        self.optimizations = optimizations or Optimizations.none()
        self.warm_sizes = warm_sizes  # compiled pipelines are warmed at these square sizes at load
        self.warm_batch = warm_batch  # and, with dynamic batching (max batch size > 1), batched too
        self.adapters = adapters or Adapters()  # LoRA adapters, loaded on the base pipelines
        self._pipelines: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()  # on_evict runs inside place(), inside get()
        self.residency = residency or Residency(device=device, budget_bytes=None, on_evict=self._evicted)
        if self.residency.on_evict is None:
            self.residency.on_evict = self._evicted

    def get(self, spec: ModelSpec, variant: str | None = None) -> Any:
        """The pipeline for ``spec``, resident and ready; with ``variant`` (a diffusers class
        name), that class built over the same loaded components (e.g. the inpaint pipeline)."""
        with self._lock:
            base = self._load(spec)
            cache_key = (spec.pipeline, spec.source)
            if variant is not None and variant != spec.pipeline:
                cache_key = (variant, spec.source)
                if cache_key not in self._pipelines:
                    import diffusers

                    # dtype: without it from_pipe casts the shared (bf16) modules to fp32 in place
                    derived = getattr(diffusers, variant).from_pipe(base, dtype=self.dtype)
                    derived.set_progress_bar_config(disable=True)
                    self._pipelines[cache_key] = derived
            pipeline = self._pipelines[cache_key]
            self.residency.place(_key(cache_key), pipeline)
            if "_fluxserve_optimizations" not in pipeline.__dict__:  # once, on the device (fp8 and checks need it)
                self._optimize(cache_key, spec, pipeline)
            return pipeline

    def loras(self, spec: ModelSpec, names: Sequence[str], strengths: Sequence[float]) -> AbstractContextManager[None]:
        """A block running ``spec``'s pipelines (any variant) with these LoRA adapters at these
        strengths, and with none when ``names`` is empty. Call ``get`` first."""
        with self._lock:
            base = self._pipelines[(spec.pipeline, spec.source)]
        return self.adapters.applied(base, spec.name, names, strengths)

    def _optimize(self, cache_key, spec: ModelSpec, pipeline: Any) -> None:
        make_batch_invariant(pipeline)  # before compile traces the modules; a no-op for solo calls
        report = apply(pipeline, self.optimizations, device=self.device)
        log.info("optimizations for %s on %s: %s", _key(cache_key), self.device, report)
        if self.optimizations.compile and self.warm_sizes and cache_key == (spec.pipeline, spec.source):
            timings = warm_up(pipeline, sizes=[(side, side) for side in self.warm_sizes], steps=1,
                              calls=lambda width, height: spec.family.warm_calls(width, height, self.warm_batch))
            log.info("compiled %s, warmed at %s", _key(cache_key), timings)

    def optimization_reports(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {_key(k): p.__dict__.get("_fluxserve_optimizations", {}) for k, p in self._pipelines.items()}

    def _load(self, spec: ModelSpec) -> Any:
        cache_key = (spec.pipeline, spec.source)
        if cache_key in self._pipelines:
            return self._pipelines[cache_key]
        import diffusers

        pipeline_class = getattr(diffusers, spec.pipeline, None)
        if pipeline_class is None:
            raise ModelLoadError(f"Model {spec.name}: diffusers has no pipeline class {spec.pipeline}")
        started = time.perf_counter()
        try:
            pipeline = pipeline_class.from_pretrained(spec.source, dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an actionable message
            log.warning("loading %s failed: %r", spec.name, exc)
            raise ModelLoadError(explain_load_failure(spec, exc)) from exc
        pipeline.set_progress_bar_config(disable=True)
        log.info("loaded %s (%s) from %s in %.1fs", spec.name, spec.pipeline, spec.source, time.perf_counter() - started)
        self._pipelines[cache_key] = pipeline
        return pipeline

    def _evicted(self, key: str, _pipeline: Any) -> None:
        """Evicted from the accelerator: keep it in host memory (reloading is then a copy), unless
        there is no accelerator, where eviction means giving the memory back: drop it and the
        variants that share its weights."""
        if self.residency.moves:
            return
        source = key.split(":", 1)[1]
        with self._lock:
            for cache_key in [k for k in self._pipelines if k[1] == source]:
                del self._pipelines[cache_key]
                self.residency.forget(_key(cache_key))

    def loaded(self) -> list[str]:
        with self._lock:
            return [_key(cache_key) for cache_key in self._pipelines]

    def clear(self) -> None:
        """Drop every cached pipeline and give their GPU memory back."""
        with self._lock:
            self.residency.forget()
            self._pipelines.clear()
        self.release_memory()

    @staticmethod
    def release_memory() -> None:
        """Return cached-but-unused GPU memory (after an out-of-memory error, for one)."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _key(cache_key: tuple[str, str]) -> str:
    """``ModelSpec.pipeline_key`` of the models loaded as ``cache_key`` (the worker maps it back)."""
    return f"{cache_key[0]}:{cache_key[1]}"
