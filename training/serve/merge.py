"""Merging trained LFLLM weights into the base and saving a standalone Hugging Face directory.

The base (LLaVA dir + SAM checkpoint) is rebuilt with the training options (``trainable.json`` next to
the weights, flags override), wrapped exactly as in training (``model.trainable.make_trainable``), the
trained tensors are loaded strictly by name and shape (``training.weights``), and peft merges LoRA and the
new token rows into plain weights. ``merge_lora_weights_and_save_hf_model.py`` is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import CLIPImageProcessor

from dataset.options import DEFAULT_PROMPT_OPTIONS
from model.build import DTYPES, build_lfllm
from model.lfllm import LFLLMForCausalLM
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable, unwrap
from training.config import given_fields, options_from_args
from training.weights import load_trainable, open_weights

MERGE_INFO = "merge_info.json"


def merge(model: nn.Module) -> LFLLMForCausalLM:
    """Fold LoRA and the trained token rows into plain weights; returns the bare ``LFLLMForCausalLM``."""
    if hasattr(model, "merge_and_unload"):
        # safe_merge would keep extra weight copies; the loaded tensors were checked finite instead
        model = model.merge_and_unload(progressbar=False, safe_merge=False)
    merged = unwrap(model)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def resolve_options(
    args: argparse.Namespace, meta: dict[str, Any] | None
) -> tuple[ModelOptions, TrainableOptions]:
    """Options of the training run: flags given on the command line, else trainable.json, else defaults."""
    meta = meta or {}
    model_opts = options_from_args(ModelOptions, args, ModelOptions.from_dict(meta.get("model_options")))
    train_opts = options_from_args(
        TrainableOptions, args, TrainableOptions.from_dict(meta.get("trainable_options"))
    )
    return model_opts, train_opts


def save_merged(
    model: LFLLMForCausalLM,
    tokenizer: Any,
    version: str | Path,
    save_path: str | Path,
    max_shard_size: str,
    info: dict[str, Any],
) -> Path:
    """Write the model (sharded safetensors + config), tokenizer, image processor and ``merge_info.json``."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor.from_pretrained(version).save_pretrained(out)
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2, default=str))
    return out


def merge_to_hf(
    args: argparse.Namespace, meta: dict[str, Any] | None, version: str | Path, vision_pretrained: str | Path
) -> tuple[Path, int]:
    """Rebuild the base, load ``args.weight`` into its trainable set, merge, save to ``args.save_path``.

    Returns (output directory, number of tensors loaded). Raises ``FileNotFoundError`` / ``KeyError`` /
    ``ValueError`` naming the file or flag on bad input, before the output directory is written."""
    model_opts, train_opts = resolve_options(args, meta)
    dtype = DTYPES[args.precision]
    # Read the trained tensors first: a DeepSpeed checkpoint is parsed (and released) before the base exists.
    source = open_weights(args.weight, args.tag)
    print(f"weights: {source.path} ({source.kind}, {len(source.names())} tensors)")
    model, tokenizer = build_lfllm(
        version, vision_pretrained, model_opts, dtype, given=given_fields(ModelOptions, args)
    )
    wrapped = make_trainable(model, train_opts)
    count = load_trainable(wrapped, source)
    source_kind = source.kind
    del source
    merged = merge(wrapped)
    info = {
        "source": str(args.weight),
        "source_kind": source_kind,
        "tensors_loaded": count,
        "version": str(version),
        "vision_pretrained": None if vision_pretrained is None else str(vision_pretrained),
        "precision": args.precision,
        "conv_type": args.conv_type or (meta or {}).get("conv_type") or DEFAULT_PROMPT_OPTIONS.conv_type,
        "model_max_length": args.model_max_length
        or (meta or {}).get("model_max_length")
        or DEFAULT_PROMPT_OPTIONS.model_max_length,
        "model_options": dataclasses.asdict(model_opts),
        "trainable_options": dataclasses.asdict(train_opts),
        "trained": {k: (meta or {}).get(k) for k in ("global_step", "epoch")},
    }
    out = save_merged(merged, tokenizer, version, args.save_path, args.max_shard_size, info)
    return out, count
