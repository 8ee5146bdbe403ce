"""The plane-sweep cost volume of the disparity estimator: warps of every neighbour for a chunk of planes,
truncated colour + gradient matching costs, and the occlusion-robust combination of direction groups."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dataset.disparity.config import DisparityConfig, plane_disparities
from dataset.disparity.filtering import GuidedFilter, smooth_views

VALID_TOL_PX = 1e-3
#: Direction groups of :func:`direction_groups`, in column order, and the two epipolar axes they form.
DIRECTION_GROUPS: tuple[str, ...] = ("left", "right", "up", "down")
AXES: tuple[tuple[int, int], ...] = ((0, 1), (2, 3))


def direction_groups(offsets: Tensor) -> Tensor:
    """``(V, 4)`` bool membership of each view in the groups left / right / up / down.

    A view is *left* when ``dcol < 0``, *right* when ``dcol > 0``, *up* when ``drow < 0`` and *down* when
    ``drow > 0``, so a diagonal view belongs to two groups.

    Args:
        offsets: ``(V, 2)`` integer ``(drow, dcol)`` of neighbour views (no centre).
    """
    drow, dcol = offsets[:, 0], offsets[:, 1]
    return torch.stack((dcol < 0, dcol > 0, drow < 0, drow > 0), dim=1)


def combine_groups(costs: Tensor, present: list[int], config: DisparityConfig) -> Tensor:
    """Occlusion-robust combination of per-group costs ``(B, G', P, H, W)`` -> ``(B, P, H, W)``.

    ``present`` lists the :data:`DIRECTION_GROUPS` index of each of the ``G'`` slices.
    """
    if config.occlusion == "none":
        return costs.mean(dim=1)
    if config.occlusion == "best":
        g = len(present)
        keep = config.occlusion_keep if config.occlusion_keep is not None else math.ceil(g / 2)
        return mean_of_smallest(costs, min(g, keep))
    per_axis = []  # "axis": min over the two sides of each epipolar axis, mean over the axes
    for side_a, side_b in AXES:
        sides = [costs[:, present.index(j)] for j in (side_a, side_b) if j in present]
        if sides:
            per_axis.append(sides[0] if len(sides) == 1 else torch.minimum(sides[0], sides[1]))
    out = per_axis[0].clone()
    for extra in per_axis[1:]:
        out.add_(extra)
    return out.div_(len(per_axis))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def check_inputs(views: Tensor, offsets: Tensor | Any, center_index: int) -> Tensor:
    """Validate and return offsets as a ``(N, 2)`` int64 CPU tensor."""
    if not isinstance(views, Tensor):
        raise TypeError(f"views: expected a torch.Tensor (B, N, 3, H, W), got {type(views).__name__}")
    if views.ndim != 5 or views.shape[2] != 3:
        raise ValueError(f"views: expected shape (B, N, 3, H, W), got {tuple(views.shape)}")
    b, n, _, h, w = views.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"views: empty batch or image, shape {tuple(views.shape)}")
    if n < 2:
        raise ValueError(f"views: need the centre and at least one neighbour (N >= 2), got N = {n}")
    if not (views.dtype.is_floating_point or views.dtype == torch.uint8):
        raise ValueError(f"views: expected a float tensor in [0, 1] (or uint8), got dtype {views.dtype}")
    off = torch.as_tensor(offsets)
    if off.dtype.is_floating_point or off.dtype.is_complex or off.dtype == torch.bool:
        raise ValueError(f"offsets: expected integer (drow, dcol) pairs, got dtype {off.dtype}")
    if off.ndim != 2 or off.shape[1] != 2 or off.shape[0] != n:
        raise ValueError(
            f"offsets: expected shape ({n}, 2) (drow, dcol) for N = {n} views, got {tuple(off.shape)}"
        )
    off = off.to(device="cpu", dtype=torch.int64)
    if not -n <= center_index < n:
        raise ValueError(f"center_index {center_index} out of range for N = {n} views")
    center_index %= n
    if off[center_index].tolist() != [0, 0]:
        raise ValueError(
            f"offsets[{center_index}] (the centre view) must be (0, 0), got {tuple(off[center_index].tolist())}"
        )
    zero = (off == 0).all(dim=1)
    if int(zero.sum()) != 1:
        raise ValueError(f"offsets: exactly one view may be the centre (0, 0), found {int(zero.sum())}")
    if torch.unique(off, dim=0).shape[0] != n:
        raise ValueError(f"offsets: duplicate (drow, dcol) entries in {off.tolist()}")
    return off


def as_float_images(views: Tensor) -> Tensor:
    if views.dtype == torch.uint8:
        return views.to(torch.float32) / 255.0
    out = views.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("views: contain NaN or inf values")
    return out


# ---------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------


def sample_grid(offsets: Tensor, planes: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Sampling grid of every (view, plane) pair and its validity.

    Args:
        offsets: ``(V, 2)`` float32 ``(drow, dcol)``; planes: ``(P,)`` float32 disparities.
    Returns:
        ``grid`` ``(V, P*H, W, 2)`` normalised ``grid_sample`` coordinates (``align_corners=False``) of
        ``(x - d*dcol, y - d*drow)``, and ``valid`` ``(V, P, H, W)`` bool (all bilinear taps inside the view).
    """
    v, p = offsets.shape[0], planes.shape[0]
    xs = torch.arange(w, dtype=torch.float32, device=planes.device)
    ys = torch.arange(h, dtype=torch.float32, device=planes.device)
    shift_x = planes[None, :] * offsets[:, 1:2]  # (V, P) px
    shift_y = planes[None, :] * offsets[:, 0:1]
    src_x = xs - shift_x[:, :, None, None]  # (V, P, 1, W)
    src_y = ys[:, None] - shift_y[:, :, None, None]  # (V, P, H, 1)
    valid = ((src_x >= -VALID_TOL_PX) & (src_x <= w - 1 + VALID_TOL_PX)) & (
        (src_y >= -VALID_TOL_PX) & (src_y <= h - 1 + VALID_TOL_PX)
    )
    # Normalised coordinate of pixel x is (2x + 1) / W - 1. The (x, y) pairs are built as complex numbers
    # x + iy: one contiguous broadcast subtraction, viewed as (..., 2) float32 without a copy.
    gy, gx = torch.meshgrid((2.0 * ys + 1.0) / h - 1.0, (2.0 * xs + 1.0) / w - 1.0, indexing="ij")
    shift = torch.complex(shift_x * (2.0 / w), shift_y * (2.0 / h))  # (V, P)
    grid = torch.view_as_real(torch.complex(gx, gy) - shift[:, :, None, None])  # (V, P, H, W, 2)
    return grid.reshape(v, p * h, w, 2), valid


def warp_planes(images: Tensor, grid: Tensor) -> Tensor:
    """Sample ``images`` ``(B, V, C, H, W)`` at ``grid`` ``(V, P*H, W, 2)`` -> ``(B, V, C, P, H, W)``."""
    b, v, c, h, w = images.shape
    ph = grid.shape[1]
    out = F.grid_sample(
        images.reshape(b * v, c, h, w),
        grid[None].expand(b, -1, -1, -1, -1).reshape(b * v, ph, w, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out.view(b, v, c, ph // h, h, w)


def matching_cost(
    warped: Tensor, center: Tensor, valid: Tensor, offsets: Tensor, config: DisparityConfig
) -> Tensor:
    """Per-view cost ``(B, V, P, H, W)`` of warped views ``(B, V, C, P, H, W)`` against ``center`` (B, C, H, W).

    ``(1 - alpha) * min(mean_c |I_v - I_c|, tau_color) + alpha * min(|grad g|, tau_grad)`` where ``g`` is
    the channel mean of ``I_v - I_c`` (the gradient of the difference is the difference of the gradients)
    and ``|grad g|`` its absolute central difference along the epipolar direction of each view (``offsets``
    ``(V, 2)`` (drow, dcol): x when ``dcol != 0``, y when ``drow != 0``, the sum of both for a diagonal
    view). Invalid samples (``valid`` ``(V, P, H, W)`` False) get the worst possible cost. ``warped`` is
    overwritten.
    """
    diff = warped.sub_(center[:, None, :, None])
    c = diff.shape[2]
    grey = diff.mean(dim=2) if config.alpha > 0 else None
    cost = diff.abs_().sum(dim=2)
    cost.clamp_(max=c * config.tau_color).mul_((1.0 - config.alpha) / c)
    if grey is not None:
        grad = torch.zeros_like(cost)  # |g(x+1) - g(x-1)| = 2 |central difference|
        written = False
        for axis, (dim, size) in enumerate(((-1, grey.shape[-1]), (-2, grey.shape[-2]))):
            along = offsets[:, 1 - axis] != 0  # x gradient for dcol != 0, y gradient for drow != 0
            if not bool(along.any()) or size < 3:
                continue
            inner = grad.narrow(dim, 1, size - 2)
            if bool(along.all()) and not written:
                torch.sub(grey.narrow(dim, 2, size - 2), grey.narrow(dim, 0, size - 2), out=inner).abs_()
                written = True
                continue
            written = True
            delta = (grey.narrow(dim, 2, size - 2) - grey.narrow(dim, 0, size - 2)).abs_()
            if not bool(along.all()):
                delta.mul_(along.to(delta)[None, :, None, None, None])
            inner.add_(delta)
        cost.add_(grad.clamp_(max=2.0 * config.tau_grad), alpha=0.5 * config.alpha)
    return cost.masked_fill_(~valid, worst_cost(config))


def worst_cost(config: DisparityConfig) -> float:
    return (1.0 - config.alpha) * config.tau_color + config.alpha * config.tau_grad


def mean_of_smallest(x: Tensor, keep: int) -> Tensor:
    """Mean of the ``keep`` smallest entries along dim 1 of ``x`` ``(B, G, ...)`` -> ``(B, ...)``."""
    g = x.shape[1]
    if keep >= g:
        return x.mean(dim=1)
    if keep == 1:
        return x.amin(dim=1)
    if keep == g - 1:
        return (x.sum(dim=1) - x.amax(dim=1)) / keep
    if g == 4 and keep == 2:  # sorting network: smallest + second smallest of four
        lo01, hi01 = torch.minimum(x[:, 0], x[:, 1]), torch.maximum(x[:, 0], x[:, 1])
        lo23, hi23 = torch.minimum(x[:, 2], x[:, 3]), torch.maximum(x[:, 2], x[:, 3])
        second = torch.minimum(torch.maximum(lo01, lo23), torch.minimum(hi01, hi23))
        return torch.minimum(lo01, lo23).add_(second).mul_(0.5)
    return x.topk(keep, dim=1, largest=False).values.mean(dim=1)


def chunk_sizes(b: int, v: int, h: int, w: int, c: int, config: DisparityConfig) -> tuple[int, int]:
    """(planes per chunk, views per step) so that the warped views of one step, ``(B, Vs, C, P, H, W)``
    float32, take at most ``config.chunk_mb`` (every other temporary is of that size or smaller)."""
    budget = int(config.chunk_mb * 2**20 / 4)  # float32 elements
    per_plane = b * h * w * c
    planes = max(1, min(config.num_planes, budget // per_plane))
    return planes, max(1, min(v, budget // (per_plane * planes)))


def prepare_views(views: Tensor, indices: list[int], config: DisparityConfig) -> Tensor:
    """Matching features of ``views[:, indices]``: float32, grey if asked, pre-smoothed; one view at a time
    so that no full float copy of the input is made. ``(B, N, 3, H, W)`` -> ``(B, len(indices), C, H, W)``."""
    b, _, _, h, w = views.shape
    c = 1 if config.features == "grey" else 3
    out = torch.empty(b, len(indices), c, h, w, device=views.device)
    for k, i in enumerate(indices):
        image = as_float_images(views[:, i])
        if c == 1:
            image = image.mean(dim=1, keepdim=True)
        out[:, k] = smooth_views(image, config.prefilter_radius, config.prefilter_eps)
    return out


def cost_volume(
    views: Tensor, center_index: int, others: list[int], offsets: Tensor, config: DisparityConfig
) -> tuple[Tensor, Tensor]:
    """Aggregated cost ``(B, D, H, W)`` and plane disparities ``(D,)`` of ``views`` ``(B, N, 3, H, W)``
    (centre at ``center_index``; neighbours ``others`` at ``offsets`` ``(V, 2)``)."""
    b, _, _, h, w = views.shape
    v = len(others)
    device = views.device
    planes = plane_disparities(config, device)
    all_groups = direction_groups(offsets)  # (V, 4) on the CPU
    present = all_groups.any(dim=0).nonzero()[:, 0].tolist()  # groups with at least one view
    groups = all_groups[:, present]  # (V, G)
    g = groups.shape[1]
    group_size = groups.sum(dim=0).tolist()
    guide = as_float_images(views[:, center_index])  # the aggregation is guided by the raw centre
    if not config.color_guide:
        guide = guide.mean(dim=1, keepdim=True)
    gf = GuidedFilter(guide, config.radius, config.eps, config.gf_subsample)
    center = prepare_views(views, [center_index], config)[:, 0]
    neighbours = prepare_views(views, others, config)
    off_f = offsets.to(device=device, dtype=torch.float32)
    chunk, vstep = chunk_sizes(b, v, h, w, neighbours.shape[2], config)
    volume = torch.empty(b, config.num_planes, h, w, device=device)
    for p0 in range(0, config.num_planes, chunk):
        pl = planes[p0 : p0 + chunk]
        sums = torch.zeros(b, g, pl.shape[0], h, w, device=device)
        for v0 in range(0, v, vstep):
            grid, valid = sample_grid(off_f[v0 : v0 + vstep], pl, h, w)
            warped = warp_planes(neighbours[:, v0 : v0 + vstep], grid)
            cost = matching_cost(warped, center, valid, off_f[v0 : v0 + vstep], config)
            for k in range(cost.shape[1]):
                for j in groups[v0 + k].nonzero()[:, 0].tolist():
                    sums[:, j] += cost[:, k]
        for j in range(g):
            sums[:, j] /= group_size[j]
        volume[:, p0 : p0 + pl.shape[0]] = gf(combine_groups(sums, present, config))
    return volume, planes
