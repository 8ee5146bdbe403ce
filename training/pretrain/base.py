"""The pretrained tiny base: a tiny SAM and a tiny LLaVA made the way the real ones were, in miniature.

``scripts/pretrain_tiny_base.py`` is the command line (:func:`main`). It writes, into ``--out``:

* ``llava/`` — an HF LLaVA directory (``tiny-base`` preset: 128-wide 4-layer LM, 8x8 CLIP grid) with a
  tokenizer trained on the pretraining corpus, after two stages (:mod:`training.pretrain.llava`);
* ``sam_tiny.pth`` — a Meta-format SAM state dict (``tiny160`` variant) after promptable-segmentation
  pretraining (:mod:`training.pretrain.sam`);
* ``pretrain_record.json`` — how it was made: command, commit, seeds, threads, wall times, losses,
  held-out scores;
* ``.work/`` — resumable stage checkpoints (rerun the same command after a kill to continue).

``--llava_from BASE`` pretrains only the SAM and takes ``llava/`` from an existing base, with that base's
LLaVA record and command (two builds of one LLaVA recipe fine-tune very differently, docs/RESULTS.md, so a
better SAM is measured against the LLaVA it will ship with).

All data are generated 2D centre views with the pretraining seed (:mod:`dataset.synthetic.pretrain`),
disjoint from every benchmark scene. With ``--parallel`` (the default) the SAM stage runs in a second
process, one thread each: the two models are too small for two threads to help one of them much.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from dataset.synthetic.pretrain import PRETRAIN_SEED, pretrain_config, pretrain_corpus
from model.presets import get_preset
from model.sam import build_sam, sam_config
from training.pretrain.llava import STAGES, LlavaStageOptions, ScenePool, rec_scores, run_llava_stage
from training.pretrain.sam import SamStageOptions, held_out_scores, run_sam_stage
from training.pretrain.tiny_base import new_llava, save_llava, train_tiny_tokenizer
from utils.options import add_option_flags, flag_name, option, options_from_args, show_value

PRESET = "tiny-base"
# flags that only shape the LLaVA stages (refused with --llava_from)
LLAVA_FLAGS = (
    "pool",
    "vision_steps",
    "vision_position_weight",
    "freeze_clip",
    "expression_first",
    "box_step",
    "caption_steps",
    "instruct_steps",
    "instruct_eval_every",
)


@dataclass(frozen=True)
class PretrainOptions:
    """Everything that decides the pretrained base (recorded in ``pretrain_record.json``)."""

    seed: int = PRETRAIN_SEED
    height: int = 120
    width: int = 160
    pool: int = 6000
    threads: int = 1
    parallel: bool = True
    sam: SamStageOptions = field(default_factory=SamStageOptions)
    llava_from: Path | None = None
    vision: LlavaStageOptions = field(default_factory=lambda: LlavaStageOptions(steps=1000, batch_size=32))
    caption: LlavaStageOptions = field(default_factory=lambda: LlavaStageOptions(steps=600))
    instruct: LlavaStageOptions = field(default_factory=lambda: LlavaStageOptions(steps=1500))


def git_commit() -> str:
    """``HEAD``'s hash (+ ``-dirty`` when the tree has changes), or ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def sam_job(out: Path, opts: PretrainOptions, progress: bool) -> dict[str, Any]:
    """Build, pretrain and save the tiny SAM (``out/sam_tiny.pth``); returns its stage record."""
    torch.set_num_threads(opts.threads)
    cfg = pretrain_config(opts.height, opts.width, opts.seed)
    torch.manual_seed(opts.seed)
    sam = build_sam(sam_config(get_preset(PRESET).sam_variant))
    record = run_sam_stage(sam, cfg, opts.sam, out / ".work", opts.seed, progress=progress)
    record["final_held_out"] = held_out_scores(sam, cfg, opts.sam.held_out)
    torch.save(sam.state_dict(), out / "sam_tiny.pth")
    (out / ".work" / "sam_record.json").write_text(json.dumps(record, indent=2))
    return record


def _exit_with_parent(parent: int) -> None:
    """Stop this process once ``parent`` is gone (killed): an orphaned stage must not keep writing."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def _sam_process(out: str, opts: PretrainOptions, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    sam_job(Path(out), opts, progress=True)


def llava_job(out: Path, opts: PretrainOptions, progress: bool) -> dict[str, Any]:
    """Tokenizer, tiny LLaVA, caption then instruct stage; saves ``out/llava``; returns the records."""
    torch.set_num_threads(opts.threads)
    cfg = pretrain_config(opts.height, opts.width, opts.seed)
    preset = get_preset(PRESET)
    work = out / ".work"
    vision = preset.vision
    pool = ScenePool.render(
        range(1, opts.pool + 1), cfg, vision["image_size"], vision["patch_size"], progress
    )
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        numbers = [f"[{a / 100:.2f}, {b / 100:.2f}]" for a in range(101) for b in range(0, 101, 7)]
        tok = train_tiny_tokenizer(pretrain_corpus(pool.scenes) + numbers, preset.vocab_size)
        tok.save_pretrained(tok_dir)
    model: LlavaForConditionalGeneration = new_llava(preset, tok, opts.seed)
    records = {}
    for stage in STAGES:
        stage_opts = getattr(opts, stage)
        records[stage] = run_llava_stage(stage, model, tok, pool, cfg, stage_opts, work, opts.seed, progress)
    records["final_held_out"] = rec_scores(
        model, tok, cfg, opts.instruct.held_out, image_first=opts.instruct.image_first
    )
    save_llava(model, tok, out / "llava")
    return records


def pretrain_base(
    out: str | Path, opts: PretrainOptions, argv: Sequence[str] = (), progress: bool = True
) -> dict[str, Any]:
    """Run every stage (resuming what ``out/.work`` holds) and write the base + ``pretrain_record.json``."""
    out = Path(out)
    (out / ".work").mkdir(parents=True, exist_ok=True)
    start, commit = time.perf_counter(), git_commit()  # the code this run starts from
    if opts.llava_from is not None:
        source = json.loads((opts.llava_from / "pretrain_record.json").read_text())
        sam = sam_job(out, opts, progress)
        shutil.copytree(opts.llava_from / "llava", out / "llava", dirs_exist_ok=True)
        llava = {
            **source["llava"],
            "from": {key: source.get(key) for key in ("command", "commit", "seed", "wall_s_this_run")}
            | {"path": str(opts.llava_from)},
        }
    elif opts.parallel:
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_sam_process, args=(str(out), opts, os.getpid()))
        proc.start()
        try:
            llava = llava_job(out, opts, progress)
        except BaseException:
            proc.terminate()  # its checkpoint stays; a rerun resumes both
            proc.join()
            raise
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(
                f"the SAM pretraining process failed (exit code {proc.exitcode}); rerun to resume"
            )
        sam = json.loads((out / ".work" / "sam_record.json").read_text())
    else:
        sam = sam_job(out, opts, progress)
        llava = llava_job(out, opts, progress)
    record = {
        "command": "python scripts/pretrain_tiny_base.py " + " ".join(argv),
        "commit": commit,
        "preset": PRESET,
        "seed": opts.seed,
        "threads": opts.threads,
        "parallel": opts.parallel,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {mp.cpu_count()} CPUs",
        "wall_s_this_run": round(time.perf_counter() - start, 1),
        "sam": sam,
        "llava": llava,
    }
    (out / "pretrain_record.json").write_text(json.dumps(record, indent=2))
    return record


#: The defaults of every stage, for the flags' defaults.
_D = PretrainOptions()


@dataclass(frozen=True)
class PretrainFlags:
    """The command line of ``scripts/pretrain_tiny_base.py``, one field per flag (defaults: those of
    :class:`PretrainOptions`); :func:`pretrain_options` checks them and builds the :class:`PretrainOptions`.

    Attributes:
        out: output folder (``--out``, required).
    """

    out: Path
    seed: int = option(_D.seed, "generator + init seed of the pretraining scenes")
    pool: int = option(_D.pool, "LLaVA pretraining scenes rendered once")
    threads: int = option(_D.threads, "torch threads per process")
    parallel: bool = option(
        _D.parallel, "run the SAM stage in a second process beside the LLaVA stages (else before them)"
    )
    llava_from: Path | None = option(  # noqa: RUF009 - option() returns a dataclasses.field
        None,
        "pretrain only the SAM; copy llava/ and its record from this existing base "
        "(the LLaVA flags are then refused)",
        parse=Path,
    )
    sam_steps: int = option(_D.sam.steps, "steps of the SAM stage")
    sam_eval_every: int = option(_D.sam.eval_every, "SAM stage steps between held-out evaluations")
    vision_steps: int = option(_D.vision.steps, "dense patch-content steps of CLIP")
    vision_position_weight: float = option(
        _D.vision.position_weight,
        "weight of the vision stage's patch-position term (0: content only, the shipped base's recipe)",
    )
    freeze_clip: bool = option(
        False,
        "freeze the vision tower in the caption and instruct stages (as LLaVA does; keeps its positions)",
    )
    expression_first: bool = option(
        False, "caption / instruct prompts put <image> after the question (LLaVA's order: before it)"
    )
    box_step: float = option(
        _D.instruct.box_step,
        "grid of the REC/REG box coordinates: 0.01 (LLaVA-1.5's 2 decimals) or 1/n, e.g. 0.1 (grown outwards)",
    )
    caption_steps: int = option(_D.caption.steps, "steps of the caption stage")
    instruct_steps: int = option(_D.instruct.steps, "steps of the instruct stage")
    instruct_eval_every: int = option(
        _D.instruct.eval_every, "instruct stage steps between held-out evaluations"
    )
    held_out: int = option(_D.sam.held_out, "held-out scenes per evaluation")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--out`` and one flag per :class:`PretrainFlags` option."""
    p = argparse.ArgumentParser(description="Pretrain the tiny LLaVA + SAM base on generated 2D scenes.")
    p.add_argument(
        "--out", required=True, help="output folder (gets llava/, sam_tiny.pth, pretrain_record.json)"
    )
    add_option_flags(p, PretrainFlags)
    return p


def _llava_flags_given(flags: PretrainFlags) -> list[str]:
    """The LLaVA-stage flags (and ``--no_parallel``) ``flags`` sets to other than their defaults."""
    defaults, by_name = PretrainFlags(out=flags.out), {f.name: f for f in fields(PretrainFlags)}
    given = []
    for name in (*LLAVA_FLAGS, "parallel"):
        value = getattr(flags, name)
        if value != getattr(defaults, name):
            f = by_name[name]
            given.append(show_value(f, value) if isinstance(value, bool) else f"--{flag_name(f)}")
    return given


def pretrain_options(flags: PretrainFlags) -> PretrainOptions:
    """:class:`PretrainOptions` from the command line's flags; ``ValueError`` naming a bad flag."""
    for name in (
        "pool",
        "threads",
        "sam_steps",
        "caption_steps",
        "instruct_steps",
        "held_out",
        "sam_eval_every",
        "instruct_eval_every",
    ):
        if getattr(flags, name) < (0 if name.endswith("_steps") else 1):
            raise ValueError(
                f"--{name} must be {'>= 0' if name.endswith('_steps') else '>= 1'}, got {getattr(flags, name)}"
            )
    if not flags.vision_position_weight >= 0:
        raise ValueError(f"--vision_position_weight must be >= 0, got {flags.vision_position_weight}")
    n = round(1 / flags.box_step) if flags.box_step > 0 else 0
    if not (2 <= n <= 100 and abs(n * flags.box_step - 1) < 1e-6):
        raise ValueError(
            f"--box_step must be 1/n for an integer n in 2..100 (0.01, 0.1, ...), got {flags.box_step}"
        )
    if flags.llava_from is not None:
        given = _llava_flags_given(flags)
        if given:
            raise ValueError(
                f"--llava_from {flags.llava_from} takes the LLaVA as it is: "
                + ", ".join(given)
                + " would not act; drop it"
            )
        for need in ("llava/config.json", "llava/model.safetensors", "pretrain_record.json"):
            if not (flags.llava_from / need).is_file():
                raise ValueError(f"--llava_from {flags.llava_from}: no {need} (not a pretrained base)")
        try:
            json.loads((flags.llava_from / "pretrain_record.json").read_text())["llava"]["instruct"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"--llava_from {flags.llava_from}: pretrain_record.json has no LLaVA record ({exc!r})"
            ) from None
    llava = {"train_vision": not flags.freeze_clip, "image_first": not flags.expression_first}
    batch = max(_D.vision.batch_size, _D.instruct.batch_size)
    if flags.pool < batch:
        raise ValueError(
            f"--pool must be >= {batch} (the largest batch of the LLaVA stages), got {flags.pool}"
        )
    return PretrainOptions(
        seed=flags.seed,
        pool=flags.pool,
        threads=flags.threads,
        parallel=flags.parallel,
        llava_from=flags.llava_from,
        sam=SamStageOptions(steps=flags.sam_steps, eval_every=flags.sam_eval_every, held_out=flags.held_out),
        vision=LlavaStageOptions(
            steps=flags.vision_steps,
            batch_size=_D.vision.batch_size,
            held_out=flags.held_out,
            position_weight=flags.vision_position_weight,
        ),
        caption=LlavaStageOptions(steps=flags.caption_steps, held_out=flags.held_out, **llava),
        instruct=LlavaStageOptions(
            steps=flags.instruct_steps,
            eval_every=flags.instruct_eval_every,
            held_out=flags.held_out,
            box_step=flags.box_step,
            **llava,
        ),
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[PretrainFlags, PretrainOptions]:
    """The command line as its flags and the :class:`PretrainOptions` they describe; a bad value exits
    with the parser's usage and the problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = options_from_args(PretrainFlags, args, PretrainFlags(out=Path(args.out)))
    try:
        return flags, pretrain_options(flags)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the record written to ``pretrain_record.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, opts = parse_args(argv)
    record = pretrain_base(flags.out, opts, argv)
    sam, llava = record["sam"], record["llava"]
    print(
        f"tiny SAM: {sam['steps_run']} steps, held-out point IoU {sam['final_held_out']['point_iou']:.3f}, "
        f"box IoU {sam['final_held_out']['box_iou']:.3f}\n"
        f"tiny LLaVA: caption loss {llava['caption']['first_loss']:.3f} -> {llava['caption']['last_loss']:.3f}, "
        f"instruct loss {llava['instruct']['first_loss']:.3f} -> {llava['instruct']['last_loss']:.3f}, "
        f"held-out REC acc@0.5 {llava['final_held_out']['rec_acc']:.3f}\n"
        f"--version {flags.out / 'llava'} --vision_pretrained {flags.out / 'sam_tiny.pth'}"
    )
    return record
