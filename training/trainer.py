"""The training loop of ``train_ds.py``: DeepSpeed engine steps, per-epoch validation, checkpoints.

Reproducibility: the data order is a function of (seed, epoch, rank) and each micro-step reseeds torch
with (seed, micro-step, rank), so a run resumed from a checkpoint sees the same batches and dropout masks
as the run it continues, and its loss trajectory continues the original's.
"""

from __future__ import annotations

import json
import math
import time
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
from training.ds_config import total_steps
from training.evaluate import evaluate
from training.run_log import RunLogger
from utils.batch import Batch
from utils.distributed import DistInfo, gather_objects, mean_across_ranks
from utils.metrics import SegMetrics

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

    def to_client(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "best_giou": self.best_giou,
            "best_step": self.best_step,
            "history": self.history,
        }

    @classmethod
    def from_client(cls, client: dict[str, Any]) -> TrainState:
        return cls(
            global_step=int(client.get("global_step", 0)),
            best_giou=float(client.get("best_giou", -1.0)),
            best_step=int(client.get("best_step", -1)),
            history=list(client.get("history", [])),
        )


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
    engine: Any, batch: Batch, micro_index: int, seed: int, dist_info: DistInfo
) -> torch.Tensor:
    """One micro-step of training: forward + backward + (at the accumulation boundary, which DeepSpeed
    tracks) the optimiser step. Torch is reseeded with (seed, micro-step, rank) first, so a resumed run
    draws the same dropout masks. The step :class:`Trainer` runs and the benchmark times.

    Returns:
        ``(4,)`` the detached float losses ``(loss, ce, bce, dice)``.

    Raises:
        NonFiniteLossError naming the step when the loss is NaN or infinite.
    """
    torch.manual_seed(seed * 1_000_003 + micro_index * dist_info.world_size + dist_info.rank)
    batch = move_batch(batch, dist_info.device)
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
    return torch.stack([out[k].detach().float() for k in LOSS_KEYS])


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
        self.last_metrics: SegMetrics | None = None

    # ------------------------------------------------------------------ checkpoints
    def maybe_resume(self) -> None:
        """Load the checkpoint chosen by ``--resume`` / ``--auto_resume``, if any."""
        source = resume_source(self.cfg.run, self.ckpt_dir)
        if source is None:
            return
        client = load_checkpoint(self.engine, *source)
        self.state = TrainState.from_client(client)
        self._adopt_validation_record()
        if self.dist.is_main:
            print(f"resumed from {source[0] / source[1]} at step {self.state.global_step}", flush=True)
        self.log.truncate_log(self.state.global_step)

    def _record_validation(self) -> None:
        """Validation results of the epochs (``val_record.json``): the epoch's checkpoint is saved before
        its validation, so the record carries what that checkpoint's client state does not yet hold."""
        if self.dist.is_main:
            record = {k: v for k, v in self.state.to_client().items() if k != "global_step"}
            atomic_write_text(self.run_dir / VAL_RECORD, json.dumps(record, indent=2))

    def _adopt_validation_record(self) -> None:
        path = self.run_dir / VAL_RECORD
        if not path.is_file():
            return
        record = json.loads(path.read_text())
        steps = {h.get("step") for h in self.state.history}
        if float(record.get("best_giou", -1.0)) > self.state.best_giou:
            self.state.best_giou = float(record["best_giou"])
            self.state.best_step = int(record.get("best_step", -1))
        for entry in record.get("history", []):
            if entry.get("step") in steps and entry.get("step", 1e18) <= self.state.global_step:
                for mine in self.state.history:
                    if mine.get("step") == entry.get("step"):
                        mine["gIoU"] = entry.get("gIoU")

    def save(self, tag: str, update_latest: bool) -> None:
        self.state.global_step = int(self.engine.global_steps)
        save_checkpoint(self.engine, self.ckpt_dir, tag, self.state.to_client(), update_latest=update_latest)
        meta = {**self.export_meta, "global_step": self.state.global_step, "tag": tag}
        export_trainable(self.engine.module, self.run_dir / "export" / tag, meta)

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
        )
        results = metrics.compute()
        self.log.metrics(step, results)
        if self.dist.is_main:
            print(
                metrics.table(title=f"validation after step {step} ({self.cfg.eval.eval_protocol})"),
                flush=True,
            )
        return metrics

    def end_of_epoch(self, epoch: int) -> None:
        """Save the epoch's checkpoint, then validate (a bad validation scene loses no training), then
        save it again as ``best`` when its gIoU is the best so far."""
        step = int(self.engine.global_steps)
        self.state.history.append({"epoch": epoch, "step": step, "gIoU": math.nan})
        self.save("last", update_latest=True)
        if self.val_loader is None:
            return
        self.last_metrics = self.validate(step)
        giou = self.last_metrics.compute()["All"]["gIoU"]
        self.state.history[-1]["gIoU"] = giou
        if giou == giou and giou > self.state.best_giou:
            self.state.best_giou, self.state.best_step = giou, step
            self.save("best", update_latest=False)
        self._record_validation()

    def train_step(self, batch: Batch, micro_index: int) -> torch.Tensor:
        """:func:`train_micro_step` on this trainer's engine (losses ``(loss, ce, bce, dice)``)."""
        return train_micro_step(self.engine, batch, micro_index, self.cfg.loop.seed, self.dist)

    def train(self) -> None:
        loop = self.cfg.loop
        spe, total = loop.steps_per_epoch, total_steps(loop)
        stop = min(total, loop.max_steps) if loop.max_steps > 0 else total
        start = int(self.engine.global_steps)
        if start >= stop:
            if self.dist.is_main:
                print(f"nothing to do: the run is at step {start} of {stop}", flush=True)
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
        while step < stop:
            epoch = step // spe
            first_micro = (step % spe) * self.gas
            self.sampler.set_epoch(epoch, start=first_micro * loop.batch_size)
            if hasattr(self.loader.dataset, "set_epoch"):
                self.loader.dataset.set_epoch(epoch)
            acc = torch.zeros(len(LOSS_KEYS))
            tic = time.perf_counter()
            for offset, batch in enumerate(self.loader):
                micro = epoch * spe * self.gas + first_micro + offset
                acc += self.train_step(batch, micro).cpu()
                if (micro + 1) % self.gas:
                    continue
                step = int(self.engine.global_steps)
                losses = mean_across_ranks(acc / self.gas)
                seconds = time.perf_counter() - tic
                values = dict(zip(LOSS_KEYS, losses.tolist()))
                values.update(lr=float(self.engine.get_lr()[0]), images_per_s=images_per_step / seconds)
                if step % loop.print_freq == 0 or step == stop:
                    self.log.scalars(step, values)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
                acc.zero_()
                tic = time.perf_counter()
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
