"""Model-size presets (a registry, not if-chains) and the tiny HF LLaVA base used by tests and the quickstart.

``tiny`` is built from configs with random init and a tokenizer trained offline on the synthetic corpus;
it is written to disk in exactly the layout of ``llava-hf/llava-1.5-7b-hf`` (config.json, safetensors,
tokenizer, preprocessor_config.json) and SAM in the official state-dict format, so that it goes through
the same loading code as the real weights. ``7b`` / ``13b`` are the full-size shapes (for benchmarks with
random init; real runs load them from the HF directories).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
)


@dataclass(frozen=True)
class Preset:
    """Shapes of one model size: language model, CLIP tower, SAM variant."""

    text: dict[str, Any]
    vision: dict[str, Any]
    sam_variant: str
    vocab_size: int = 32000
    extra: dict[str, Any] = field(default_factory=dict)


_CLIP_L14_224 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            # HF's 0.02 is a constant tuned for widths in the thousands (std·sqrt(width) = 1.28 at 4096).
            # At width 64 it shrinks every projection ~6x: uniform attention, LM logits near 0, and a
            # [SEG] projection 60x smaller than SAM's prompt embeddings. Keep the 7B's per-layer gain.
            initializer_range=0.02 * (4096 / 64) ** 0.5,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        ),
        sam_variant="tiny",
        vocab_size=1024,
    ),
    # The pretrained tiny base shipped in pretrained/tiny_base (scripts/pretrain_tiny_base.py): a wider LM
    # and an 8x8 CLIP grid (112 px, patch 14), fine enough to locate the benchmark's objects.
    "tiny-base": Preset(
        text=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            initializer_range=0.02 * (4096 / 128) ** 0.5,
        ),
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
            projection_dim=32,
        ),
        sam_variant="tiny160",
        vocab_size=1024,
    ),
    "7b": Preset(
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
        vision=_CLIP_L14_224,
        sam_variant="vit_h",
    ),
    "13b": Preset(
        text=dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
        ),
        vision=_CLIP_L14_224,
        sam_variant="vit_h",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def llava_config(
    preset: Preset, vocab_size: int, image_token_id: int, pad_token_id: int | None
) -> LlavaConfig:
    """An HF ``LlavaConfig`` with the preset's shapes (CLIP features from layer -2, CLS dropped)."""
    text = LlamaConfig(**preset.text, vocab_size=vocab_size, pad_token_id=pad_token_id)
    vision = CLIPVisionConfig(**preset.vision)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.pad_token_id = pad_token_id
    return cfg
