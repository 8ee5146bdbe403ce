"""Merging trained LFLLM weights into the base and saving a standalone Hugging Face directory.

The base (LLaVA dir + SAM checkpoint) is rebuilt with the training options (``trainable.json`` next to
the weights, flags override), wrapped exactly as in training (``model.trainable.make_trainable``), the
trained tensors are loaded strictly by name and shape (``training.weights``), and peft merges LoRA and the
new token rows into plain weights. ``merge_lora_weights_and_save_hf_model.py`` is the command line.

Nothing the user has is overwritten (``utils.outputs``): ``--save_path`` may not be, lie inside or hold
``--version``, ``--weight`` or the SAM / light-decoder checkpoint, and a non-empty one needs
``--overwrite`` -- both refused before anything is built. The model is written into a temporary sibling
folder and moved into place when complete, so a crash or a full disk leaves the previous content as it was.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import CLIPImageProcessor

from model.build import DTYPES, build_lfllm
from model.lfllm import LFLLMForCausalLM
from model.options import ModelOptions
from model.trainable import make_trainable, unwrap
from training.config import RunConfig
from training.weights import load_trainable, meta_path, open_weights
from utils.options import option
from utils.outputs import check_output_dir, staged_dir

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


@dataclass(frozen=True)
class MergeOptions:
    """What the merge reads and writes (LISA's merge flags); the model's options come from the run record."""

    weight: str = option("", "trainable.safetensors, a DeepSpeed ckpt dir, or a .bin")
    save_path: str = option("", "output HF directory")
    tag: str | None = option(None, "DeepSpeed checkpoint tag (default: its 'latest' file)", parse=str)
    precision: str = option("bf16", "dtype of the saved model", choices=sorted(DTYPES))
    max_shard_size: str = option("5GB", "safetensors shard size")
    overwrite: bool = option(
        False, "replace a non-empty --save_path (its old content is removed once the new model is complete)"
    )


def recorded_version(meta: dict[str, Any] | None) -> bool:
    """Whether the run record ``meta`` names the base (``run_options.version``, or the flat ``version`` of
    earlier records)."""
    meta = meta or {}
    return bool((meta.get("run_options") or {}).get("version") or meta.get("version"))


def save_merged(
    model: LFLLMForCausalLM,
    tokenizer: Any,
    version: str | Path,
    save_path: str | Path,
    max_shard_size: str,
    info: dict[str, Any],
) -> Path:
    """Write the model (sharded safetensors + config), tokenizer, image processor and ``merge_info.json``
    into a temporary sibling of ``save_path`` and move it into place when complete (an existing
    ``save_path`` is replaced only then). Raises ``DiskFullError`` (a ``ValueError``) naming the disk and
    its free space when the disk fills up; the temporary folder is removed on any error."""
    out = Path(save_path)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        CLIPImageProcessor.from_pretrained(version).save_pretrained(tmp)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2, default=str))
    return out


def merge_inputs(cfg: RunConfig, opts: MergeOptions) -> dict[str, str | Path | None]:
    """What the merge reads, by flag: ``--save_path`` may not be, lie inside or hold any of them. A file
    (the SAM and light-decoder checkpoints, a ``--weight`` file, the ``trainable.json`` read) protects
    itself, not its folder: ``--vision_pretrained sam.pth --save_path ./merged`` in one folder is fine."""
    return {
        "--version": cfg.run.version,
        "--weight": opts.weight,
        "--vision_pretrained": cfg.sam_checkpoint,
        "--light_pretrained": cfg.light_checkpoint,
        "the training record of --weight": meta_path(opts.weight, opts.tag),
    }


def merged_record(version: str | Path) -> dict[str, Any] | None:
    """The run record of a merged model: its ``merge_info.json``'s ``run_record`` (the configuration it was
    merged with), with the prompt options the file states flat (``conv_type`` / ``model_max_length``, all
    that earlier merges recorded); None for a folder that is not a merged model. Raises ``ValueError`` naming the file when it is not a JSON object."""
    info = Path(version) / MERGE_INFO
    if not info.is_file():
        return None
    try:
        record = json.loads(info.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{info}: not a JSON object ({exc})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{info}: not a JSON object (a {type(record).__name__})")
    run = dict(record.get("run_record") or {})
    # the flat conv_type / model_max_length are the merged model's prompt (chat has always read them)
    flat = {k: record[k] for k in ("conv_type", "model_max_length") if record.get(k) is not None}
    return {**run, "prompt_options": {**(run.get("prompt_options") or {}), **flat}}


def merge_to_hf(cfg: RunConfig, opts: MergeOptions, meta: dict[str, Any] | None) -> tuple[Path, int]:
    """Rebuild the base ``cfg.run.version`` (+ ``cfg.run.vision_pretrained``) with ``cfg``'s model and
    trainable options, load ``opts.weight`` into its trainable set, merge, save to ``opts.save_path``.

    Returns (output directory, number of tensors loaded). Raises ``FileNotFoundError`` / ``KeyError`` /
    ``ValueError`` naming the file or flag on bad input, before the output directory is written; an
    output that would overwrite an input, or a non-empty one without ``--overwrite``, is refused
    (``OutputDirError``) before anything is read or built."""
    check_output_dir(opts.save_path, merge_inputs(cfg, opts), opts.overwrite, "--save_path")
    version, vision_pretrained = cfg.run.version, cfg.sam_checkpoint
    dtype = DTYPES[opts.precision]
    # Read the trained tensors first: a DeepSpeed checkpoint is parsed (and released) before the base exists.
    source = open_weights(opts.weight, opts.tag)
    print(f"weights: {source.path} ({source.kind}, {len(source.names())} tensors)")
    # a run recorded with gres rebuilds a merged base without [REJ] as it trained it: with the token added
    given = cfg.given_fields(ModelOptions) | ({"gres"} if cfg.model.gres else set())
    model, tokenizer = build_lfllm(
        version, vision_pretrained, cfg.model, dtype, given=given, region_token=cfg.datasets.ilvc > 0
    )
    wrapped = make_trainable(model, cfg.trainable)
    count = load_trainable(wrapped, source)
    source_kind = source.kind
    del source
    merged = merge(wrapped)
    info = {
        "source": str(opts.weight),
        "source_kind": source_kind,
        "tensors_loaded": count,
        "version": str(version),
        "vision_pretrained": None if vision_pretrained is None else str(vision_pretrained),
        "precision": opts.precision,
        "conv_type": cfg.prompt.conv_type,
        "model_max_length": cfg.prompt.model_max_length,
        "model_options": dataclasses.asdict(cfg.model),
        "trainable_options": dataclasses.asdict(cfg.trainable),
        "trained": {k: (meta or {}).get(k) for k in ("global_step", "epoch")},
        "run_record": cfg.to_record(),
    }
    out = save_merged(merged, tokenizer, version, opts.save_path, opts.max_shard_size, info)
    return out, count
