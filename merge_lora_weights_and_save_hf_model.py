"""Merge trained LFLLM weights into the base model and save a standalone Hugging Face directory.

The trained weights (``--weight``) may be

* our export: ``trainable.safetensors`` (or the folder holding it), written by ``training.checkpoint.export_trainable``;
* a DeepSpeed checkpoint folder: ``…/ckpt_model`` (tag from ``--tag`` or its ``latest`` file) or
  ``…/ckpt_model/<tag>``; read with DeepSpeed's ``zero_to_fp32`` functions (trainable parameters only);
* a full state dict as written by ``zero_to_fp32``: ``pytorch_model.bin`` (DeepSpeed < 0.15.3), or the
  output folder of newer versions (``pytorch_model*.bin`` / ``model*.safetensors``, sharded with an index).

The base (``--version`` LLaVA dir + ``--vision_pretrained`` SAM checkpoint) is rebuilt with the training
options (read from ``trainable.json`` next to the weights when present; flags override), wrapped exactly
as in training (``model.trainable.make_trainable``; the library code is ``training/serve/merge.py`` and
``training/weights.py``), the trained tensors are loaded strictly by name and
shape, and peft merges LoRA and the new token rows into plain weights. The result
(``--save_path``: sharded safetensors, config with every LFLLM field, tokenizer, image processor) loads
with ``LFLLMForCausalLM.from_pretrained(save_path)`` alone and with ``model.build.build_lfllm``.

Nothing you have is overwritten: ``--save_path`` may not be, lie inside or hold ``--version``, ``--weight``
or the SAM checkpoint, and a folder that is not empty is replaced only with ``--overwrite``
(checked before anything is built). The model is written into a temporary folder beside ``--save_path`` and
moved into place when complete: a crash or a full disk (named, with its free space) leaves what was there.

Memory: the base is built directly in ``--precision``; only trained tensors are read into memory (full
state dicts are memory-mapped), so the peak is about one copy of the model.

Example::

    python merge_lora_weights_and_save_hf_model.py --version llava-1.5-7b-hf \\
        --vision_pretrained sam_vit_h_4b8939.pth --weight runs/lfllm/ckpt_model --save_path lfllm-7b-merged
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dataset.options import PromptOptions
from model.options import ModelOptions
from model.trainable import TrainableOptions
from training.checkpoint import TRAINABLE_META
from training.config import RunConfig, RunOptions
from training.serve.merge import MergeOptions, merge_to_hf, recorded_version
from training.weights import read_meta
from utils.options import add_option_flags, options_from_args

#: The run options the merge takes (default: the run record's); the rest are LISA's, accepted and unused.
RUN_FLAGS = ("version", "vision_pretrained", "vision_tower", "local_rank")


def build_parser() -> argparse.ArgumentParser:
    """The CLI (LISA's merge flags; options left unset come from trainable.json, then the defaults)."""
    p = argparse.ArgumentParser(
        description="Merge trained LFLLM weights (LoRA, [SEG] head, SAM decoder, token rows) into the "
        "base and save a Hugging Face directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_option_flags(p, MergeOptions, required=("weight", "save_path"))
    add_option_flags(p, RunOptions, unset=True, only=RUN_FLAGS)
    # conv_type / model_max_length: default None = trainable.json's; recorded in merge_info.json for chat
    add_option_flags(p, PromptOptions, unset=True)
    t = p.add_argument_group("training options (default: trainable.json next to --weight, else LISA's)")
    add_option_flags(t, TrainableOptions, unset=True)
    add_option_flags(t, ModelOptions, unset=True)
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the merge; returns the output directory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = frozenset(k for k, v in vars(args).items() if v is not None)
    opts = options_from_args(MergeOptions, args)
    meta = read_meta(opts.weight, opts.tag)
    if args.version is None and not recorded_version(meta):
        parser.error(f"--version is required (no {TRAINABLE_META} next to {opts.weight} names the base)")
    recorded = RunConfig.from_record(meta)
    cfg = recorded.replace(
        **{g: options_from_args(type(o), args, o) for g, o in recorded.groups().items() if g != "run"},
        run=options_from_args(RunOptions, args, recorded.run),
        given=given,
    )
    if cfg.run.vision_tower:
        print(f"note: --vision-tower {cfg.run.vision_tower} ignored; the CLIP tower comes from --version")
    out, count = merge_to_hf(cfg, opts, meta)
    print(f"merged {count} trained tensors into {cfg.run.version}; saved {opts.precision} model to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
