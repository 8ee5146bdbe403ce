"""The DeepSpeed configuration of ``train_ds.py`` (the reference recipe), built from the CLI options, and the
learning-rate schedule the engine runs (:class:`Schedule`, stepped by :class:`RunSchedule`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import LoopOptions, OptimOptions


def total_steps(loop: LoopOptions) -> int:
    """Optimiser steps of the whole run: ``epochs × steps_per_epoch``."""
    return loop.epochs * loop.steps_per_epoch


def clipped_warmup(warmup_steps: int, steps: int) -> int:
    """The warm-up of a ``steps``-step run: ``--warmup_steps``, shortened so that at least one step trains
    at the peak and one below it in the decay. Step ``s`` trains at scheduler iteration ``s - 2`` and
    DeepSpeed's warm-up lasts at least 2 iterations, so the warm-up is at most ``steps - 3``; one shorter
    than 2 is none (the first step at the peak): a run of 4 steps or fewer has no warm-up."""
    warmup = min(warmup_steps, steps - 3)
    return warmup if warmup >= 2 else 0


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimiser step: DeepSpeed's WarmupDecayLR (linear warm-up over
    ``warmup_steps`` — DeepSpeed makes it at least 2 —, then linear decay to 0 at ``total_steps``), with

    - ``warmup_steps`` 0: no warm-up, the first step at the peak LR (DeepSpeed's class refuses 0);
    - ``extensions`` ``((from_iteration, total), …)``, one per ``--extend_schedule``: from that scheduler
      iteration on, the LR falls linearly from the value the schedule had reached there to 0 at ``total``
      (a run still warming up finishes its warm-up and decays to 0 at ``total``): it never jumps.

    "Iteration" is DeepSpeed's ``last_batch_iteration``: ``i`` after the ``i+1``-th step, whose LR the
    ``i+2``-th step uses."""

    lr: float
    warmup_steps: int
    total_steps: int
    extensions: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_options(cls, optim: OptimOptions, loop: LoopOptions) -> Schedule:
        """The schedule ``--lr``, ``--warmup_steps``, ``--epochs`` and ``--steps_per_epoch`` ask for."""
        steps = total_steps(loop)
        return cls(float(optim.lr), clipped_warmup(optim.warmup_steps, steps), max(steps, 1))

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Schedule:
        ext = tuple((int(a), int(b)) for a, b in record.get("extensions", ()))
        return cls(float(record["lr"]), int(record["warmup_steps"]), int(record["total_steps"]), ext)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "extensions": [list(e) for e in self.extensions]}

    @property
    def end(self) -> int:
        """The step at which the LR reaches 0 (the run's length)."""
        return self.extensions[-1][1] if self.extensions else self.total_steps

    @property
    def effective_warmup(self) -> int:
        """DeepSpeed's warm-up length: ``max(2, warmup_steps)``, 0 without warm-up."""
        return 0 if self.warmup_steps == 0 else max(2, self.warmup_steps)

    def _base(self, it: int, total: int) -> float:
        if self.warmup_steps == 0:
            return max(0.0, float(total - 1 - it) / float(total))
        warm = self.effective_warmup
        if it < warm:  # DeepSpeed's WarmupDecayLR, linear warm-up, term for term
            return it / warm
        return max(0.0, float(total - it) / float(max(1.0, total - warm)))

    def factor(self, it: int, upto: int | None = None) -> float:
        """The LR at scheduler iteration ``it`` as a fraction of the peak."""
        upto = len(self.extensions) if upto is None else upto
        if upto == 0:
            return self._base(it, self.total_steps)
        start, total = self.extensions[upto - 1]
        if start > 0 and self.factor(start, upto - 1) == 0.0:
            start -= (
                1  # the old schedule was at 0 for the next step already (no warm-up): go on from its last LR
            )
        if it <= start:
            return self.factor(it, upto - 1)
        if start < self.effective_warmup:
            return self._base(it, total)
        reached = self.factor(start, upto - 1)
        return reached * max(0.0, float(total - it) / float(max(1, total - start)))

    def lr_at(self, it: int) -> float:
        """The LR after iteration ``it`` (-1: before the first step)."""
        if it < 0:
            return self.lr if self.warmup_steps == 0 else 0.0
        return 0.0 + self.lr * self.factor(it)

    def lr_of_step(self, step: int) -> float:
        """The LR optimiser step ``step`` (1-based) trains with."""
        return self.lr_at(step - 2)

    def extended(self, iteration: int, total: int) -> Schedule:
        """This schedule, continued from ``iteration`` to reach 0 at ``total`` (see the class doc)."""
        return dataclasses.replace(self, extensions=(*self.extensions, (int(iteration), int(total))))

    def describe(self) -> str:
        warm = "no warm-up" if self.warmup_steps == 0 else f"warm-up {self.effective_warmup} steps"
        text = f"peak {self.lr:.3g}, {warm}, linear decay over {self.total_steps} steps"
        for start, total in self.extensions:
            text += f", extended after step {start + 1} to decay over {total} steps"
        return text


class RunSchedule:
    """The LR scheduler DeepSpeed steps (``deepspeed.initialize(lr_scheduler=…)``): :class:`Schedule` over the
    optimiser's parameter groups. Its state — saved in every checkpoint — holds the whole schedule, so a
    resumed run continues the schedule it was trained with; a checkpoint of DeepSpeed's own WarmupDecayLR
    (``{"last_batch_iteration": i}``) loads as well."""

    def __init__(self, optimizer: Any, schedule: Schedule) -> None:
        self.optimizer = optimizer if hasattr(optimizer, "param_groups") else optimizer.optimizer
        self.schedule = schedule
        self.last_batch_iteration = -1
        self.loaded_schedule: Schedule | None = None
        self.apply()

    def apply(self) -> None:
        """Set the LR the next step uses."""
        lr = self.schedule.lr_at(self.last_batch_iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self.apply()

    def get_lr(self) -> list[float]:
        return [self.schedule.lr_at(self.last_batch_iteration) for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration, "schedule": self.schedule.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the iteration and the recorded schedule (the checkpoint's, until the trainer decides)."""
        self.last_batch_iteration = int(state["last_batch_iteration"])
        if isinstance(state.get("schedule"), dict):
            self.loaded_schedule = Schedule.from_json(state["schedule"])
            self.schedule = self.loaded_schedule
        self.apply()


def deepspeed_config(
    optim: OptimOptions, loop: LoopOptions, precision: str, on_cpu: bool, trainable_numel: int | None = None
) -> dict[str, Any]:
    """AdamW (betas from the CLI, no weight decay), WarmupDecayLR (linear warm-up for ``warmup_steps``,
    then linear decay to 0 at ``epochs × steps_per_epoch``), gradient clipping, ZeRO stage
    ``--zero_stage`` (2 by default), bf16 / fp16 / fp32. On CPU plain torch AdamW is used (the fused and
    CPU Adam ops would compile first). ZeRO's gradient buckets are capped at the trainable parameter
    count (``trainable_numel``): LoRA trains ~26 M parameters at 7B, and the default 5e8-element buckets
    would allocate ~2 GiB of buffers for nothing.

    The ``scheduler`` entry records the schedule; the engine runs it as :class:`RunSchedule`
    (:func:`training.engine.build_engine`), which also takes a warm-up of 0 and an extended run."""
    steps = total_steps(loop)
    warmup = clipped_warmup(optim.warmup_steps, steps)
    zero: dict[str, Any] = {"stage": optim.zero_stage}
    bucket = int(5e8) if trainable_numel is None else int(min(5e8, max(trainable_numel, 1e6)))
    if optim.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=not on_cpu,
            reduce_scatter=True,
            reduce_bucket_size=bucket,
            allgather_bucket_size=bucket,
        )
    return {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.grad_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "weight_decay": 0.0,
                "betas": [optim.beta1, optim.beta2],
                "torch_adam": bool(optim.torch_adam or on_cpu),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(steps, 1),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": optim.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        },
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": precision == "bf16"},
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
