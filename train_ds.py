"""Train LFLLM with DeepSpeed (LoRA + [SEG] + SAM decoder), or evaluate a model with ``--eval_only``.

    deepspeed train_ds.py --version LLAVA_HF_DIR --vision_pretrained sam_vit_h_4b8939.pth \\
        --dataset_dir ./dataset --refer_seg_data ref-urbanlf-real --val_dataset "ref-urbanlf-real|syn|val" \\
        --exp_name lfllm-7b
    deepspeed train_ds.py --version MERGED_DIR --eval_only --val_dataset "ref-urbanlf-real|syn|val"

A run writes under ``<log_base_dir>/<exp_name>/``: ``args.json``, ``ds_config.json``, TensorBoard events,
``train_log.jsonl``, ``ckpt_model/{last,best}`` (DeepSpeed, atomic, ``latest`` -> ``last``),
``export/{last,best}/trainable.safetensors`` (for ``merge_lora_weights_and_save_hf_model.py``) and, after
validation, ``eval.json``. ``--depth_source estimate`` replaces the disparity files by the built-in
estimator's maps (cached per scene, see ``docs/DISPARITY.md``). See ``python train_ds.py --help`` for every
option.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dataset.errors import DataError
from dataset.refer_seg import SampleSpec
from dataset.scenes import SceneDataset
from model.build import DTYPES, OptionMismatchError, build_lfllm, check_pretrained_dir
from model.options import ModelOptions
from model.trainable import unwrap
from training.baselines import baseline_metrics, summary_line
from training.checkpoint import atomic_write_text, checkpoint_step, find_resume_checkpoint
from training.config import RunConfig, parse_config
from training.engine import build_engine
from training.evaluate import check_protocol, evaluate
from training.features import prepare_feature_cache
from training.loaders import build_train_loader, build_val_loader, prepare_estimated_disparity, val_scenes
from training.preflight import preflight
from training.run_dir import RunInUseError, RunLock, check_resume_options
from training.run_log import RunLogger
from training.serve.merge import merged_record
from training.trainer import STOP, Trainer, TrainingInterrupted, resume_source
from utils import distributed
from utils.distributed import DistInfo, init_distributed
from utils.gres_metrics import GRES_TAGS, GresMetrics
from utils.metrics import PAPER_COLUMNS, SegMetrics
from utils.outputs import OutputDirError, refuse_inputs
from utils.safe_load import UnsafeCheckpointError


def _given(cfg: RunConfig) -> set[str]:
    """The model options (and ``vision_pretrained``) set on the command line: checked against the weights.
    ``gres`` on (given, or recorded by the run being resumed) always counts: it may add [REJ] to a merged base."""
    return (
        cfg.given_fields(ModelOptions)
        | ({"vision_pretrained"} & cfg.given)
        | ({"gres"} if cfg.model.gres else set())
    )


def _report(
    cfg: RunConfig, run_dir: Path, metrics: SegMetrics, dist_info: DistInfo, logger: RunLogger
) -> None:
    """Print the table (paper column order) beside the expression-blind baselines; write ``eval.json``."""
    if not dist_info.is_main:
        return
    scenes = val_scenes(cfg, with_disparity=False)
    baselines = baseline_metrics(scenes) if isinstance(scenes, SceneDataset) else {}  # referring sets only
    probe = "" if cfg.eval.eval_input == "exact" else f", input {cfg.eval.eval_input}"
    title = f"{cfg.eval.val_dataset} ({cfg.eval.eval_protocol}{probe}), model {cfg.run.version}"
    print(metrics.table(title=title))
    print("baselines that ignore the expression:")
    print(summary_line("model", metrics))
    for name, m in baselines.items():
        print(summary_line(name, m))
    if metrics.gres is not None:
        print(
            metrics.gres.table(
                columns=(*PAPER_COLUMNS, *GRES_TAGS),
                title="GRES: both rules, N-acc / T-acc (gsva: a rejected target keeps its mask; rela: it scores 0)",
            )
        )
        print(metrics.gres.baselines_table())
    record = {
        "val_dataset": cfg.eval.val_dataset,
        "protocol": cfg.eval.eval_protocol,
        "eval_input": cfg.eval.eval_input,
        "version": cfg.run.version,
        **metrics.to_json(),
        "baselines": {name: m.to_json()["subsets"]["All"] for name, m in baselines.items()},
        **({"gres": metrics.gres.to_json()} if metrics.gres is not None else {}),
    }
    atomic_write_text(run_dir / "eval.json", json.dumps(record, indent=2))
    logger.metrics(0, metrics.compute(), prefix="eval")


def prepare_disparity(cfg: RunConfig, model_config: Any, dist_info: DistInfo, *, train: bool) -> None:
    """``--depth_source estimate``: the estimator's maps for every scene this run reads (the training split
    when ``train``, ``--val_dataset`` when validating), written before the datasets are built and shared
    over the ranks; a model that reads no disparity (``--no_depth --no_caam``) needs none."""
    if cfg.data.depth_source != "estimate" or not SampleSpec.from_model_config(model_config).needs_disparity:
        return
    prepare_estimated_disparity(
        cfg,
        train=train,
        val=not (train and cfg.eval.no_eval),
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        device=dist_info.device,
        show_progress=dist_info.is_main,
    )


def run_eval_only(cfg: RunConfig, dist_info: DistInfo, run_dir: Path, logger: RunLogger) -> SegMetrics:
    """Evaluate ``--version`` (a merged LFLLM dir, or a LLaVA dir + SAM) on ``--val_dataset``; the prompt
    options a merged model recorded apply unless given on the command line."""
    cfg = cfg.with_recorded(merged_record(cfg.run.version), groups=("prompt",))
    torch.manual_seed(cfg.loop.seed)  # a LLaVA dir gets fresh [SEG] heads: the same on every rank and run
    model, tokenizer = build_lfllm(
        cfg.run.version,
        cfg.sam_checkpoint,
        cfg.model,
        DTYPES[cfg.run.precision],
        given=_given(cfg),
        light_pretrained=cfg.light_checkpoint,
    )
    protocol = cfg.eval.eval_protocol
    check_protocol(model.config, protocol)
    model.to(dist_info.device)
    prepare_disparity(cfg, model.config, dist_info, train=False)
    store = prepare_feature_cache(cfg, model, tokenizer, dist_info, train=False, val=True)
    loader = build_val_loader(
        cfg,
        model.config,
        tokenizer,
        dist_info.rank,
        dist_info.world_size,
        protocol == "generated",
        store=store,
    )
    vis = Path(cfg.eval.vis_save_path) if cfg.eval.vis_save_path else None
    metrics = evaluate(
        model,
        loader,
        dist_info.device,
        protocol=protocol,
        tokenizer=tokenizer,
        max_new_tokens=cfg.generation.max_new_tokens,
        vis_dir=vis,
        show_progress=dist_info.is_main,
        gres=GresMetrics() if model.config.gres else None,
    )
    _report(cfg, run_dir, metrics, dist_info, logger)
    return metrics


def run_training(cfg: RunConfig, dist_info: DistInfo, run_dir: Path, logger: RunLogger) -> Trainer:
    """Build the model, wrap it with peft and DeepSpeed, train, and evaluate at every epoch end."""
    torch.manual_seed(cfg.loop.seed)
    model, tokenizer = build_lfllm(
        cfg.run.version,
        cfg.sam_checkpoint,
        cfg.model,
        DTYPES[cfg.run.precision],
        given=_given(cfg),
        light_pretrained=cfg.light_checkpoint,
        region_token=cfg.datasets.ilvc > 0,  # the placeholder of ILVC answers
    )
    if not cfg.eval.no_eval:
        check_protocol(model.config, cfg.eval.eval_protocol)  # before any training step
    engine, ds_config = build_engine(model, cfg, on_cpu=dist_info.device.type == "cpu")
    logger.write_run_files(cfg.to_record(), ds_config)
    config = unwrap(engine.module).config
    prepare_disparity(cfg, config, dist_info, train=True)
    store = prepare_feature_cache(
        cfg, unwrap(engine.module), tokenizer, dist_info, train=True, val=not cfg.eval.no_eval
    )
    train_loader, sampler = build_train_loader(cfg, config, tokenizer, dist_info.rank, store=store)
    val_loader = None
    if not cfg.eval.no_eval:
        val_loader = build_val_loader(
            cfg,
            config,
            tokenizer,
            dist_info.rank,
            dist_info.world_size,
            cfg.eval.eval_protocol == "generated",
            store=store,
        )
    trainer = Trainer(
        cfg, engine, train_loader, sampler, val_loader, tokenizer, dist_info, logger, run_dir, cfg.to_record()
    )
    trainer.maybe_resume()
    trainer.train()
    if trainer.last_metrics is not None:
        _report(cfg, run_dir, trainer.last_metrics, dist_info, logger)
    return trainer


#: Errors that are the user's to fix: they end the run with one message, not a traceback.
USER_ERRORS = (
    DataError,
    OutputDirError,
    OptionMismatchError,
    UnsafeCheckpointError,
    RunInUseError,
    FileNotFoundError,
    ValueError,
)


def run(cfg: RunConfig, dist_info: DistInfo, run_dir: Path) -> None:
    """Pre-flight, lock and option checks, then evaluation or training."""
    preflight(cfg, train=not cfg.run.eval_only, is_main=dist_info.is_main)
    lock = RunLock(run_dir).acquire() if dist_info.is_main else None
    try:
        if lock is not None and lock.took_over:
            print(f"note: took over the lock of a run that is no longer alive ({lock.took_over})", flush=True)
        if not cfg.run.eval_only and dist_info.is_main:
            resuming = resume_source(cfg.run, run_dir / "ckpt_model") is not None
            for line in check_resume_options(run_dir, cfg, resuming):
                print(f"note: --resume_with_changes: {line}", flush=True)
        distributed.barrier()
        logger = RunLogger(run_dir, enabled=dist_info.is_main)
        try:
            if cfg.run.eval_only:
                logger.write_run_files(cfg.to_record(), None)
                run_eval_only(cfg, dist_info, run_dir, logger)
            else:
                run_training(cfg, dist_info, run_dir, logger)
        finally:
            logger.close()
    finally:
        if lock is not None:
            lock.release()


def run_inputs(cfg: RunConfig) -> dict[str, str | None]:
    """What a run reads, which its run folder (``--log_base_dir``/``--exp_name``) may not be, lie inside
    or hold (:func:`utils.outputs.refuse_inputs`)."""
    return {
        "--version": cfg.run.version,
        "--dataset_dir": cfg.datasets.dataset_dir,
        "--vision_pretrained": cfg.sam_checkpoint,
        "--light_pretrained": cfg.light_checkpoint,
    }


def resume_command(cfg: RunConfig, argv: Sequence[str] | None, world_size: int) -> str:
    """The command that continues this run: its own command line, with ``--resume`` pointed at the run's
    own checkpoints once it has one (an explicit ``--resume`` or ``--no_auto_resume`` would not find them)."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith(("--local_rank=", "--local-rank="))]
    own = cfg.run.run_dir / "ckpt_model"
    if (cfg.run.resume or not cfg.run.auto_resume) and find_resume_checkpoint(own) is not None:
        kept, skip = [], False
        for arg in args:
            if skip:
                skip = False
            elif arg == "--resume":
                skip = True
            elif not arg.startswith("--resume=") and arg != "--no_auto_resume":
                kept.append(arg)
        args = [*kept, "--resume", str(own)]
    script = sys.argv[0] if argv is None and sys.argv[0].endswith(".py") else "train_ds.py"
    launcher = ["deepspeed", "--num_gpus", str(world_size)] if world_size > 1 else [sys.executable]
    return shlex.join([*launcher, script, *args])


def interrupted_message(
    cfg: RunConfig, argv: Sequence[str] | None, world_size: int, exc: BaseException
) -> str:
    """What a stopped run says: what was saved, and the command that resumes it."""
    what = STOP.name
    if isinstance(exc, TrainingInterrupted):
        said = f"{what}: stopped after step {exc.step}; saved {exc.checkpoint} (step {exc.step})"
        if exc.pending_validation:
            said += ", whose validation runs when the run resumes"
    else:
        found = find_resume_checkpoint(cfg.run.run_dir / "ckpt_model")
        if found is None:
            said = f"{what}: stopped before this run saved a checkpoint"
        else:
            step = checkpoint_step(cfg.run.run_dir / "ckpt_model" / found[0])
            said = f"{what}: stopped; the newest checkpoint is {cfg.run.run_dir / 'ckpt_model' / found[0]}"
            said += (
                f" (step {step}); what came after it was not saved" if step is not None and step >= 0 else ""
            )
    return f"{said}. Resume with:\n  {resume_command(cfg, argv, world_size)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a user error (bad flag, file or data) ends with one ``error:`` line and status 2.
    SIGINT (Ctrl-C) or SIGTERM while training finishes the optimiser step, saves ``last``, prints the
    command that resumes and exits 128 + the signal (130 for Ctrl-C); before or after the steps it stops
    at once with the same advice (:class:`training.trainer.StopRequest`)."""
    installed = threading.current_thread() is threading.main_thread()
    restore = STOP.install() if installed else None
    cfg, world_size = None, 1
    try:
        cfg = parse_config(argv)
        try:  # a wrong --version, or a run folder among the inputs, is named before anything exists
            check_pretrained_dir(cfg.run.version)
            refuse_inputs(cfg.run.run_dir, run_inputs(cfg), "--log_base_dir/--exp_name")
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        dist_info = init_distributed(cfg.run.local_rank)
        world_size, STOP.verbose = dist_info.world_size, dist_info.is_main
        run_dir = cfg.run.run_dir
        try:
            run(cfg, dist_info, run_dir)
        except USER_ERRORS as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            prefix = f"[rank {dist_info.rank}] " if dist_info.world_size > 1 else ""
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
            return 2
        return 0
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        if STOP.verbose:
            text = f"{STOP.name}: stopped" if cfg is None else interrupted_message(cfg, argv, world_size, exc)
            print(f"\n{text}", file=sys.stderr, flush=True)
        return STOP.exit_code
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":
    sys.exit(main())
