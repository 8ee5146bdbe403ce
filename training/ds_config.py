"""The DeepSpeed configuration of ``train_ds.py`` (the reference recipe), built from the CLI options."""

from __future__ import annotations

import argparse
from typing import Any


def total_steps(args: argparse.Namespace) -> int:
    """Optimiser steps of the whole run: ``epochs × steps_per_epoch``."""
    return args.epochs * args.steps_per_epoch


def deepspeed_config(
    args: argparse.Namespace, on_cpu: bool, trainable_numel: int | None = None
) -> dict[str, Any]:
    """AdamW (betas from the CLI, no weight decay), WarmupDecayLR (linear warm-up for ``warmup_steps``,
    then linear decay to 0 at ``epochs × steps_per_epoch``), gradient clipping, ZeRO stage
    ``--zero_stage`` (2 by default), bf16 / fp16 / fp32. On CPU plain torch AdamW is used (the fused and
    CPU Adam ops would compile first). ZeRO's gradient buckets are capped at the trainable parameter
    count (``trainable_numel``): LoRA trains ~26 M parameters at 7B, and the default 5e8-element buckets
    would allocate ~2 GiB of buffers for nothing."""
    steps = total_steps(args)
    warmup = min(args.warmup_steps, max(steps - 1, 0))
    zero: dict[str, Any] = {"stage": args.zero_stage}
    bucket = int(5e8) if trainable_numel is None else int(min(5e8, max(trainable_numel, 1e6)))
    if args.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=not on_cpu,
            reduce_scatter=True,
            reduce_bucket_size=bucket,
            allgather_bucket_size=bucket,
        )
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": args.lr,
                "weight_decay": 0.0,
                "betas": [args.beta1, args.beta2],
                "torch_adam": bool(args.torch_adam or on_cpu),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(steps, 1),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": args.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        },
        "fp16": {"enabled": args.precision == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": args.precision == "bf16"},
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
