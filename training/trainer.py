"""The training loop of ``train_ds.py``: DeepSpeed engine steps, per-epoch validation, checkpoints.

Length: the loop, its checkpoints, and the resume checks that keep a resumed run what it says (the
options, trainable shapes and LR schedule a checkpoint was trained with; a validation it still owes; a
Ctrl-C that saves first) read as one unit.

Reproducibility: the data order is a function of (seed, epoch, rank) and each micro-step reseeds torch
with (seed, micro-step, rank), so a run resumed from a checkpoint sees the same batches and dropout masks
as the run it continues, and its loss trajectory continues the original's.

A resumed run is the run it continues: the checkpoint records the options (``resume=True`` fields) and the
learning-rate schedule it was trained with; other options are refused unless ``--resume_with_changes``
(never when its trainable tensors do not fit the model), another length unless ``--extend_schedule``. An
epoch's checkpoint records that its validation is pending until ``val_record.json`` holds it; a resumed run
runs it first. SIGINT / SIGTERM (:data:`STOP`) finish the optimiser step, save ``last`` and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from dataset.collate import move_batch
from model.trainable import unwrap
from training.checkpoint import (
    atomic_write_text,
    checkpoint_step,
    export_trainable,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.ds_config import Schedule, clipped_warmup, total_steps
from training.evaluate import evaluate
from training.run_dir import OPTIONS_FILE, option_differences, recorded_resume_values, with_later_defaults
from training.run_log import RunLogger
from utils.batch import Batch
from utils.distributed import DistInfo, gather_objects, mean_across_ranks
from utils.gres_metrics import GRES_TAGS, GresMetrics
from utils.metrics import PAPER_COLUMNS, SegMetrics
from utils.safe_load import deepspeed_records, verify_torch_file

if TYPE_CHECKING:
    from training.config import RunConfig, RunOptions

LOSS_KEYS = ("loss", "ce_loss", "bce_loss", "dice_loss")
VAL_RECORD = "val_record.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class TrainState:
    """Progress saved with every checkpoint (DeepSpeed's client state)."""

    global_step: int = 0
    best_giou: float = -1.0
    best_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The step of an epoch checkpoint saved before its validation, until that validation is recorded.
    pending_validation: int | None = None

    def to_client(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "best_giou": self.best_giou,
            "best_step": self.best_step,
            "history": self.history,
            "pending_validation": self.pending_validation,
        }

    @classmethod
    def from_client(cls, client: dict[str, Any]) -> TrainState:
        pending = client.get("pending_validation")
        return cls(
            global_step=int(client.get("global_step", 0)),
            best_giou=float(client.get("best_giou", -1.0)),
            best_step=int(client.get("best_step", -1)),
            history=list(client.get("history", [])),
            pending_validation=None if pending is None else int(pending),
        )


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after ``last`` was saved at ``step``."""

    def __init__(self, step: int, checkpoint: Path, pending_validation: bool) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.pending_validation = step, checkpoint, pending_validation


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM, as ``train_ds.py`` handles them once :meth:`install` ed.

    While the training loop runs (:meth:`deferred`) a signal only records the request: the loop finishes its
    optimiser step (every rank agrees at the step's loss reduction), saves ``last`` and raises
    :class:`TrainingInterrupted`; a second SIGINT stops at once without saving. Anywhere else (start-up,
    validation, :meth:`abortable`) it raises ``KeyboardInterrupt`` at once: nothing in flight would be lost.
    A forked data-loader worker ignores both (the rank decides)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.defer = False
        self.verbose = True
        self.pid: int | None = None

    def install(self) -> Any:
        """Handle SIGINT and SIGTERM in this (main) thread; returns a function that restores the previous
        handlers."""
        self.pid, self.signum = os.getpid(), None
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for Ctrl-C)."""
        return 128 + int(self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum in (None, signal.SIGINT) else signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return
        first = self.signum is None
        if first:
            self.signum = signum
        if self.defer and (first or signum != signal.SIGINT):
            if first and self.verbose:  # os.write: no buffered stream is re-entered from a signal handler
                os.write(
                    2,
                    f"\n{self.name}: finishing this optimiser step, then saving 'last' and stopping "
                    "(Ctrl-C again stops at once without saving)\n".encode(),
                )
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals only record the request inside this block."""
        old, self.defer = self.defer, True
        try:
            yield
        finally:
            self.defer = old

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """Signals stop at once inside this block (and one received before it stops on entry)."""
        old, self.defer = self.defer, False
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self.defer = old


#: The process's stop request (installed by ``train_ds.main``; never set where it is not installed).
STOP = StopRequest()


def resume_source(run: RunOptions, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from: ``--resume`` (a ``ckpt_model`` dir or one of its tags), else
    with ``--auto_resume`` this run's newest complete checkpoint
    (:func:`training.checkpoint.find_resume_checkpoint`, which also recovers from a save interrupted
    at any point and says so), else None."""
    if run.resume:
        path = Path(run.resume)
        if path.is_dir() and ((path / "latest").is_file() or checkpoint_step(path) is None):
            found = find_resume_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"--resume {path}: no complete checkpoint in this folder")
            _say(found[1])
            return path, found[0]
        if path.is_dir():
            return path.parent, path.name
        raise FileNotFoundError(f"--resume {path}: no such checkpoint directory")
    if run.auto_resume:
        found = find_resume_checkpoint(ckpt_dir)
        if found is not None:
            _say(found[1])
            return ckpt_dir, found[0]
    return None


def _say(note: str | None) -> None:
    if note:
        print(f"note: {note}", flush=True)


def train_micro_step(
    engine: Any,
    batch: Batch,
    micro_index: int,
    seed: int,
    dist_info: DistInfo,
    task_names: list[str] | None = None,
) -> torch.Tensor:
    """One micro-step of training: forward + backward + (at the accumulation boundary, which DeepSpeed
    tracks) the optimiser step. Torch is reseeded with (seed, micro-step, rank) first, so a resumed run
    draws the same dropout masks. The step :class:`Trainer` runs and the benchmark times.

    Returns:
        ``(4,)`` the detached float losses ``(loss, ce, bce, dice)``; with ``task_names`` (a task mix)
        followed by each task's :data:`model.losses.TASK_STAT_FIELDS` sums, ``(4 + 5 T,)``.

    Raises:
        NonFiniteLossError naming the step when the loss is NaN or infinite.
    """
    torch.manual_seed(seed * 1_000_003 + micro_index * dist_info.world_size + dist_info.rank)
    batch = move_batch(batch, dist_info.device)
    if task_names:
        batch["task_names"] = list(task_names)
    out = engine(lf_batch=batch)
    loss = out["loss"]
    if not torch.isfinite(loss):
        step = int(engine.global_steps) + 1
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()} at optimiser step {step} (micro-step {micro_index}, "
            f"rank {dist_info.rank}; ce {out['ce_loss'].item()}, bce {out['bce_loss'].item()}, "
            f"dice {out['dice_loss'].item()}): stopping. Try a lower --lr or --precision fp32."
        )
    engine.backward(loss)
    engine.step()
    losses = torch.stack([out[k].detach().float() for k in LOSS_KEYS])
    if task_names:
        losses = torch.cat([losses.cpu(), out["task_stats"].flatten()])
    return losses


def task_scalars(
    sums: torch.Tensor, task_names: list[str], weights: tuple[float, float, float]
) -> dict[str, float]:
    """``<task>/loss``, ``<task>/ce_loss``, ``<task>/bce_loss``, ``<task>/dice_loss`` of each task that had
    answer tokens or masks, from the (T x 5) sums of :func:`model.losses.task_loss_sums` (added over
    micro-steps and ranks); ``weights`` = (ce, bce, dice) loss weights."""
    out: dict[str, float] = {}
    for task, (ce_sum, tokens, bce_sum, dice_sum, masks) in zip(task_names, sums.view(-1, 5).tolist()):
        if tokens == 0 and masks == 0:
            continue
        ce = ce_sum / tokens if tokens else 0.0
        bce, dice = (bce_sum / masks, dice_sum / masks) if masks else (0.0, 0.0)
        out.update(
            {
                f"{task}/loss": weights[0] * ce + weights[1] * bce + weights[2] * dice,
                f"{task}/ce_loss": ce,
                f"{task}/bce_loss": bce,
                f"{task}/dice_loss": dice,
            }
        )
    return out


class Trainer:
    """Runs ``epochs × steps_per_epoch`` optimiser steps of a DeepSpeed engine."""

    def __init__(
        self,
        cfg: RunConfig,
        engine: Any,
        train_loader: Any,
        sampler: Any,
        val_loader: Any | None,
        tokenizer: Any,
        dist_info: DistInfo,
        logger: RunLogger,
        run_dir: Path,
        export_meta: dict[str, Any],
    ) -> None:
        self.cfg, self.engine, self.loader, self.sampler = cfg, engine, train_loader, sampler
        self.val_loader, self.tokenizer, self.dist, self.log = val_loader, tokenizer, dist_info, logger
        self.run_dir, self.export_meta = run_dir, export_meta
        self.ckpt_dir = run_dir / "ckpt_model"
        self.state = TrainState()
        self.gas = cfg.loop.grad_accumulation_steps
        tasks = cfg.datasets.tasks
        self.task_names = tasks if len(tasks) > 1 else None  # a task mix logs each task's losses
        self.last_metrics: SegMetrics | None = None

    # ------------------------------------------------------------------ checkpoints
    def maybe_resume(self) -> None:
        """Load the checkpoint chosen by ``--resume`` / ``--auto_resume``, if any, after checking that it
        continues this run: the options and trainable shapes it was trained with, and its LR schedule."""
        source = resume_source(self.cfg.run, self.ckpt_dir)
        if source is None:
            return
        tag_dir = Path(source[0]) / source[1]
        record = read_checkpoint_record(tag_dir)
        self._check_options(record, tag_dir)
        schedule = self._plan_schedule(record, tag_dir)
        client = load_checkpoint(self.engine, *source)
        self.state = TrainState.from_client(client)
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if schedule is not None and hasattr(scheduler, "schedule"):
            scheduler.schedule = schedule
            scheduler.apply()
        self._adopt_validation_record(tag_dir)
        if self.dist.is_main:
            print(f"resumed from {tag_dir} at step {self.state.global_step}", flush=True)
        self.log.truncate_log(self.state.global_step)

    def _check_options(self, record: dict[str, Any], tag_dir: Path) -> None:
        """Refuse a checkpoint trained with other ``resume=True`` options unless ``--resume_with_changes``;
        refuse one whose trainable tensors do not fit this model in any case."""
        recorded = record.get("client", {}).get("options")
        if recorded is None:  # an earlier version's checkpoint: the run record beside it (another run's)
            beside = tag_dir.parent.parent / OPTIONS_FILE
            if tag_dir.parent.name == "ckpt_model" and beside.is_file() and beside.parent != self.run_dir:
                try:
                    recorded = recorded_resume_values(json.loads(beside.read_text()))
                except (json.JSONDecodeError, TypeError, ValueError):
                    recorded = None
        if recorded is not None:
            recorded = with_later_defaults(recorded)  # e.g. gres: a checkpoint from before the option
        diffs = option_differences(recorded, self.cfg.resume_values()) if recorded is not None else []
        if diffs and not self.cfg.run.resume_with_changes:
            raise ValueError(
                f"{tag_dir}: this checkpoint was trained with other options than this run's:\n  "
                + "\n  ".join(diffs)
                + "\nresuming it would continue those weights under these options. Pass the checkpoint's "
                "options, start a new run (another --exp_name, no --resume), or add --resume_with_changes "
                "to continue it with these"
            )
        module = self.engine.module
        trainable = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
        buffers = {n: tuple(b.shape) for n, b in module.named_buffers()}
        misfit = _shape_misfit(record.get("shapes", {}), trainable, buffers)
        if misfit:
            why = f" (the options differ: {'; '.join(diffs)})" if diffs else ""
            raise ValueError(
                f"{tag_dir}: its trainable weights do not fit this run's model{why}: {misfit}. "
                "A checkpoint continues only the model it was trained as, even with --resume_with_changes: "
                "pass its options, or start a new run (another --exp_name, no --resume)"
            )
        if diffs and self.dist.is_main:
            for line in diffs:
                print(f"note: --resume_with_changes: continuing {tag_dir} with {line}", flush=True)

    def _plan_schedule(self, record: dict[str, Any], tag_dir: Path) -> Schedule | None:
        """The LR schedule the resumed run follows: the checkpoint's; another length only with
        ``--extend_schedule`` (the LR continues from its value and falls to 0 at the new end), another
        ``--lr`` / ``--warmup_steps`` only with ``--resume_with_changes``; the old and the new printed."""
        recorded = _recorded_schedule(record)
        requested = Schedule.from_options(self.cfg.optim, self.cfg.loop)
        step = int(record.get("global_steps") or record.get("client", {}).get("global_step") or 0)
        it = int((record.get("lr_scheduler") or {}).get("last_batch_iteration", step - 1))
        stop = min(requested.end, self.cfg.loop.max_steps) if self.cfg.loop.max_steps > 0 else requested.end
        if recorded is None or step >= stop:
            return recorded  # nothing will be trained (or the checkpoint recorded no schedule): as it was
        new, changes, refused = recorded, [], []
        warmup = clipped_warmup(self.cfg.optim.warmup_steps, recorded.total_steps)
        if recorded.lr != requested.lr or warmup != recorded.warmup_steps:
            new = dataclasses.replace(new, lr=requested.lr, warmup_steps=warmup)
            for flag, old, value in (
                ("--lr", recorded.lr, requested.lr),
                ("--warmup_steps", recorded.warmup_steps, warmup),
            ):
                if old != value:
                    changes.append(f"{flag}: {old:g} -> {value:g}")
            if not self.cfg.run.resume_with_changes:
                refused.append("--resume_with_changes to train on with the new --lr / --warmup_steps")
        if requested.end != recorded.end:
            loop = self.cfg.loop
            was = record.get("client", {}).get("loop") or {}
            before = (
                f" (--epochs {was['epochs']} x --steps_per_epoch {was['steps_per_epoch']})" if was else ""
            )
            changes.append(
                f"length: {recorded.end} steps{before} -> {requested.end} "
                f"(--epochs {loop.epochs} x --steps_per_epoch {loop.steps_per_epoch})"
            )
            new = new.extended(it, requested.end)
            if not self.cfg.loop.extend_schedule:
                refused.append(
                    f"--extend_schedule to continue the LR from the value it reached and let it fall "
                    f"linearly to 0 at step {requested.end}"
                )
        if new == recorded:
            return recorded
        first = step + 1
        lines = [
            f"the checkpoint's: {recorded.describe()}; LR of step {first}: {recorded.lr_at(it):.3g}",
            f"re-derived for this run: {requested.describe()}; LR of step {first}: {requested.lr_at(it):.3g}",
        ]
        if refused:
            raise ValueError(
                f"{tag_dir} (step {step}) was trained on another learning-rate schedule than this run asks "
                "for:\n  "
                + "\n  ".join(changes)
                + "\nschedules:\n  "
                + "\n  ".join(lines)
                + "\nadd "
                + ", and ".join(refused)
                + "; or pass the checkpoint's values to keep its schedule (docs/TRAINING.md, 'Extending a run')"
            )
        if self.dist.is_main:
            print(
                "note: the learning-rate schedule changes on resume ("
                + "; ".join(changes)
                + "):\n  "
                + lines[0]
                + f"\n  this run's: {new.describe()}; LR of step {first}: {new.lr_at(it):.3g}, of step "
                f"{stop} (the last): {new.lr_of_step(stop):.3g}",
                flush=True,
            )
        return new

    def _record_validation(self) -> None:
        """Validation results of the epochs (``val_record.json``): the epoch's checkpoint is saved before
        its validation, so the record carries what that checkpoint's client state does not yet hold."""
        if self.dist.is_main:
            skip = ("global_step", "pending_validation")
            record = {k: v for k, v in self.state.to_client().items() if k not in skip}
            atomic_write_text(self.run_dir / VAL_RECORD, json.dumps(record, indent=2))

    def _adopt_validation_record(self, tag_dir: Path | None = None) -> None:
        """Take the validation results of the checkpoint's epochs from ``val_record.json`` (this run's, and
        for another run's checkpoint the one beside it); a pending validation they hold is done."""
        own = self.run_dir / VAL_RECORD
        if own.is_file():
            self._adopt_record(json.loads(own.read_text()), best=True)
        beside = None if tag_dir is None else tag_dir.parent.parent / VAL_RECORD
        if beside is not None and beside != own and beside.is_file():
            self._adopt_record(json.loads(beside.read_text()), best=False)

    def _adopt_record(self, record: dict[str, Any], best: bool) -> None:
        steps = {h.get("step") for h in self.state.history}
        if best and float(record.get("best_giou", -1.0)) > self.state.best_giou:
            self.state.best_giou = float(record["best_giou"])
            self.state.best_step = int(record.get("best_step", -1))
        for entry in record.get("history", []):
            if entry.get("step") in steps and entry.get("step", 1e18) <= self.state.global_step:
                for mine in self.state.history:
                    if mine.get("step") == entry.get("step"):
                        mine["gIoU"] = entry.get("gIoU")
                if entry.get("step") == self.state.pending_validation:
                    self.state.pending_validation = None

    def save(self, tag: str, update_latest: bool) -> None:
        self.state.global_step = int(self.engine.global_steps)
        client = {**self.state.to_client(), **self.run_client_state()}
        save_checkpoint(self.engine, self.ckpt_dir, tag, client, update_latest=update_latest)
        meta = {**self.export_meta, "global_step": self.state.global_step, "tag": tag}
        export_trainable(self.engine.module, self.run_dir / "export" / tag, meta)

    def run_client_state(self) -> dict[str, Any]:
        """What a checkpoint records of the run that wrote it: the options a resumed run must share, and the
        loop's length (the LR schedule itself is the scheduler's state)."""
        loop = self.cfg.loop
        return {
            "options": self.cfg.resume_values(),
            "loop": {"epochs": loop.epochs, "steps_per_epoch": loop.steps_per_epoch},
        }

    # ------------------------------------------------------------------ validation
    def validate(self, step: int) -> SegMetrics:
        metrics = evaluate(
            unwrap(self.engine.module),
            self.val_loader,
            self.dist.device,
            protocol=self.cfg.eval.eval_protocol,
            tokenizer=self.tokenizer,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            show_progress=self.dist.is_main,
            gres=GresMetrics() if getattr(unwrap(self.engine.module).config, "gres", False) else None,
        )
        results = metrics.compute()
        self.log.metrics(step, results)
        if metrics.gres is not None:
            accuracies = {
                name: {k: v for k, v in values.items() if k in ("N-acc", "T-acc") and v is not None}
                for name, values in metrics.gres.compute("rela").items()
            }
            self.log.metrics(step, accuracies, prefix="gres")
        if self.dist.is_main:
            print(
                metrics.table(title=f"validation after step {step} ({self.cfg.eval.eval_protocol})"),
                flush=True,
            )
            if metrics.gres is not None:
                columns = (*PAPER_COLUMNS, *GRES_TAGS)
                print(metrics.gres.table(columns=columns, title="GRES (both rules)"), flush=True)
        return metrics

    def end_of_epoch(self, epoch: int, validate: bool = True) -> None:
        """Save the epoch's checkpoint (its validation recorded as pending), then validate (a bad validation
        scene loses no training, and a rerun runs it), then save it again as ``best`` when its gIoU is the
        best so far. ``validate=False`` (a stop request) leaves the validation pending."""
        step = int(self.engine.global_steps)
        self.state.history.append({"epoch": epoch, "step": step, "gIoU": math.nan})
        self.state.pending_validation = step if self.val_loader is not None else None
        self.save("last", update_latest=True)
        if self.val_loader is None or not validate:
            return
        self._validate_checkpoint(step)

    def _validate_checkpoint(self, step: int) -> None:
        """Validate the weights of the checkpoint saved at ``step``; record the result; ``best``."""
        with STOP.abortable():
            self.last_metrics = self.validate(step)
        giou = self.last_metrics.compute()["All"]["gIoU"]
        entry = next((h for h in self.state.history if h.get("step") == step), None)
        if entry is None:
            entry = {"epoch": step // self.cfg.loop.steps_per_epoch - 1, "step": step}
            self.state.history.append(entry)
        entry["gIoU"] = giou
        self.state.pending_validation = None
        if giou == giou and giou > self.state.best_giou:
            self.state.best_giou, self.state.best_step = giou, step
            self.save("best", update_latest=False)
        self._record_validation()

    def run_pending_validation(self) -> bool:
        """The validation the resumed checkpoint still owes (its run stopped or failed in it); True if run."""
        step = self.state.pending_validation
        if step is None or step != int(self.engine.global_steps):
            return False
        if self.val_loader is None:
            if self.dist.is_main:
                print(
                    f"note: the validation of step {step} is still pending (this run has --no_eval)",
                    flush=True,
                )
            return False
        if self.dist.is_main:
            print(
                f"note: the checkpoint of step {step} was saved before its validation, which did not complete; "
                "running it now",
                flush=True,
            )
        self._validate_checkpoint(step)
        return True

    def train_step(self, batch: Batch, micro_index: int) -> torch.Tensor:
        """:func:`train_micro_step` on this trainer's engine (losses ``(loss, ce, bce, dice)``)."""
        return train_micro_step(
            self.engine, batch, micro_index, self.cfg.loop.seed, self.dist, self.task_names
        )

    def loss_weights(self) -> tuple[float, float, float]:
        """The (CE, BCE, dice) weights of the model's loss."""
        c = self.engine.module.config
        return float(c.ce_loss_weight), float(c.bce_loss_weight), float(c.dice_loss_weight)

    def interrupt(self, step: int, epoch_end: bool) -> None:
        """A stop request at ``step``: save ``last`` (an epoch end's validation stays pending), then raise
        :class:`TrainingInterrupted`."""
        if epoch_end:
            self.end_of_epoch(step // self.cfg.loop.steps_per_epoch - 1, validate=False)
        else:
            self.save("last", update_latest=True)
        raise TrainingInterrupted(step, self.ckpt_dir / "last", self.state.pending_validation is not None)

    def train(self) -> None:
        loop = self.cfg.loop
        spe, total = loop.steps_per_epoch, total_steps(loop)
        stop = min(total, loop.max_steps) if loop.max_steps > 0 else total
        validated = self.run_pending_validation()
        start = int(self.engine.global_steps)
        if start >= stop:
            if self.dist.is_main:
                print(f"nothing to do: the run is at step {start} of {stop}", flush=True)
            if validated:
                self.write_summary()
            return
        images_per_step = loop.batch_size * self.gas * self.dist.world_size
        bar = tqdm(
            total=stop,
            initial=start,
            desc="train",
            unit="step",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        step = start
        with STOP.deferred():
            while step < stop:
                epoch = step // spe
                first_micro = (step % spe) * self.gas
                self.sampler.set_epoch(epoch, start=first_micro * loop.batch_size)
                if hasattr(self.loader.dataset, "set_epoch"):
                    self.loader.dataset.set_epoch(epoch)
                acc = torch.zeros(len(LOSS_KEYS) + 5 * len(self.task_names or ()))
                tic = time.perf_counter()
                step_lr = float(self.engine.get_lr()[0])  # the LR this optimiser step trains with
                for offset, batch in enumerate(self.loader):
                    micro = epoch * spe * self.gas + first_micro + offset
                    acc += self.train_step(batch, micro).cpu()
                    if (micro + 1) % self.gas:
                        continue
                    step = int(self.engine.global_steps)
                    # the stop request rides on the loss reduction: every rank stops after the same step
                    flag = torch.tensor([1.0 if STOP.requested else 0.0])
                    reduced = mean_across_ranks(torch.cat([acc / self.gas, flag]))
                    losses, stop_now = reduced[: len(LOSS_KEYS)], bool(reduced[-1] > 0)
                    seconds = time.perf_counter() - tic
                    values = dict(zip(LOSS_KEYS, losses.tolist()))
                    if self.task_names:
                        sums = reduced[len(LOSS_KEYS) : -1]
                        values.update(task_scalars(sums, self.task_names, self.loss_weights()))
                    values.update(lr=step_lr, images_per_s=images_per_step / seconds)
                    if step % loop.print_freq == 0 or step == stop:
                        self.log.scalars(step, values)
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
                    acc.zero_()
                    tic = time.perf_counter()
                    step_lr = float(self.engine.get_lr()[0])
                    if stop_now:
                        bar.close()
                        self.interrupt(step, epoch_end=step % spe == 0)
                    if step % spe == 0:
                        self.end_of_epoch(step // spe - 1)
                    elif step == stop or (loop.save_steps and step % loop.save_steps == 0):
                        self.save("last", update_latest=True)
                    if step >= stop:
                        break
        bar.close()
        self.write_summary()

    def write_summary(self) -> None:
        """``train_summary.json``: final step, best gIoU, epoch history and one fingerprint of the
        trainable weights per rank (data-parallel replicas must agree; a mismatch means they diverged)."""
        prints = gather_objects(weights_fingerprint(self.engine.module))
        if not self.dist.is_main:
            return
        summary = {
            **self.state.to_client(),
            "global_step": int(self.engine.global_steps),
            "world_size": self.dist.world_size,
            "rank_fingerprints": prints,
            "replicas_identical": all(p == prints[0] for p in prints),
        }
        atomic_write_text(self.run_dir / "train_summary.json", json.dumps(summary, indent=2))
        if not summary["replicas_identical"]:
            print(f"WARNING: data-parallel replicas differ: {prints}", flush=True)


def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """(sum, sum of squares, sum of |x| * position weight) over the trainable parameters, in float64:
    equal on two replicas iff (with overwhelming probability) their weights are equal."""
    total = torch.zeros(3, dtype=torch.float64)
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not p.requires_grad:
            continue
        x = p.detach().double().flatten().cpu()
        pos = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
        total += torch.stack([x.sum(), (x * x).sum(), (x.abs() * pos).sum()])
    return total.tolist()


def export_path(run_dir: Path, tag: str) -> Path:
    """Where ``Trainer.save`` exported the trainable weights of checkpoint ``tag``."""
    return run_dir / "export" / tag


#: The client state a checkpoint holds (:class:`TrainState` and :meth:`Trainer.run_client_state`).
_CLIENT_KEYS = (*TrainState().to_client(), "options", "loop")


def read_checkpoint_record(tag_dir: Path) -> dict[str, Any]:
    """What a DeepSpeed checkpoint folder says about itself, read weights-only before DeepSpeed loads it:
    ``client`` (the progress, options and loop it was saved with), ``lr_scheduler`` (iteration and, since
    this version, the schedule), ``ds_config``, ``global_steps`` and the ``shapes`` of its trainable tensors."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed checkpoint (no *model_states.pt in this folder)")
    state = verify_torch_file(files[0], deepspeed_records())
    if not isinstance(state, dict):
        raise ValueError(f"{files[0]}: not a DeepSpeed checkpoint (holds a {type(state).__name__})")
    module = state.get("module") or {}
    return {
        "client": {k: state[k] for k in _CLIENT_KEYS if k in state},
        "lr_scheduler": state.get("lr_scheduler"),
        "ds_config": state.get("ds_config"),
        "global_steps": state.get("global_steps"),
        "shapes": {k: tuple(v.shape) for k, v in module.items() if hasattr(v, "shape")},
    }


def _recorded_schedule(record: dict[str, Any]) -> Schedule | None:
    """The schedule a checkpoint was trained on: its scheduler's state, or (a checkpoint of DeepSpeed's own
    WarmupDecayLR) the ``scheduler`` entry of the DeepSpeed config saved with it."""
    sched = record.get("lr_scheduler") or {}
    if isinstance(sched.get("schedule"), dict):
        return Schedule.from_json(sched["schedule"])
    params = ((record.get("ds_config") or {}).get("scheduler") or {}).get("params")
    if not params:
        return None
    return Schedule(
        float(params["warmup_max_lr"]), int(params["warmup_num_steps"]), int(params["total_num_steps"])
    )


def _shape_misfit(
    saved: dict[str, tuple[int, ...]],
    trainable: dict[str, tuple[int, ...]],
    buffers: dict[str, tuple[int, ...]],
) -> str:
    """How a checkpoint's tensors (trainable parameters and buffers) differ from the model's trainable
    parameters and buffers ('' when they fit)."""
    if not saved:
        return ""
    here = {**buffers, **trainable}
    only_saved = sorted(set(saved) - set(here))
    only_here = sorted(set(trainable) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(here) if tuple(saved[k]) != tuple(here[k]))
    parts = []
    if only_saved:
        parts.append(f"{len(only_saved)} tensors only in the checkpoint (e.g. {only_saved[0]})")
    if only_here:
        parts.append(f"{len(only_here)} only in this model (e.g. {only_here[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape (e.g. {k}: {tuple(saved[k])} in the checkpoint, {here[k]} here)"
        )
    return "; ".join(parts)
