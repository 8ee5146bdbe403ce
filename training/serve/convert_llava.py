"""Convert an original-format LLaVA checkpoint (liuhaotian/llava-v1.5-*) to a Hugging Face LLaVA directory.

transformers 5 ships no converter as a library function, so the mapping is written out here:

=====================================================  =============================================
original (``LlavaLlamaForCausalLM``)                   HF ``LlavaForConditionalGeneration``
=====================================================  =============================================
``model.embed_tokens.*``, ``model.layers.*``,          ``model.language_model.*`` (same suffix)
``model.norm.*``
``lm_head.weight``                                     ``lm_head.weight``
``model.mm_projector.0.*`` / ``model.mm_projector.2.*``  ``model.multi_modal_projector.linear_1/2.*``
``model.vision_tower.vision_tower.vision_model.*``     ``model.vision_tower.*``
(or the CLIP dir ``--vision_tower``: ``vision_model.*``)
``…rotary_emb.inv_freq``                               dropped (recomputed)
=====================================================  =============================================

The config: Llama fields at the top level become ``text_config``; ``mm_vision_select_layer`` ->
``vision_feature_layer``; ``mm_vision_select_feature`` ``patch`` -> ``default`` (CLS dropped), ``cls_patch``
-> ``full``; only ``mm_projector_type: mlp2x_gelu`` maps onto HF's projector. The CLIP tower's config and
image processor come from ``--vision_tower`` (default: ``mm_vision_tower`` when it is a local folder);
its weights from the checkpoint when it holds them (a tuned tower), else from that folder.
The tokenizer gains ``<image>`` (and a ``<pad>`` token) when missing; the new embedding rows are the
mean of the old ones, and the vocabulary is padded to a multiple of 64 as in ``llava-1.5-7b-hf``.

Nothing the user has is overwritten (``utils.outputs``): ``--dst`` may not be, lie inside or hold ``--src`` or
the CLIP folder, and a non-empty ``--dst`` is replaced only with ``--overwrite`` (checked before anything is
read). The result is written into a temporary folder beside ``--dst`` and moved into place when complete, so
a crash or a full disk (named, with its free space) leaves what was there.

Usage::

    python scripts/convert_llava_to_hf.py --src llava-v1.5-7b --dst llava-v1.5-7b-hf \\
        --vision_tower clip-vit-large-patch14-336
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from training.weights import open_weights
from utils.options import add_option_flags, option, options_from_args
from utils.outputs import check_output_dir, refuse_inputs, staged_dir

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RENAMES: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


@dataclass(frozen=True)
class ConvertOptions:
    """The command line of ``scripts/convert_llava_to_hf.py``.

    Attributes:
        src: original LLaVA folder: config.json, weights, tokenizer (``--src``, required).
        dst: output HF LLaVA folder (``--dst``, required).
    """

    src: Path
    dst: Path
    vision_tower: str | None = option(None, "CLIP folder (default: mm_vision_tower if local)", parse=str)
    dtype: str = option("auto", "auto: the config's torch_dtype", choices=["auto", *DTYPES])
    pad_to_multiple_of: int = option(64, "vocabulary padding when tokens are added")
    max_shard_size: str = option("5GB", "largest safetensors shard written")
    overwrite: bool = option(
        False, "replace a non-empty --dst (its old content is removed once the new model is complete)"
    )


def rename_key(key: str) -> str | None:
    """HF name of an original LLaVA key; None for keys to drop. Raises ``KeyError`` for unknown keys."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def read_original_config(src: Path) -> dict:
    """``src/config.json`` of an original LLaVA checkpoint, checked for what the mapping supports."""
    path = src / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the LLaVA config ({exc})") from exc
    if "mm_hidden_size" not in config or "hidden_size" not in config:
        raise ValueError(f"{path}: not an original-format LLaVA config (no mm_hidden_size / hidden_size)")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"{path}: mm_projector_type {projector!r}; only 'mlp2x_gelu' maps onto HF LLaVA")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ValueError(f"{path}: mm_vision_select_feature {feature!r} not in {sorted(SELECT_FEATURE)}")
    return config


def text_config(config: dict, vocab_size: int, pad_token_id: int | None) -> LlamaConfig:
    """The Llama part of an original LLaVA config (rope settings included)."""
    names = {f.name for f in dataclasses.fields(LlamaConfig)} | {"rope_theta", "rope_scaling"}
    skip = {"vocab_size", "pad_token_id", "architectures", "model_type", "transformers_version"}
    fields = {k: v for k, v in config.items() if k in names and k not in skip and v is not None}
    fields.pop("torch_dtype", None)
    return LlamaConfig(**fields, vocab_size=vocab_size, pad_token_id=pad_token_id)


def add_image_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add ``<image>`` and a ``<pad>`` token when missing (as ``llava-1.5-7b-hf``); returns what was added."""
    added = []
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
        )
        added.append("<image>")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        if "<pad>" not in tokenizer.get_vocab():
            added.append("<pad>")
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (V, D) extended to (rows, D) with the mean row (computed in float32)."""
    if rows <= weight.shape[0]:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def vision_dir(vision_tower: str | None, config: dict, src: Path) -> Path:
    """The CLIP folder: ``vision_tower`` (``--vision_tower``), else the config's ``mm_vision_tower`` when it
    is a local folder (as given or inside ``src``)."""
    named = vision_tower or config.get("mm_vision_tower")
    for candidate in (named, src / str(named)) if named else ():
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        f"{src / 'config.json'}: the CLIP tower {named!r} is not a local folder; pass --vision_tower CLIP_DIR "
        "(e.g. a download of openai/clip-vit-large-patch14-336): its config and image processor are needed"
    )


def convert(options: ConvertOptions) -> Path:
    """Write the HF LLaVA directory ``options.dst`` from the original checkpoint ``options.src``; returns it."""
    src, dst = options.src, options.dst
    check_output_dir(dst, {"--src": src, "--vision_tower": options.vision_tower}, options.overwrite, "--dst")
    config = read_original_config(src)
    clip_dir = vision_dir(options.vision_tower, config, src)
    refuse_inputs(dst, {"the CLIP folder (mm_vision_tower)": clip_dir}, "--dst")
    dtype = DTYPES.get(options.dtype) or getattr(torch, str(config.get("torch_dtype", "float16")))
    source = open_weights(src)
    state: dict[str, torch.Tensor] = {}
    for key in source.names():
        try:
            new = rename_key(key)
        except KeyError:
            raise KeyError(
                f"{source.where(key)}: unexpected key {key!r} for an original LLaVA checkpoint"
            ) from None
        if new is not None:
            state[new] = source.tensor(key).to(dtype)
    vision_cfg = CLIPVisionConfig.from_pretrained(clip_dir)
    if not any(k.startswith("model.vision_tower.") for k in state):
        tower = CLIPVisionModel.from_pretrained(clip_dir, dtype=dtype)
        state.update({"model.vision_tower." + k: v for k, v in tower.state_dict().items()})

    tokenizer = AutoTokenizer.from_pretrained(src)
    added = add_image_tokens(tokenizer)
    if EMBED not in state or HEAD not in state:
        raise KeyError(
            f"{source.path}: no {EMBED!r} / {HEAD!r} (model.embed_tokens / lm_head) in the checkpoint"
        )
    rows = max(len(tokenizer), state[EMBED].shape[0])
    if rows > state[EMBED].shape[0]:
        rows = -(-rows // options.pad_to_multiple_of) * options.pad_to_multiple_of
    state[EMBED], state[HEAD] = grow_rows(state[EMBED], rows), grow_rows(state[HEAD], rows)

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    grid = vision_cfg.image_size // vision_cfg.patch_size
    strategy = SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    hf_config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_config(config, rows, tokenizer.pad_token_id),
        image_token_id=image_id,
        image_seq_length=grid * grid + (1 if strategy == "full" else 0),
        projector_hidden_act="gelu",
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
    )
    hf_config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{src}: weights do not fill the HF LLaVA model; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.config.dtype = dtype
    if (clip_dir / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(clip_dir)
    else:
        size = vision_cfg.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    with staged_dir(dst) as tmp:  # moved to dst only when complete
        model.save_pretrained(tmp, max_shard_size=options.max_shard_size)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    print(f"converted {src} -> {dst} ({len(state)} tensors, {dtype}, vocab {rows}, added tokens {added})")
    return dst


def build_parser() -> argparse.ArgumentParser:
    """The converter's command line: ``--src``, ``--dst`` and one flag per :class:`ConvertOptions` option."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="original LLaVA folder (config.json, weights, tokenizer)")
    p.add_argument("--dst", required=True, help="output HF LLaVA folder")
    add_option_flags(p, ConvertOptions)
    return p


def parse_args(argv: Sequence[str] | None = None) -> ConvertOptions:
    """The command line as :class:`ConvertOptions`."""
    args = build_parser().parse_args(argv)
    return options_from_args(ConvertOptions, args, ConvertOptions(src=Path(args.src), dst=Path(args.dst)))


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point; returns the output folder."""
    return convert(parse_args(argv))
