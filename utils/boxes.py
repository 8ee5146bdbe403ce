"""Boxes of masks, their normalised (optionally grid-snapped) form and its text ``[x0, y0, x1, y1]``: one
format for the pretraining's REC answers, LFLLM's box-stating answers and the ``[SEG]`` oracle probe."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` pixel box of a non-empty (H, W) mask, end exclusive; ``ValueError`` if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask_box: the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` pixel centre (+0.5) of the maximum of a non-empty (H, W) mask's distance transform: its
    deepest interior point (the first in raster order on ties); ``ValueError`` if the mask is empty."""
    m = np.pad(np.asarray(mask).astype(np.uint8), 1)
    if not m.any():
        raise ValueError("interior_point: the mask is empty")
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


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


def box_text(box: np.ndarray | tuple[float, ...], height: int, width: int, step: float = 0.01) -> str:
    """``[x0, y0, x1, y1]`` of an xyxy pixel box, normalised to the image, written with 2 decimals; ``step``
    as in :func:`grid_box` (0.01: LLaVA-1.5's format; coarser: on that grid, grown outwards)."""
    return "[" + ", ".join(f"{v:.2f}" for v in grid_box(box, height, width, step)) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[a, b, c, d]`` of normalised numbers in ``text``; ``None`` when there is none."""
    start = text.find("[")
    end = text.find("]", start + 1)
    if start < 0 or end < 0:
        return None
    try:
        vals = tuple(float(v) for v in text[start + 1 : end].split(","))
    except ValueError:
        return None
    return vals if len(vals) == 4 else None  # type: ignore[return-value]
