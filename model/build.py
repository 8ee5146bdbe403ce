"""Build an LFLLM model from pretrained directories: HF LLaVA (or a merged LFLLM) + a SAM checkpoint.

``build_lfllm`` is the one entry point used by ``train_ds.py``, the merge script, ``chat.py`` and the
tests; the tiny preset goes through it exactly like the real weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, PreTrainedTokenizerBase
from transformers import logging as transformers_logging

from dataset.lightfield import parse_views
from dataset.prompts import DEPTH_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN
from model.lfllm import LFLLMConfig, LFLLMForCausalLM
from model.sam import load_sam

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelOptions:
    """The LFLLM fields a user chooses on the command line (defaults: the paper's method)."""

    use_depth: bool = True
    use_caam: bool = True
    caam_target: str = "both"
    caam_mode: str = "fixed"
    caam_views: str = "4"
    depth_range: tuple[float, float] = (-1.0, 1.0)
    depth_projector: str = "shared"
    use_mm_start_end: bool = True
    out_dim: int = 256
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5


def add_special_tokens(
    tokenizer: PreTrainedTokenizerBase, use_mm_start_end: bool
) -> tuple[dict[str, int], list[int]]:
    """Add ``[SEG]``, ``<image>``, ``<depth>`` (and ``<im_start>``/``<im_end>``) and a pad token.

    Returns (ids of the tokens it guarantees, ids it newly added). Tokens already present keep their ids.
    """
    wanted = [SEG_TOKEN, IMAGE_TOKEN, DEPTH_TOKEN]
    if use_mm_start_end:
        wanted += [IM_START_TOKEN, IM_END_TOKEN]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        missing.append(tokenizer.pad_token)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in wanted}, tokenizer.convert_tokens_to_ids(missing)


def load_tokenizer(version: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a LLaVA / LFLLM directory, right-padded, no length truncation surprises."""
    tok = AutoTokenizer.from_pretrained(version)
    tok.padding_side = "right"
    return tok


def _lfllm_config(
    version: str | Path, sam_cfg: dict, options: ModelOptions, ids: dict[str, int]
) -> LFLLMConfig:
    base = AutoConfig.from_pretrained(version).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    image_id = base.get("image_token_id", base.get("image_token_index"))
    if image_id is not None and image_id != ids[IMAGE_TOKEN]:
        raise ValueError(
            f"{version}: config image_token_id {image_id} but the tokenizer's {IMAGE_TOKEN} is {ids[IMAGE_TOKEN]}"
        )
    base.pop("image_token_id", None)
    base["image_token_index"] = ids[IMAGE_TOKEN]
    processor = CLIPImageProcessor.from_pretrained(version)
    fields = dict(vars(options))
    fields.pop("caam_views")
    fields["depth_range"] = list(options.depth_range)
    # The [SEG] projector feeds SAM's prompt slots, so its width is SAM's (256 for every official SAM).
    fields["out_dim"] = sam_cfg["prompt_embed_dim"]
    return LFLLMConfig(
        **base,
        **fields,
        seg_token_id=ids[SEG_TOKEN],
        depth_token_id=ids[DEPTH_TOKEN],
        sam_config=sam_cfg,
        caam_offsets=[list(o) for o in parse_views(options.caam_views)],
        clip_image_mean=list(processor.image_mean),
        clip_image_std=list(processor.image_std),
    )


NEW_MODULES = ("sam.", "seg_projector.", "caam.", "depth_projector.")


def _load_llava_weights(
    version: str | Path, config: LFLLMConfig, dtype: torch.dtype = torch.float32
) -> LFLLMForCausalLM:
    """LLaVA weights into a fresh LFLLM, loaded directly in ``dtype`` (no float32 detour: one copy of the
    model in memory). Only LFLLM's own modules may be missing; nothing may be unexpected."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the expected "missing sam.*" report is noise here
    try:
        model, info = LFLLMForCausalLM.from_pretrained(
            version, config=config, dtype=dtype, output_loading_info=True
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith(NEW_MODULES)]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise ValueError(
            f"{version}: weights do not match the LLaVA architecture; missing {missing[:5]}, "
            f"unexpected {list(info['unexpected_keys'])[:5]}, mismatched {list(info.get('mismatched_keys', []))[:5]}"
        )
    return model


def cast_model(model: LFLLMForCausalLM, dtype: torch.dtype) -> LFLLMForCausalLM:
    """Cast to ``dtype`` but keep SAM's prompt encoder in float32 (its Fourier features fail in bf16),
    with its float32 values exact: they are put back after the cast instead of being rounded through
    ``dtype`` and up again."""
    prompt_state = {k: v.float() for k, v in model.sam.prompt_encoder.state_dict().items()}
    model.to(dtype)
    model.sam.prompt_encoder.float()
    model.sam.prompt_encoder.load_state_dict(prompt_state)
    return model


def build_lfllm(
    version: str | Path,
    vision_pretrained: str | Path | None = None,
    options: ModelOptions | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """Load LFLLM from ``version``.

    * ``version`` is an HF LLaVA directory (``llava-1.5-7b-hf`` layout): LLaVA is loaded, the new tokens are
      added and the embeddings resized, SAM is loaded from ``vision_pretrained`` (official format, variant
      inferred), and the ``[SEG]`` projector / CAAM start fresh.
    * ``version`` is a merged LFLLM directory: everything (SAM, ``[SEG]`` projector, CAAM, options) comes
      from it; ``vision_pretrained`` and ``options`` are ignored, nothing is re-initialised.
    """
    tokenizer = load_tokenizer(version)
    if AutoConfig.from_pretrained(version).model_type == "lfllm":
        # Loaded straight in ``dtype`` (no float32 copy first); the prompt encoder stays float32 and exact
        # through ``_keep_in_fp32_modules_strict``.
        model = LFLLMForCausalLM.from_pretrained(version, dtype=dtype)
        odd = {str(t.dtype) for t in model.sam.prompt_encoder.state_dict().values()} - {"torch.float32"}
        if odd:
            raise RuntimeError(f"{version}: SAM's prompt encoder loaded as {odd}, expected float32")
        return model, tokenizer
    if vision_pretrained is None:
        raise ValueError(f"{version} is a LLaVA directory: pass the SAM checkpoint with --vision_pretrained")
    options = options or ModelOptions()
    sam, sam_cfg = load_sam(vision_pretrained)
    ids, added = add_special_tokens(tokenizer, options.use_mm_start_end)
    config = _lfllm_config(version, sam_cfg, options, ids)
    config.new_token_ids = sorted(added)
    model = _load_llava_weights(version, config, dtype)
    # Never shrink: HF LLaVA checkpoints pad their vocabulary (32064 rows for 32002 tokens).
    rows = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.sam.prompt_encoder.float()  # before loading, so its float32 checkpoint values stay exact
    model.sam.load_state_dict(sam.state_dict())
    del sam
    return cast_model(model, dtype), tokenizer
