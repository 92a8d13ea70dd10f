"""FLUX.2 klein and Flux Kontext pipelines with random weights, built from config, offline, for
the benchmarks (``MODELS``: the ``--model`` names and their builders).

Scales:

* ``"true"``: the published component sizes (docs: /work/shared/design/MODELS.md), counted on the
  meta device (``parameter_counts``):

  - klein: ``Flux2Transformer2DModel`` 3.88 B params (klein-4B), ``Qwen3ForCausalLM`` 4.02 B
    params (Qwen3-4B), ``AutoencoderKLFlux2`` with its default (= published) config, ~84 M
    params. About 16 GB in bf16.
  - kontext (FLUX.1 Kontext dev): ``FluxTransformer2DModel`` 11.90 B params, T5-v1.1-XXL
    ``T5EncoderModel`` 4.76 B, CLIP-L ``CLIPTextModel`` 123 M, FLUX.1 ``AutoencoderKL`` 84 M.
    About 33.7 GB in bf16.

  Built directly on the target device in the target dtype (under ``torch.device(device)`` with
  that default dtype), so the weights are never materialised on the host: no 16-34 GB (or twice
  that in fp32) copy in host RAM, nothing saved to disk.
* ``"small"``: the same classes and the same structure (klein: 28 Qwen3 layers so that hidden
  layers 9, 18, 27 exist, 32 latent channels; kontext: CLIP + T5 (gated-gelu), 16 latent
  channels, guidance embedding; both: VAE scale factor 8, 2x2 patchify) at a small width/depth,
  so the code path of a true-size run can be proven on CPU in seconds.

Weights are random (default initialisation, seeded): speed does not depend on weight values.
The tokenizers are the tiny offline ones of ``fluxserve.engine.tiny`` (Qwen BPE ~400, CLIP
character-level 514, T5 Unigram ~300: each below its encoder's vocab at both scales, checked),
so nothing is downloaded. A padded prompt (512 tokens; CLIP: 77) costs the same whatever its
tokens are.

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


def kontext_transformer_config(scale: str, t5_hidden_size: int, clip_hidden_size: int) -> dict[str, Any]:
    """``FluxTransformer2DModel`` kwargs (FLUX.1 dev / Kontext: guidance-distilled, 16 latent
    channels 2x2-packed = 64 in, T5 context, pooled CLIP projection)."""
    common = dict(patch_size=1, in_channels=64, joint_attention_dim=t5_hidden_size,
                  pooled_projection_dim=clip_hidden_size, guidance_embeds=True)
    if scale == "true":
        return dict(common, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    axes_dims_rope=(16, 56, 56))
    if scale == "small":
        return dict(common, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                    axes_dims_rope=(8, 12, 12))
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


def clip_config(scale: str) -> Any:
    """``CLIPTextConfig``: CLIP-L's text tower at true scale, with the tiny tokenizer's bos/eos/pad
    ids (the pooled output is read at the eos token)."""
    from transformers import CLIPTextConfig

    from fluxserve.engine.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if scale == "true":
        return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                              hidden_act="quick_gelu", **ids)
    if scale == "small":
        return CLIPTextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
                              hidden_act="quick_gelu", **ids)
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


def t5_config(scale: str) -> Any:
    """``T5Config`` of an encoder: T5-v1.1-XXL at true scale (the tiny tokenizer's pad 0 and eos 1
    are T5's own ids)."""
    from transformers import T5Config

    common = dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False)
    if scale == "true":
        return T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, **common)
    if scale == "small":
        return T5Config(vocab_size=1024, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4, **common)
    raise ValueError(f"unknown scale {scale!r}; one of {SCALES}")


def kontext_vae_config(scale: str) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs: the FLUX.1 VAE (16 latent channels, FLUX.1's scale and shift)."""
    common = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False)
    if scale == "true":
        return dict(common, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
    if scale == "small":
        return dict(common, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
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
    from fluxserve.engine.tiny import flow_match_scheduler

    return flow_match_scheduler()


def _check_vocab(config: Any, tokenizer: Any) -> None:
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"the encoder's vocabulary ({config.vocab_size}) must cover the tokenizer's "
                         f"({len(tokenizer)})")


def _frozen(module: Any) -> Any:
    return module.eval().requires_grad_(False)


def build_klein_pipeline(scale: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A ``Flux2KleinPipeline`` (step-distilled, like klein-4B) with random weights, on ``device``.

    true scale: ~16 GB in bf16 on the GPU, built there in seconds (random init on the device).
    """
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    from fluxserve.engine.tiny import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    encoder_config = text_encoder_config(scale)
    _check_vocab(encoder_config, tokenizer)
    with _building(device, dtype, seed + 1):
        text_encoder = _frozen(Qwen3ForCausalLM(encoder_config))
    with _building(device, dtype, seed + 2):
        vae = _frozen(AutoencoderKLFlux2(**vae_config(scale)))
    with _building(device, dtype, seed + 3):
        transformer = _frozen(Flux2Transformer2DModel(**transformer_config(scale, encoder_config.hidden_size)))
    pipeline = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_kontext_pipeline(scale: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A ``FluxKontextPipeline`` (FLUX.1 Kontext dev) with random weights, on ``device``.

    true scale: ~34 GB in bf16 on the GPU, built there in seconds (random init on the device).
    """
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from fluxserve.engine.tiny import build_clip_tokenizer, build_t5_tokenizer

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    clip, t5 = clip_config(scale), t5_config(scale)
    _check_vocab(clip, tokenizer)
    _check_vocab(t5, tokenizer_2)
    with _building(device, dtype, seed + 1):
        text_encoder = _frozen(CLIPTextModel(clip))
    with _building(device, dtype, seed + 2):
        text_encoder_2 = _frozen(T5EncoderModel(t5))
    with _building(device, dtype, seed + 3):
        vae = _frozen(AutoencoderKL(**kontext_vae_config(scale)))
    with _building(device, dtype, seed + 4):
        transformer = _frozen(FluxTransformer2DModel(**kontext_transformer_config(scale, t5.d_model,
                                                                                   clip.hidden_size)))
    pipeline = FluxKontextPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                                   image_encoder=None, feature_extractor=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


#: ``--model`` name -> (diffusers pipeline class, builder)
MODELS = {
    "klein": ("Flux2KleinPipeline", build_klein_pipeline),
    "kontext": ("FluxKontextPipeline", build_kontext_pipeline),
}


def model_of(pipeline: Any) -> str:
    """The ``MODELS`` name of a built pipeline, by its class (a subclass counts)."""
    import diffusers

    for name, (class_name, _builder) in MODELS.items():
        if isinstance(pipeline, getattr(diffusers, class_name)):
            return name
    raise ValueError(f"no benchmark model for pipeline class {type(pipeline).__name__}")


def _klein_meta(source: str | Any) -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

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


def _kontext_meta(source: str | Any) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    if isinstance(source, str):
        clip, t5 = clip_config(source), t5_config(source)
        return {
            "transformer": FluxTransformer2DModel(**kontext_transformer_config(source, t5.d_model, clip.hidden_size)),
            "text_encoder": CLIPTextModel(clip),
            "text_encoder_2": T5EncoderModel(t5),
            "vae": AutoencoderKL(**kontext_vae_config(source)),
        }
    return {
        "transformer": FluxTransformer2DModel.from_config(source.transformer.config),
        "text_encoder": CLIPTextModel(source.text_encoder.config),
        "text_encoder_2": T5EncoderModel(source.text_encoder_2.config),
        "vae": AutoencoderKL.from_config(source.vae.config),
    }


_META = {"klein": _klein_meta, "kontext": _kontext_meta}


def meta_components(source: str | Any, model: str | None = None) -> dict[str, Any]:
    """The components on the meta device (shapes only, no memory): from a scale name (of
    ``model``, default klein), or from a built pipeline's configs (tiny pipelines included; the
    model is then its class's). klein: transformer, text_encoder (Qwen3), vae; kontext:
    transformer, text_encoder (CLIP), text_encoder_2 (T5), vae."""
    if not isinstance(source, str):
        model = model_of(source)
    with torch.device("meta"):
        return _META[model or "klein"](source)


def parameter_counts(source: str | Any, model: str | None = None) -> dict[str, int]:
    """Parameters per component (tied embeddings counted once)."""
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in meta_components(source, model).items()}


def save_pipeline(pipeline: Any, folder: Path) -> Path:
    """``save_pretrained`` into ``folder``, loadable with ``<PipelineClass>.from_pretrained`` (what
    the service does for a ``model_overrides`` source). Cheap at small scale; ~16 GB (klein) or
    ~34 GB (kontext) and minutes at true scale."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
