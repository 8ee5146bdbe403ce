"""A confidence score for a predicted mask, and the rank correlation that says how well one tracks IoU.

Candidates (each in [0, 1], higher = the mask is more likely right):

* ``sam_iou``: SAM's predicted IoU for the ``[SEG]`` prompt (the mask decoder's IoU head), clipped;
* ``confidence``: mean sigmoid probability over the pixels of the predicted mask (0 for an empty mask);
* ``stability``: SAM's stability score, IoU of the masks thresholded at ``+offset`` and ``-offset``
  logits (0 when both are empty).

Which one is reported as *the* score (:data:`DEFAULT_SCORE`) was measured on the synthetic validation set
(``docs/RESULTS.md``, "Mask scores"): the one whose Spearman correlation with the true IoU is highest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

SCORE_NAMES: tuple[str, ...] = ("sam_iou", "confidence", "stability")
#: The score shown by chat.py, the demo and the per-expression JSON (see the module docstring).
DEFAULT_SCORE = "stability"
STABILITY_OFFSET = 1.0  # segment_anything's default ``stability_score_offset``


def mask_confidence(logits: Tensor) -> Tensor:
    """Mean sigmoid probability inside the predicted mask: (k, H, W) logits -> (k,) float32 in [0, 1]."""
    x = logits.float().flatten(1)
    inside = x > 0
    total = (torch.sigmoid(x) * inside).sum(1)
    count = inside.sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def stability_score(logits: Tensor, offset: float = STABILITY_OFFSET) -> Tensor:
    """SAM's stability score: (k, H, W) logits -> (k,) float32, |x > offset| / |x > -offset| (0 if empty)."""
    x = logits.float().flatten(1)
    high = (x > offset).sum(1).float()
    low = (x > -offset).sum(1).float()
    return torch.where(low > 0, high / low.clamp(min=1), torch.zeros_like(low))


def mask_scores(logits: Tensor, sam_iou: Tensor) -> dict[str, Tensor]:
    """Every candidate score of k masks: (k, H, W) logits and (k,) SAM IoU -> ``{name: (k,) float32}``."""
    return {
        "sam_iou": sam_iou.float().clamp(0.0, 1.0).reshape(-1),
        "confidence": mask_confidence(logits),
        "stability": stability_score(logits),
    }


def scores_of_one(logits: Tensor | None, sam_iou: float | None) -> dict[str, float] | None:
    """The candidate scores of one mask (H, W) as floats; None when there is no mask (no ``[SEG]``)."""
    if logits is None or sam_iou is None:
        return None
    scores = mask_scores(logits[None], torch.tensor([sam_iou]))
    return {name: round(float(v[0]), 4) for name, v in scores.items()}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (the Spearman convention)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (NaN when either is constant or n < 2)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman: expected two 1-D sequences of equal length, got {a.shape}, {b.shape}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return math.nan if denom == 0 else float((ra * rb).sum() / denom)
