"""Segment, then describe (LIRA's ILVC at inference): each generated answer's *predicted* mask is cropped from
the centre view exactly as the training crops the ground truth (``dataset.regions.region_crop``), and the model
continues its answer after ``[SEG]`` with the region's own tokens and a description of it
(``model.inference.describe_regions``). ``chat.py --describe`` and the demo's checkbox call it through
:meth:`training.serve.predict.Segmenter.answer_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dataset.lightfield import read_rgb
from dataset.regions import region_crop
from model.inference import Generated, describe_regions
from model.lfllm import LFLLMForCausalLM
from utils.batch import Batch


@torch.no_grad()
def describe_predicted(
    model: LFLLMForCausalLM,
    tokenizer: Any,
    batch: Batch,
    samples: Sequence[dict[str, Any]],
    generated: list[list[Generated]],
    max_new_tokens: int,
) -> int:
    """Set ``description`` on every answer of ``generated`` (per scene of ``batch``, its conversations in
    order) whose first slot is a ``[SEG]`` with a non-empty mask; one generation for the whole batch. The
    centre view is read from each sample's ``center_path``. Returns the number of answers described."""
    size = int(model.config.vision_config.image_size)
    lengths = batch["attention_mask"].sum(1).tolist()
    todo, row = [], 0
    for i, per_image in enumerate(generated):
        center = None
        for result in per_image:
            n, row = row, row + 1
            if result.rejected or result.mask_logits is None or not bool((result.mask_logits > 0).any()):
                continue
            center = read_rgb(samples[i]["center_path"]) if center is None else center
            mask = (result.mask_logits.float() > 0).cpu().numpy().astype(np.uint8)
            prompt = batch["input_ids"][n, : int(lengths[n])]
            answer = torch.tensor(result.token_ids, dtype=torch.long, device=prompt.device)
            todo.append((result, torch.cat([prompt, answer]), i, region_crop(center, mask, size)))
    if not todo:
        return 0
    device = batch["input_ids"].device
    pixels = torch.stack([t[3].pixels for t in todo]).to(device)
    masks = torch.stack([t[3].mask for t in todo]).to(device)
    ids = describe_regions(
        model, batch, tokenizer, [t[1] for t in todo], [t[2] for t in todo], pixels, masks, max_new_tokens
    )
    for (result, *_), new in zip(todo, ids, strict=True):
        result.description = tokenizer.decode(new, skip_special_tokens=True).strip()
    return len(todo)
