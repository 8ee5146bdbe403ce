"""Image geometry for the two encoders (numpy + OpenCV, run in data-loader workers).

* SAM: resize the longest side to T (SAM's ``ResizeLongestSide`` rounding), pad bottom/right to T×T.
* CLIP: resize the shortest side to S (bicubic, as ``CLIPImageProcessor``), centre-crop S×S.

Views and disparity go through the same geometry, so CAAM can warp in the resized frame. Disparity
values stay in original-resolution pixels; each function returns the scale that converts them
(``d_resized = d * scale``), and the model applies it where a warp needs it. Aspect ratio is preserved,
so one scale serves both axes (up to rounding of the output size, < 1/size).
"""

from __future__ import annotations

import cv2
import numpy as np

from utils.geometry import disparity_scale, longest_side_shape, shortest_side_shape

__all__ = [  # the shapes live in utils.geometry (the model needs them too); re-exported for the data path
    "clip_geometry",
    "disparity_scale",
    "longest_side_shape",
    "sam_geometry",
    "shortest_side_shape",
]


def sam_geometry(
    images: np.ndarray, disparity: np.ndarray | None, target: int
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], float]:
    """Resize (K, H, W, 3) uint8 views and the (H, W) disparity for SAM; pad to ``target``².

    Returns (views (K, T, T, 3) uint8, disparity (T, T) float32 or None, resized (h, w), scale).
    """
    k, h, w, _ = images.shape
    nh, nw = longest_side_shape(h, w, target)
    out = np.zeros((k, target, target, 3), np.uint8)
    for i in range(k):
        out[i, :nh, :nw] = cv2.resize(images[i], (nw, nh), interpolation=cv2.INTER_LINEAR)
    disp = None
    if disparity is not None:
        disp = np.zeros((target, target), np.float32)
        disp[:nh, :nw] = cv2.resize(disparity, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return out, disp, (nh, nw), disparity_scale(h, w, target, "sam")


def clip_geometry(
    images: np.ndarray, disparity: np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Shortest side to ``size`` then centre crop, for (K, H, W, 3) uint8 views and (H, W) disparity.

    Returns (views (K, S, S, 3) uint8, disparity (S, S) float32 or None, scale).
    """
    k, h, w, _ = images.shape
    nh, nw = shortest_side_shape(h, w, size)
    top, left = (nh - size) // 2, (nw - size) // 2
    out = np.empty((k, size, size, 3), np.uint8)
    for i in range(k):
        resized = cv2.resize(images[i], (nw, nh), interpolation=cv2.INTER_CUBIC)
        out[i] = resized[top : top + size, left : left + size]
    disp = None
    if disparity is not None:
        resized = cv2.resize(disparity, (nw, nh), interpolation=cv2.INTER_NEAREST)
        disp = np.ascontiguousarray(resized[top : top + size, left : left + size], dtype=np.float32)
    return out, disp, disparity_scale(h, w, size, "clip")
