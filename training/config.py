"""Every command-line option of ``train_ds.py`` with its default, in one place.

The reference (LISA/LFLLM) flags keep their names and defaults, so an existing command line runs;
boolean switches work both ways (``--x`` / ``--no_x``). Our own options follow the reference style.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from dataset.disparity.config import DisparityConfig, config_overrides
from dataset.options import DataOptions, PromptOptions
from model.options import GenerationOptions, ModelOptions
from model.trainable import TrainableOptions
from utils.options import flag_name, is_option
from utils.views import view_set_offsets

OptionClass = type


def add_switch(
    parser: argparse.ArgumentParser, name: str, default: bool, help: str, off: str | None = None
) -> None:
    """``--name`` sets True and ``--no_name`` (or ``--<off>``) sets False; the last one given wins, so a
    recipe's command line can be overridden by appending a flag."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=f"{help} (default: {default})")
    off_flag = off or f"no_{name}"
    parser.add_argument(f"--{off_flag}", dest=name, action="store_false", help=f"turn --{name} off")
    parser.set_defaults(**{name: default})


def _arg_type(parse: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` becomes the flag's error message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag
    return convert


def _unset_switch(parser: argparse._ActionsContainer, name: str, help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help)
    group.add_argument(
        f"--no_{name}", dest=name, action="store_false", default=None, help=f"turn --{name} off"
    )


def add_option_flags(
    parser: argparse._ActionsContainer, cls: OptionClass, *, unset: bool = False, skip: Sequence[str] = ()
) -> None:
    """One flag per option field of ``cls`` (``utils.options.option``): its name, type or parser, choices,
    help and default come from the field. ``unset=True``: every default is None (the caller fills the
    options it was not given from a record, e.g. the merge script from ``trainable.json``)."""
    for f in dataclasses.fields(cls):
        if not is_option(f) or f.name in skip:
            continue
        name, help = flag_name(f), f.metadata["help"]
        if isinstance(f.default, bool):
            if unset:
                _unset_switch(parser, name, f"{help} (default: recorded, else {f.default})")
            else:
                add_switch(parser, name, f.default, help)
            continue
        parse = f.metadata.get("parse") or type(f.default)
        parser.add_argument(
            f"--{name}",
            dest=name,
            type=_arg_type(parse, name),
            default=None if unset else f.default,
            choices=f.metadata.get("choices"),
            help=help,
        )


def options_from_args(cls: OptionClass, args: argparse.Namespace, base: Any = None) -> Any:
    """``cls`` from the option flags in ``args``; flags that are None keep ``base``'s value (default:
    ``cls()``'s)."""
    base = base if base is not None else cls()
    values = {}
    for f in dataclasses.fields(cls):
        if is_option(f) and getattr(args, flag_name(f), None) is not None:
            values[f.name] = getattr(args, flag_name(f))
    return dataclasses.replace(base, **values)


def given_fields(cls: OptionClass, args: argparse.Namespace) -> set[str]:
    """Names of the option fields of ``cls`` whose flags were given on the command line (``args.given``,
    set by :func:`explicit_dests`)."""
    given = set(getattr(args, "given", ()))
    return {f.name for f in dataclasses.fields(cls) if is_option(f) and flag_name(f) in given}


_UNSET = object()


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The destinations the command line ``argv`` sets explicitly (argparse fills a default only for
    attributes that the namespace lacks, so a namespace pre-filled with a sentinel shows what was given)."""
    plain = [a for a in parser._actions if a.dest != "help" and not isinstance(a, argparse._AppendAction)]
    probe = argparse.Namespace(**{a.dest: _UNSET for a in plain})
    parsed, _ = parser.parse_known_args(argv, namespace=probe)
    given = {k for k, v in vars(parsed).items() if v is not _UNSET}
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    return sorted((given - appended) | {d for d in appended if getattr(parsed, d)})


_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelOptions)]
#: The ModelOptions of the LFLLM paper (grouped apart in --help); the others are LISA's reference flags.
_LFLLM_MODEL_FIELDS = (
    "use_depth",
    "use_caam",
    "caam_target",
    "caam_mode",
    "caam_views",
    "depth_range",
    "depth_projector",
)


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
    add_option_flags(g, PromptOptions)

    add_option_flags(g, ModelOptions, skip=_LFLLM_MODEL_FIELDS)

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
    add_option_flags(t, TrainableOptions)
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
    add_option_flags(m, ModelOptions, skip=[f for f in _MODEL_FIELDS if f not in _LFLLM_MODEL_FIELDS])
    add_option_flags(m, DataOptions)

    e = p.add_argument_group(
        "disparity source (ours)",
        "--depth_source estimate: before the datasets are built, the built-in estimator (dataset/disparity/) "
        "writes --estimated_disparity_name into every scene folder of the splits the run uses that lacks it "
        "(shared over the ranks, atomic files), and the datasets read that file instead of --disparity_name",
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
    add_option_flags(o, GenerationOptions)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--warmup_steps", type=int, default=100)
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--save_steps", type=int, default=0, help="also save 'last' every N optimiser steps")
    o.add_argument("--max_steps", type=int, default=0, help="stop after N optimiser steps (0: the full run)")
    o.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2])
    o.add_argument(
        "--feature_cache",
        default="",
        help="folder of the per-scene feature cache (frozen CLIP/SAM outputs computed once per scene; "
        "docs/PERFORMANCE.md); empty: off",
    )
    o.add_argument(
        "--feature_cache_dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="storage dtype of the feature cache entries (auto: the training precision)",
    )
    add_switch(
        o,
        "resume_with_changes",
        False,
        "resume a run's checkpoint even though model/data/trainable options differ from the run's record",
    )
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
    if len(args.val_dataset.split("|")) != 3:
        parser.error(f"--val_dataset {args.val_dataset!r}: expected 'ds|splitBy|split'")
    if args.start_epoch != 0:
        parser.error(
            f"--start_epoch {args.start_epoch}: the epoch a run continues from comes from its checkpoint "
            "(--resume / --auto_resume, with the optimiser and LR schedule); a fresh run starts at epoch 0"
        )
    try:
        sample_weights(args)
    except ValueError as exc:
        parser.error(str(exc))
    for flag in (
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "grad_accumulation_steps",
        "val_batch_size",
        "num_classes_per_sample",
        "model_max_length",
        "max_new_tokens",
        "print_freq",
    ):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    for flag in ("workers", "lora_r", "warmup_steps", "save_steps", "max_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 0")
    for flag in ("lr", "beta1", "beta2", "lora_dropout", "max_grad_norm"):
        value = getattr(args, flag)
        low_ok = value > 0 if flag in ("lr", "max_grad_norm") else value >= 0
        if not (low_ok and math.isfinite(value)) or (
            flag in ("beta1", "beta2", "lora_dropout") and value >= 1
        ):
            parser.error(f"--{flag} {value}: out of range")
    for flag in ("ce_loss_weight", "bce_loss_weight", "dice_loss_weight"):
        if not (getattr(args, flag) >= 0 and math.isfinite(getattr(args, flag))):
            parser.error(f"--{flag} {getattr(args, flag)}: must be a finite number >= 0")
    if not args.lora_target_modules.strip(","):
        parser.error("--lora_target_modules is empty: name the language-model layers (e.g. q_proj,v_proj)")
    try:
        view_set_offsets(disparity_config(args).views)
    except ValueError as exc:
        parser.error(f"--disparity_set: {exc}")
    args.given = explicit_dests(parser, argv)
    return args


def sample_weights(args: argparse.Namespace) -> list[float]:
    """``--sample_rates`` as one positive weight per dataset of ``--refer_seg_data`` (a single value
    applies to all). Raises ``ValueError`` naming the flag."""
    names = [n for n in args.refer_seg_data.split("||") if n.strip()]
    try:
        rates = [float(v) for v in str(args.sample_rates).split(",")]
    except ValueError:
        raise ValueError(f"--sample_rates {args.sample_rates!r}: expected numbers like '3,1'") from None
    if len(rates) == 1:
        rates = rates * len(names)
    if len(rates) != len(names):
        raise ValueError(
            f"--sample_rates {args.sample_rates!r}: {len(rates)} rates for {len(names)} datasets "
            f"of --refer_seg_data {args.refer_seg_data!r}"
        )
    if not all(r > 0 and r == r and r != float("inf") for r in rates):
        raise ValueError(f"--sample_rates {args.sample_rates!r}: every rate must be a positive number")
    return rates


def disparity_config(args: argparse.Namespace) -> DisparityConfig:
    """Estimator settings of ``--depth_source estimate``: the defaults + ``--disparity_set`` overrides.

    Raises ``ValueError`` naming a bad field or value."""
    return DisparityConfig(**config_overrides(args.disparity_set))


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model fields chosen on the command line."""
    return options_from_args(ModelOptions, args)


def trainable_options(args: argparse.Namespace) -> TrainableOptions:
    """LoRA / head switches chosen on the command line."""
    return options_from_args(TrainableOptions, args)


def data_options(args: argparse.Namespace) -> DataOptions:
    """Scene file names and disparity source chosen on the command line."""
    return options_from_args(DataOptions, args)
