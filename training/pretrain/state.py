"""Resumable stage state of the tiny-base pretraining: atomic weights-only checkpoints and the schedule.

A stage checkpoint holds the model and optimizer state dicts, the step reached, the log and the best
held-out score so far (with the best weights). It is written atomically (temporary file + ``os.replace``)
so a kill at any moment leaves either the previous or the new checkpoint, and it is read back with
``torch.load(weights_only=True)``. Batches are a pure function of ``(seed, stage, step)``, so a resumed
stage continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (``step`` 0-based)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def save_stage(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_stage(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (weights only), or ``None`` when there is none yet."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which and stop
        raise ValueError(
            f"{path}: cannot read the pretraining checkpoint ({exc}); delete it to restart"
        ) from exc


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (the best weights kept while training goes on)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class StageRun:
    """The progress of one resumable stage: ``modules`` (name -> module) and ``opt`` are restored from
    ``path`` on creation when it holds a checkpoint, and written back by :meth:`save`."""

    path: Path
    modules: dict[str, torch.nn.Module]
    opt: torch.optim.Optimizer
    step: int = 0
    log: list = field(default_factory=list)
    history: list = field(default_factory=list)
    best: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    done: bool = False
    start: float = 0.0

    def __post_init__(self) -> None:
        state = load_stage(self.path)
        wall = 0.0
        if state is not None:
            for name, module in self.modules.items():
                module.load_state_dict(state[name])
            self.opt.load_state_dict(state["optim"])
            self.step, self.log, self.history = state["step"], state["log"], state["history"]
            self.best, self.best_state, wall = state["best"], state["best_model"], state["wall"]
            self.done = state.get("done", False)
        self.start = time.perf_counter() - wall

    @property
    def wall(self) -> float:
        """Seconds spent in this stage, over every run that resumed it."""
        return time.perf_counter() - self.start

    def keep_if_best(self, score: float) -> None:
        """Remember the first module's weights when ``score`` beats every earlier one."""
        if score > self.best:
            self.best, self.best_state = score, clone_state(next(iter(self.modules.values())))

    def save(self, finished: bool = False) -> None:
        """Checkpoint every module, the optimizer and the progress (atomically)."""
        main = next(iter(self.modules.values()))
        save_stage(
            self.path,
            {
                **{name: m.state_dict() for name, m in self.modules.items()},
                "optim": self.opt.state_dict(),
                "step": self.step,
                "log": self.log,
                "history": self.history,
                "best": self.best,
                "best_model": self.best_state or clone_state(main),
                "wall": self.wall,
                "done": finished,
            },
        )
