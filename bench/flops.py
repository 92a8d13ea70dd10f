"""FLOPs of each stage of a klein generation, counted (not estimated) by running the components
on the ``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``: no memory, no weights,
seconds on a CPU even at true size. Matrix products (linear layers) and attention are counted
(attention = QK^T + AV = 4 * S^2 * width per layer, whatever kernel runs it); norms, activations
and RoPE are not (a fraction of a percent). For klein-4B at 1024^2 with 512 text tokens this gives
28.3 TFLOP linear + 6.5 TFLOP attention = 34.8 TFLOP per step (PERFORMANCE.md).
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
    """One denoising step (one transformer forward, batch 1, no CFG: klein is distilled)."""
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
    result["tokens"] = n_image + text_tokens
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


def vae_decode_flops(vae: Any, height: int, width: int) -> dict[str, float]:
    """``vae.decode`` of one image (conv FLOPs are counted as "attention_and_other")."""
    meta = torch.device("meta")
    latents = torch.empty(1, vae.config.latent_channels, height // 8, width // 8, device=meta)
    return _count(lambda: vae.decode(latents, return_dict=False))


def pipeline_flops(source: str | Any, height: int, width: int, text_tokens: int = 512,
                   text_layers: int | None = None) -> dict[str, dict]:
    """FLOPs of text encoding, one step and VAE decode, for a scale name or a built pipeline
    (``text_layers``: a text encoder truncated to that many layers)."""
    from bench.models import meta_components

    parts = meta_components(source)
    return {
        "text_encoding": text_encoder_flops(parts["text_encoder"], text_tokens, text_layers),
        "step": transformer_step_flops(parts["transformer"], height, width, text_tokens),
        "vae_decode": vae_decode_flops(parts["vae"], height, width),
    }
