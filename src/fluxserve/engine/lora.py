"""Per-job LoRA adapters on the loaded pipelines (``lora_model`` / ``lora_strength``).

Adapters are loaded with diffusers' LoRA loader (``load_lora_weights``) into the *base* pipeline
of a model (the class ``from_pretrained`` loaded), once each, under a name of their own, and kept
loaded (at most ``max_loaded`` per pipeline; the least recently used is deleted beyond that). The
variants of a family (img2img, inpaint) are built with ``from_pipe`` over the same modules, so
adapters loaded on the base pipeline work in them too.

Around each pipeline call, :meth:`Adapters.applied` turns the job's adapters on at its strengths
(``set_adapters``) and, afterwards, every adapter off again (``disable_lora``: the LoRA layers
then return their base layer's output untouched), so a job without adapters gets the base
model's image bit for bit.

A compiled transformer (``compile``): changing which adapters are loaded or active changes the
code dynamo traced, so each new set would recompile the blocks. A job with a single adapter
therefore goes into one *hot-swap slot* (diffusers' ``enable_lora_hotswap`` + ``hotswap=True``;
the slot's rank is padded to ``HOTSWAP_RANK``): the first such job recompiles the blocks (with
the slot on; a later job without adapters once more with it off; the first strength other than
the first once more), and every later single-adapter job swaps its weights into the slot in
place, with no recompile. An adapter that cannot be swapped in (rank above ``HOTSWAP_RANK``,
layers the slot lacks) replaces the slot (one recompile). Jobs combining several adapters on a
compiled transformer use named adapters as without compile: each new combination recompiles.

The prompt-embedding cache (``optimize``) keys its entries on the text encoders' adapter state,
so an adapter that changes a text encoder never gets an embedding computed without it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxserve.engine.batch_invariance import make_new_linears_batch_invariant
from fluxserve.engine.errors import ModelLoadError
from fluxserve.loras import LoraCatalog, LoraSource, UnknownLora

log = logging.getLogger(__name__)

#: The hot-swap slot's adapter name and padded rank (adapters of a higher rank replace the slot).
SLOT = "fluxserve_slot"
HOTSWAP_RANK = 128


class LoraLoadError(ModelLoadError):
    """An adapter that could not be loaded or applied; the message (for the client) says why."""


def adapter_name(ref: str) -> str:
    """The name an adapter is loaded under: a module-attribute-safe digest of its catalog name
    (peft keeps adapters in ``ModuleDict``s, whose keys may not contain dots)."""
    return "fluxserve_" + hashlib.sha256(ref.encode()).hexdigest()[:16]


@dataclass
class _State:
    """What is loaded on one base pipeline (kept in its ``__dict__``, so it goes with it)."""

    loaded: collections.OrderedDict[str, str] = field(default_factory=collections.OrderedDict)  # ref -> name, LRU
    slot: str | None = None  # the ref the hot-swap slot holds
    hotswap_failed: bool = False  # the slot could not be set up here: named adapters only
    loads: collections.Counter[str] = field(default_factory=collections.Counter)  # ref -> times read from disk

    @property
    def any(self) -> bool:
        return bool(self.loaded) or self.slot is not None


def state_of(pipeline: Any) -> _State | None:
    return pipeline.__dict__.get("_fluxserve_loras")


def _is_compiled(pipeline: Any) -> bool:
    return bool(getattr(getattr(pipeline, "transformer", None), "_fluxserve_compiled", False))


class Adapters:
    """Loads, keeps and applies the adapters of one engine (see the module docstring)."""

    def __init__(self, catalog: LoraCatalog | None = None, max_loaded: int = 8):
        self.catalog = catalog
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def applied(self, pipeline: Any, model: str, names: Sequence[str], strengths: Sequence[float]) -> Iterator[None]:
        """``names`` at ``strengths`` on ``pipeline`` (a base pipeline) for the block; none of them
        after it. With no names, every loaded adapter is off for the block."""
        with self._lock:
            if not names:
                self._off(pipeline)
                yield
                return
            try:
                self._on(pipeline, model, list(names), [float(s) for s in strengths])
                yield
            finally:
                self._off(pipeline)

    def loaded(self, pipeline: Any) -> list[str]:
        """The catalog names of the adapters loaded on ``pipeline`` (the slot's last)."""
        state = state_of(pipeline)
        if state is None:
            return []
        return list(state.loaded) + ([state.slot] if state.slot is not None else [])

    # -- on and off ------------------------------------------------------------------------------
    def _on(self, pipeline: Any, model: str, names: list[str], strengths: list[float]) -> None:
        if not callable(getattr(pipeline, "load_lora_weights", None)):
            raise LoraLoadError(f"Model {model} cannot load LoRA adapters ({type(pipeline).__name__} has no LoRA loader)")
        state = pipeline.__dict__.setdefault("_fluxserve_loras", _State())
        active = None
        if len(names) == 1 and _is_compiled(pipeline) and not state.hotswap_failed:
            active = self._into_slot(pipeline, model, state, names[0])
        if active is None:
            active = [self._ensure(pipeline, model, state, name, keep=names) for name in names]
        pipeline.enable_lora()
        pipeline.set_adapters(active, strengths)

    @staticmethod
    def _off(pipeline: Any) -> None:
        state = state_of(pipeline)
        if state is not None and state.any:
            pipeline.disable_lora()

    # -- named adapters (kept loaded, least recently used deleted) --------------------------------
    def _ensure(self, pipeline: Any, model: str, state: _State, ref: str, keep: Sequence[str]) -> str:
        if ref in state.loaded:
            state.loaded.move_to_end(ref)
            return state.loaded[ref]
        for old in [r for r in state.loaded if r not in keep][: max(0, len(state.loaded) + 1 - self.max_loaded)]:
            log.info("LoRA %s: unloading %s (more than %d loaded)", model, old, self.max_loaded)
            _delete(pipeline, state.loaded.pop(old))
        name = adapter_name(ref)
        self._load(pipeline, model, state, ref, name)
        state.loaded[ref] = name
        return name

    # -- the hot-swap slot of a compiled transformer ---------------------------------------------
    def _into_slot(self, pipeline: Any, model: str, state: _State, ref: str) -> list[str] | None:
        """The slot holding ``ref`` (swapped in without a recompile where diffusers can), or None
        when the slot can't be had here (the caller falls back to a named adapter)."""
        if state.slot == ref:
            return [SLOT]
        if state.slot is not None:
            try:
                self._load(pipeline, model, state, ref, SLOT, hotswap=True)
                state.slot = ref
                return [SLOT]
            except LoraLoadError as exc:
                if isinstance(exc.__cause__, (UnknownLora, OSError)):
                    raise  # the adapter itself is missing: a fresh slot would not help
                log.warning("LoRA %s: %s cannot be hot-swapped (%s); reloading the slot (one recompile)",
                            model, ref, exc.__cause__ or exc)
            _delete(pipeline, SLOT)
            state.slot = None
        try:
            pipeline.enable_lora_hotswap(target_rank=HOTSWAP_RANK, check_compiled="ignore")
            self._load(pipeline, model, state, ref, SLOT)
        except LoraLoadError as exc:
            if isinstance(exc.__cause__, (UnknownLora, OSError)):
                raise
            log.warning("LoRA %s: no hot-swap slot for %s (%s); using named adapters (recompiles)", model, ref,
                        exc.__cause__ or exc)
            state.hotswap_failed = True
            _delete(pipeline, SLOT)
            return None
        except Exception:  # noqa: BLE001 - enable_lora_hotswap itself: go without the slot
            log.warning("LoRA %s: hot-swapping unavailable; using named adapters (recompiles)", model, exc_info=True)
            state.hotswap_failed = True
            return None
        state.slot = ref
        return [SLOT]

    # -- loading -------------------------------------------------------------------------------
    def _load(self, pipeline: Any, model: str, state: _State, ref: str, name: str, hotswap: bool = False) -> None:
        try:
            if self.catalog is None:
                raise UnknownLora(f"Unknown LoRA adapter: {ref} (no LoRA adapters are configured)")
            source = self.catalog.resolve(ref)  # again: it may have been removed since the job was queued
        except UnknownLora as exc:
            raise LoraLoadError(f"{exc}; it was offered when the request was queued") from exc
        try:
            with _unexpected_keys() as unexpected:
                if source.hub:
                    pipeline.load_lora_weights(source.location, weight_name=source.weight_name, adapter_name=name,
                                               hotswap=hotswap)
                else:
                    path = Path(source.location)
                    pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name,
                                               hotswap=hotswap)
            if unexpected:  # diffusers only warns, and applies the rest: half an adapter is not what was asked
                raise MismatchedLora(f"it has weights for layers {model} does not have ({unexpected[0][:300]}); "
                                     "is it a LoRA for another model?")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message the client can act on
            log.warning("loading LoRA %s into %s failed: %r", ref, model, exc)
            if not hotswap:
                _delete(pipeline, name)  # nothing half-loaded stays behind
            raise LoraLoadError(explain_lora_failure(source, model, exc)) from exc
        state.loads[ref] += 1
        make_new_linears_batch_invariant(pipeline)  # the LoRA layers' own linears, as the base ones
        log.info("LoRA %s loaded into %s as %s%s", ref, model, name, " (hot-swapped)" if hotswap else "")


class MismatchedLora(ValueError):
    pass


@contextlib.contextmanager
def _unexpected_keys() -> Iterator[list[str]]:
    """The "unexpected keys" warnings diffusers logs while loading an adapter (keys naming
    layers the model lacks), collected."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "unexpected keys" in message:
                found.append(message.split("found in the model:", 1)[-1].strip())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("diffusers.utils.peft_utils")
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def _delete(pipeline: Any, name: str) -> None:
    """Delete adapter ``name`` from every component that has it (if any)."""
    present = {adapter for adapters in pipeline.get_list_adapters().values() for adapter in adapters}
    if name in present:
        pipeline.delete_adapters([name])


def explain_lora_failure(source: LoraSource, model: str, exc: BaseException) -> str:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"LoRA adapter {source.name} could not be loaded into {model}"
    if source.hub:
        fix = (f"download it where the hub is reachable (hf download {source.location}"
               f"{' ' + source.weight_name if source.weight_name else ''}) into this machine's Hugging Face cache, "
               "or copy its .safetensors file into the LoRA folder (FLUXSERVE_LORA_DIR)")
        if isinstance(exc, GatedRepoError):
            return f"{where}: the repository is gated; accept its terms on the hub and set HF_TOKEN, or {fix}"
        if isinstance(exc, RepositoryNotFoundError):
            return f"{where}: no such repository on the hub; {fix}"
        if isinstance(exc, (LocalEntryNotFoundError, OSError)) or "offline" in str(exc).lower():
            return f"{where}: it is not in the Hugging Face cache and the hub could not provide it; {fix}"
        if source.weight_name is None and "weight_name" in str(exc):
            return f"{where}: the repository holds several weight files; name one ({source.location}:FILE.safetensors)"
    elif isinstance(exc, OSError):
        return f"{where}: its file could not be read ({exc})"
    if isinstance(exc, MismatchedLora):
        return f"{where}: {exc}"
    return (f"{where}: {type(exc).__name__}: {exc} (is it a LoRA for this model's architecture, "
            "in the diffusers, kohya or peft format?)")
