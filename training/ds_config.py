"""The DeepSpeed configuration of ``train_ds.py`` (the reference recipe), built from the CLI options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import LoopOptions, OptimOptions


def total_steps(loop: LoopOptions) -> int:
    """Optimiser steps of the whole run: ``epochs × steps_per_epoch``."""
    return loop.epochs * loop.steps_per_epoch


def deepspeed_config(
    optim: OptimOptions, loop: LoopOptions, precision: str, on_cpu: bool, trainable_numel: int | None = None
) -> dict[str, Any]:
    """AdamW (betas from the CLI, no weight decay), WarmupDecayLR (linear warm-up for ``warmup_steps``,
    then linear decay to 0 at ``epochs × steps_per_epoch``), gradient clipping, ZeRO stage
    ``--zero_stage`` (2 by default), bf16 / fp16 / fp32. On CPU plain torch AdamW is used (the fused and
    CPU Adam ops would compile first). ZeRO's gradient buckets are capped at the trainable parameter
    count (``trainable_numel``): LoRA trains ~26 M parameters at 7B, and the default 5e8-element buckets
    would allocate ~2 GiB of buffers for nothing."""
    steps = total_steps(loop)
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
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
