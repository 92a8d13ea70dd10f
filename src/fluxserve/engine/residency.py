"""Which loaded pipelines live on the accelerator: an LRU policy under a byte budget, so that
several model families can share one GPU, with diffusers' CPU offload for small GPUs.

A pipeline's size is the bytes of the parameters and buffers of its torch modules (its
``components``); modules shared between pipelines (variants built with ``from_pipe`` share the
base pipeline's transformer, VAE and text encoders) are counted once and are never moved off the
device while another resident pipeline still uses them.

Offload modes (``FLUXSERVE_OFFLOAD``):

``none``
    Whole pipelines are moved to the device with ``.to(device)`` and stay there until the least
    recently used ones must make room (they go back to host memory with ``.to("cpu")``).
``model``
    ``enable_model_cpu_offload``: weights live in host memory; one component at a time visits
    the device while it runs. Nothing is kept on the device between jobs, so no pipeline is
    evicted; a component bigger than the budget is refused (use ``sequential``).
``sequential``
    ``enable_sequential_cpu_offload``: layer by layer; slowest, smallest.

On the CPU nothing moves (everything already lives in host memory), but the LRU bookkeeping and
an explicit budget still work: eviction drops the pipeline from the resident set and calls
``on_evict(key, pipeline)`` so that the owner (the pipeline cache) can drop it and free the
host memory. Offload needs an accelerator: asking for it with device ``cpu`` is a
:class:`ResidencyError` at construction time (a configuration error, reported at startup).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fluxserve.units import parse_bytes  # re-exported: sizes are parsed in one place

log = logging.getLogger(__name__)

__all__ = [
    "OFFLOAD_MODES",
    "Residency",
    "ResidencyError",
    "auto_budget",
    "module_bytes",
    "parse_bytes",
]

OFFLOAD_MODES = ("none", "model", "sequential")
GIB = 1024**3
#: Auto budget on CUDA: total memory minus max(10 %, 2 GiB), left for activations, the VAE
#: decode, the CUDA context and small helper models.
SAFETY_FRACTION = 0.10
SAFETY_MIN_BYTES = 2 * GIB

OnEvict = Callable[[str, Any], None]


class ResidencyError(RuntimeError):
    """A pipeline that cannot be placed on the device (or an impossible configuration); the
    message says why and what to set instead."""


# -- sizes ----------------------------------------------------------------------------------


def _modules(pipeline: Any) -> dict[int, torch.nn.Module]:
    """The distinct torch modules of a pipeline (by id), in component order."""
    if isinstance(pipeline, torch.nn.Module):
        return {id(pipeline): pipeline}
    found: dict[int, torch.nn.Module] = {}
    for component in (getattr(pipeline, "components", None) or {}).values():
        if isinstance(component, torch.nn.Module):
            found.setdefault(id(component), component)
    return found


def _tensor_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def module_bytes(pipeline: Any) -> int:
    """Bytes of all parameters and buffers of every torch module component of ``pipeline``;
    a module that appears under several names (or is shared by ``from_pipe`` variants, when
    their components are pooled) is counted once. Meta tensors (sequential offload) count at
    their real size."""
    return _tensor_bytes(_modules(pipeline).values())


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def auto_budget(device: str) -> int | None:
    """Bytes the pipelines may take on ``device``: on CUDA the device's total memory minus
    max(10 %, 2 GiB); elsewhere no limit (None)."""
    if not _is_cuda(device):
        return None
    _free, total = torch.cuda.mem_get_info(torch.device(device))
    return max(0, total - max(int(total * SAFETY_FRACTION), SAFETY_MIN_BYTES))


def _empty_cache(device: str) -> None:
    if _is_cuda(device) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mib(n: int | None) -> str:
    return "no limit" if n is None else f"{n / 2**20:,.1f} MiB"


# -- the policy -----------------------------------------------------------------------------


class Residency:
    """Decides which pipelines live on the accelerator (see the module docstring).

    ``place(key, pipeline)`` before every use; ``key`` names one pipeline object (e.g.
    ``"Flux2KleinPipeline:/path"``). All methods are thread-safe (one lock); ``on_evict``
    callbacks run in the calling thread after that lock is released, before the call returns.
    """

    def __init__(
        self, *, device: str, budget_bytes: int | None, offload: str = "none", on_evict: OnEvict | None = None,
    ):
        if offload not in OFFLOAD_MODES:
            raise ResidencyError(
                f"unknown offload mode {offload!r}; FLUXSERVE_OFFLOAD must be one of {', '.join(OFFLOAD_MODES)}"
            )
        self.device = str(device)
        self.offload = offload
        if offload != "none" and torch.device(self.device).type == "cpu":
            raise ResidencyError(
                f"FLUXSERVE_OFFLOAD={offload} needs an accelerator (CUDA), but the device is cpu, where the "
                "weights already live in host memory; set FLUXSERVE_OFFLOAD=none (or run on a GPU)"
            )
        if budget_bytes is not None and budget_bytes < 0:
            raise ResidencyError(f"the memory budget must not be negative (got {budget_bytes})")
        self.budget_bytes = auto_budget(self.device) if budget_bytes is None else int(budget_bytes)
        self.on_evict = on_evict
        self.evictions = 0
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._offloaded: weakref.WeakSet = weakref.WeakSet()  # pipelines with offload hooks applied

    @property
    def moves(self) -> bool:
        """Whether placing and evicting move weights (False on the CPU)."""
        return torch.device(self.device).type != "cpu"

    # -- public ---------------------------------------------------------------------------

    def place(self, key: str, pipeline: Any) -> None:
        """Make ``pipeline`` usable on the device now and mark it most recently used, evicting
        least recently used pipelines first if it does not fit the budget. Raises
        :class:`ResidencyError` (nothing evicted) when it can never fit."""
        with self._lock:
            evicted = self._place(key, pipeline)
        self._notify(evicted)

    def evict_all(self) -> list[str]:
        """Evict every resident pipeline (least recently used first); returns their keys."""
        with self._lock:
            evicted = []
            while self._resident:
                evicted.append(self._evict_lru(keep=set()))
            if evicted and self.moves:
                _empty_cache(self.device)
        self._notify(evicted)
        return [key for key, _ in evicted]

    def forget(self, key: str | None = None) -> None:
        """Drop the bookkeeping for ``key`` (all keys when None) without moving anything or
        calling ``on_evict``: for an owner that is discarding the pipeline itself."""
        with self._lock:
            if key is None:
                self._resident.clear()
            else:
                self._resident.pop(key, None)

    def resident(self) -> list[str]:
        """Keys of the resident pipelines, most recently used first."""
        with self._lock:
            return list(reversed(self._resident))

    def accounting(self) -> dict:
        """For system_details. ``pipelines``: each resident pipeline's full size (MRU first);
        ``resident_bytes``: bytes held on the device between jobs, shared modules once (0 under
        offload, where weights stay in host memory; on the CPU, the resident pipelines' bytes)."""
        with self._lock:
            pipelines = {key: module_bytes(p) for key, p in reversed(self._resident.items())}
            return {
                "device": self.device,
                "offload": self.offload,
                "budget_bytes": self.budget_bytes,
                "resident_bytes": 0 if self.offload != "none" else self._bytes_of(self._resident_modules()),
                "pipelines": pipelines,
                "evictions": self.evictions,
            }

    # -- internals (under the lock) ---------------------------------------------------------

    def _place(self, key: str, pipeline: Any) -> list[tuple[str, Any]]:
        current = self._resident.get(key)
        if current is pipeline:
            self._resident.move_to_end(key)
            return []
        modules = _modules(pipeline)
        if current is not None:  # the owner replaced the pipeline behind this key (reloaded)
            del self._resident[key]
            if self.moves and self.offload == "none":
                still_used = set(self._resident_modules()) | set(modules)
                self._to_host([m for mid, m in _modules(current).items() if mid not in still_used])
        if self.offload != "none":
            self._apply_offload(key, pipeline)
            self._resident[key] = pipeline
            return []
        size = _tensor_bytes(modules.values())
        if self.budget_bytes is not None and size > self.budget_bytes:
            raise ResidencyError(
                f"{key} needs {_mib(size)} but the memory budget on {self.device} is {_mib(self.budget_bytes)}; "
                "set FLUXSERVE_OFFLOAD=model (or sequential) to run it with CPU offload, or raise the budget"
            )
        evicted = []
        while self.budget_bytes is not None and self._resident:
            needed = self._bytes_of({**self._resident_modules(), **modules})
            if needed <= self.budget_bytes:
                break
            evicted.append(self._evict_lru(keep=set(modules)))
        if evicted and self.moves:
            _empty_cache(self.device)
        if self.moves:
            self._to_device(pipeline)
        self._resident[key] = pipeline
        if evicted:
            log.info("placed %s (%s); evicted %s", key, _mib(size), ", ".join(k for k, _ in evicted))
        return evicted

    def _evict_lru(self, keep: set[int]) -> tuple[str, Any]:
        key, pipeline = self._resident.popitem(last=False)
        self.evictions += 1
        if self.moves and self.offload == "none":
            still_used = set(self._resident_modules()) | keep
            self._to_host([m for mid, m in _modules(pipeline).items() if mid not in still_used])
        return key, pipeline

    def _apply_offload(self, key: str, pipeline: Any) -> None:
        if pipeline in self._offloaded:
            return
        modules = _modules(pipeline)
        if self.offload == "model" and self.budget_bytes is not None and modules:
            largest = max(_tensor_bytes([m]) for m in modules.values())
            if largest > self.budget_bytes:
                raise ResidencyError(
                    f"{key}: its largest component needs {_mib(largest)} but the memory budget on {self.device} "
                    f"is {_mib(self.budget_bytes)}; set FLUXSERVE_OFFLOAD=sequential"
                )
        if self.offload == "model":
            pipeline.enable_model_cpu_offload(device=self.device)
        else:
            pipeline.enable_sequential_cpu_offload(device=self.device)
        self._offloaded.add(pipeline)

    def _resident_modules(self) -> dict[int, torch.nn.Module]:
        found: dict[int, torch.nn.Module] = {}
        for pipeline in self._resident.values():
            found.update(_modules(pipeline))
        return found

    @staticmethod
    def _bytes_of(modules: dict[int, torch.nn.Module]) -> int:
        return _tensor_bytes(modules.values())

    def _to_device(self, pipeline: Any) -> None:
        pipeline.to(self.device)

    def _to_host(self, modules: list[torch.nn.Module]) -> None:
        """Module by module, not ``pipeline.to("cpu")``: modules still used by another resident
        pipeline (a variant's owner) stay where they are."""
        for module in modules:
            module.to("cpu")

    def _notify(self, evicted: list[tuple[str, Any]]) -> None:
        if self.on_evict is None:
            return
        for key, pipeline in evicted:
            try:
                self.on_evict(key, pipeline)
            except Exception:  # noqa: BLE001 - a failing callback must not fail the placement
                log.exception("on_evict(%s) failed", key)
