"""Tokenisation with placeholder expansion and label masking, and batching of model-ready samples.

``encode_conversation`` turns rendered segments into ``input_ids`` / ``labels``: the ``<image>`` and
``<depth>`` placeholders (and an ILVC answer's ``<region>``) are expanded to the real number of visual tokens (transformers 5's LLaVA does
not expand them), only answer segments carry labels, and a prompt longer than ``model_max_length`` (placeholders counted
once, as in the reference) is refused when cutting it would drop a ``[SEG]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from utils.batch import META_KEYS, REGION_KEYS, STACKED_KEYS, Batch, Sample
from utils.tokens import DEPTH_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN


@dataclass(frozen=True)
class TokenSpec:
    """Token ids and counts the encoder needs (from the tokenizer and the model config)."""

    bos_id: int | None
    pad_id: int
    image_id: int
    depth_id: int
    seg_id: int
    num_image_tokens: int
    num_depth_tokens: int
    model_max_length: int
    region_id: int | None = None  # <region> of a model built for ILVC answers; None otherwise

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, num_visual_tokens: int, model_max_length: int
    ) -> TokenSpec:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, DEPTH_TOKEN, SEG_TOKEN)}
        unk = tokenizer.unk_token_id
        for token, tid in ids.items():
            if tid is None or (tid == unk and token != tokenizer.unk_token):
                raise ValueError(f"tokenizer has no {token} token; build the model with model.build first")
        region = tokenizer.get_vocab().get(REGION_TOKEN)
        return cls(
            region_id=region,
            bos_id=tokenizer.bos_token_id,
            pad_id=tokenizer.pad_token_id,
            image_id=ids[IMAGE_TOKEN],
            depth_id=ids[DEPTH_TOKEN],
            seg_id=ids[SEG_TOKEN],
            num_image_tokens=num_visual_tokens,
            num_depth_tokens=num_visual_tokens,
            model_max_length=model_max_length,
        )


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]], spec: TokenSpec
) -> tuple[list[int], list[int]]:
    """Tokenise ``(text, is_answer)`` segments into (input_ids, labels), placeholders expanded.

    ``spec.model_max_length`` bounds the prompt as the reference's tokenizer sees it: each ``<image>`` /
    ``<depth>`` placeholder counts as one token (the reference expands them inside the model), so the same
    ``--model_max_length 512`` fits a llava-1.5 prompt whose expanded length is 512 + 2 x 575. A prompt
    longer than that is cut there (a long VQA answer loses its end), and refused with ``ValueError`` if the cut
    would drop a ``[SEG]`` or, in a prompt without answers, the end of the question.
    """
    chunks: list[tuple[int, bool]] = [] if spec.bos_id is None else [(spec.bos_id, False)]
    for text, is_answer in segments:
        chunks += [(tid, is_answer) for tid in tokenizer(text, add_special_tokens=False).input_ids]
    if len(chunks) > spec.model_max_length:
        seg_positions = [i for i, (t, _) in enumerate(chunks) if t == spec.seg_id]
        answered = any(is_answer for _, is_answer in chunks)
        if not seg_positions and not answered:  # a prompt awaiting its answer: cutting it drops the question
            raise ValueError(
                f"prompt of {len(chunks)} tokens (placeholders counted once) exceeds "
                f"model_max_length={spec.model_max_length}; cutting it would drop the end of the question: "
                "shorten the expression"
            )
        if seg_positions and seg_positions[-1] >= spec.model_max_length:
            raise ValueError(
                f"prompt of {len(chunks)} tokens (placeholders counted once) exceeds "
                f"model_max_length={spec.model_max_length} and would be truncated past [SEG] "
                f"(at {seg_positions}); raise --model_max_length or shorten the expression"
            )
        chunks = chunks[: spec.model_max_length]
    expand = {spec.image_id: spec.num_image_tokens, spec.depth_id: spec.num_depth_tokens}
    if spec.region_id is not None:  # a region's tokens come from the same tower as the image's
        expand[spec.region_id] = spec.num_image_tokens
    ids: list[int] = []
    labels: list[int] = []
    for tid, is_answer in chunks:
        n = expand.get(tid, 1)
        ids.extend([tid] * n)
        labels.extend([tid if is_answer and n == 1 else IGNORE_INDEX] * n)
    return ids, labels


def collate_batch(samples: list[Sample], pad_id: int) -> Batch:
    """Batch model-ready samples (see ``dataset.refer_seg.ReferSegDataset``) into a
    :class:`utils.batch.Batch` (its docstring has every key's shape).

    Images are stacked (B, ...), conversations of all images padded right into ``input_ids`` /
    ``labels`` / ``attention_mask`` (N, L) with ``conv_image`` (N,) naming each one's image. Masks stay a
    list (their sizes differ): ``gt_masks[i]`` (k_i, H_i, W_i) float, in the ``[SEG]`` order of image i;
    ``gt_masks`` is absent when the samples carry no masks (``masks=None``: prediction only, e.g. chat).
    """
    batch: Batch = {}
    for key in STACKED_KEYS:
        values = [s.get(key) for s in samples]
        if all(v is not None for v in values):
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        elif any(v is not None for v in values):
            raise ValueError(f"{key} is present in some samples of the batch but not in others")
    for key, dtype in (
        ("clip_scale", torch.float32),
        ("sam_scale", torch.float32),
        ("sam_resized_hw", torch.long),
    ):
        if samples[0].get(key) is not None:  # no SAM keys for the light mask head
            batch[key] = torch.tensor([s[key] for s in samples], dtype=dtype)
    batch["original_hw"] = [tuple(s["original_hw"]) for s in samples]
    convs = [(i, ids, lab) for i, s in enumerate(samples) for ids, lab in s["conversations"]]
    length = max(len(ids) for _, ids, _ in convs)
    input_ids = torch.full((len(convs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(convs), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(convs), length), dtype=torch.long)
    for row, (_, ids, lab) in enumerate(convs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    batch.update(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention,
        conv_image=torch.tensor([i for i, _, _ in convs], dtype=torch.long),
    )
    batch.update(_regions(samples))
    masks = [s.get("masks") for s in samples]
    if all(m is not None for m in masks):
        batch["gt_masks"] = [torch.as_tensor(m).float() for m in masks]
    elif any(m is not None for m in masks):
        raise ValueError("masks are present in some samples of the batch but not in others")
    for key in META_KEYS:
        if key == "no_target":  # GRES flags; a sample from elsewhere (chat, the benchmarks) has targets only
            batch[key] = [list(s.get(key) or [False] * len(s.get("sentences") or ())) for s in samples]
        elif key == "task":  # a sample from outside a task mix is a referring one
            batch[key] = [s.get(key, "refer_seg") for s in samples]
        else:
            batch[key] = [s[key] for s in samples]
    return batch


def _regions(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The ILVC regions of all samples, concatenated (``region_pixels``, ``region_masks``, ``region_boxes``)
    with ``region_conv`` renumbered to the batch's conversations; empty without any region."""
    out: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for s in samples:
        if s.get("region_conv") is not None and len(s["region_conv"]):
            out.setdefault("region_conv", []).append(torch.as_tensor(s["region_conv"]) + offset)
            for key in REGION_KEYS:
                if s.get(key) is not None:
                    out.setdefault(key, []).append(torch.as_tensor(s[key]))
        offset += len(s["conversations"])
    if not out:
        return {}
    count = len(out["region_conv"])
    if any(len(v) != count for v in out.values()):
        raise ValueError("ILVC regions of some samples lack keys that others carry")
    return {key: torch.cat(v) for key, v in out.items()}


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """Tensors (and lists of tensors) to ``device``; everything else as is."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out
