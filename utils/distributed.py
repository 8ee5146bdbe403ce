"""Process-group setup for the ``deepspeed`` launcher, ``torchrun`` and plain ``python`` (one rank)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank: int = -1) -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (NCCL on GPUs, gloo on CPU).

    A plain ``python train_ds.py`` gets a one-rank group on a free local port, so every code path (ZeRO,
    metric reduction, checkpoints) is the same with and without a launcher.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank >= 0 else 0))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    elif os.environ.get("LFLLM_DS_SHM") != "1":
        _skip_cpu_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at its first
    ``init_distributed`` (40 s to minutes on a small machine). It speeds up tensor-parallel inference;
    data-parallel training over gloo does not use it, and DeepSpeed falls back to ``torch.distributed``
    when the op is absent. ``LFLLM_DS_SHM=1`` keeps it."""
    import deepspeed.comm.torch as ds_torch_comm

    ds_torch_comm.build_shm_op = lambda: None


def barrier() -> None:
    """``dist.barrier()`` when a group exists."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small float tensor over all ranks (identity on one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` of ``group`` on every rank (``[obj]`` without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
