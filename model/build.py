"""Build an LFLLM model from pretrained directories: HF LLaVA (or a merged LFLLM) + a SAM checkpoint.

``build_lfllm`` is the one entry point used by ``train_ds.py``, the merge script, ``chat.py`` and the
tests; the tiny preset goes through it exactly like the real weights.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, PreTrainedTokenizerBase
from transformers import logging as transformers_logging

from model.lfllm import LFLLMConfig, LFLLMForCausalLM, light_decoder_config
from model.options import ModelOptions, mismatched_flags, recorded_options
from model.sam import load_sam
from utils.tokens import DEPTH_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN
from utils.views import parse_views

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_pretrained_dir(version: str | Path) -> str:
    """What ``version`` is (``"llava"`` or ``"lfllm"``), checked from its files before anything is
    allocated. Raises ``FileNotFoundError`` / ``ValueError`` naming the folder, what is missing or wrong,
    and the fix (an original-format LLaVA checkpoint is pointed to the converter)."""
    path = Path(version)
    expected = "config.json, model*.safetensors, tokenizer.json or tokenizer.model, preprocessor_config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"--version {path}: not a folder (expected an HF LLaVA or merged LFLLM dir)")
    config_path = path / "config.json"
    if not config_path.is_file():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise FileNotFoundError(f"--version {path} {what}: expected an HF LLaVA directory ({expected})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    architectures = config.get("architectures") or []
    if "LlavaLlamaForCausalLM" in architectures or "mm_vision_tower" in config:
        raise ValueError(
            f"--version {path} is an original-format LLaVA checkpoint ({', '.join(architectures) or 'mm_* keys'}); "
            f"convert it first: python scripts/convert_llava_to_hf.py --src {path} --dst {path}-hf, "
            f"then pass --version {path}-hf"
        )
    kind = config.get("model_type")
    if kind not in ("llava", "lfllm"):
        raise ValueError(
            f"--version {path}: config.json says model_type {kind!r}, expected 'llava' or 'lfllm'"
        )
    missing = [] if any((path / f).is_file() for f in TOKENIZER_FILES) else [" or ".join(TOKENIZER_FILES)]
    if not (path / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        raise FileNotFoundError(
            f"--version {path}: missing {', '.join(missing)} (an HF LLaVA directory has {expected})"
        )
    return kind


def load_tokenizer(version: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a LLaVA / LFLLM directory, right-padded, no length truncation surprises."""
    tok = AutoTokenizer.from_pretrained(version)
    tok.padding_side = "right"
    return tok


def option_fields(options: ModelOptions, sam_cfg: dict | None) -> dict:
    """The :class:`model.lfllm.LFLLMConfig` fields that ``options`` sets, for a SAM of config ``sam_cfg``
    (None: the light mask head, no SAM)."""
    fields = recorded_options(options)
    fields.pop("image_size", None)  # a SAM property (sam_config["img_size"]), not a config field
    fields["depth_range"] = list(options.depth_range)
    # The [SEG] projector feeds SAM's prompt slots, so its width is SAM's (256 for every official SAM).
    if sam_cfg is not None:
        fields["out_dim"] = sam_cfg["prompt_embed_dim"]
    fields["caam_offsets"] = [list(o) for o in parse_views(options.caam_views)]
    return fields


def _lfllm_config(
    version: str | Path, sam_cfg: dict | None, options: ModelOptions, ids: dict[str, int]
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
    return LFLLMConfig(
        **base,
        **option_fields(options, sam_cfg),
        seg_token_id=ids[SEG_TOKEN],
        depth_token_id=ids[DEPTH_TOKEN],
        sam_config=sam_cfg,
        clip_image_mean=list(processor.image_mean),
        clip_image_std=list(processor.image_std),
    )


NEW_MODULES = ("sam.", "seg_projector.", "caam.", "depth_projector.", "semantic_fusion.", "depth_stream.",
               "light_decoder.")  # fmt: skip


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
    if model.sam is None:  # the light mask head
        return model.to(dtype)
    prompt_state = {k: v.float() for k, v in model.sam.prompt_encoder.state_dict().items()}
    model.to(dtype)
    model.sam.prompt_encoder.float()
    model.sam.prompt_encoder.load_state_dict(prompt_state)
    return model


def merged_from_sam(version: str | Path) -> str | None:
    """The SAM checkpoint a merged model was merged from (its ``merge_info.json``), if recorded."""
    info = Path(version) / "merge_info.json"
    try:
        return json.loads(info.read_text()).get("vision_pretrained") if info.is_file() else None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{info}: not a JSON object ({exc})") from exc


def _same_file(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


class OptionMismatchError(ValueError):
    """A flag the user gave disagrees with the weights it would apply to (the message lists each one)."""


def check_given_options(source: str, options: ModelOptions, given: Collection[str], recorded: dict) -> None:
    """Raise :class:`OptionMismatchError` when an option in ``given`` (field names set on the command line)
    differs from what ``source`` records; the one check of every entry point."""
    lines = mismatched_flags(source, options, given, recorded)
    if lines:
        raise OptionMismatchError(
            "options that disagree with the model:\n  "
            + "\n  ".join(lines)
            + "\ndrop these flags (a merged model's options are fixed when it is merged) or pass the values it has"
        )


def build_lfllm(
    version: str | Path,
    vision_pretrained: str | Path | None = None,
    options: ModelOptions | None = None,
    dtype: torch.dtype = torch.float32,
    given: Collection[str] = (),
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """Load LFLLM from ``version``.

    * ``version`` is an HF LLaVA directory (``llava-1.5-7b-hf`` layout): LLaVA is loaded, the new tokens are
      added and the embeddings resized, SAM is loaded from ``vision_pretrained`` (official format, variant
      inferred), and the ``[SEG]`` projector / CAAM start fresh. ``options.out_dim`` yields to SAM's prompt
      width unless it is in ``given``, where a different value is refused.
    * ``version`` is a merged LFLLM directory: everything (SAM, ``[SEG]`` projector, CAAM, options) comes
      from it, nothing is re-initialised; an option in ``given`` (the :class:`ModelOptions` fields the user
      set explicitly) that differs from the merged model's is refused with :class:`OptionMismatchError`.

    Args:
        given: names of the :class:`ModelOptions` fields (and ``"vision_pretrained"``) set explicitly on a
            command line; the others are defaults that yield to what the weights hold.
    """
    options = options or ModelOptions()
    check_pretrained_dir(version)
    if AutoConfig.from_pretrained(version).model_type == "lfllm":
        tokenizer = load_tokenizer(version)
        # Loaded straight in ``dtype`` (no float32 copy first); the prompt encoder stays float32 and exact
        # through ``_keep_in_fp32_modules_strict``.
        light = AutoConfig.from_pretrained(version).to_dict().get("mask_head") == "light"
        if light and "vision_pretrained" in given:
            raise OptionMismatchError(
                f"--vision_pretrained {vision_pretrained}: the merged model {version} has the light mask head "
                "(--mask_head light), which has no SAM; drop the flag"
            )
        if "vision_pretrained" in given and not _same_file(vision_pretrained, merged_from_sam(version)):
            raise OptionMismatchError(
                f"--vision_pretrained {vision_pretrained}: the merged model {version} holds its own SAM "
                f"(merged from {merged_from_sam(version)}); drop the flag (or evaluate the base LLaVA "
                "directory with this SAM)"
            )
        model = LFLLMForCausalLM.from_pretrained(version, dtype=dtype)
        recorded = recorded_options(model.config)
        recorded["caam_views"] = model.config.caam_offsets or []
        check_given_options(f"the merged model {version}", options, given, recorded)
        odd = set()
        if model.sam is not None:
            odd = {str(t.dtype) for t in model.sam.prompt_encoder.state_dict().values()} - {"torch.float32"}
        if odd:
            raise RuntimeError(f"{version}: SAM's prompt encoder loaded as {odd}, expected float32")
        return model, tokenizer
    if options.mask_head == "light":
        return _build_light(version, vision_pretrained, options, dtype)
    if vision_pretrained is None:
        raise ValueError(f"{version} is a LLaVA directory: pass the SAM checkpoint with --vision_pretrained")
    sam, sam_cfg = load_sam(vision_pretrained)
    check_given_options(
        f"the SAM in {vision_pretrained}",
        options,
        {"out_dim", "image_size"} & set(given),
        {"out_dim": sam_cfg["prompt_embed_dim"], "image_size": sam_cfg["img_size"]},
    )
    model, tokenizer = _new_lfllm(version, sam_cfg, options, dtype)
    model.sam.prompt_encoder.float()  # before loading, so its float32 checkpoint values stay exact
    model.sam.load_state_dict(sam.state_dict())
    del sam
    return cast_model(model, dtype), tokenizer


def _new_lfllm(
    version: str | Path, sam_cfg: dict | None, options: ModelOptions, dtype: torch.dtype
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """LLaVA from ``version`` with the new tokens added and the embeddings resized; LFLLM's own modules
    fresh (SAM still empty)."""
    tokenizer = load_tokenizer(version)
    ids, added = add_special_tokens(tokenizer, options.use_mm_start_end)
    config = _lfllm_config(version, sam_cfg, options, ids)
    config.new_token_ids = sorted(added)
    if config.mask_head == "light":
        light_decoder_config(config)  # a bad --light_detail_size is refused before the weights load
    model = _load_llava_weights(version, config, dtype)
    # Never shrink: HF LLaVA checkpoints pad their vocabulary (32064 rows for 32002 tokens).
    rows = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(rows, mean_resizing=False)
    return model, tokenizer


def _build_light(
    version: str | Path, vision_pretrained: str | Path | None, options: ModelOptions, dtype: torch.dtype
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """A LLaVA directory with the light mask head: no SAM checkpoint is read (one given is refused)."""
    if vision_pretrained is not None:
        raise ValueError(
            f"--vision_pretrained {vision_pretrained}: the light mask head (--mask_head light) has no SAM; "
            "drop the flag (or use --mask_head sam)"
        )
    model, tokenizer = _new_lfllm(version, None, options, dtype)
    return model.to(dtype), tokenizer
