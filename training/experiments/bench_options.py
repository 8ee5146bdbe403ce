"""Options of the step benchmark (``training/experiments/bench_step.py``): its own, as :class:`BenchOptions`,
and ``train_ds.py``'s that it takes, as the :class:`training.config.RunConfig` it times (:data:`BENCH_BASE`
with the flags given). :func:`parse_args` is the only place that sees the parser's namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from model.options import ModelOptions
from model.presets import PRESETS
from training.config import RunConfig
from utils.options import (
    add_option_flags,
    at_least,
    explicit_dests,
    flag_name,
    option,
    options_from_args,
    problems,
)

BUILDS: tuple[str, ...] = ("auto", "files", "direct")


def parse_hw(text: str) -> tuple[int, int]:
    """``"480,640"`` -> ``(480, 640)``; ``ValueError`` with a message otherwise."""
    try:
        h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--original_hw {text!r}: expected H,W") from None
    return h, w


@dataclass(frozen=True)
class BenchOptions:
    """What the benchmark measures, and on which synthetic inputs (train_ds.py's options are a
    :class:`RunConfig`, see :data:`BENCH_BASE`)."""

    preset: str = option("tiny", "model size preset (model.presets)", choices=sorted(PRESETS))
    steps: int = option(5, "timed steps (median reported)", check=at_least(1))
    warmup: int = option(2, "untimed steps first", check=at_least(0))
    precision: str | None = option(
        None, "default: bf16 on a GPU, fp32 on CPU", choices=("bf16", "fp32"), parse=str
    )
    eval: bool = option(False, "add the teacher-forced validation row")
    chat: bool = option(False, "add the chat latency row")
    train: bool = option(
        True, "the training rows (--no_train: skip them, with --eval/--chat)", off="no_train"
    )
    flops: bool = option(True, "the FLOP-counted step (--no_flops: skip it)", off="no_flops")
    json_path: str | None = option(None, "write the results here", flag="json", parse=str)
    images: int = option(2, "scenes per training micro-batch", check=at_least(1))
    expressions: int = option(3, "expressions per scene", check=at_least(1))
    text_tokens: int = option(80, "text tokens of a one-expression conversation", check=at_least(1))
    original_hw: tuple[int, int] = option(
        (480, 640),
        "original image size H,W (UrbanLF: 480,640)",
        parse=parse_hw,
        show=lambda hw: ",".join(map(str, hw)),
        check=lambda hw: None if min(hw) >= 1 else "must be >= 1",
    )
    chat_queries: int = option(5, "chat: timed queries (after --warmup)", check=at_least(1))
    build: str = option(
        "auto",
        "files: write/load through build_lfllm; direct: random init in memory (auto: files for tiny)",
        choices=BUILDS,
    )
    feature_cache: bool = option(
        False, "also time each train/eval step on cached front-end features (training.features)"
    )
    compare_light: int = option(
        0,
        "also time the light mask head (--mask_head light, detail pass at this many px) against the model's "
        "route, the two engines' steps interleaved; 0: off",
        check=at_least(0),
    )

    def __post_init__(self) -> None:
        lines = problems(self)
        if lines:
            raise ValueError("; ".join(lines))


#: train_ds.py's configuration as the benchmark starts from it: train_ds.py's defaults, but gradient
#: checkpointing off and 16 new tokens per chat query (the benchmark's defaults).
BENCH_BASE = RunConfig().replace(loop={"gradient_checkpointing": False}, generation={"max_new_tokens": 16})
#: train_ds.py's options the benchmark's command line sets (group -> fields); ``run``'s have no default
#: (not given: the benchmark builds its preset instead of loading a base).
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    "loop": ("gradient_checkpointing", "pack_conversations", "seed"),
    "optim": ("torch_adam", "zero_stage"),
    "generation": ("max_new_tokens",),
    "run": ("version", "vision_pretrained"),
}


def parse_args(
    argv: Sequence[str] | None = None, description: str | None = None
) -> tuple[BenchOptions, RunConfig]:
    """The command line as the benchmark's options and the train_ds.py configuration it times
    (:data:`BENCH_BASE` with the train_ds.py flags given); ``SystemExit`` with a message on a bad value.
    ``--build auto`` is resolved."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_option_flags(p, BenchOptions)
    shared = p.add_argument_group("train_ds.py's options (the benchmark's defaults)")
    for group, names in TRAIN_FLAGS.items():
        base = getattr(BENCH_BASE, group)
        defaults = {n: None if group == "run" else getattr(base, n) for n in names}
        add_option_flags(shared, type(base), only=names, defaults=defaults)
    add_option_flags(p.add_argument_group("model options (train_ds.py's)"), ModelOptions)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if not args.train and not (args.eval or args.chat):
        p.error("--no_train leaves nothing to measure: add --eval and/or --chat")
    values = {g: {n: getattr(args, n) for n in names} for g, names in TRAIN_FLAGS.items()}
    values["run"] = {n: v for n, v in values["run"].items() if v is not None}
    train_flags = {n for names in TRAIN_FLAGS.values() for n in names}
    train_flags |= {flag_name(f) for f in dataclasses.fields(ModelOptions)}
    try:
        opts = options_from_args(BenchOptions, args)
        cfg = BENCH_BASE.replace(
            model=options_from_args(ModelOptions, args),
            **values,
            given=frozenset(explicit_dests(p, argv)) & train_flags,
        )
    except ValueError as exc:
        p.error(str(exc).split("; ")[0])
    loads = "version" in cfg.given
    build = opts.build if opts.build != "auto" else ("files" if opts.preset == "tiny" or loads else "direct")
    if build == "direct" and loads:
        p.error("--version loads files: it cannot be combined with --build direct")
    return dataclasses.replace(opts, build=build), cfg


def base_dir(cfg: RunConfig) -> tuple[str | None, str | None]:
    """(``--version``, ``--vision_pretrained``) when given, else None each (the preset is built instead)."""
    run = cfg.run
    return (
        run.version if "version" in cfg.given else None,
        run.vision_pretrained if "vision_pretrained" in cfg.given else None,
    )


def step_config(opts: BenchOptions, cfg: RunConfig) -> RunConfig:
    """``train_ds.py``'s configuration for the timed step: one image batch per optimiser step."""
    loop = {"batch_size": opts.images, "grad_accumulation_steps": 1, "epochs": 1}
    return cfg.replace(loop={**loop, "steps_per_epoch": opts.warmup + opts.steps + 1})
