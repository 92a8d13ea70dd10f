"""Tiny random-weight FLUX pipelines, built fully offline.

The service loads its real pipelines with ``<PipelineClass>.from_pretrained(folder)``.  For
tests, CI and local development we want that exact code path without downloading tens of
gigabytes from the Hugging Face hub, so this module builds miniature versions of every
pipeline family the service serves:

one per model family (``engine/families``: each family's ``build_tiny`` composes the
component builders below), e.g. FLUX.2 klein (a Qwen3 text encoder + Qwen2 BPE tokenizer,
``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``) and the FLUX.1 families (CLIP + T5 text
encoders and tokenizers, ``FluxTransformer2DModel``, ``AutoencoderKL``; Kontext and Fill with
weights of their own).

Every component has the same class and the same *structure* as the real model (same
latent channels, same VAE scale factor of 8, same text-encoder hidden layers read by the
pipeline, same scheduler config) but is only a few kilobytes to a few hundred kilobytes of
random weights.  Tokenizers are trained on a few lines of in-code text with the
``tokenizers`` library.  Nothing is downloaded.

Each pipeline is ``save_pretrained`` into ``root/<name>`` so that the production loader can
be pointed at that folder.  Builds are

* deterministic: each component's weights come from a fixed torch seed, so two builds give
  byte-identical ``*.safetensors`` files;
* idempotent: a folder holding the completion marker (written last) is reused untouched;
* atomic: each pipeline is built in a temporary sibling folder and ``os.rename``-d into place,
  so a crash never leaves a half-built folder that looks complete.

The images these pipelines produce are noise: they exist to exercise shapes, dtypes, argument
plumbing, seeding and the job machinery, not image quality.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from fluxserve.engine.families.base import Family

__all__ = ["MARKER_NAME", "TINY_BUILD_VERSION", "build_tiny_lora", "build_tiny_loras", "build_tiny_models", "tiny_families"]

#: File written last into a finished build; its content must equal TINY_BUILD_VERSION.
MARKER_NAME = ".fluxserve-tiny-complete"
#: Bump whenever the builders change, so stale builds are rebuilt.
TINY_BUILD_VERSION = "fluxserve-tiny-v2"


def tiny_families() -> dict[str, Family]:
    """Folder name under the build root (the family's name) -> family, for every family the
    registry serves."""
    from fluxserve.models import DEFAULT_REGISTRY

    return {spec.family.name: spec.family for spec in DEFAULT_REGISTRY.values()}

# In-code corpus for training the tiny tokenizers.
_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a painting of a squirrel eating a burger",
    "a small cactus with a happy face in the Sahara desert",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "make the sky purple and add a rainbow over the mountains",
    "portrait of an old man with a white beard, studio lighting",
    "a dog is dancing in the rain; the street is wet and shiny",
    "A cozy cabin in a snowy forest at night, warm light in the windows.",
    "Turn this image into a watercolor sketch. Keep the composition!",
    "0123456789 ?!.,:;'\"()[]{}<>-_+=*/\\|@#$%^&~`",
]

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def flow_match_scheduler() -> Any:
    """The FlowMatchEulerDiscreteScheduler config shipped with FLUX.1 dev/Kontext and FLUX.2 klein.

    Both pipeline families pass a resolution-dependent ``mu`` to ``set_timesteps``, which
    requires ``use_dynamic_shifting=True``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------

_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3-style chat template: the klein pipeline calls
# apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False).
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_qwen_tokenizer() -> Any:
    """A tiny byte-level BPE tokenizer with Qwen's special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        special_tokens=_QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,  # type: ignore[arg-type]  # typed str | list[str]; the (a, b) pairs tokenizers emits work too
        unk_token=None,  # type: ignore[arg-type]  # typed str, but None (no unknown token, as Qwen's) is accepted
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_QWEN_SPECIAL_TOKENS[1:],
        model_max_length=40960,
        padding_side="right",
    )
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def build_clip_tokenizer() -> Any:
    """A character-level CLIP tokenizer (byte-level alphabet, no merges)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = specials + alphabet + [ch + "</w>" for ch in alphabet]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer from a tiny Unigram model trained on the in-code corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(_CORPUS, trainer=trainer)
    # The trainer's scores vary in the last bits from run to run (hash-map summation order), so
    # round them, then sort for determinism: best score first, ties broken by the piece itself.
    pieces = [
        (p, round(float(s), 6)) for p, s in json.loads(unigram.to_str())["model"]["vocab"] if p not in specials
    ]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    vocab = [(tok, 0.0) for tok in specials] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=8, model_max_length=512)


# --------------------------------------------------------------------------------------
# text encoders
# --------------------------------------------------------------------------------------


def build_qwen3_text_encoder(vocab_size: int, seed: int) -> Any:
    """Tiny ``Qwen3ForCausalLM``: 28 layers so the pipeline's hidden layers (9, 18, 27) exist."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    with _seeded(seed):
        return Qwen3ForCausalLM(config).eval()


def build_clip_text_encoder(tokenizer: Any, seed: int) -> Any:
    """Tiny ``CLIPTextModel``; the pipeline uses its pooled output (hidden_size wide)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def build_t5_text_encoder(tokenizer: Any, seed: int) -> Any:
    """Tiny T5 v1.1-style ``T5EncoderModel`` (gated-gelu), as FLUX.1 uses T5-XXL's encoder."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(  # type: ignore[call-arg]  # these are PretrainedConfig **kwargs the T5Config signature omits
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------------------
# transformers (denoisers)
# --------------------------------------------------------------------------------------


def build_flux2_transformer(latent_channels: int, text_hidden_size: int, seed: int) -> Any:
    """Tiny ``Flux2Transformer2DModel`` (klein: no guidance embedding, 2x2-patchified latents)."""
    from diffusers import Flux2Transformer2DModel

    with _seeded(seed):
        return Flux2Transformer2DModel(
            patch_size=1,
            in_channels=latent_channels * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * text_hidden_size,  # three stacked Qwen3 hidden layers
            timestep_guidance_channels=32,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
            rope_theta=2000,
            guidance_embeds=False,
        ).eval()  # type: ignore[attr-defined]  # mypy resolves this name to diffusers' dummy placeholder class


def build_flux1_transformer(
    latent_channels: int, t5_dim: int, clip_dim: int, seed: int, in_channels: int | None = None
) -> Any:
    """Tiny ``FluxTransformer2DModel`` (FLUX.1 dev / Kontext / Fill: guidance-distilled).
    ``in_channels`` defaults to the packed latents (4 x latent channels); Fill reads more."""
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels or latent_channels * 4,
            out_channels=latent_channels * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_dim,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ).eval()  # type: ignore[attr-defined]  # mypy resolves this name to diffusers' dummy placeholder class


# --------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------

# Four blocks -> 2**3 = 8x spatial downscaling, as in the real VAEs.
_VAE_BLOCKS = (8, 8, 8, 8)


def build_flux2_vae(seed: int) -> Any:
    """Tiny ``AutoencoderKLFlux2`` with 32 latent channels and scale factor 8."""
    from diffusers import AutoencoderKLFlux2

    with _seeded(seed):
        return AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
            block_out_channels=_VAE_BLOCKS,
            layers_per_block=1,
            latent_channels=32,
            norm_num_groups=4,
            sample_size=256,
        ).eval()  # type: ignore[attr-defined]  # mypy resolves this name to diffusers' dummy placeholder class


def build_flux1_vae(seed: int) -> Any:
    """Tiny ``AutoencoderKL`` with 16 latent channels, scale factor 8 and FLUX.1's shift/scale."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
            block_out_channels=_VAE_BLOCKS,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=256,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ).eval()  # type: ignore[attr-defined]  # mypy resolves this name to diffusers' dummy placeholder class


# --------------------------------------------------------------------------------------
# shared pipeline components
# --------------------------------------------------------------------------------------


def flux1_components(seed: int, *, masked_inputs: bool = False) -> dict[str, Any]:
    """Components of the FLUX.1-architecture pipelines (FLUX.1, Kontext, Fill). With
    ``masked_inputs`` (Fill) the transformer also reads the masked image's packed latents and
    the packed 8x8 mask: 4 x latent channels + 4 x 64 more input channels, as the real model."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = build_clip_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = build_t5_text_encoder(tokenizer_2, seed + 2)
    vae = build_flux1_vae(seed + 3)
    packed = vae.config.latent_channels * 4
    transformer = build_flux1_transformer(
        vae.config.latent_channels, text_encoder_2.config.d_model, text_encoder.config.hidden_size, seed + 4,
        in_channels=packed + packed + 4 * 64 if masked_inputs else None,
    )
    return {
        "scheduler": flow_match_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


# --------------------------------------------------------------------------------------
# on-disk build
# --------------------------------------------------------------------------------------


def _is_complete(folder: pathlib.Path) -> bool:
    marker = folder / MARKER_NAME
    try:
        return marker.read_text(encoding="utf-8").strip() == TINY_BUILD_VERSION
    except OSError:
        return False


def _remove_stale(target: pathlib.Path) -> None:
    """Move an incomplete folder aside (atomically), then delete it."""
    trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    moved = trash / target.name
    try:
        os.rename(target, moved)
        if _is_complete(moved):
            # A concurrent builder finished between our check and the move: put it back.
            with contextlib.suppress(OSError):
                os.rename(moved, target)
    except FileNotFoundError:
        pass  # someone else already removed it
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _quiet_saving() -> Iterator[None]:
    """Silence transformers' "Writing model shards" progress bars while saving."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_one(family: Family, target: pathlib.Path) -> None:
    """Build ``family``'s tiny pipeline into a temporary sibling of ``target`` and rename it into place."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{family.name}.tmp-", dir=target.parent))
    try:
        pipeline = family.build_tiny(family.tiny_seed)
        with _quiet_saving():
            pipeline.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER_NAME).write_text(TINY_BUILD_VERSION + "\n", encoding="utf-8")
        for _ in range(2):
            if _is_complete(target):
                return  # a concurrent builder won the race: discard our copy
            if target.exists():
                _remove_stale(target)
            try:
                os.rename(tmp, target)
                return
            except OSError:
                continue  # target reappeared between the check and the rename; re-check
        if not _is_complete(target):
            raise RuntimeError(f"could not move tiny pipeline build into {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_models(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Build (once) every tiny pipeline under root/<name>; return {name: folder}.

    Idempotent: a folder whose completion marker (``.fluxserve-tiny-complete``, written last,
    holding ``TINY_BUILD_VERSION``) is present is reused untouched; any other folder at that path
    is replaced.  Atomic: each pipeline is built in a temporary sibling folder and renamed into
    place, so a crash never leaves a half-built folder that looks complete, and a concurrent
    builder that loses the rename race discards its copy.  Deterministic: every component's
    random weights come from a fixed torch seed, so two builds in different folders give
    byte-identical safetensors files.

    Load a folder with ``getattr(diffusers, family.pipeline).from_pretrained(folder)``.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[str, pathlib.Path] = {}
    for name, family in tiny_families().items():
        target = root / name
        if not _is_complete(target):
            _build_one(family, target)
        folders[name] = target
    return folders


# --------------------------------------------------------------------------------------
# tiny LoRA adapters
# --------------------------------------------------------------------------------------

#: Attention projections: in every FLUX transformer block (FLUX.1, Kontext, Fill, FLUX.2 klein).
TINY_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Text-encoder projections of CLIP (FLUX.1 family) for adapters that also change the prompt's encoding.
TINY_TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _random_lora_state(module: Any, targets: tuple[str, ...], rank: int, seed: int, scale: float) -> dict[str, Any]:
    """A LoRA of ``rank`` on ``targets`` of (a copy of) ``module`` with seeded random weights, as
    peft's state dict. peft starts ``lora_B`` at zero (an adapter that changes nothing): here both
    factors are random, ``B`` scaled by ``scale``, so the adapter visibly changes the image."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), copy.deepcopy(module))
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if ".lora_A." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
            elif ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return get_peft_model_state_dict(model)


def build_tiny_lora(
    pipeline_class: Any, transformer: Any, path: pathlib.Path, *, seed: int, rank: int = 4, scale: float = 3.0,
    targets: tuple[str, ...] = TINY_LORA_TARGETS, text_encoder: Any = None,
    text_encoder_targets: tuple[str, ...] = TINY_TEXT_ENCODER_LORA_TARGETS,
) -> pathlib.Path:
    """Write a random-weight LoRA for a tiny ``transformer`` (left unchanged) to ``path`` (a
    ``.safetensors`` file) with ``pipeline_class.save_lora_weights``, the format adapters trained
    with diffusers have. Deterministic for a seed. With ``text_encoder`` (the pipeline's CLIP
    encoder) it adapts that too."""
    layers = {"transformer_lora_layers": _random_lora_state(transformer, targets, rank, seed, scale)}
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = _random_lora_state(text_encoder, text_encoder_targets, rank, seed + 1, scale)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.stem}.tmp-", dir=path.parent))
    try:
        pipeline_class.save_lora_weights(tmp, weight_name=path.name, **layers)
        os.replace(tmp / path.name, path)  # atomic: a reader never sees half a file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_lora_name(family: Family) -> str:
    """The demo adapter of a family served with ``--models tiny``: ``tiny-<family>``."""
    return f"tiny-{family.name}"


def load_tiny_transformer(folder: pathlib.Path) -> Any:
    """The transformer of a tiny pipeline folder, alone (its class from ``model_index.json``)."""
    import diffusers

    _library, class_name = json.loads((pathlib.Path(folder) / "model_index.json").read_text())["transformer"]
    return getattr(diffusers, class_name).from_pretrained(pathlib.Path(folder) / "transformer")


def build_tiny_loras(models_root: pathlib.Path, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """One demo adapter per family that takes LoRAs, for its tiny pipeline under ``models_root``
    (built by :func:`build_tiny_models`), as ``root/tiny-<family>.safetensors`` (random weights on
    the attention projections); a file already there is kept. Returns {adapter name: file}."""
    import diffusers

    made: dict[str, pathlib.Path] = {}
    for name, family in tiny_families().items():
        if not family.takes_loras:
            continue
        path = pathlib.Path(root) / f"{tiny_lora_name(family)}.safetensors"
        if not path.is_file():
            transformer = load_tiny_transformer(pathlib.Path(models_root) / name)
            build_tiny_lora(getattr(diffusers, family.pipeline), transformer, path, seed=family.tiny_seed + 500)
        made[tiny_lora_name(family)] = path
    return made
