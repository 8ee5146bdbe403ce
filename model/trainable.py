"""Which parameters train: LoRA on the language model's q/v (peft), the new token rows, the ``[SEG]``
projector, SAM's mask decoder, and the optional CAAM / separate depth-projector parameters.

Frozen: the language model's base weights, the CLIP tower, the multimodal projector, SAM's image and
prompt encoders. peft does the LoRA and the token-row training (``trainable_token_indices``), so
``merge_and_unload`` folds both back into plain weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from torch import nn

from model.lfllm import LFLLMForCausalLM
from utils.options import at_least, fraction, option

ALWAYS_TRAINED = (
    "seg_projector.",
    "caam.",
    "depth_projector.",
    "semantic_fusion.",
    "depth_stream.",
    "light_decoder.",
)


@dataclass(frozen=True)
class TrainableOptions:
    """LoRA and head switches (the reference's flags and defaults, declared once here)."""

    lora_r: int = option(
        8, "LoRA rank on the language model (0 disables LoRA)", resume=True, check=at_least(0)
    )
    lora_alpha: int = option(16, "LoRA alpha", resume=True)
    lora_dropout: float = option(0.05, "LoRA dropout", resume=True, check=fraction)
    lora_target_modules: str = option(
        "q_proj,v_proj", "comma-separated language-model layers given LoRA", resume=True
    )
    train_mask_decoder: bool = option(True, "train SAM's mask decoder", resume=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TrainableOptions:
        """The options recorded in ``values`` (e.g. ``trainable.json``); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})


def lora_target_regex(modules: str) -> str:
    """``"q_proj,v_proj"`` -> a regex matching those layers inside the language model only (CLIP has
    layers of the same names, which must stay frozen)."""
    names = [m.strip() for m in modules.split(",") if m.strip()]
    if not names:
        raise ValueError("--lora_target_modules is empty")
    return r".*language_model.*\.(" + "|".join(names) + r")$"


def make_trainable(model: LFLLMForCausalLM, options: TrainableOptions) -> PeftModel | LFLLMForCausalLM:
    """Freeze everything, wrap with peft (LoRA and/or the rows of ``config.new_token_ids``), unfreeze the
    heads. Returns the model to train (a ``PeftModel`` unless there is neither LoRA nor a new token)."""
    token_ids = list(model.config.new_token_ids or [])
    for p in model.parameters():
        p.requires_grad_(False)
    token_targets = {"embed_tokens": token_ids, "lm_head": token_ids} if token_ids else None
    if options.lora_r > 0:
        config = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=lora_target_regex(options.lora_target_modules),
            trainable_token_indices=token_targets,
        )
        wrapped: nn.Module = get_peft_model(model, config)
    elif token_ids:
        config = TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=token_ids)
        wrapped = get_peft_model(model, config)
    else:
        wrapped = model
    for name, p in model.named_parameters():
        if name.startswith(ALWAYS_TRAINED) or (
            options.train_mask_decoder and name.startswith("sam.mask_decoder.")
        ):
            p.requires_grad_(True)
    return wrapped


def unwrap(model: nn.Module) -> LFLLMForCausalLM:
    """The ``LFLLMForCausalLM`` inside a peft and/or DeepSpeed wrapper."""
    while not isinstance(model, LFLLMForCausalLM):
        if hasattr(model, "module"):
            model = model.module
        elif isinstance(model, PeftModel):
            model = model.get_base_model()
        else:
            raise TypeError(f"no LFLLMForCausalLM inside {type(model).__name__}")
    return model
