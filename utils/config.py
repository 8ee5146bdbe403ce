"""Every command-line option of ``train_ds.py`` with its default, in one place.

The reference (LISA/LFLLM) flags keep their names and defaults, so an existing command line runs;
boolean switches work both ways (``--x`` / ``--no_x``). Our own options follow the reference style.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dataset.disparity_cache import DEFAULT_ESTIMATED_NAME, check_cache_name
from dataset.single_scene import DEPTH_SOURCES
from model.build import ModelOptions
from model.disparity import DisparityConfig, config_overrides, view_set_offsets
from model.trainable import TrainableOptions


def add_switch(
    parser: argparse.ArgumentParser, name: str, default: bool, help: str, off: str | None = None
) -> None:
    """``--name`` sets True and ``--no_name`` (or ``--<off>``) sets False; the last one given wins, so a
    recipe's command line can be overridden by appending a flag."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=f"{help} (default: {default})")
    off_flag = off or f"no_{name}"
    parser.add_argument(f"--{off_flag}", dest=name, action="store_false", help=f"turn --{name} off")
    parser.set_defaults(**{name: default})


def _reference_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (reference flags)")
    g.add_argument("--version", default="./tiny_base/llava", help="HF LLaVA dir, or a merged LFLLM dir")
    g.add_argument("--vision_pretrained", default="./tiny_base/sam_tiny.pth", help="SAM checkpoint (.pth)")
    g.add_argument(
        "--vision-tower",
        "--vision_tower",
        dest="vision_tower",
        default=None,
        help="accepted for compatibility; the tower comes from --version",
    )
    g.add_argument("--dataset_dir", default="./dataset")
    g.add_argument("--dataset", default="refer_seg", help="only refer_seg is supported")
    g.add_argument("--sample_rates", default="1")
    g.add_argument("--refer_seg_data", default="ref-urbanlf-syn", help="'||'-separated dataset names")
    g.add_argument(
        "--val_dataset",
        default="ref-urbanlf-syn|syn|val",
        help="ds|splitBy|split (split may be a subset tag)",
    )
    g.add_argument("--log_base_dir", default="./runs")
    g.add_argument("--exp_name", default="lfllm")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    g.add_argument("--image_size", type=int, default=1024, help="SAM input size (must match the SAM variant)")
    g.add_argument("--model_max_length", type=int, default=512)
    g.add_argument("--out_dim", type=int, default=256, help="[SEG] projection width (SAM's prompt width)")
    g.add_argument("--conv_type", default="llava_v1", choices=["llava_v1", "llava_llama_2"])
    add_switch(g, "use_mm_start_end", True, "wrap visual placeholders in <im_start>/<im_end>")
    add_switch(g, "train_mask_decoder", True, "train SAM's mask decoder")

    t = p.add_argument_group("optimisation (reference flags)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--steps_per_epoch", type=int, default=500, help="optimiser steps per epoch")
    t.add_argument("--batch_size", type=int, default=2, help="scenes per micro-batch per rank")
    t.add_argument("--grad_accumulation_steps", type=int, default=10)
    t.add_argument("--val_batch_size", type=int, default=1)
    t.add_argument("--workers", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.95)
    t.add_argument("--ce_loss_weight", type=float, default=1.0)
    t.add_argument("--bce_loss_weight", type=float, default=2.0)
    t.add_argument("--dice_loss_weight", type=float, default=0.5)
    t.add_argument("--lora_r", type=int, default=8, help="0 disables LoRA")
    t.add_argument("--lora_alpha", type=int, default=16)
    t.add_argument("--lora_dropout", type=float, default=0.05)
    t.add_argument("--lora_target_modules", default="q_proj,v_proj")
    t.add_argument("--num_classes_per_sample", type=int, default=3, help="expressions per scene per step")
    add_switch(t, "gradient_checkpointing", True, "recompute LM activations in backward")
    add_switch(t, "no_eval", False, "skip validation after each epoch", off="eval")
    add_switch(t, "eval_only", False, "only evaluate --version on --val_dataset")
    t.add_argument("--resume", default="", help="checkpoint dir (…/ckpt_model) to resume from")
    add_switch(t, "auto_resume", True, "resume from the run's latest checkpoint when there is one")
    t.add_argument("--start_epoch", type=int, default=0)
    t.add_argument("--print_freq", type=int, default=1)
    t.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1)


def _lfllm_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("light-field modules (LFLLM)")
    add_switch(m, "caam", True, "Center Angular Aggregation Module (--no_caam: LISA baseline)")
    add_switch(m, "depth", True, "<DEPTH> tokens from the disparity map (--no_depth: LISA baseline)")
    m.add_argument("--caam_target", default="both", choices=["clip", "sam", "both"])
    m.add_argument("--caam_mode", default="fixed", choices=["fixed", "learned", "occlusion"])
    m.add_argument("--caam_views", default="4", help="'4', '8', 'cross2' or view names like 5_4,5_6")
    m.add_argument(
        "--depth_range",
        default="-1,1",
        help="disparity (px) mapped to black..white; write --depth_range=-0.5,2 for a negative start",
    )
    m.add_argument("--depth_projector", default="shared", choices=["shared", "separate"])
    m.add_argument("--view_pattern", default="{row}_{col}.png")
    m.add_argument("--disparity_name", default="5_5_disparity.npy", help="e.g. 5_5_disparity_OAVC.npy")

    e = p.add_argument_group(
        "disparity source (ours)",
        "--depth_source estimate: before the datasets are built, the built-in estimator (model/disparity.py) "
        "writes --estimated_disparity_name into every scene folder of the splits the run uses that lacks it "
        "(shared over the ranks, atomic files), and the datasets read that file instead of --disparity_name",
    )
    e.add_argument(
        "--depth_source",
        default="file",
        choices=DEPTH_SOURCES,
        help="file: read --disparity_name; estimate: the estimator's cached maps",
    )
    e.add_argument(
        "--estimated_disparity_name",
        default=DEFAULT_ESTIMATED_NAME,
        help="cache file of --depth_source estimate in each scene folder (scripts/estimate_disparity.py's "
        "--out_name); existing files are reused whatever settings wrote them",
    )
    e.add_argument(
        "--disparity_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="estimator setting (a DisparityConfig field, e.g. d_max=3 or views=full); repeatable",
    )
    e.add_argument(
        "--disparity_device", default="", help="device of the estimator; empty: the rank's own device"
    )

    o = p.add_argument_group("run control (ours)")
    o.add_argument("--eval_protocol", default="teacher_forced", choices=["teacher_forced", "generated"])
    o.add_argument("--vis_save_path", default="", help="write overlay images of validation here")
    o.add_argument("--max_new_tokens", type=int, default=32, help="generated protocol / chat")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--warmup_steps", type=int, default=100)
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--save_steps", type=int, default=0, help="also save 'last' every N optimiser steps")
    o.add_argument("--max_steps", type=int, default=0, help="stop after N optimiser steps (0: the full run)")
    o.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2])
    add_switch(o, "pack_conversations", False, "all expressions of a scene in one multi-turn conversation")
    add_switch(o, "torch_adam", False, "plain torch AdamW (no compiled op; automatic on CPU)")


def build_parser() -> argparse.ArgumentParser:
    """The ``train_ds.py`` parser."""
    parser = argparse.ArgumentParser(
        description="Train (or with --eval_only, evaluate) LFLLM for light-field referring segmentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _reference_flags(parser)
    _lfllm_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; raises ``SystemExit`` with a message on inconsistent options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "refer_seg":
        parser.error(
            f"--dataset {args.dataset!r}: only 'refer_seg' (Ref-UrbanLF / RefCOCO layout) is supported"
        )
    try:
        lo, hi = (float(v) for v in args.depth_range.split(","))
    except ValueError:
        parser.error(f"--depth_range {args.depth_range!r}: expected 'lo,hi'")
    if lo >= hi:
        parser.error(f"--depth_range {args.depth_range!r}: lo must be < hi")
    args.depth_range = (lo, hi)
    if len(args.val_dataset.split("|")) != 3:
        parser.error(f"--val_dataset {args.val_dataset!r}: expected 'ds|splitBy|split'")
    try:
        check_cache_name(args.estimated_disparity_name)
        view_set_offsets(disparity_config(args).views)
    except ValueError as exc:
        parser.error(f"--estimated_disparity_name / --disparity_set: {exc}")
    return args


def disparity_config(args: argparse.Namespace) -> DisparityConfig:
    """Estimator settings of ``--depth_source estimate``: the defaults + ``--disparity_set`` overrides.

    Raises ``ValueError`` naming a bad field or value."""
    return DisparityConfig(**config_overrides(args.disparity_set))


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model fields chosen on the command line."""
    return ModelOptions(
        use_depth=args.depth,
        use_caam=args.caam,
        caam_target=args.caam_target,
        caam_mode=args.caam_mode,
        caam_views=args.caam_views,
        depth_range=args.depth_range,
        depth_projector=args.depth_projector,
        use_mm_start_end=args.use_mm_start_end,
        out_dim=args.out_dim,
        ce_loss_weight=args.ce_loss_weight,
        bce_loss_weight=args.bce_loss_weight,
        dice_loss_weight=args.dice_loss_weight,
    )


def trainable_options(args: argparse.Namespace) -> TrainableOptions:
    """LoRA / head switches chosen on the command line."""
    return TrainableOptions(
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=args.lora_target_modules,
        train_mask_decoder=args.train_mask_decoder,
    )
