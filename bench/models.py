"""FLUX.2 klein pipelines with random weights, built from config, offline, for the benchmarks.

Scales:

* ``"true"``: the published component sizes (docs: /work/shared/design/MODELS.md):
  ``Flux2Transformer2DModel`` 3.88 B params (klein-4B), ``Qwen3ForCausalLM`` 4.02 B params
  (Qwen3-4B), ``AutoencoderKLFlux2`` with its default (= published) config, ~84 M params.
  About 16 GB in bf16. Built directly on the target device in the target dtype (under
  ``torch.device(device)`` with that default dtype), so the weights are never materialised on
  the host: no 16 GB (or 32 GB fp32) copy in host RAM, nothing saved to disk.
* ``"small"``: the same classes and the same structure (28 Qwen3 layers so that hidden layers 9,
  18, 27 exist, 32 latent channels, VAE scale factor 8, 2x2 patchify) at a small width/depth,
  so the code path of a true-size run can be proven on CPU in seconds.

Weights are random (default initialisation, seeded): speed does not depend on weight values.
The tokenizer is the tiny offline BPE of ``fluxserve.engine.tiny`` (vocab ~400, below the
encoder's vocab at both scales), so nothing is downloaded. A 512-token padded prompt costs the
same whatever its tokens are.

``meta_components(scale or pipeline)`` builds the same modules on the ``meta`` device (no memory)
for parameter and FLOP counts (``bench.flops``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SCALES = ("small", "true")


def transformer_config(scale: str, text_hidden_size: int) -> dict[str, Any]:
    """``Flux2Transformer2DModel`` kwargs; ``joint_attention_dim`` = 3 stacked encoder layers."""
    if scale == "true":
        return dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3 * text_hidden_size, timestep_guidance_channels=256,
                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
    if scale == "small":
        return dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=3 * text_hidden_size, timestep_guidance_channels=64,
                    mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8), rope_theta=2000, guidance_embeds=False)
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


def text_encoder_config(scale: str) -> Any:
    """``Qwen3Config``: Qwen3-4B at true scale; 28 narrow layers at small scale."""
    from transformers import Qwen3Config

    if scale == "true":
        return Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                           tie_word_embeddings=True, attention_bias=False)
    if scale == "small":
        return Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=28,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                           tie_word_embeddings=True)
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


def vae_config(scale: str) -> dict[str, Any]:
    """``AutoencoderKLFlux2`` kwargs: the class defaults (the published config) at true scale."""
    if scale == "true":
        return {}
    if scale == "small":
        return dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=8,
                    sample_size=256)
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


@contextlib.contextmanager
def _building(device: str | torch.device, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Allocate new modules on ``device`` in ``dtype``, with seeded RNGs; restore everything after."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    devices = [device.index] if device.type == "cuda" else []
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous)


def _scheduler() -> Any:
    from fluxserve.engine.tiny import _flow_match_scheduler

    return _flow_match_scheduler()


def build_klein_pipeline(scale: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A ``Flux2KleinPipeline`` (step-distilled, like klein-4B) with random weights, on ``device``.

    true scale: ~16 GB in bf16 on the GPU, built there in seconds (random init on the device).
    """
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    from fluxserve.engine.tiny import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    encoder_config = text_encoder_config(scale)
    if encoder_config.vocab_size < len(tokenizer):
        raise ValueError("the encoder's vocabulary must cover the tokenizer's")
    with _building(device, dtype, seed + 1):
        text_encoder = Qwen3ForCausalLM(encoder_config).eval()
    with _building(device, dtype, seed + 2):
        vae = AutoencoderKLFlux2(**vae_config(scale)).eval()
    with _building(device, dtype, seed + 3):
        transformer = Flux2Transformer2DModel(**transformer_config(scale, encoder_config.hidden_size)).eval()
    for module in (text_encoder, vae, transformer):
        module.requires_grad_(False)
    pipeline = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def meta_components(source: str | Any) -> dict[str, Any]:
    """transformer, text_encoder, vae on the meta device (shapes only, no memory): from a scale
    name, or from a built pipeline's configs (tiny pipelines included)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        if isinstance(source, str):
            encoder_config = text_encoder_config(source)
            return {
                "transformer": Flux2Transformer2DModel(**transformer_config(source, encoder_config.hidden_size)),
                "text_encoder": Qwen3ForCausalLM(encoder_config),
                "vae": AutoencoderKLFlux2(**vae_config(source)),
            }
        return {
            "transformer": Flux2Transformer2DModel.from_config(source.transformer.config),
            "text_encoder": Qwen3ForCausalLM(source.text_encoder.config),
            "vae": AutoencoderKLFlux2.from_config(source.vae.config),
        }


def parameter_counts(source: str | Any) -> dict[str, int]:
    """Parameters per component (tied embeddings counted once)."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in meta_components(source).items()}


def save_pipeline(pipeline: Any, folder: Path) -> Path:
    """``save_pretrained`` into ``folder``, loadable with ``Flux2KleinPipeline.from_pretrained``
    (what the service does for a ``model_overrides`` source). Cheap at small scale; ~16 GB and
    minutes at true scale."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
