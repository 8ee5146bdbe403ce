"""Depth Convergence Module: disparity map -> depth image (-> ``<DEPTH>`` tokens).

Contents:
    1. Disparity -> depth image (this section): the grey 3-channel image the vision tower encodes.

Where the disparity comes from: the scene's ``5_5_disparity.npy`` (GT or a precomputed map such as
``5_5_disparity_OAVC.npy``), or the built-in classical estimator in ``dataset/disparity/``
(``estimate_disparity`` for tensors, ``disparity_for_scene`` for a scene folder;
``scripts/estimate_disparity.py`` writes ``5_5_disparity_est.npy`` for a whole dataset; see
``docs/DISPARITY.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.options import DEFAULT_MODEL_OPTIONS

# ---------------------------------------------------------------------------------------------------
# 1. Disparity -> depth image
# ---------------------------------------------------------------------------------------------------

#: Disparity range (px between adjacent views) mapped to black..white, as in the reference release
#: (``ModelOptions.depth_range``). UrbanLF-Syn GT spans about [-0.47, 1.55] px, so this range saturates
#: the nearest objects.
DEFAULT_DEPTH_RANGE: tuple[float, float] = DEFAULT_MODEL_OPTIONS.depth_range


def disparity_to_depth_image(
    disparity_px: Tensor, disp_range: tuple[float, float] = DEFAULT_DEPTH_RANGE
) -> Tensor:
    """Map disparity linearly to a grey depth image, nearer = brighter.

    ``value = (clip(d, lo, hi) - lo) / (hi - lo)``, so ``lo`` -> 0 (far, black), ``hi`` -> 1 (near,
    white). This is the reference's ``[-1, 1] px -> 0..255`` mapping divided by 255, without its uint8
    quantisation; feed it to the vision-tower preprocessing as an image in [0, 1]. NaN (unknown
    disparity) maps to 0.

    Args:
        disparity_px: ``(B, H, W)`` disparity in pixels between adjacent views (larger = nearer).
        disp_range: ``(lo, hi)`` with ``lo < hi``; values outside are clipped.

    Returns:
        ``(B, 3, H, W)`` in [0, 1]; same dtype as a floating input (computed in float32), float32 for an
        integer input. The three channels are identical.
    """
    lo, hi = (float(v) for v in disp_range)
    if not lo < hi:
        raise ValueError(f"disp_range: expected lo < hi, got {disp_range}")
    if disparity_px.ndim != 3:
        raise ValueError(f"disparity_px: expected shape (B, H, W), got {tuple(disparity_px.shape)}")
    out_dtype = disparity_px.dtype if disparity_px.dtype.is_floating_point else torch.float32
    disp = disparity_px.to(torch.float32)
    grey = ((disp.clamp(lo, hi) - lo) / (hi - lo)).nan_to_num(nan=0.0)
    return grey[:, None].expand(-1, 3, -1, -1).to(out_dtype).contiguous()
