"""Inputs of the step benchmark: the model at a size preset (random init, no download) and synthetic batches
of the real shapes, through ``dataset.collate.collate_batch``. ``training/experiments/bench_step.py`` times them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from dataset.collate import collate_batch
from dataset.refer_seg import SampleSpec
from dataset.transforms import disparity_scale, longest_side_shape
from model.build import build_lfllm, cast_model, option_fields
from model.lfllm import LFLLMConfig, LFLLMForCausalLM
from model.options import ModelOptions
from model.presets import get_preset, llava_config
from model.sam import reset_sam_buffers, sam_config
from training.pretrain.tiny_base import write_tiny_base
from utils.batch import Sample
from utils.tokens import IGNORE_INDEX, IM_END_TOKEN, IM_START_TOKEN


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TokenIds:
    """Token ids the synthetic conversations use; plain text is drawn from ``[text_low, text_high)``."""

    bos: int
    eos: int
    pad: int
    image: int
    depth: int
    seg: int
    im_start: int
    im_end: int
    text_low: int
    text_high: int


def random_config(preset_name: str, options: ModelOptions) -> tuple[LFLLMConfig, TokenIds]:
    """The LFLLM config ``build_lfllm`` would make from a ``llava-1.5-*-hf`` directory of this preset:
    ``<image>`` and ``<pad>`` right after the base vocabulary, then ``[SEG]``, ``<depth>``, ``<im_start>``,
    ``<im_end>``, rows padded to a multiple of 64."""
    preset = get_preset(preset_name)
    v = preset.vocab_size
    ids = TokenIds(
        bos=1,
        eos=2,
        image=v,
        pad=v + 1,
        seg=v + 2,
        depth=v + 3,
        im_start=v + 4,
        im_end=v + 5,
        text_low=3,
        text_high=v,
    )
    rows = -(-(v + 6) // 64) * 64
    base = llava_config(preset, vocab_size=rows, image_token_id=ids.image, pad_token_id=ids.pad).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "image_token_id"):
        base.pop(key, None)
    base["image_token_index"] = ids.image
    sam_cfg = None if options.mask_head == "light" else sam_config(preset.sam_variant)
    config = LFLLMConfig(
        **base,
        **option_fields(options, sam_cfg),
        seg_token_id=ids.seg,
        depth_token_id=ids.depth,
        new_token_ids=[ids.seg, ids.depth, ids.im_start, ids.im_end],
        sam_config=sam_cfg,
    )
    config._attn_implementation = "sdpa"
    return config, ids


def build_direct(config: LFLLMConfig, dtype: torch.dtype, device: torch.device) -> LFLLMForCausalLM:
    """Random-init LFLLM built in place on ``device`` in ``dtype`` (no float32 copy, no files)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LFLLMForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device)  # CAAM keeps small tensors on the CPU by construction
    if model.sam is not None:
        reset_sam_buffers(model.sam)
    return cast_model(model, dtype)


def token_ids_from_tokenizer(tokenizer: Any, config: LFLLMConfig) -> TokenIds:
    """The token ids of a loaded tokenizer and its LFLLM config."""
    im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    special = [config.image_token_id, config.depth_token_id, config.seg_token_id, tokenizer.pad_token_id]
    special += list(config.new_token_ids or [])
    return TokenIds(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        image=config.image_token_id,
        depth=config.depth_token_id,
        seg=config.seg_token_id,
        im_start=im_start,
        im_end=im_end,
        text_low=3,
        text_high=min(special),
    )


TINY_CORPUS = (
    "the red car parked on the left",
    "a person walking next to the tall tree",
    "the blue bicycle in front of the building",
    "the nearest street lamp",
)


def build_model(
    preset: str,
    build: str,
    options: ModelOptions,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    version: str | None = None,
    vision_pretrained: str | None = None,
) -> tuple[LFLLMForCausalLM, Any, TokenIds, float]:
    """The benchmark's model: ``build`` ``direct`` (random init of ``preset`` in memory) or ``files``
    (``version`` + ``vision_pretrained`` loaded with ``build_lfllm``, else the tiny base written to a
    temporary folder and loaded). Returns (model on ``device`` in eval mode, tokenizer or None, token ids,
    seconds)."""
    tic = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = None
    if build == "direct":
        config, ids = random_config(preset, options)
        model = build_direct(config, dtype, device)
    else:
        if version:
            model, tokenizer = build_lfllm(version, vision_pretrained, options, dtype)
        else:
            if preset != "tiny":
                raise SystemExit(f"--preset {preset}: --build files writes only the tiny base")
            with tempfile.TemporaryDirectory(prefix="lfllm_bench_") as tmp:
                paths = write_tiny_base(tmp, TINY_CORPUS, seed=seed)
                sam = None if options.mask_head == "light" else paths["sam"]
                model, tokenizer = build_lfllm(paths["llava"], sam, options, dtype)
        model.to(device)
        ids = token_ids_from_tokenizer(tokenizer, model.config)
    return model.eval(), tokenizer, ids, time.perf_counter() - tic


# ---------------------------------------------------------------------------------------------- inputs
ANSWER_TOKENS = 8  # "Sure, it is [SEG].</s>"
TURN_TOKENS = 40  # "USER:" question "ASSISTANT:" + the answer (the first turn's "USER:" is in the head)


def conversation(
    config: LFLLMConfig, ids: TokenIds, gen: torch.Generator, turns: int, text_tokens: int, with_answer: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one synthetic conversation with ``turns`` question/answer turns.

    ``text_tokens`` counts everything but the expanded visual runs for one turn; each extra turn adds
    ``TURN_TOKENS``. Without answers the prompt ends after the first question (a chat query)."""

    def text(n: int) -> list[int]:
        return torch.randint(ids.text_low, ids.text_high, (n,), generator=gen).tolist()

    newline = ids.text_low
    visual: list[int] = []
    runs = ([ids.depth] if config.use_depth else []) + [ids.image]
    for tok in runs:
        run = [tok] * config.image_seq_length
        visual += ([ids.im_start, *run, ids.im_end] if config.use_mm_start_end else run) + [newline]
    head = text_tokens - (len(visual) - len(runs) * config.image_seq_length) - TURN_TOKENS
    if head < 1:
        raise ValueError(f"--text_tokens {text_tokens} is too short for the prompt layout")
    input_ids = [ids.bos, *text(head - 1), *visual]
    labels = [IGNORE_INDEX] * len(input_ids)
    for _ in range(turns):
        question = text(TURN_TOKENS - ANSWER_TOKENS)
        input_ids += question
        labels += [IGNORE_INDEX] * len(question)
        if not with_answer:
            break
        answer = [*text(ANSWER_TOKENS - 3), ids.seg, *text(1), ids.eos]
        input_ids += answer
        labels += answer
    return input_ids, labels


def synthetic_sample(
    config: LFLLMConfig,
    ids: TokenIds,
    gen: torch.Generator,
    expressions: int,
    text_tokens: int,
    original_hw: tuple[int, int],
    pack: bool,
    with_answer: bool = True,
) -> Sample:
    """One scene as a :class:`utils.batch.Sample` (the format of ``dataset.refer_seg.ReferSegDataset`` items (uint8 views at CLIP and SAM
    geometry, disparity, conversations, masks at the original size)."""
    spec = SampleSpec.from_model_config(config)
    s, t = spec.clip_size, spec.sam_size
    h, w = original_hw
    views = len(config.caam_offsets or [])

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)

    def disparity(size: int) -> torch.Tensor:
        return torch.rand(size, size, generator=gen) * 2 - 1

    sam: dict[str, Any] = {}
    if t is not None:  # the SAM route (the light mask head has no SAM geometry)
        nh, nw = longest_side_shape(h, w, t)
        sam_center, sam_views = pixels(3, t, t), pixels(views, 3, t, t) if spec.caam_sam else None
        for x in (sam_center, sam_views):
            if x is not None:  # SAM's input is padded with zeros below/right of the resized image
                x[..., nh:, :] = 0
                x[..., nw:] = 0
        sam = {
            "sam_center": sam_center,
            "sam_views": sam_views,
            "sam_disparity": disparity(t) if spec.sam_disparity else None,
            "sam_scale": disparity_scale(h, w, t, "sam"),
            "sam_resized_hw": (nh, nw),
        }
    if pack:
        convs = [conversation(config, ids, gen, expressions, text_tokens, with_answer)]
    else:
        convs = [conversation(config, ids, gen, 1, text_tokens, with_answer) for _ in range(expressions)]
    masks = (torch.rand(expressions, h, w, generator=gen) > 0.5).to(torch.uint8) if with_answer else None
    return {
        "clip_center": pixels(3, s, s),
        "clip_views": pixels(views, 3, s, s) if spec.caam_clip else None,
        "clip_disparity": disparity(s) if spec.needs_disparity else None,
        "clip_scale": disparity_scale(h, w, s, "clip"),
        **sam,
        "original_hw": (h, w),
        "conversations": convs,
        "masks": masks,
        "image_id": 0,
        "ds": "synthetic",
        "sentences": [f"expression {k}" for k in range(expressions)],
        "subsets": [],
        "scene_dir": "synthetic",
        "center_path": "synthetic",
    }


def synthetic_batch(
    config: LFLLMConfig,
    ids: TokenIds,
    *,
    images: int,
    expressions: int,
    text_tokens: int = 80,
    original_hw: tuple[int, int] = (480, 640),
    pack: bool = False,
    with_answer: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """A collated batch (``collate_batch``) of ``images`` synthetic scenes × ``expressions``."""
    gen = torch.Generator().manual_seed(seed)
    samples = [
        synthetic_sample(config, ids, gen, expressions, text_tokens, original_hw, pack, with_answer)
        for _ in range(images)
    ]
    return collate_batch(samples, ids.pad)


def batch_shape(batch: dict[str, Any], ids: TokenIds) -> dict[str, Any]:
    """Sizes of a collated batch: scenes, conversations (rows), padded length, real tokens, [SEG]s."""
    return {
        "images": len(batch["original_hw"]),
        "conversations": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "lm_tokens": int(batch["attention_mask"].sum()),
        "seg_tokens": int((batch["input_ids"] == ids.seg).sum()),
    }
