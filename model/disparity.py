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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from dataset.lightfield import LightFieldLayout

__all__ = [
    "DEFAULT_DISPARITY_CONFIG",
    "DIRECTION_GROUPS",
    "OCCLUSION_MODES",
    "DisparityConfig",
    "block_matching_baseline",
    "config_overrides",
    "direction_groups",
    "disparity_for_scene",
    "estimate_disparity",
    "plane_disparities",
    "view_set_offsets",
]

_VALID_TOL_PX = 1e-3
#: Direction groups of :func:`direction_groups`, in column order, and the two epipolar axes they form.
DIRECTION_GROUPS: tuple[str, ...] = ("left", "right", "up", "down")
_AXES: tuple[tuple[int, int], ...] = ((0, 1), (2, 3))
#: Ways to combine the direction groups (see :class:`DisparityConfig`).
OCCLUSION_MODES: tuple[str, ...] = ("axis", "best", "none")


@dataclass(frozen=True)
class DisparityConfig:
    """Every setting of :func:`estimate_disparity`; the defaults live here and nowhere else.

    The defaults were chosen on the synthetic benchmark (``docs/DISPARITY.md``); the ones to revisit for
    noisier real captures are ``tau_color`` / ``tau_grad`` (raise them) and ``prefilter_eps``.

    Attributes:
        d_min, d_max: swept disparity range in px between adjacent views (inclusive). ``[-1, 2]`` covers
            UrbanLF-Syn (GT in about ``[-0.5, 1.6]``) with margin on both sides and the small disparities
            of plenoptic (Lytro Illum, UrbanLF-Real) captures; widen it for other data.
        num_planes: planes in ``[d_min, d_max]`` (41 = a 0.075 px step; the parabola fit does the rest).
        views: which views :func:`disparity_for_scene` loads (:func:`view_set_offsets`): ``"cross"`` (centre
            row and column: 16 neighbours on 9x9), ``"full"`` (whole grid), ``"4"``, ``"8"``, ``"cross2"``,
            or a list like ``"5_1,5_9,1_5,9_5"``. :func:`estimate_disparity` uses the views it is given.
        features: ``"rgb"`` or ``"grey"`` (channel mean; about 2x faster, a little less accurate) matching.
        prefilter_radius, prefilter_eps: edge-preserving pre-smoothing of every view (self-guided filter,
            window ``2r + 1``): variations with a local variance well below ``eps`` (8-bit quantisation
            steps, sensor noise) are averaged out, edges and texture stronger than ``sqrt(eps)`` (~8 grey
            levels) are kept. Removes the pull of quantised low-contrast texture towards integer shifts.
            ``prefilter_radius = 0`` disables it.
        alpha: weight of the gradient term of the matching cost (the colour term gets ``1 - alpha``).
        tau_color: truncation of the colour difference (channel mean; images in [0, 1]).
        tau_grad: truncation of the gradient difference.
        radius: guided-filter (cost aggregation) window radius at full resolution (window ``2r + 1``).
        eps: guided-filter regulariser (larger = smoother, less edge-aware).
        color_guide: colour (3x3 covariance) guided filter; False = grey guide.
        gf_subsample: the guided filter's coefficients are computed at ``1 / gf_subsample`` resolution
            (fast guided filter); 1 = exact.
        occlusion: combination of the direction groups: ``"axis"`` (per axis the better side, mean of the
            axes; default), ``"best"`` (mean of the ``occlusion_keep`` best groups) or ``"none"`` (mean).
        occlusion_keep: for ``occlusion="best"``: groups kept per pixel; ``None`` = half, rounded up.
        subpixel: parabola refinement of the winning plane.
        median: size of an optional final median filter (odd; 1 = off).
        chunk_mb: size of the largest temporary of the sweep (the planes of one chunk are processed
            together, one or a few views at a time). Peak memory is about ``10 * chunk_mb`` plus the
            ``(B, num_planes, H, W)`` float32 cost volume (50 MB at 640x480); small chunks are also fast on
            the CPU, where glibc recycles freed blocks below 32 MB instead of page-faulting fresh ones.
    """

    d_min: float = -1.0
    d_max: float = 2.0
    num_planes: int = 41
    views: str = "cross"
    features: str = "rgb"
    prefilter_radius: int = 2
    prefilter_eps: float = 1e-3
    alpha: float = 0.1
    tau_color: float = 0.01
    tau_grad: float = 0.005
    radius: int = 7
    eps: float = 1e-4
    color_guide: bool = True
    gf_subsample: int = 2
    occlusion: str = "axis"
    occlusion_keep: int | None = None
    subpixel: bool = True
    median: int = 1
    chunk_mb: float = 24.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.d_min) and math.isfinite(self.d_max) and self.d_min < self.d_max):
            raise ValueError(f"DisparityConfig: need finite d_min < d_max, got {self.d_min}, {self.d_max}")
        if self.num_planes < 3:
            raise ValueError(f"DisparityConfig: num_planes must be >= 3, got {self.num_planes}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DisparityConfig: alpha must be in [0, 1], got {self.alpha}")
        if self.tau_color <= 0 or self.tau_grad <= 0 or self.eps <= 0:
            raise ValueError(
                "DisparityConfig: tau_color, tau_grad and eps must be > 0, got "
                f"{self.tau_color}, {self.tau_grad}, {self.eps}"
            )
        if self.gf_subsample < 1:
            raise ValueError(f"DisparityConfig: gf_subsample must be >= 1, got {self.gf_subsample}")
        if self.radius < 1:
            raise ValueError(f"DisparityConfig: radius must be >= 1, got {self.radius}")
        if self.occlusion not in OCCLUSION_MODES:
            raise ValueError(
                f"DisparityConfig: occlusion must be one of {OCCLUSION_MODES}, got {self.occlusion!r}"
            )
        if self.occlusion_keep is not None and self.occlusion_keep < 1:
            raise ValueError(
                f"DisparityConfig: occlusion_keep must be >= 1 or None, got {self.occlusion_keep}"
            )
        if self.median < 1 or self.median % 2 == 0:
            raise ValueError(f"DisparityConfig: median must be odd and >= 1, got {self.median}")
        if self.features not in ("rgb", "grey"):
            raise ValueError(f"DisparityConfig: features must be 'rgb' or 'grey', got {self.features!r}")
        if self.prefilter_radius < 0 or self.prefilter_eps <= 0:
            raise ValueError(
                "DisparityConfig: need prefilter_radius >= 0 and prefilter_eps > 0, got "
                f"{self.prefilter_radius}, {self.prefilter_eps}"
            )
        if not self.chunk_mb > 0:
            raise ValueError(f"DisparityConfig: chunk_mb must be > 0, got {self.chunk_mb}")

    @property
    def step(self) -> float:
        """Spacing of the planes in px."""
        return (self.d_max - self.d_min) / (self.num_planes - 1)


#: The defaults, for callers that want to read them.
DEFAULT_DISPARITY_CONFIG = DisparityConfig()

_PARSERS: dict[str, Any] = {"float": float, "int": int, "str": str}


def config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["tau_color=0.02", "occlusion=best", "occlusion_keep=none"]`` into typed field overrides.

    For command lines (``--set KEY=VALUE``). Raises ``ValueError`` naming an unknown field or a value of
    the wrong type.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(DisparityConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in types:
            raise ValueError(f"bad option {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.lower() in ("true", "1")
            elif kind.endswith("| None") and text.lower() == "none":
                out[key] = None
            else:
                out[key] = _PARSERS[kind.split("|")[0].strip()](text)
        except ValueError:
            raise ValueError(f"bad option {item!r}: {key} expects {kind}") from None
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The estimator's command-line options (``--views``, ``--d_min``, ``--d_max``, ``--num_planes`` and a
    repeatable ``--set KEY=VALUE`` for any other field), defaults from :class:`DisparityConfig`."""
    d = DEFAULT_DISPARITY_CONFIG
    parser.add_argument("--d_min", type=float, default=d.d_min, help="smallest swept disparity (px)")
    parser.add_argument("--d_max", type=float, default=d.d_max, help="largest swept disparity (px)")
    parser.add_argument("--num_planes", type=int, default=d.num_planes, help="planes in [d_min, d_max]")
    parser.add_argument(
        "--views", default=d.views, help="view set: cross | full | 4 | 8 | cross2 | '5_1,5_9,...'"
    )
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other DisparityConfig field, e.g. --set tau_color=0.02 (repeatable)",
    )


def config_from_arguments(args: argparse.Namespace) -> DisparityConfig:
    """The :class:`DisparityConfig` of options added by :func:`add_config_arguments`. Raises ``ValueError``
    (or ``TypeError``) naming a bad field or value."""
    return DisparityConfig(
        d_min=args.d_min,
        d_max=args.d_max,
        num_planes=args.num_planes,
        views=args.views,
        **config_overrides(args.options),
    )


def plane_disparities(config: DisparityConfig, device: torch.device | str = "cpu") -> Tensor:
    """``(num_planes,)`` float32 disparities of the sweep, ``d_min`` .. ``d_max`` inclusive."""
    return torch.linspace(config.d_min, config.d_max, config.num_planes, dtype=torch.float32, device=device)


def view_set_offsets(spec: str, center: tuple[int, int] = (5, 5)) -> tuple[tuple[int, int], ...]:
    """Neighbour offsets ``(drow, dcol)`` (centre excluded) of a view-set spec.

    ``"cross"``: the centre row and column of the ``(2c-1) x (2c-1)`` grid (``c`` = centre index, 1-based);
    ``"full"``: every view of that grid; anything else goes to ``dataset.lightfield.parse_views`` (``"4"``,
    ``"8"``, ``"cross2"`` or ``"5_1,5_9,..."``). Raises ``ValueError`` on an unknown spec.
    """
    from dataset.lightfield import LightFieldLayout, parse_views

    reach_r, reach_c = center[0] - 1, center[1] - 1
    name = spec.strip()
    if name == "cross":
        horiz = [(0, k) for k in range(-reach_c, reach_c + 1) if k]
        vert = [(k, 0) for k in range(-reach_r, reach_r + 1) if k]
        return tuple(horiz + vert)
    if name == "full":
        return tuple(
            (r, q)
            for r in range(-reach_r, reach_r + 1)
            for q in range(-reach_c, reach_c + 1)
            if (r, q) != (0, 0)
        )
    return parse_views(name, LightFieldLayout(center=center))


def direction_groups(offsets: Tensor) -> Tensor:
    """``(V, 4)`` bool membership of each view in the groups left / right / up / down.

    A view is *left* when ``dcol < 0``, *right* when ``dcol > 0``, *up* when ``drow < 0`` and *down* when
    ``drow > 0``, so a diagonal view belongs to two groups.

    Args:
        offsets: ``(V, 2)`` integer ``(drow, dcol)`` of neighbour views (no centre).
    """
    drow, dcol = offsets[:, 0], offsets[:, 1]
    return torch.stack((dcol < 0, dcol > 0, drow < 0, drow > 0), dim=1)


def _combine_groups(costs: Tensor, present: list[int], config: DisparityConfig) -> Tensor:
    """Occlusion-robust combination of per-group costs ``(B, G', P, H, W)`` -> ``(B, P, H, W)``.

    ``present`` lists the :data:`DIRECTION_GROUPS` index of each of the ``G'`` slices.
    """
    if config.occlusion == "none":
        return costs.mean(dim=1)
    if config.occlusion == "best":
        g = len(present)
        keep = config.occlusion_keep if config.occlusion_keep is not None else math.ceil(g / 2)
        return _mean_of_smallest(costs, min(g, keep))
    per_axis = []  # "axis": min over the two sides of each epipolar axis, mean over the axes
    for side_a, side_b in _AXES:
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


def _check_inputs(views: Tensor, offsets: Tensor | Any, center_index: int) -> Tensor:
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


def _as_float_images(views: Tensor) -> Tensor:
    if views.dtype == torch.uint8:
        return views.to(torch.float32) / 255.0
    out = views.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("views: contain NaN or inf values")
    return out


# ---------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------


def _box_sum_1d(x: Tensor, r: int, dim: int) -> Tensor:
    """Sum over a window of ``2r + 1`` along ``dim`` (zero padding), via a cumulative sum."""
    n = x.shape[dim]
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [r + 1, r]
    c = F.pad(x, pad).cumsum(dim)
    return c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)


def _box_mean(x: Tensor, r: int, inv_count: Tensor) -> Tensor:
    """Mean over the in-image part of a ``(2r+1)^2`` window of the last two dims of ``x``."""
    return _box_sum_1d(_box_sum_1d(x, r, -2), r, -1) * inv_count


def _inv_count(h: int, w: int, r: int, device: torch.device) -> Tensor:
    ones = torch.ones(1, 1, h, w, device=device)
    return 1.0 / _box_sum_1d(_box_sum_1d(ones, r, -2), r, -1)


class _GuidedFilter:
    """He et al.'s guided filter with a fixed guide ``(B, C, H, W)`` (C = 1 or 3), applied to ``(B, S, H, W)``.

    With ``subsample = s > 1`` it is the *fast* guided filter (He & Sun 2015): the linear coefficients are
    computed on ``s``-times area-downsampled inputs with radius ``round(radius / s)`` and bilinearly
    upsampled before they are applied to the full-resolution guide.
    """

    def __init__(self, guide: Tensor, radius: int, eps: float, subsample: int = 1) -> None:
        c, h, w = guide.shape[1:]
        self.full_hw = (h, w)
        self.small_hw = (max(1, -(-h // subsample)), max(1, -(-w // subsample)))
        self.r = max(1, round(radius / subsample))
        self.guide = guide
        small = self._down(guide)
        self.inv_n = _inv_count(*self.small_hw, self.r, guide.device)
        self.mean_i = _box_mean(small, self.r, self.inv_n)  # (B, C, h, w)
        if c == 1:
            var = _box_mean(small * small, self.r, self.inv_n) - self.mean_i**2
            self.inv = (1.0 / (var + eps))[:, :, None]  # (B, 1, 1, h, w)
        else:
            prod = small[:, :, None] * small[:, None, :]  # (B, 3, 3, h, w)
            corr = _box_mean(prod.flatten(1, 2), self.r, self.inv_n).reshape(prod.shape)
            cov = corr - self.mean_i[:, :, None] * self.mean_i[:, None, :]
            cov = cov + eps * torch.eye(c, device=guide.device)[None, :, :, None, None]
            inv = torch.linalg.inv(cov.permute(0, 3, 4, 1, 2))  # (B, h, w, 3, 3)
            self.inv = inv.permute(0, 3, 4, 1, 2).contiguous()  # (B, 3, 3, h, w)

    def _down(self, x: Tensor) -> Tensor:
        if self.small_hw == self.full_hw:
            return x
        return F.adaptive_avg_pool2d(x.flatten(0, -3), self.small_hw).unflatten(0, x.shape[:-2])

    def _up(self, x: Tensor) -> Tensor:
        if self.small_hw == self.full_hw:
            return x
        out = F.interpolate(x.flatten(0, -3)[None], size=self.full_hw, mode="bilinear", align_corners=False)
        return out[0].unflatten(0, x.shape[:-2])

    def __call__(self, p: Tensor) -> Tensor:
        """Filter ``p`` ``(B, S, H, W)`` slice by slice -> ``(B, S, H, W)``."""
        r, inv_n = self.r, self.inv_n
        small_p = self._down(p)
        mean_p = _box_mean(small_p, r, inv_n)  # (B, S, h, w)
        mi = self.mean_i[:, :, None]  # (B, C, 1, h, w)
        mean_ip = _box_mean(
            self._down(self.guide)[:, :, None] * small_p[:, None], r, inv_n
        )  # (B, C, S, h, w)
        cov_ip = mean_ip - mi * mean_p[:, None]
        if self.guide.shape[1] == 1:
            a = cov_ip * self.inv  # (B, 1, S, h, w)
        else:
            a = (self.inv[:, :, :, None] * cov_ip[:, None]).sum(dim=2)  # (B, 3, S, h, w)
        bias = mean_p - (a * mi).sum(dim=1)
        mean_a = self._up(_box_mean(a, r, inv_n))  # (B, C, S, H, W)
        return (mean_a * self.guide[:, :, None]).sum(dim=1) + self._up(_box_mean(bias, r, inv_n))


def _median(x: Tensor, k: int) -> Tensor:
    """``k x k`` median filter of ``(B, H, W)`` with replicate padding."""
    pad = k // 2
    patches = F.unfold(F.pad(x[:, None], (pad, pad, pad, pad), mode="replicate"), k)  # (B, k*k, H*W)
    return patches.median(dim=1).values.reshape(x.shape)


def _smooth(images: Tensor, radius: int, eps: float) -> Tensor:
    """Edge-preserving smoothing: self-guided filter of each channel of ``images`` (..., H, W).

    Variations with a local variance well below ``eps`` (uint8 quantisation steps, sensor noise) are
    averaged over a ``2r + 1`` window; stronger edges and textures are kept. Shift-invariant, so it commutes
    with the view-to-centre translations of the sweep.
    """
    if radius == 0:
        return images
    shape = images.shape
    flat = images.reshape(-1, shape[-3], shape[-2], shape[-1])
    inv_n = _inv_count(shape[-2], shape[-1], radius, images.device)[0]
    out = torch.empty_like(flat)
    for i, x in enumerate(flat):  # one image at a time keeps the temporaries small
        mean = _box_mean(x, radius, inv_n)
        var = _box_mean(x * x, radius, inv_n) - mean * mean
        a = var / (var + eps)
        b = mean - a * mean
        out[i] = _box_mean(a, radius, inv_n) * x + _box_mean(b, radius, inv_n)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Plane sweep
# ---------------------------------------------------------------------------------------------------


def _sample_grid(offsets: Tensor, planes: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
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
    valid = ((src_x >= -_VALID_TOL_PX) & (src_x <= w - 1 + _VALID_TOL_PX)) & (
        (src_y >= -_VALID_TOL_PX) & (src_y <= h - 1 + _VALID_TOL_PX)
    )
    # Normalised coordinate of pixel x is (2x + 1) / W - 1. The (x, y) pairs are built as complex numbers
    # x + iy: one contiguous broadcast subtraction, viewed as (..., 2) float32 without a copy.
    gy, gx = torch.meshgrid((2.0 * ys + 1.0) / h - 1.0, (2.0 * xs + 1.0) / w - 1.0, indexing="ij")
    shift = torch.complex(shift_x * (2.0 / w), shift_y * (2.0 / h))  # (V, P)
    grid = torch.view_as_real(torch.complex(gx, gy) - shift[:, :, None, None])  # (V, P, H, W, 2)
    return grid.reshape(v, p * h, w, 2), valid


def _warp_planes(images: Tensor, grid: Tensor) -> Tensor:
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


def _matching_cost(
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
    return cost.masked_fill_(~valid, _worst_cost(config))


def _worst_cost(config: DisparityConfig) -> float:
    return (1.0 - config.alpha) * config.tau_color + config.alpha * config.tau_grad


def _mean_of_smallest(x: Tensor, keep: int) -> Tensor:
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


def _chunk_sizes(b: int, v: int, h: int, w: int, c: int, config: DisparityConfig) -> tuple[int, int]:
    """(planes per chunk, views per step) so that the warped views of one step, ``(B, Vs, C, P, H, W)``
    float32, take at most ``config.chunk_mb`` (every other temporary is of that size or smaller)."""
    budget = int(config.chunk_mb * 2**20 / 4)  # float32 elements
    per_plane = b * h * w * c
    planes = max(1, min(config.num_planes, budget // per_plane))
    return planes, max(1, min(v, budget // (per_plane * planes)))


def _prepare_views(views: Tensor, indices: list[int], config: DisparityConfig) -> Tensor:
    """Matching features of ``views[:, indices]``: float32, grey if asked, pre-smoothed; one view at a time
    so that no full float copy of the input is made. ``(B, N, 3, H, W)`` -> ``(B, len(indices), C, H, W)``."""
    b, _, _, h, w = views.shape
    c = 1 if config.features == "grey" else 3
    out = torch.empty(b, len(indices), c, h, w, device=views.device)
    for k, i in enumerate(indices):
        image = _as_float_images(views[:, i])
        if c == 1:
            image = image.mean(dim=1, keepdim=True)
        out[:, k] = _smooth(image, config.prefilter_radius, config.prefilter_eps)
    return out


def _cost_volume(
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
    guide = _as_float_images(views[:, center_index])  # the aggregation is guided by the raw centre
    if not config.color_guide:
        guide = guide.mean(dim=1, keepdim=True)
    gf = _GuidedFilter(guide, config.radius, config.eps, config.gf_subsample)
    center = _prepare_views(views, [center_index], config)[:, 0]
    neighbours = _prepare_views(views, others, config)
    off_f = offsets.to(device=device, dtype=torch.float32)
    chunk, vstep = _chunk_sizes(b, v, h, w, neighbours.shape[2], config)
    volume = torch.empty(b, config.num_planes, h, w, device=device)
    for p0 in range(0, config.num_planes, chunk):
        pl = planes[p0 : p0 + chunk]
        sums = torch.zeros(b, g, pl.shape[0], h, w, device=device)
        for v0 in range(0, v, vstep):
            grid, valid = _sample_grid(off_f[v0 : v0 + vstep], pl, h, w)
            warped = _warp_planes(neighbours[:, v0 : v0 + vstep], grid)
            cost = _matching_cost(warped, center, valid, off_f[v0 : v0 + vstep], config)
            for k in range(cost.shape[1]):
                for j in groups[v0 + k].nonzero()[:, 0].tolist():
                    sums[:, j] += cost[:, k]
        for j in range(g):
            sums[:, j] /= group_size[j]
        volume[:, p0 : p0 + pl.shape[0]] = gf(_combine_groups(sums, present, config))
    return volume, planes


def _winner_takes_all(volume: Tensor, planes: Tensor, subpixel: bool) -> Tensor:
    """Argmin over planes with optional parabola refinement; ``(B, D, H, W)`` -> ``(B, H, W)``."""
    d = volume.shape[1]
    idx = volume.argmin(dim=1, keepdim=True)  # (B, 1, H, W)
    disparity = planes[idx[:, 0]]
    if not subpixel:
        return disparity
    lo = (idx - 1).clamp(min=0)
    hi = (idx + 1).clamp(max=d - 1)
    c0 = volume.gather(1, idx)[:, 0]
    cm = volume.gather(1, lo)[:, 0]
    cp = volume.gather(1, hi)[:, 0]
    curv = cm - 2.0 * c0 + cp
    interior = (idx[:, 0] > 0) & (idx[:, 0] < d - 1) & (curv > 1e-12)
    delta = torch.where(interior, 0.5 * (cm - cp) / curv.clamp(min=1e-12), torch.zeros_like(c0))
    step = float(planes[1] - planes[0])
    return disparity + delta.clamp(-0.5, 0.5) * step


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
    off = _check_inputs(views, offsets, center_index)
    center_index %= views.shape[1]
    others = [i for i in range(views.shape[1]) if i != center_index]
    with torch.no_grad():
        volume, planes = _cost_volume(views, center_index, others, off[others], config)
        disparity = _winner_takes_all(volume, planes, config.subpixel)
        if config.median > 1:
            disparity = _median(disparity, config.median)
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
    c32, v32 = _as_float_images(center), _as_float_images(view)
    planes = plane_disparities(cfg, center.device)
    off = torch.tensor([offset], dtype=torch.float32, device=center.device)
    b, _, h, w = c32.shape
    inv_n = _inv_count(h, w, window // 2, center.device)
    volume = torch.empty(b, num_planes, h, w, device=center.device)
    chunk, _ = _chunk_sizes(b, 1, h, w, 3, cfg)
    with torch.no_grad():
        for p0 in range(0, num_planes, chunk):
            pl = planes[p0 : p0 + chunk]
            grid, _ = _sample_grid(off, pl, h, w)
            warped = _warp_planes(v32[:, None], grid)[:, 0]  # (B, 3, P, H, W)
            sad = (warped - c32[:, :, None]).abs().sum(dim=1)  # (B, P, H, W)
            volume[:, p0 : p0 + pl.shape[0]] = _box_mean(sad, window // 2, inv_n)
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
    from dataset.lightfield import DEFAULT_LAYOUT, load_light_field

    layout = layout or DEFAULT_LAYOUT
    config = config or DEFAULT_DISPARITY_CONFIG
    offsets = view_set_offsets(config.views, layout.center)
    sample = load_light_field(scene_dir, offsets, layout, with_disparity=False)
    images = np.concatenate([sample.center[None], sample.views])  # (N, H, W, 3) uint8, centre first
    views = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)[None]  # (1, N, 3, H, W)
    all_offsets = torch.tensor([(0, 0), *offsets], dtype=torch.int64)
    disparity = estimate_disparity(views, all_offsets, 0, config)
    return disparity[0].cpu().numpy().astype(np.float32, copy=False)
