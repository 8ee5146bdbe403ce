"""The DeepSpeed engine of a training run: LoRA-wrapped model + optimiser + LR schedule, built one way.

``train_ds.py`` and the step benchmark both call :func:`build_engine`, so the benchmark times exactly the
engine a run trains.
"""

from __future__ import annotations

import argparse
from typing import Any

from model.lfllm import LFLLMForCausalLM
from model.trainable import TrainableOptions, make_trainable, unwrap
from training.ds_config import deepspeed_config


def build_engine(
    model: LFLLMForCausalLM, args: argparse.Namespace, options: TrainableOptions, on_cpu: bool
) -> tuple[Any, dict[str, Any]]:
    """Prepare ``model`` for training and wrap it in a DeepSpeed engine.

    Turns the KV cache off, enables gradient checkpointing when ``args.gradient_checkpointing``, wraps the
    trainable set with peft (``options``), builds the DeepSpeed config from ``args``
    (``training.ds_config.deepspeed_config``) and initialises the engine in train mode.

    Returns:
        (engine, the DeepSpeed config dict).
    """
    import deepspeed  # heavy (JIT op registry): only when an engine is built

    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = make_trainable(model, options)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    ds_config = deepspeed_config(args, on_cpu=on_cpu, trainable_numel=sum(p.numel() for p in params))
    engine, _, _, _ = deepspeed.initialize(model=wrapped, model_parameters=params, config=ds_config)
    # DeepSpeed casts the whole module to bf16/fp16; SAM's prompt encoder (frozen) must stay float32.
    unwrap(engine.module).sam.prompt_encoder.float()
    # from_pretrained returns eval mode: without this, LoRA dropout and gradient checkpointing are off.
    engine.train()
    return engine, ds_config
