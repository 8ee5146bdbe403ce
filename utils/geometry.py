"""Image geometry shared by the data path and the model: the resized shapes of SAM's (longest side) and CLIP's
(shortest side, then centre crop) inputs, and the disparity scale between an original and a resized frame."""

from __future__ import annotations

from typing import Literal


def longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """SAM's output shape for an (h, w) image resized so its longest side is ``target``."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def shortest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """CLIP's resized shape (before the centre crop) for an (h, w) image whose shortest side becomes
    ``size``."""
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def disparity_scale(h: int, w: int, size: int, encoder: Literal["clip", "sam"]) -> float:
    """The factor from original-resolution disparity pixels to the ``encoder``'s resized frame (``clip``:
    shortest side to ``size``; ``sam``: longest side to ``size``): the one place this scale is computed
    (the geometry functions below, the feature cache's per-scene geometry, the benchmark's inputs)."""
    shape = shortest_side_shape if encoder == "clip" else longest_side_shape
    return shape(h, w, size)[1] / w
