"""Build an LFLLM model from pretrained directories: HF LLaVA (or a merged LFLLM) + a SAM checkpoint.

``build_lfllm`` is the one entry point used by ``train_ds.py``, the merge script, ``chat.py`` and the
tests; the tiny preset goes through it exactly like the real weights.

What is loaded is exactly what was saved: a merged model's or a base LLaVA's weight files are opened first
(a truncated file or a pickle payload is refused naming it), transformers' own loading report
(``output_loading_info``) must hold no missing, unexpected or mis-shaped key (only LFLLM's new modules may
be missing from a base LLaVA), and a merged model's token ids must be its tokenizer's; each refusal is one
:class:`utils.safe_load.WeightsMismatchError` naming the file and the first key.

Length: about 510 lines: every way a model comes from disk (a base LLaVA + SAM or the light head, a merged
model) and the checks that what loads is what was saved; split, each path would lose its checks' view.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, PreTrainedTokenizerBase
from transformers import logging as transformers_logging

from model.lfllm import LFLLMConfig, LFLLMForCausalLM, light_decoder_config
from model.light_decoder import load_light_decoder, read_light_decoder
from model.options import ModelOptions, mismatched_flags, recorded_options
from model.sam import load_sam
from utils.safe_load import (
    WeightsMismatchError,
    mismatch_message,
    read_weight_keys,
    token_mismatch_message,
    weight_files,
)
from utils.tokens import (
    DEPTH_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    REGION_TOKEN,
    REJ_TOKEN,
    SEG_TOKEN,
)
from utils.views import parse_views

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_special_tokens(
    tokenizer: PreTrainedTokenizerBase, use_mm_start_end: bool, gres: bool = False, region: bool = False
) -> tuple[dict[str, int], list[int]]:
    """Add ``[SEG]``, ``<image>``, ``<depth>`` (and ``<im_start>``/``<im_end>``, ``[REJ]`` for a ``gres``
    model, ``<region>`` for a model trained with ILVC answers) and a pad token.

    Returns (ids of the tokens it guarantees, ids it newly added). Tokens already present keep their ids.
    """
    wanted = [SEG_TOKEN, IMAGE_TOKEN, DEPTH_TOKEN]
    if use_mm_start_end:
        wanted += [IM_START_TOKEN, IM_END_TOKEN]
    if gres:
        wanted.append(REJ_TOKEN)
    if region:
        wanted.append(REGION_TOKEN)
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
        rej_token_id=ids.get(REJ_TOKEN),
        region_token_id=ids.get(REGION_TOKEN),
        depth_token_id=ids[DEPTH_TOKEN],
        sam_config=sam_cfg,
        clip_image_mean=list(processor.image_mean),
        clip_image_std=list(processor.image_std),
    )


NEW_MODULES = ("sam.", "seg_projector.", "caam.", "depth_projector.", "semantic_fusion.", "depth_stream.",
               "light_decoder.")  # fmt: skip


def _file_keys(model: LFLLMForCausalLM, keys: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """Model key -> (file, key as written there): transformers renames keys on loading (a LLaVA file's
    ``language_model.model.*`` is the model's ``model.language_model.*``); its own renaming is applied to
    every file key so that a refusal names the file that holds the key and the key as the file spells it."""
    try:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = getattr(model, "_weight_conversions", None) or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = model.state_dict()
        renamed = {
            rename_source_key(k, renamings, converters, model.base_model_prefix, meta)[0]: k for k in keys
        }
    except (
        ImportError,
        AttributeError,
        TypeError,
        ValueError,
    ):  # another transformers: file keys as they are
        renamed = {k: k for k in keys}
    return {model_key: (keys[file_key], file_key) for model_key, file_key in renamed.items()}


def load_exact(
    version: str | Path,
    dtype: torch.dtype,
    config: LFLLMConfig | None = None,
    may_be_missing: tuple[str, ...] = (),
    then: str = "",
) -> LFLLMForCausalLM:
    """``LFLLMForCausalLM.from_pretrained(version)``, refusing anything but exactly the saved weights.

    The weight files are opened first (a truncated ``.safetensors`` or a payload in a ``.bin`` is refused
    naming the file); then transformers' loading report must hold no missing key (except those under
    ``may_be_missing``: modules a base LLaVA cannot have), no unexpected key and no mis-shaped one.
    Raises :class:`WeightsMismatchError` naming the file and the first key of each kind, and ``then``."""
    found = weight_files(version)
    if found is None:
        raise FileNotFoundError(
            f"--version {version}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
        )
    entry, files = found
    keys = read_weight_keys(files)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its loading report is replaced by our refusal below
    try:
        model, info = LFLLMForCausalLM.from_pretrained(
            version,
            **({"config": config} if config is not None else {}),
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported, then refused here with the file named
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if not (may_be_missing and k.startswith(may_be_missing)))
    unexpected, mismatched = sorted(info["unexpected_keys"]), sorted(info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        where = _file_keys(model, keys)
        raise WeightsMismatchError(
            mismatch_message(
                [(entry, k) for k in missing],
                [where.get(k, (entry, k)) for k in unexpected],
                [(*where.get(k, (entry, k)), saved, want) for k, saved, want in mismatched],
                expects=f"{Path(version) / 'config.json'} asks for",
                then=then,
            )
        )
    return model


def _load_llava_weights(
    version: str | Path, config: LFLLMConfig, dtype: torch.dtype = torch.float32
) -> LFLLMForCausalLM:
    """LLaVA weights into a fresh LFLLM, loaded directly in ``dtype`` (no float32 detour: one copy of the
    model in memory). Only LFLLM's own modules may be missing; nothing may be unexpected or mis-shaped."""
    return load_exact(
        version,
        dtype,
        config,
        may_be_missing=NEW_MODULES,
        then=(
            f"the weights in {version} are not what its config.json describes (loading would start the missing "
            "weights from random values and drop the unexpected ones): refused; use the HF LLaVA folder as it "
            "was downloaded or converted"
        ),
    )


#: The config's token ids and the tokens they must be in the tokenizer.
TOKEN_IDS = (
    ("seg_token_id", SEG_TOKEN),
    ("image_token_index", IMAGE_TOKEN),
    ("depth_token_id", DEPTH_TOKEN),
    ("rej_token_id", REJ_TOKEN),  # None on both sides for a model without gres
    ("region_token_id", REGION_TOKEN),  # None on both sides for a model never trained with --ilvc
)


def check_token_ids(version: str | Path, config: LFLLMConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A merged model's config.json and tokenizer must agree: ``seg_token_id`` / ``image_token_index`` /
    ``depth_token_id`` are the tokenizer's ids of ``[SEG]`` / ``<image>`` / ``<depth>``, ``<im_start>`` and
    ``<im_end>`` are single tokens when the model wraps images in them, the pad id is the tokenizer's, and
    every token id fits the embedding. Raises :class:`WeightsMismatchError` naming config.json and the
    first key (a wrong ``seg_token_id`` would otherwise look for ``[SEG]`` at another token, silently)."""
    vocab = tokenizer.get_vocab()
    wrong = []
    for key, token in TOKEN_IDS:
        actual = vocab.get(token)
        if getattr(config, key, None) != actual:
            wrong.append((key, getattr(config, key, None), token, actual))
    if config.use_mm_start_end:
        wrong += [
            ("use_mm_start_end", True, t, None) for t in (IM_START_TOKEN, IM_END_TOKEN) if t not in vocab
        ]
    pad = config.text_config.pad_token_id
    if pad is not None and tokenizer.pad_token is not None and pad != tokenizer.pad_token_id:
        wrong.append(("text_config.pad_token_id", pad, tokenizer.pad_token, tokenizer.pad_token_id))
    rows = config.text_config.vocab_size
    if len(tokenizer) > rows:
        top = max(vocab, key=vocab.get)
        wrong.append(("text_config.vocab_size", rows, top, vocab[top]))
    if wrong:
        raise WeightsMismatchError(token_mismatch_message(Path(version) / "config.json", version, wrong))


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


def _grow_tokens(
    model: LFLLMForCausalLM, tokenizer: PreTrainedTokenizerBase, **which: bool
) -> dict[str, int]:
    """Add the tokens ``which`` asks for (``gres=True``: ``[REJ]``, ``region=True``: ``<region>``) to a loaded
    model: to ``tokenizer``, the embeddings grown by fresh rows (as for every new token of a base), the new
    ids among the config's trainable ``new_token_ids``. Returns the tokenizer's ids."""
    config = model.config
    ids, added = add_special_tokens(
        tokenizer, config.use_mm_start_end, gres=bool(config.gres) or which.get("gres", False),
        region=config.region_token_id is not None or which.get("region", False),
    )  # fmt: skip
    rows = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(rows, mean_resizing=False)
    config.new_token_ids = sorted({*(config.new_token_ids or []), *added})
    return ids


def add_rej_token(model: LFLLMForCausalLM, tokenizer: PreTrainedTokenizerBase) -> int:
    """Give a loaded model without ``[REJ]`` the token (a fresh, trainable row); the config marked
    ``gres``. Returns the id."""
    ids = _grow_tokens(model, tokenizer, gres=True)
    model.config.gres = True
    model.config.rej_token_id = ids[REJ_TOKEN]
    return ids[REJ_TOKEN]


def add_region_token(model: LFLLMForCausalLM, tokenizer: PreTrainedTokenizerBase) -> int:
    """Give a loaded model without ``<region>`` the placeholder of ILVC answers (``--ilvc``): a fresh row,
    recorded as ``region_token_id``. Returns the id."""
    ids = _grow_tokens(model, tokenizer, region=True)
    model.config.region_token_id = ids[REGION_TOKEN]
    return ids[REGION_TOKEN]


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
    light_pretrained: str | Path | None = None,
    region_token: bool = False,
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """Load LFLLM from ``version``.

    * ``version`` is an HF LLaVA directory (``llava-1.5-7b-hf`` layout): LLaVA is loaded, the new tokens are
      added and the embeddings resized, SAM is loaded from ``vision_pretrained`` (official format, variant
      inferred), and the ``[SEG]`` projector / CAAM start fresh. ``options.out_dim`` yields to SAM's prompt
      width unless it is in ``given``, where a different value is refused.
    * ``version`` is a merged LFLLM directory: everything (SAM, ``[SEG]`` projector, CAAM, options) comes
      from it, nothing is re-initialised; an option in ``given`` (the :class:`ModelOptions` fields the user
      set explicitly) that differs from the merged model's is refused with :class:`OptionMismatchError`.
      One exception: ``gres`` given to a merged model without ``[REJ]`` adds the token (a new, trainable row),
      MLLMSeg's GRES stage started from a model trained on one-target expressions.

    Args:
        given: names of the :class:`ModelOptions` fields (and ``"vision_pretrained"``) set explicitly on a
            command line; the others are defaults that yield to what the weights hold.
        light_pretrained: a light-decoder file (``model.light_decoder.save_light_decoder``) to start the
            light head from, for a LLaVA directory with ``mask_head="light"`` only.
        region_token: the model gets ``<region>``, the placeholder of ILVC answers (a training run with
            ``--ilvc``, and its merge); a merged model that has it keeps it either way.
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
        if light_pretrained is not None:
            raise OptionMismatchError(
                f"--light_pretrained {light_pretrained}: the merged model {version} holds its own light decoder; "
                "drop the flag"
            )
        check_token_ids(version, AutoConfig.from_pretrained(version), tokenizer)
        model = load_exact(
            version,
            dtype,
            then=(
                f"the weights in {version} are not what its config.json describes (loading would start the "
                "missing weights from random values and drop the unexpected ones): refused; use the folder as "
                "the merge wrote it, or merge again"
            ),
        )
        recorded = recorded_options(model.config)
        recorded["caam_views"] = model.config.caam_offsets or []
        extend = options.gres and "gres" in given and not model.config.gres
        if extend:
            recorded["gres"] = True  # added below: the one option a merged model can gain
        check_given_options(f"the merged model {version}", options, given, recorded)
        if extend:
            add_rej_token(model, tokenizer)
        if region_token and model.config.region_token_id is None:
            add_region_token(model, tokenizer)
        odd = set()
        if model.sam is not None:
            odd = {str(t.dtype) for t in model.sam.prompt_encoder.state_dict().values()} - {"torch.float32"}
        if odd:
            raise RuntimeError(f"{version}: SAM's prompt encoder loaded as {odd}, expected float32")
        return model, tokenizer
    if options.mask_head == "light":
        return _build_light(version, vision_pretrained, options, dtype, light_pretrained, region_token)
    if light_pretrained is not None:
        raise ValueError(f"--light_pretrained {light_pretrained}: the SAM route has no light decoder")
    if vision_pretrained is None:
        raise ValueError(f"{version} is a LLaVA directory: pass the SAM checkpoint with --vision_pretrained")
    sam, sam_cfg = load_sam(vision_pretrained)
    check_given_options(
        f"the SAM in {vision_pretrained}",
        options,
        {"out_dim", "image_size"} & set(given),
        {"out_dim": sam_cfg["prompt_embed_dim"], "image_size": sam_cfg["img_size"]},
    )
    model, tokenizer = _new_lfllm(version, sam_cfg, options, dtype, region_token)
    model.sam.prompt_encoder.float()  # before loading, so its float32 checkpoint values stay exact
    model.sam.load_state_dict(sam.state_dict())
    del sam
    return cast_model(model, dtype), tokenizer


def _new_lfllm(
    version: str | Path,
    sam_cfg: dict | None,
    options: ModelOptions,
    dtype: torch.dtype,
    region_token: bool = False,
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """LLaVA from ``version`` with the new tokens added and the embeddings resized; LFLLM's own modules
    fresh (SAM still empty)."""
    tokenizer = load_tokenizer(version)
    ids, added = add_special_tokens(tokenizer, options.use_mm_start_end, options.gres, region_token)
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
    version: str | Path,
    vision_pretrained: str | Path | None,
    options: ModelOptions,
    dtype: torch.dtype,
    light_pretrained: str | Path | None = None,
    region_token: bool = False,
) -> tuple[LFLLMForCausalLM, PreTrainedTokenizerBase]:
    """A LLaVA directory with the light mask head: no SAM checkpoint is read (one given is refused); the
    decoder starts from ``light_pretrained`` when given (checked before the LLaVA weights load)."""
    if vision_pretrained is not None:
        raise ValueError(
            f"--vision_pretrained {vision_pretrained}: the light mask head (--mask_head light) has no SAM; "
            "drop the flag (or use --mask_head sam)"
        )
    if light_pretrained is not None:
        read_light_decoder(light_pretrained)  # a missing or foreign file is refused before the base loads
    model, tokenizer = _new_lfllm(version, None, options, dtype, region_token)
    if light_pretrained is not None:
        load_light_decoder(model.light_decoder, light_pretrained)
    return model.to(dtype), tokenizer
