"""The DeepSpeed engine of a training run: LoRA-wrapped model + optimiser + LR schedule, built one way.

``train_ds.py`` and the step benchmark both call :func:`build_engine`, so the benchmark times exactly the
engine a run trains.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from model.lfllm import LFLLMForCausalLM
from model.trainable import make_trainable, unwrap
from training.ds_config import RunSchedule, Schedule, deepspeed_config

if TYPE_CHECKING:
    from training.config import RunConfig


def build_engine(model: LFLLMForCausalLM, cfg: RunConfig, on_cpu: bool) -> tuple[Any, dict[str, Any]]:
    """Prepare ``model`` for training and wrap it in a DeepSpeed engine.

    Turns the KV cache off, enables gradient checkpointing when ``--gradient_checkpointing``, wraps the
    trainable set with peft (``cfg.trainable``), builds the DeepSpeed config from ``cfg.optim`` / ``cfg.loop``
    (``training.ds_config.deepspeed_config``) and initialises the engine in train mode. The LR schedule is
    :class:`training.ds_config.RunSchedule` (the config's WarmupDecayLR, which also takes no warm-up, and
    records itself in every checkpoint).

    Returns:
        (engine, the DeepSpeed config dict).
    """
    import deepspeed  # heavy (JIT op registry): only when an engine is built

    model.config.use_cache = False
    if cfg.loop.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = make_trainable(model, cfg.trainable)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    ds_config = deepspeed_config(cfg.optim, cfg.loop, cfg.run.precision, on_cpu=on_cpu, trainable_numel=numel)
    schedule = Schedule.from_options(cfg.optim, cfg.loop)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda optimizer: RunSchedule(optimizer, schedule),
    )
    # DeepSpeed casts the whole module to bf16/fp16; SAM's prompt encoder (frozen) must stay float32.
    inner = unwrap(engine.module)
    if inner.sam is not None:
        inner.sam.prompt_encoder.float()
    # from_pretrained returns eval mode: without this, LoRA dropout and gradient checkpointing are off.
    engine.train()
    return engine, ds_config


def setup_single_process(on_cpu: bool):
    """One-rank process group through ``utils.distributed.init_distributed`` (as a plain ``python``
    ``train_ds.py`` run). On CPU the shared-memory comm op DeepSpeed JIT-builds at init is skipped: one
    rank never uses it. Returns (DistInfo, whether this call created the group)."""
    import torch.distributed as dist

    if not ("RANK" in os.environ and "MASTER_PORT" in os.environ):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op is replaced)

    if on_cpu:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from utils.distributed import init_distributed

    created = not dist.is_initialized()
    if created:
        forget_deepspeed_world_group()
    return init_distributed(), created


def forget_deepspeed_world_group() -> None:
    """DeepSpeed caches a clone of the world group for the first engine of a process; when a group is
    created anew in the same process (``main`` called twice, e.g. from the tests) the cached clone is
    stale and ``deepspeed.initialize`` fails with "Group ... is not registered"."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_WORLD_GROUP"):
        groups._WORLD_GROUP = None
