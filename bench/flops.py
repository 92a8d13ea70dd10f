"""FLOPs of each stage of a klein or Kontext generation, counted (not estimated) by running the
components on the ``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``: no memory, no
weights, seconds on a CPU even at true size. Matrix products (linear layers) and attention are
counted (attention = QK^T + AV = 4 * S^2 * width per layer, whatever kernel runs it), and the VAE's
convolutions; norms, activations and RoPE are not (a fraction of a percent). For klein-4B at 1024^2
with 512 text tokens this gives 28.3 TFLOP linear + 6.5 TFLOP attention = 34.8 TFLOP per step
(PERFORMANCE.md).

Kontext (FLUX.1 Kontext dev) at 1024^2 edits a 1024^2 reference: the encoded reference's 4096
tokens are concatenated to the 4096 image tokens, so each step runs 4096 + 4096 + 512 (T5) =
8704 tokens through the FLUX.1 transformer (no true CFG: the service sends no negative prompt).
Its prompt is encoded by CLIP-L (77 tokens, pooled) and T5-XXL (512 tokens), and the reference
by the VAE encoder, once per image.
"""

from __future__ import annotations

from typing import Any

import torch

#: bf16 dense peak of an H100 SXM (and H200), FLOP/s: the roofline's denominator.
H100_BF16_PEAK = 989e12

_CATEGORIES = {"mm": "linear", "addmm": "linear", "linear": "linear", "bmm": "attention", "baddbmm": "attention",
               "convolution": "convolution"}


def _category(op: str) -> str:
    if op.startswith(("_scaled_dot_product", "_flash_attention", "_efficient_attention")):
        return "attention"
    return _CATEGORIES.get(op, "other")


def _count(run) -> dict[str, Any]:
    """FLOPs of ``run()`` per category: linear (mm, addmm), attention (bmm, SDPA), convolution."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    by_op = {str(op).split(".")[-1]: float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    result: dict[str, Any] = {"linear": 0.0, "attention": 0.0, "convolution": 0.0, "other": 0.0}
    for op, n in by_op.items():
        result[_category(op)] += n
    result["total"] = float(counter.get_total_flops())
    result["by_op"] = by_op
    return result


def image_tokens(height: int, width: int) -> int:
    """Latent tokens of an image: 8x VAE downsampling, then 2x2 patches."""
    return (height // 16) * (width // 16)


def transformer_step_flops(transformer: Any, height: int, width: int, text_tokens: int = 512) -> dict[str, float]:
    """One klein denoising step (one transformer forward, batch 1, no CFG: klein is distilled)."""
    config = transformer.config
    n_image = image_tokens(height, width)
    meta = torch.device("meta")
    hidden = torch.empty(1, n_image, config.in_channels, device=meta)
    context = torch.empty(1, text_tokens, config.joint_attention_dim, device=meta)
    img_ids = torch.zeros(1, n_image, 4, device=meta, dtype=torch.long)
    txt_ids = torch.zeros(1, text_tokens, 4, device=meta, dtype=torch.long)
    timestep = torch.ones(1, device=meta)
    result = _count(lambda: transformer(hidden_states=hidden, timestep=timestep, guidance=None,
                                        encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids,
                                        return_dict=False))
    result.update(tokens=n_image + text_tokens, image_tokens=n_image, text_tokens=text_tokens)
    return result


def flux1_step_flops(transformer: Any, height: int, width: int, reference_tokens: int | None = None,
                     text_tokens: int = 512) -> dict[str, float]:
    """One Kontext denoising step: one FLUX.1 transformer forward (batch 1, guidance embedded, no
    true CFG) over the image tokens, the reference's tokens (default: a reference of the output's
    size) and the T5 tokens."""
    config = transformer.config
    n_image = image_tokens(height, width)
    n_reference = n_image if reference_tokens is None else reference_tokens
    meta = torch.device("meta")
    hidden = torch.empty(1, n_image + n_reference, config.in_channels, device=meta)
    context = torch.empty(1, text_tokens, config.joint_attention_dim, device=meta)
    pooled = torch.empty(1, config.pooled_projection_dim, device=meta)
    img_ids = torch.zeros(n_image + n_reference, 3, device=meta)
    txt_ids = torch.zeros(text_tokens, 3, device=meta)
    ones = torch.ones(1, device=meta)
    result = _count(lambda: transformer(hidden_states=hidden, timestep=ones, guidance=ones, pooled_projections=pooled,
                                        encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids,
                                        return_dict=False))
    result.update(tokens=n_image + n_reference + text_tokens, image_tokens=n_image, reference_tokens=n_reference,
                  text_tokens=text_tokens)
    return result


def text_encoder_flops(text_encoder: Any, text_tokens: int = 512, layers: int | None = None) -> dict[str, Any]:
    """The Qwen3 forward as the pipeline runs it: all layers and the LM head, 512 padded tokens;
    with ``layers``, only the first ``layers`` decoder layers and no LM head (the service's
    truncated encoder)."""
    meta = torch.device("meta")
    ids = torch.zeros(1, text_tokens, dtype=torch.long, device=meta)
    # a 4D (additive) mask: the 2D one is inspected with data-dependent checks meta tensors cannot answer
    mask = torch.zeros(1, 1, text_tokens, text_tokens, device=meta)
    model = text_encoder
    if layers is not None:
        import copy

        from transformers import Qwen3Model

        config = copy.deepcopy(text_encoder.config)
        config.num_hidden_layers = layers
        config.layer_types = list(config.layer_types)[:layers] if getattr(config, "layer_types", None) else None
        with meta:
            model = Qwen3Model(config)
    return _count(lambda: model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False))


def flux1_encoder_flops(text_encoder: Any, tokens: int) -> dict[str, Any]:
    """A FLUX.1 text encoder as the pipelines run it, on ``tokens`` padded tokens with no
    attention mask: CLIP (77 tokens, pooled output) or T5 (512 tokens)."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device=torch.device("meta"))
    return _count(lambda: text_encoder(ids, output_hidden_states=False))


def vae_decode_flops(vae: Any, height: int, width: int) -> dict[str, float]:
    """``vae.decode`` of one image."""
    meta = torch.device("meta")
    latents = torch.empty(1, vae.config.latent_channels, height // 8, width // 8, device=meta)
    return _count(lambda: vae.decode(latents, return_dict=False))


def vae_encode_flops(vae: Any, height: int, width: int) -> dict[str, float]:
    """``vae.encode`` of one image (Kontext's reference)."""
    image = torch.empty(1, vae.config.in_channels, height, width, device=torch.device("meta"))
    return _count(lambda: vae.encode(image, return_dict=False))


def combined(*counts: dict[str, Any]) -> dict[str, Any]:
    """Several counts as one (e.g. CLIP + T5 = Kontext's text encoding)."""
    result: dict[str, Any] = {key: sum(c[key] for c in counts)
                              for key in ("linear", "attention", "convolution", "other", "total")}
    by_op: dict[str, float] = {}
    for count in counts:
        for op, n in count["by_op"].items():
            by_op[op] = by_op.get(op, 0.0) + n
    result["by_op"] = by_op
    return result


def _klein_flops(parts: dict[str, Any], height: int, width: int, text_tokens: int,
                 text_layers: int | None) -> dict[str, dict]:
    return {
        "text_encoding": text_encoder_flops(parts["text_encoder"], text_tokens, text_layers),
        "step": transformer_step_flops(parts["transformer"], height, width, text_tokens),
        "vae_decode": vae_decode_flops(parts["vae"], height, width),
    }


def _kontext_flops(parts: dict[str, Any], height: int, width: int, text_tokens: int,
                   text_layers: int | None) -> dict[str, dict]:
    """A reference of the output's size (as the benchmarks send); ``text_layers`` does not apply."""
    clip = flux1_encoder_flops(parts["text_encoder"], parts["text_encoder"].config.max_position_embeddings)
    t5 = flux1_encoder_flops(parts["text_encoder_2"], text_tokens)
    text = combined(clip, t5)
    text.update(clip=clip["total"], t5=t5["total"])
    return {
        "text_encoding": text,
        "reference_encode": vae_encode_flops(parts["vae"], height, width),
        "step": flux1_step_flops(parts["transformer"], height, width, text_tokens=text_tokens),
        "vae_decode": vae_decode_flops(parts["vae"], height, width),
    }


_PIPELINE_FLOPS = {"klein": _klein_flops, "kontext": _kontext_flops}


def pipeline_flops(source: str | Any, height: int, width: int, text_tokens: int = 512,
                   text_layers: int | None = None, model: str | None = None) -> dict[str, dict]:
    """FLOPs of each counted stage of one generation (klein: text encoding, one step, VAE decode;
    kontext: text encoding (CLIP + T5), reference encode, one step, VAE decode), for a scale name
    of ``model`` (default klein) or a built pipeline (``text_layers``: klein's text encoder
    truncated to that many layers). The keys are the stage names of ``bench.stages``."""
    from bench.models import meta_components, model_of

    if not isinstance(source, str):
        model = model_of(source)
    model = model or "klein"
    return _PIPELINE_FLOPS[model](meta_components(source, model), height, width, text_tokens, text_layers)
