"""Engine speed-ups (issue 6): each one a switch, applied in place to a loaded pipeline, so the
service can be measured with every switch on and off in the same run.

``apply(pipeline, opts, device=...)`` runs the switches below in this order and returns a report
``{switch: value}`` whose value starts with ``"on"``, ``"off"`` or ``"unavailable"`` (optionally
followed by ``": detail"``).  A feature that cannot be had (no GPU, a package not installed, a
backend that fails its probe) is logged and reported, never raised.  ``apply`` may be called again
on the same pipeline or on one made from it with ``from_pipe`` (which shares the modules but not
the per-instance wrappers): work already done on shared modules is not redone.

Reported effects are the published anchors in ``/work/shared/design/PERFORMANCE.md`` (H100/H200
unless stated); none of them is measured here.

``bf16`` (field ``bf16_everywhere``)
    Every component in bf16, the VAE included (a 1024² decode is about 20 ms in bf16 against about
    160 ms in fp32).  On CUDA only: on CPU bf16 is slow, so the pipeline stays fp32 unless
    ``force_bf16``.  :func:`compute_dtype` is the dtype the loader should pass to
    ``from_pretrained`` so that no cast is needed at all; ``apply`` casts whatever is left.
``truncate_text_encoder``
    FLUX.2 klein reads Qwen3 hidden states (9, 18, 27) of 36 layers.  ``hidden_states[0]`` is the
    embedding output and ``hidden_states[i]`` the output of decoder layer ``i - 1``, so layers
    0..26 are enough: prompts are encoded by a *view* of the encoder holding only those layers
    (the same parameter objects, no copy), with no final norm use and no LM head.  That is 27 of
    36 layers and no 512 x 151936 logits: about 2.9 instead of 4.1 TFLOP per prompt.  The full
    encoder stays untouched for its other user, the local prompt enhancer (``generate`` needs
    every layer and the LM head).  A probe checks at apply time that the view gives bit-identical
    embeddings.  Calls asking for a later layer than the view holds, and calls while the encoder
    carries CPU-offload hooks (``FLUXSERVE_OFFLOAD``: the view would bypass the hook that brings
    the weights to the GPU), use the full encoder.  Moving the pipeline with ``.to()`` (residency)
    moves the view too: it holds the same parameter objects.
``prompt_cache`` (field ``prompt_cache_size``, 0 = off)
    An LRU of ``encode_prompt`` results keyed by the prompt(s) and every argument, plus the text
    encoders' identity, dtype and device; a repeated prompt skips the text encoders entirely and
    gives bit-identical images.  Entries are kept in host memory (a klein entry is 512 x 7680
    values, 7.9 MB in bf16, so 256 entries can hold about 2 GB: too much to hide from the GPU
    memory budget) and copied back to the device they came from on a hit (~1 ms).  Counters:
    ``prompt_cache_stats(pipeline)`` / ``pipeline._fluxserve_prompt_cache.stats()``.
``channels_last_vae``
    The VAE's convolutions in channels-last memory format (faster cuDNN kernels on GPUs).
``attention_backend`` ("auto" | "native" | "off" | a diffusers backend name)
    diffusers' attention dispatcher.  "auto" picks the first that is installed and passes a probe
    against a reference on this device: on CUDA ``_flash_3`` (FA3, Hopper), ``_native_cudnn``,
    ``flash`` (FA2), then ``native`` (PyTorch SDPA); on CPU ``native``.  Sage attention quantizes
    Q/K, so it is used only when named.  Reported: FA3 + compile vs SDPA + compile 4.32 -> 3.73 s
    (FLUX.1-dev, H200).  "off" leaves diffusers' default alone.
``fp8``
    torchao float8 dynamic quantization (activations and weights, per row) of the transformer's
    linear layers: ~1.3-1.4x on H100.  Needs CUDA compute capability >= 8.9, torchao (not a
    dependency of fluxserve) and bf16 weights; otherwise reported unavailable.
``compile``
    Regional ``torch.compile`` (fullgraph) of the transformer's repeated blocks
    (``compile_repeated_blocks``; compile time 67 s -> 10 s against compiling the whole model):
    1.2-1.5x.  Compilation happens at the first call, so the loader must call :func:`warm_up`
    at load with every size it serves: then no request pays compile time.  A size not warmed
    costs one recompile (after two sizes dynamo switches to dynamic shapes by itself); a warm-up
    that fails to compile reverts the blocks to eager and reports compile unavailable.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch

from fluxserve.engine.switches import SWITCHES, Optimizations

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

log = logging.getLogger(__name__)

__all__ = [
    "SWITCHES",
    "Optimizations",
    "PromptEmbeddingCache",
    "apply",
    "compute_dtype",
    "prompt_cache_stats",
    "warm_up",
]

# SWITCHES and Optimizations (the settings text and its grammar) live in the torch-free
# fluxserve.engine.switches, so that the settings can check them without torch.

#: Attention backends "auto" tries on CUDA, fastest first (each must pass a probe).
CUDA_ATTENTION_PREFERENCE = ("_flash_3", "_native_cudnn", "flash", "native")


def known_attention_backends() -> set[str]:
    """Backend names diffusers' attention dispatcher knows (installed or not)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except Exception:  # noqa: BLE001 - an older diffusers: accept what is asked, apply() reports
        return {"native"}
    return {member.value for member in AttentionBackendName}


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def compute_dtype(device: str | torch.device, opts: Optimizations) -> torch.dtype:
    """The dtype to load (``from_pretrained(dtype=...)``) and run the pipeline in: bf16 on CUDA when
    ``bf16_everywhere`` (and anywhere with ``force_bf16``), fp32 otherwise."""
    if opts.force_bf16 or (opts.bf16_everywhere and _is_cuda(device)):
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------


def apply(pipeline: Any, opts: Optimizations, *, device: str | torch.device) -> dict[str, str]:
    """Apply every switch of ``opts`` to ``pipeline`` in place (in the order of :data:`SWITCHES`) and
    return ``{switch: "on[: detail]" | "off[: detail]" | "unavailable: reason"}``.

    ``device`` is where the pipeline runs.  Call it once the pipeline is there (after its first
    residency placement: fp8 quantizes the weights where they are, and the truncation probe runs
    the encoder where it is), then :func:`warm_up` when compile is on.  Call it again on each
    pipeline made with ``from_pipe`` (the per-instance wrappers do not carry over).  The report is
    also kept as ``pipeline._fluxserve_optimizations``.
    """
    steps: dict[str, Callable[[], str]] = {
        "bf16": lambda: _apply_bf16(pipeline, opts, device),
        "truncate_text_encoder": lambda: _apply_truncation(pipeline, opts),
        "channels_last_vae": lambda: _apply_channels_last_vae(pipeline, opts),
        "attention_backend": lambda: _apply_attention_backend(pipeline, opts, device),
        "fp8": lambda: _apply_fp8(pipeline, opts, device),
        "compile": lambda: _apply_compile(pipeline, opts, device),
        "prompt_cache": lambda: _apply_prompt_cache(pipeline, opts),
    }
    report: dict[str, str] = {}
    for switch, step in steps.items():
        try:
            report[switch] = step()
        except Exception as exc:  # noqa: BLE001 - an optional speed-up never stops the service
            log.warning("optimization %s failed on %s", switch, type(pipeline).__name__, exc_info=True)
            report[switch] = f"unavailable: {type(exc).__name__}: {exc}"
    pipeline._fluxserve_optimizations = report
    log.debug("optimizations for %s on %s: %s", type(pipeline).__name__, device, report)  # loading logs it with its source
    return report


def _components(pipeline: Any) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}


# -- 1. bf16 ----------------------------------------------------------------------------


def _apply_bf16(pipeline: Any, opts: Optimizations, device: str | torch.device) -> str:
    if not opts.bf16_everywhere and not opts.force_bf16:
        return "off"
    if compute_dtype(device, opts) != torch.bfloat16:
        return f"off: {torch.device(device).type} keeps fp32 (bf16 is slow there; force_bf16 casts anyway)"
    cast = []
    for name, module in _components(pipeline).items():
        if getattr(module, "_fluxserve_fp8", False):
            continue  # quantized weights are not cast back
        if any(p.is_floating_point() and p.dtype != torch.bfloat16 for p in module.parameters()):
            module.to(dtype=torch.bfloat16)
            cast.append(name)
    return "on" + (f": cast {', '.join(cast)}" if cast else "")


# -- 2. Qwen3 truncation ---------------------------------------------------------------


def _default_out_layers(pipeline: Any) -> tuple[int, ...] | None:
    for method, name in (("__call__", "text_encoder_out_layers"), ("encode_prompt", "text_encoder_out_layers"),
                         ("_get_qwen3_prompt_embeds", "hidden_states_layers")):
        try:
            parameter = inspect.signature(getattr(type(pipeline), method)).parameters.get(name)
        except (AttributeError, TypeError, ValueError):
            continue
        if parameter is not None and isinstance(parameter.default, (tuple, list)) and parameter.default:
            return tuple(int(i) for i in parameter.default)
    return None


def _truncated_view(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """A shallow copy of a decoder-only ``*Model`` (e.g. ``Qwen3Model``) running only its first
    ``keep`` layers.  Shares every parameter, buffer, submodule and hook dict with ``model``."""
    view = copy.copy(model)
    view._modules = collections.OrderedDict(model._modules)
    view._modules["layers"] = torch.nn.ModuleList(list(cast(torch.nn.ModuleList, model.layers)[:keep]))
    config: Any = copy.deepcopy(model.config)  # a transformers PretrainedConfig
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), (list, tuple)):
        config.layer_types = list(config.layer_types[:keep])
    # transformers replaces hidden_states[-1] with the final-normed output: with the view the
    # last hidden state is a raw layer output the pipeline wants as is.
    config.tie_last_hidden_states = False
    view.config = config
    return view


def _has_offload_hooks(encoder: torch.nn.Module) -> bool:
    """Whether accelerate / diffusers offload hooks sit on the encoder (model offload hooks the
    top module, sequential offload every module, group offload uses diffusers' hook registry)."""
    layers = getattr(getattr(encoder, "model", None), "layers", None)
    probes = [encoder, getattr(encoder, "model", None), layers[0] if layers is not None and len(layers) else None]
    return any(
        getattr(m, "_hf_hook", None) is not None or getattr(m, "_diffusers_hook", None) is not None
        for m in probes if m is not None
    )


def _apply_truncation(pipeline: Any, opts: Optimizations) -> str:
    if not opts.truncate_text_encoder:
        return "off"
    info = pipeline.__dict__.get("_fluxserve_truncation")
    if info is not None:
        return f"on: {info['kept']} of {info['total']} layers (already applied)"
    original = getattr(type(pipeline), "_get_qwen3_prompt_embeds", None)
    encoder = getattr(pipeline, "text_encoder", None)
    layers = getattr(getattr(encoder, "model", None), "layers", None)
    if original is None or encoder is None or layers is None:  # (no encoder: no layers either)
        return f"unavailable: {type(pipeline).__name__} has no Qwen3 text encoder (FLUX.2 klein only)"
    if _has_offload_hooks(encoder):
        return "unavailable: the text encoder is offloaded (accelerate hooks)"
    used = _default_out_layers(pipeline)
    signature = inspect.signature(original)
    if used is None or "hidden_states_layers" not in signature.parameters or "text_encoder" not in signature.parameters:
        return "unavailable: cannot tell which hidden layers the pipeline reads"
    total = len(layers)
    keep = max(used)  # hidden_states[k] is the output of layer k - 1
    if min(used) < 0 or keep >= total:
        return f"unavailable: the pipeline reads hidden layers {used} of {total}: nothing to drop"

    # Probe: full encoder first (installs transformers' output hooks on the shared layers, so
    # the view, copied after, does not install them twice), then the view, then full again.
    probe = dict(tokenizer=pipeline.tokenizer, prompt=["fluxserve truncation probe"], max_sequence_length=16,
                 hidden_states_layers=used)
    with torch.no_grad():
        reference = original(text_encoder=encoder, **probe)
        view = _truncated_view(encoder.model, keep)
        truncated = original(text_encoder=view, **probe)
        again = original(text_encoder=encoder, **probe)
    if not torch.equal(reference, again):
        raise RuntimeError("the full text encoder changed while building its truncated view")
    if not torch.equal(reference, truncated):
        return "unavailable: the truncated encoder's embeddings differ from the full encoder's"

    def _get_qwen3_prompt_embeds(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        chosen = tuple(bound.arguments["hidden_states_layers"])
        if (
            bound.arguments["text_encoder"] is encoder
            and chosen and all(0 <= i <= keep for i in chosen)
            and not _has_offload_hooks(encoder)
        ):
            bound.arguments["text_encoder"] = view
        return original(*bound.args, **bound.kwargs)

    pipeline._get_qwen3_prompt_embeds = _get_qwen3_prompt_embeds  # shadows the staticmethod
    pipeline._fluxserve_truncation = {"kept": keep, "total": total, "layers": used}
    return f"on: {keep} of {total} layers (hidden states {', '.join(map(str, used))})"


# -- 3. channels_last VAE ----------------------------------------------------------------


def _apply_channels_last_vae(pipeline: Any, opts: Optimizations) -> str:
    if not opts.channels_last_vae:
        return "off"
    vae = getattr(pipeline, "vae", None)
    if not isinstance(vae, torch.nn.Module):
        return "unavailable: the pipeline has no VAE"
    vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit this documented form
    return "on"


# -- 4. attention backend ----------------------------------------------------------------


def _probe_attention(name: str, *, device: str | torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> None:
    """Run backend ``name`` on a small problem on ``device``; raise unless it matches SDPA math."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    backend = AttentionBackendName(name)
    _check_attention_backend_requirements(backend)
    generator = torch.Generator("cpu").manual_seed(0)
    query, key, value = (torch.randn(1, 64, heads, head_dim, generator=generator) for _ in range(3))
    q, k, v = (t.to(device, dtype) for t in (query, key, value))
    out = dispatch_attention_fn(q, k, v, backend=backend)
    out = out[0] if isinstance(out, tuple) else out
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    ).transpose(1, 2)
    if tuple(out.shape) != tuple(expected.shape):
        raise RuntimeError(f"{name} returned shape {tuple(out.shape)}")
    error = (out.float().cpu() - expected).abs().max().item()
    if not error < 0.1:  # bf16 rounding stays well below; a wrong kernel is off by ~1
        raise RuntimeError(f"{name} is off by {error:.3g} from SDPA")


def _set_attention_backend(transformer: ModelMixin, name: str) -> None:
    """``transformer.set_attention_backend(name)`` without changing diffusers' process-wide default
    (which set_attention_backend also sets) for the other models in this process."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def _apply_attention_backend(pipeline: Any, opts: Optimizations, device: str | torch.device) -> str:
    wanted = opts.attention_backend
    if wanted == "off":
        return "off"
    transformer = getattr(pipeline, "transformer", None)
    if transformer is None or not callable(getattr(transformer, "set_attention_backend", None)):
        return "unavailable: this diffusers has no attention dispatcher on the transformer"
    config = transformer.config
    probe = dict(
        device=device, dtype=transformer.dtype,
        heads=int(getattr(config, "num_attention_heads", 2)), head_dim=int(getattr(config, "attention_head_dim", 64)),
    )
    if wanted != "auto":
        if wanted != "native" and wanted not in known_attention_backends():
            # the settings check only the form of a name (no diffusers there): a typo ends here, reported
            known = ", ".join(sorted(known_attention_backends()))
            log.warning("unknown attention backend %r; known: %s", wanted, known)
            return f"unavailable: unknown attention backend {wanted!r}; use auto, off, native or one of {known}"
        try:
            if wanted != "native":
                _probe_attention(wanted, **probe)
            _set_attention_backend(transformer, wanted)
        except Exception as exc:  # noqa: BLE001 - not installed, wrong GPU, no hub access...
            log.warning("attention backend %s unavailable: %s", wanted, exc)
            return f"unavailable: {wanted}: {exc}"
        return f"on: {wanted}"
    candidates = CUDA_ATTENTION_PREFERENCE if _is_cuda(device) else ("native",)
    skipped = []
    for name in candidates:
        try:
            if name != "native":
                _probe_attention(name, **probe)
            _set_attention_backend(transformer, name)
        except Exception as exc:  # noqa: BLE001 - try the next one
            skipped.append(f"{name} ({type(exc).__name__})")
            log.info("attention backend %s skipped: %s", name, exc)
            continue
        return f"on: {name} (auto" + (f"; skipped {', '.join(skipped)})" if skipped else ")")
    return f"unavailable: no attention backend passed its probe ({', '.join(skipped)})"


# -- 5. fp8 ------------------------------------------------------------------------------


def _fp8_linear_filter(module: torch.nn.Module, _fqn: str = "") -> bool:
    """Linear layers whose sides fit fp8 GEMMs (multiples of 16)."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _fp8_config() -> Any:
    """torchao's float8 dynamic activation + weight config, per row (new or old torchao API)."""
    import torchao.quantization as quantization

    per_row = getattr(quantization, "PerRow", None)
    if per_row is None:
        from torchao.quantization import granularity

        per_row = granularity.PerRow
    config_class = getattr(quantization, "Float8DynamicActivationFloat8WeightConfig", None)
    if config_class is not None:
        return config_class(granularity=per_row())
    return quantization.float8_dynamic_activation_float8_weight(granularity=per_row())


def _apply_fp8(pipeline: Any, opts: Optimizations, device: str | torch.device) -> str:
    if not opts.fp8:
        return "off"
    if not _is_cuda(device) or not torch.cuda.is_available():
        return f"unavailable: fp8 needs a CUDA GPU of compute capability >= 8.9 (device is {device})"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        return f"unavailable: fp8 needs compute capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
    try:
        from torchao.quantization import quantize_
    except ImportError:
        return "unavailable: torchao is not installed"
    transformer = pipeline.transformer
    if getattr(transformer, "_fluxserve_fp8", False):
        return "on: float8 dynamic, per row (already applied)"
    if transformer.dtype != torch.bfloat16:
        return f"unavailable: fp8 per-row quantization needs bf16 weights, the transformer is {transformer.dtype}"
    quantize_(transformer, _fp8_config(), filter_fn=_fp8_linear_filter)
    transformer._fluxserve_fp8 = True
    return "on: float8 dynamic activations and weights, per row"


# -- 6. torch.compile --------------------------------------------------------------------


def _inductor_unavailable(device: str | torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None."""
    try:
        if _is_cuda(device):
            from torch.utils._triton import has_triton

            return None if has_triton() else "triton is not installed"
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
        return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) for inductor on cpu"
    except Exception:  # noqa: BLE001 - the check itself failed: let the warm-up tell
        return None


def _compiled_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _uncompile(transformer: torch.nn.Module) -> None:
    for module in _compiled_blocks(transformer):
        module._compiled_call_impl = None
    transformer._fluxserve_compiled = False  # type: ignore[assignment]  # torch types Module.__setattr__ values as Tensor | Module


def _apply_compile(pipeline: Any, opts: Optimizations, device: str | torch.device) -> str:
    if not opts.compile:
        return "off"
    transformer = getattr(pipeline, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        return "unavailable: the pipeline has no transformer"
    if getattr(transformer, "_fluxserve_compiled", False):
        return "on: regional (already applied)"
    reason = _inductor_unavailable(device)
    if reason:
        return f"unavailable: {reason}"
    kwargs: dict[str, Any] = {"fullgraph": True}
    if opts.compile_dynamic is not None:
        kwargs["dynamic"] = opts.compile_dynamic
    compile_repeated_blocks = getattr(transformer, "compile_repeated_blocks", None)
    if callable(compile_repeated_blocks) and getattr(transformer, "_repeated_blocks", None):
        compile_repeated_blocks(**kwargs)
        how = "regional (compile_repeated_blocks)"
    else:
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, name, [])]
        if not blocks:
            return "unavailable: no repeated transformer blocks to compile"
        for block in blocks:
            block.compile(**kwargs)
        how = "per block"
    transformer._fluxserve_compiled = True  # type: ignore[assignment]  # torch types Module.__setattr__ values as Tensor | Module
    return f"on: {how}, fullgraph; call warm_up() at load"


# -- 7. prompt-embedding cache -----------------------------------------------------------


class _Uncacheable(Exception):
    pass


def _key_part(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_key_part(v) for v in value))
    if isinstance(value, (torch.device, torch.dtype)):
        return (type(value).__name__, str(value))
    raise _Uncacheable(type(value).__name__)  # tensors (precomputed embeddings) and anything else


class _Stored:
    """A result tensor kept in host memory, with the device to give it back on."""

    __slots__ = ("tensor", "device")

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.tensor = tensor.detach().to("cpu", copy=True)

    def restore(self) -> torch.Tensor:
        if self.device == self.tensor.device:
            return self.tensor.clone()
        return self.tensor.to(self.device)  # a new tensor: exact copy


def _to_store(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _Stored(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_store(v) for v in value)
    return value


def _from_store(value: Any) -> Any:
    if isinstance(value, _Stored):
        return value.restore()
    if isinstance(value, (tuple, list)):
        return type(value)(_from_store(v) for v in value)
    return value


class PromptEmbeddingCache:
    """A thread-safe LRU of ``encode_prompt`` results, kept in host memory.  Stored tensors are
    never handed out: every call gets fresh copies on the device they were computed on, so a
    caller that changes them in place cannot spoil the cache."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.bypassed = 0

    def lookup(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                stored = self._entries[key]
            else:
                self.misses += 1
                stored = None
        if stored is None:
            result = compute()  # outside the lock: other prompts are not held up
            stored = _to_store(result)
            with self._lock:
                self._entries[key] = stored
                self._entries.move_to_end(key)
                while len(self._entries) > self.maxsize:
                    self._entries.popitem(last=False)
            return result
        return _from_store(stored)

    def bypass(self) -> None:
        with self._lock:
            self.bypassed += 1

    def clear(self, *, reset_stats: bool = True) -> None:
        """Drop every entry (call it after changing weights, e.g. loading a LoRA)."""
        with self._lock:
            self._entries.clear()
            if reset_stats:
                self.hits = self.misses = self.bypassed = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bypassed": self.bypassed,
                    "size": len(self._entries), "maxsize": self.maxsize}


def _encoder_state(pipeline: Any) -> tuple:
    """What besides the arguments decides an encoding: which text encoders, in what dtype, where,
    with which LoRA adapters on, at what scale."""
    # autograd on or off: kernels (SDPA's backend choice) and so the last bits can differ
    state: list[Any] = [type(pipeline).__name__, torch.is_grad_enabled()]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            parameter = next(module.parameters(), None)
            state.append((name, id(module), str(getattr(parameter, "dtype", None)), str(getattr(parameter, "device", None)),
                          _adapter_state(module)))
    return tuple(state)


def _adapter_state(module: torch.nn.Module) -> tuple | None:
    """The LoRA state of a text encoder (None without LoRA layers): for its peft layers, which
    adapters are active, whether they are disabled or merged, and their scales; each layer's
    weights are fixed once loaded (a hot-swap changes the adapter, hence this state too: the
    engine swaps only transformer adapters). Walking the modules costs well under a millisecond."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there are no adapters
        return None
    states = set()
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            active = tuple(layer.active_adapters)
            scaling = getattr(layer, "scaling", {}) or {}
            scales = tuple((name, float(scaling[name])) for name in active if name in scaling)
            states.add((active, bool(layer.disable_adapters), bool(layer.merged), scales))
    return tuple(sorted(states)) if states else None


def _apply_prompt_cache(pipeline: Any, opts: Optimizations) -> str:
    if opts.prompt_cache_size <= 0:
        return "off"
    existing = pipeline.__dict__.get("_fluxserve_prompt_cache")
    if existing is not None:
        return f"on: {existing.maxsize} prompts (already applied)"
    original = getattr(pipeline, "encode_prompt", None)
    if not callable(original):
        return "unavailable: the pipeline has no encode_prompt"
    signature = inspect.signature(original)
    cache = PromptEmbeddingCache(opts.prompt_cache_size)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            if arguments.get("device", ...) is None:  # the pipeline would pick its execution device
                arguments["device"] = pipeline._execution_device
            key = (_encoder_state(pipeline), tuple((name, _key_part(v)) for name, v in sorted(arguments.items())))
        except (_Uncacheable, TypeError):
            cache.bypass()
            return original(*args, **kwargs)
        return cache.lookup(key, lambda: original(*args, **kwargs))

    pipeline.encode_prompt = encode_prompt
    pipeline._fluxserve_prompt_cache = cache
    return f"on: {cache.maxsize} prompts"


def prompt_cache_stats(pipeline: Any) -> dict[str, int] | None:
    """The prompt cache's counters (hits, misses, bypassed, size, maxsize), or None without one."""
    cache = getattr(pipeline, "_fluxserve_prompt_cache", None)
    return cache.stats() if cache is not None else None


# --------------------------------------------------------------------------------------
# warm-up
# --------------------------------------------------------------------------------------


def warm_up(
    pipeline: Any, *, sizes: Iterable[tuple[int, int]], steps: int = 1,
    calls: Callable[[int, int], list[Any]] | None = None,
) -> dict[str, float]:
    """Run one short generation per served ``(width, height)`` so that compilation (and every other
    first-call cost) happens now, at load, and no request pays for it.  Sides are rounded up to
    multiples of 16 as the families do.  ``calls(width, height)`` gives the calls to make
    (``PipelineCall``s of the pipeline's family: ``Family.warm_calls``, which shapes them like the
    requests it serves, batched ones included when dynamic batching is on); by default one
    text-to-image call.

    Returns ``{"WxH": seconds}``.  Should a compiled transformer fail here, its blocks go back to
    eager, the report says compile unavailable, and the warm-up goes on.  Afterwards the prompt
    cache is emptied and its counters reset.
    """
    timings: dict[str, float] = {}
    transformer = getattr(pipeline, "transformer", None)
    for width, height in sizes:
        width, height = (-(-int(width) // 16) * 16), (-(-int(height) // 16) * 16)
        started = time.perf_counter()
        made = calls(width, height) if calls else [{"prompt": "warm-up", "width": width, "height": height}]
        for call in made:
            kwargs = dict(getattr(call, "kwargs", call), num_inference_steps=steps, output_type="pil")
            generator = torch.Generator("cpu").manual_seed(0)
            try:
                pipeline(generator=generator, **kwargs)
            except Exception as exc:
                if transformer is None or not getattr(transformer, "_fluxserve_compiled", False):
                    raise
                log.error("compiled transformer failed at warm-up (%dx%d); back to eager", width, height, exc_info=True)
                _uncompile(transformer)
                report = pipeline.__dict__.get("_fluxserve_optimizations")
                if report is not None:
                    report["compile"] = f"unavailable: failed at warm-up: {type(exc).__name__}: {exc}"
                pipeline(generator=torch.Generator("cpu").manual_seed(0), **kwargs)
        timings[f"{width}x{height}"] = time.perf_counter() - started
        log.info("warm-up %s %dx%d: %.1fs", type(pipeline).__name__, width, height, timings[f"{width}x{height}"])
    cache = pipeline.__dict__.get("_fluxserve_prompt_cache")
    if cache is not None:
        cache.clear()
    return timings
