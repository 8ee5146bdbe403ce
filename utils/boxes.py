"""Boxes of masks and their normalised, optionally grid-snapped form (shared by the pretraining's REC text
and the ``[SEG]`` oracle probe)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` pixel box of a non-empty (H, W) mask, end exclusive; ``ValueError`` if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask_box: the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def grid_box(
    box: Sequence[float], height: int, width: int, step: float = 0.01
) -> tuple[float, float, float, float]:
    """An xyxy pixel box normalised to the image and clipped to [0, 1].

    ``step`` 0.01 leaves the values as they are (LLaVA-1.5 rounds them to 2 decimals when writing). A
    coarser ``step`` (1/n, e.g. 0.1: 11 values a coordinate) puts the box on that grid *grown outwards*
    (x0, y0 floored, x1, y1 ceiled), so that it still covers the object.
    """
    x0, y0, x1, y1 = (min(max(float(v) / s, 0.0), 1.0) for v, s in zip(box, (width, height, width, height)))
    if step != 0.01:
        n = round(1 / step)
        x0, y0 = (math.floor(v * n + 1e-6) / n for v in (x0, y0))
        x1, y1 = (math.ceil(v * n - 1e-6) / n for v in (x1, y1))
    return x0, y0, x1, y1
