"""Classical, weight-free light-field disparity estimator (plane sweep + edge-aware cost filtering).

Geometry (UrbanLF / OAVC convention, the one of ``dataset/lightfield.py`` and ``model/caam.py``)
------------------------------------------------------------------------------------------------
Views are addressed by their angular offset ``(drow, dcol) = (row - 5, col - 5)`` from the centre view
``5_5``. A point at ``(x, y)`` in the centre view appears in view ``(drow, dcol)`` at
``(x - d*dcol, y - d*drow)``, ``d`` = disparity in pixels between adjacent views, larger ``d`` = nearer. So
for a candidate disparity ``d`` the centre pixel ``(x, y)`` is compared with neighbour ``v`` sampled at
``(x - d*dcol_v, y - d*drow_v)``. Pixel ``i`` sits at coordinate ``i`` (pixel centres), and sampling is
``grid_sample(..., align_corners=False)`` with normalised coordinate ``(2x + 1) / W - 1``, grids in float32.

Method (all vectorised; Python loops run over chunks of planes and views only, never over pixels)
------------------------------------------------------------------------------------------------------
0. **Pre-smoothing.** Every view gets the same edge-preserving smoothing (a self-guided filter), which
   removes 8-bit quantisation steps of low-contrast texture (they pull bilinear matching towards integer
   shifts) but keeps edges; being shift-invariant it commutes with the warps.
1. **Plane sweep.** ``num_planes`` fronto-parallel planes evenly spaced in ``[d_min, d_max]``. Each
   neighbour is warped to the centre for a chunk of planes at once with one ``grid_sample`` call (the planes
   are stacked along the grid's height, so a view is never copied per plane).
2. **Matching cost** per view and pixel: ``(1 - alpha) * min(mean_c |I_v - I_c|, tau_color) +
   alpha * min(|d(I_v - I_c)|, tau_grad)``: truncated absolute colour difference plus the truncated
   difference of grey-level gradients along the view's epipolar direction (Hosni et al.'s cost-volume
   filtering cost). Samples whose bilinear taps leave the view get the worst cost.
3. **Occlusion-robust combination.** Views are grouped by direction: left ``dcol < 0``, right
   ``dcol > 0``, up ``drow < 0``, down ``drow > 0`` (a diagonal view belongs to two groups); each group's
   cost is the mean over its views. An occluder next to a pixel hides it only from the views on the
   occluder's side, so per pixel and plane the default (``occlusion="axis"``) takes, for each epipolar
   axis, the better of its two sides, ``min(left, right)`` and ``min(up, down)``, and averages the two
   axes. Both axes always contribute, so texture that is informative along one axis only (stripes) is
   not discarded, which a plain "best half of the groups" rule (``occlusion="best"``) would do.
4. **Edge-aware aggregation.** Every cost slice is filtered with a guided filter (He et al.; the fast
   variant with coefficients at half resolution) guided by the centre view's colours, with O(1) box
   filters built from cumulative sums, so the aggregation windows do not straddle colour edges.
5. **Winner-takes-all + sub-pixel refinement**: a parabola through the best plane and its two neighbours
   (offset clamped to half a plane step); optionally a final median filter.

Memory: planes are processed in chunks sized by ``DisparityConfig.chunk_mb`` (one view at a time at
640x480). Beyond its input, one 640x480 scene needs about 0.35 GB with the 17-view cross and 0.6 GB with
the full 9x9 grid (mostly the pre-smoothed float32 views). Several scenes can be batched (``B > 1``); they
share the sampling grids.

:func:`block_matching_baseline` is the naive two-view reference the evaluation compares against.

Files by job: ``config.py`` (settings), ``cost_volume.py`` (steps 1-3), ``filtering.py`` (steps 0 and 4),
``refinement.py`` (step 5), this file (the entry points), ``cache.py`` (maps written once per scene).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataset.disparity.config import DEFAULT_DISPARITY_CONFIG, DisparityConfig, plane_disparities
from dataset.disparity.cost_volume import (
    as_float_images,
    check_inputs,
    chunk_sizes,
    cost_volume,
    sample_grid,
    warp_planes,
)
from dataset.disparity.filtering import box_mean, inv_count, median_filter
from dataset.disparity.refinement import winner_takes_all
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, load_light_field
from utils.views import view_set_offsets

__all__ = ["block_matching_baseline", "disparity_for_scene", "estimate_disparity"]


def estimate_disparity(
    views: Tensor,
    offsets: Tensor,
    center_index: int,
    config: DisparityConfig | None = None,
    **overrides: Any,
) -> Tensor:
    """Estimate the centre-view disparity of a batch of light fields.

    Args:
        views: ``(B, N, 3, H, W)`` RGB views of ``B`` scenes, float in [0, 1] (uint8 is scaled by 1/255),
            on any device; all scenes share the view set.
        offsets: ``(N, 2)`` integer ``(drow, dcol)`` of each view relative to the centre (``5_4`` ->
            ``(0, -1)``, ``4_5`` -> ``(-1, 0)``); entry ``center_index`` must be ``(0, 0)``.
        center_index: index of the centre view along ``N``.
        config: settings (:class:`DisparityConfig`; default ``DisparityConfig()``).
        **overrides: fields of :class:`DisparityConfig` to replace, e.g. ``d_min=-0.5, num_planes=43``.

    Returns:
        ``(B, H, W)`` float32 disparity in px between adjacent views (larger = nearer), on ``views.device``.

    Raises:
        ValueError: on a bad shape, dtype, offsets table or config value, with a message naming it.
    """
    config = dataclasses.replace(config or DEFAULT_DISPARITY_CONFIG, **overrides)
    off = check_inputs(views, offsets, center_index)
    center_index %= views.shape[1]
    others = [i for i in range(views.shape[1]) if i != center_index]
    with torch.no_grad():
        volume, planes = cost_volume(views, center_index, others, off[others], config)
        disparity = winner_takes_all(volume, planes, config.subpixel)
        if config.median > 1:
            disparity = median_filter(disparity, config.median)
    return disparity


def block_matching_baseline(
    center: Tensor,
    view: Tensor,
    offset: tuple[int, int] = (0, 1),
    d_min: float = DEFAULT_DISPARITY_CONFIG.d_min,
    d_max: float = DEFAULT_DISPARITY_CONFIG.d_max,
    num_planes: int = DEFAULT_DISPARITY_CONFIG.num_planes,
    window: int = 9,
) -> Tensor:
    """Naive two-view block matching: SAD over a fixed ``window x window`` box, winner-takes-all.

    The centre is compared with one neighbour (``5_6`` by default, ``offset = (drow, dcol)``) sampled at
    ``(x - d*dcol, y - d*drow)`` for the same plane set as :func:`estimate_disparity`; no edge awareness,
    no occlusion handling, no sub-pixel refinement.

    Args:
        center: ``(B, 3, H, W)`` centre view, float in [0, 1].
        view: ``(B, 3, H, W)`` the neighbour at ``offset``.
        offset: ``(drow, dcol)`` of ``view``.
        d_min, d_max, num_planes: the swept planes.
        window: odd box size.

    Returns:
        ``(B, H, W)`` float32 disparity.
    """
    if center.ndim != 4 or center.shape[1] != 3 or view.shape != center.shape:
        raise ValueError(
            f"center and view: expected equal shapes (B, 3, H, W), got {tuple(center.shape)}, {tuple(view.shape)}"
        )
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    cfg = DisparityConfig(d_min=d_min, d_max=d_max, num_planes=num_planes)
    c32, v32 = as_float_images(center), as_float_images(view)
    planes = plane_disparities(cfg, center.device)
    off = torch.tensor([offset], dtype=torch.float32, device=center.device)
    b, _, h, w = c32.shape
    inv_n = inv_count(h, w, window // 2, center.device)
    volume = torch.empty(b, num_planes, h, w, device=center.device)
    chunk, _ = chunk_sizes(b, 1, h, w, 3, cfg)
    with torch.no_grad():
        for p0 in range(0, num_planes, chunk):
            pl = planes[p0 : p0 + chunk]
            grid, _ = sample_grid(off, pl, h, w)
            warped = warp_planes(v32[:, None], grid)[:, 0]  # (B, 3, P, H, W)
            sad = (warped - c32[:, :, None]).abs().sum(dim=1)  # (B, P, H, W)
            volume[:, p0 : p0 + pl.shape[0]] = box_mean(sad, window // 2, inv_n)
    return planes[volume.argmin(dim=1)]


def disparity_for_scene(
    scene_dir: str | Path,
    layout: LightFieldLayout | None = None,
    config: DisparityConfig | None = None,
    *,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Estimate the centre disparity of one scene folder from its view files.

    Reads the centre and the views of ``config.views`` (:func:`view_set_offsets`, grid size from
    ``layout.center``) with :func:`dataset.lightfield.load_light_field`, so a missing, unreadable or
    differently sized view raises ``LightFieldError`` naming the file.

    Args:
        scene_dir: the scene folder (``Image<id>/``).
        layout: view file names (default: UrbanLF ``<row>_<col>.png``, centre ``5_5``).
        config: estimator settings (default ``DisparityConfig()``).
        device: where to run (``"cpu"``, ``"cuda"``, ...).

    Returns:
        ``(H, W)`` float32 disparity in px between adjacent views (larger = nearer).
    """
    layout = layout or DEFAULT_LAYOUT
    config = config or DEFAULT_DISPARITY_CONFIG
    offsets = view_set_offsets(config.views, layout.center)
    sample = load_light_field(scene_dir, offsets, layout, with_disparity=False)
    images = np.concatenate([sample.center[None], sample.views])  # (N, H, W, 3) uint8, centre first
    views = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)[None]  # (1, N, 3, H, W)
    all_offsets = torch.tensor([(0, 0), *offsets], dtype=torch.int64)
    disparity = estimate_disparity(views, all_offsets, 0, config)
    return disparity[0].cpu().numpy().astype(np.float32, copy=False)
