"""Center Angular Aggregation Module (CAAM): warp neighbouring sub-aperture views to the centre view.

Geometry convention (UrbanLF / OAVC, and our synthetic generator)
-----------------------------------------------------------------
* Views are named ``<row>_<col>``, 1-based, centre ``5_5``; ``5_4`` is left of the centre, ``4_5`` above
  it. A view is addressed here by its offset ``(drow, dcol) = (row - 5, col - 5)``.
* ``d`` = disparity of the centre view, in pixels between adjacent views; larger ``d`` = nearer.
* A point at ``(x, y)`` in the centre view appears in view ``(row, col)`` at
  ``(x - d * dcol, y - d * drow)``. Hence the centre pixel ``(x, y)`` is *sampled* from neighbour ``v`` at
  ``(x - d * dcol_v, y - d * drow_v)`` (bilinear).
* Pixel coordinates are pixel centres: pixel ``(i, j)`` (column i, row j, 0-based) sits at ``x = i``,
  ``y = j``. ``grid_sample`` is always called with ``align_corners=False``, for which the normalised
  coordinate of ``x`` is ``(2x + 1) / W - 1`` (and likewise for ``y`` with ``H``).
* All grid arithmetic is float32, whatever the image dtype (a bf16 grid is off by whole pixels at
  x ≈ 500). Images are sampled in float32 and the result is cast back to the input dtype.
* A sample is *valid* when all four bilinear taps lie inside the image, i.e.
  ``0 <= x_src <= W - 1`` and ``0 <= y_src <= H - 1`` (with a 1e-3 px tolerance for rounding), and the
  disparity is finite. Invalid samples read as zeros (``padding_mode="zeros"``) and are excluded from the
  aggregation by per-pixel renormalisation, so image borders are never darkened.

Resizing: disparity is measured in pixels of the resolution it was estimated at. When views are resized
from ``(H0, W0)`` to ``(H1, W1)``, the shift in the new pixels is ``d * W1/W0`` along x and ``d * H1/H0``
along y. :func:`rescale_disparity` resizes the map and returns these factors as ``scale_xy = (sx, sy)``,
which :func:`warp_to_center` and :class:`CAAM` apply (x shift = ``d*sx*dcol``, y shift = ``d*sy*drow``);
this handles anisotropic resizes, which a single rescaled disparity value cannot.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.options import CAAM_MODES
from utils.views import NEIGHBOURHOODS

CENTER_VIEW: tuple[int, int] = (5, 5)
#: (drow, dcol) of the four direct neighbours, in the order 5_4, 5_6, 4_5, 6_5.
DEFAULT_NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = NEIGHBOURHOODS["4"]

_VALID_TOL_PX = 1e-3
_GRID_CACHE_MAX = 16
_grid_cache: OrderedDict[tuple[int, int, str, int | None], Tensor] = OrderedDict()
_grid_cache_stats = {"hits": 0, "misses": 0}


def offsets_from_view_names(
    names: Sequence[str], center: tuple[int, int] = CENTER_VIEW
) -> list[tuple[int, int]]:
    """``["5_4", "4_5"]`` -> ``[(0, -1), (-1, 0)]``: view names ``<row>_<col>`` to ``(drow, dcol)``."""
    offsets = []
    for name in names:
        parts = str(name).split("_")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"view name must look like '<row>_<col>' (e.g. '5_4'), got {name!r}")
        offsets.append((int(parts[0]) - center[0], int(parts[1]) - center[1]))
    return offsets


def grid_cache_info() -> dict[str, int]:
    """Counters of the base-pixel-grid cache: ``{"hits", "misses", "size"}``."""
    return {**_grid_cache_stats, "size": len(_grid_cache)}


def clear_grid_cache() -> None:
    """Empty the base-pixel-grid cache and reset its counters."""
    _grid_cache.clear()
    _grid_cache_stats.update(hits=0, misses=0)


def _base_pixel_grid(height: int, width: int, device: torch.device) -> Tensor:
    """Pixel-centre coordinates ``(2, H, W)`` float32: ``[0]`` = x (column), ``[1]`` = y (row). Cached.

    The returned tensor is shared between callers; never modify it in place.
    """
    key = (height, width, device.type, device.index)
    grid = _grid_cache.get(key)
    if grid is not None:
        _grid_cache.move_to_end(key)
        _grid_cache_stats["hits"] += 1
        return grid
    _grid_cache_stats["misses"] += 1
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((grid_x, grid_y))
    _grid_cache[key] = grid
    while len(_grid_cache) > _GRID_CACHE_MAX:
        _grid_cache.popitem(last=False)
    return grid


def _as_offsets(offsets: Tensor | Sequence[Sequence[int]], num_views: int, device: torch.device) -> Tensor:
    """Validate ``offsets`` ``(V, 2)`` (drow, dcol) and return them as float32 on ``device``."""
    off = torch.as_tensor(offsets)
    if off.dtype.is_floating_point or off.dtype == torch.bool or off.dtype.is_complex:
        raise ValueError(f"offsets must be integer (drow, dcol) pairs, got dtype {off.dtype}")
    if off.ndim != 2 or off.shape[1] != 2 or off.shape[0] != num_views:
        raise ValueError(f"offsets: expected shape ({num_views}, 2) (drow, dcol), got {tuple(off.shape)}")
    return off.to(device=device, dtype=torch.float32)


def _check_views_and_disparity(views: Tensor, disparity_px: Tensor) -> tuple[int, int, int, int, int]:
    if views.ndim != 5:
        raise ValueError(f"views: expected shape (B, V, C, H, W), got {tuple(views.shape)}")
    b, v, c, h, w = views.shape
    if v == 0:
        raise ValueError("views: expected at least one neighbour view, got V = 0")
    if tuple(disparity_px.shape) != (b, h, w):
        raise ValueError(
            f"disparity_px: expected shape {(b, h, w)} (B, H, W), got {tuple(disparity_px.shape)}"
        )
    return b, v, c, h, w


def _warp_float32(
    views: Tensor, disparity_px: Tensor, offsets_f32: Tensor, scale_xy: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """Core of :func:`warp_to_center` without validation; returns float32 ``(B, V, C, H, W)`` + valid."""
    b, v, c, h, w = views.shape
    base = _base_pixel_grid(h, w, views.device)
    disp = disparity_px.to(device=views.device, dtype=torch.float32)
    finite = torch.isfinite(disp)
    disp = torch.where(finite, disp, torch.zeros((), dtype=torch.float32, device=views.device))
    shift_x = offsets_f32[:, 1] * float(scale_xy[0])  # (V,) px per unit disparity
    shift_y = offsets_f32[:, 0] * float(scale_xy[1])
    src_x = base[0] - disp[:, None] * shift_x[None, :, None, None]  # (B, V, H, W)
    src_y = base[1] - disp[:, None] * shift_y[None, :, None, None]
    valid = (
        (src_x >= -_VALID_TOL_PX)
        & (src_x <= w - 1 + _VALID_TOL_PX)
        & (src_y >= -_VALID_TOL_PX)
        & (src_y <= h - 1 + _VALID_TOL_PX)
        & finite[:, None]
    )
    grid = torch.stack(((2.0 * src_x + 1.0) / w - 1.0, (2.0 * src_y + 1.0) / h - 1.0), dim=-1)
    sampled = F.grid_sample(
        views.reshape(b * v, c, h, w).to(torch.float32),
        grid.reshape(b * v, h, w, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return sampled.reshape(b, v, c, h, w), valid[:, :, None]


def warp_to_center(
    views: Tensor,
    disparity_px: Tensor,
    offsets: Tensor | Sequence[Sequence[int]],
    *,
    scale_xy: tuple[float, float] = (1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Warp neighbour views onto the centre view (bilinear, one batched ``grid_sample``).

    Args:
        views: ``(B, V, C, H, W)`` neighbour views, any float dtype.
        disparity_px: ``(B, H, W)`` centre-view disparity in pixels between adjacent views (see the
            module docstring for the sign convention); non-finite values give invalid samples.
        offsets: ``(V, 2)`` integer ``(drow, dcol)`` of each view relative to the centre.
        scale_xy: ``(sx, sy)`` factors from disparity pixels to view pixels (see
            :func:`rescale_disparity`); x shift = ``d*sx*dcol``, y shift = ``d*sy*drow``.

    Returns:
        ``(warped, valid)``: ``warped`` ``(B, V, C, H, W)`` in ``views.dtype`` (zeros where invalid) and
        ``valid`` ``(B, V, 1, H, W)`` bool, True where every bilinear tap is inside the view.
    """
    _check_views_and_disparity(views, disparity_px)
    off = _as_offsets(offsets, views.shape[1], views.device)
    warped, valid = _warp_float32(views, disparity_px, off, scale_xy)
    return warped.to(views.dtype), valid


def disparity_scale_xy(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[float, float]:
    """``(sx, sy) = (W_dst / W_src, H_dst / H_src)``: disparity-pixel to resized-pixel factors."""
    (h0, w0), (h1, w1) = src_hw, dst_hw
    if min(h0, w0, h1, w1) <= 0:
        raise ValueError(f"sizes must be positive, got src_hw={src_hw}, dst_hw={dst_hw}")
    return (w1 / w0, h1 / h0)


def rescale_disparity(
    disparity_px: Tensor,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    *,
    mode: str = "bilinear",
) -> tuple[Tensor, tuple[float, float]]:
    """Resize a disparity map along with its views, keeping its values in *source* pixels.

    Args:
        disparity_px: ``(B, H_src, W_src)`` disparity in source pixels.
        src_hw: ``(H_src, W_src)`` the resolution the disparity was measured at.
        dst_hw: ``(H_dst, W_dst)`` the resolution of the resized views.
        mode: ``F.interpolate`` mode for the map (``bilinear``, ``nearest``, ``area``, ...).

    Returns:
        ``(disparity, scale_xy)``: the map resampled to ``(B, H_dst, W_dst)`` (float32, values still in
        source pixels) and ``scale_xy = (W_dst/W_src, H_dst/H_src)`` to pass to :func:`warp_to_center` or
        :meth:`CAAM.forward`. For an isotropic resize ``disparity * sx`` is the disparity in new pixels.
    """
    if disparity_px.ndim != 3 or tuple(disparity_px.shape[1:]) != tuple(src_hw):
        raise ValueError(
            f"disparity_px: expected shape (B, {src_hw[0]}, {src_hw[1]}), got {tuple(disparity_px.shape)}"
        )
    scale_xy = disparity_scale_xy(src_hw, dst_hw)
    disp = disparity_px.to(torch.float32)
    if tuple(src_hw) != tuple(dst_hw):
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        disp = F.interpolate(disp[:, None], size=tuple(dst_hw), mode=mode, **kwargs)[:, 0]
    return disp, scale_xy


class CAAM(nn.Module):
    """Aggregate the centre view with neighbours warped to it by the centre disparity.

    Modes:
        ``fixed``: centre ``center_weight`` (0.6 in the paper), the rest split equally over the V
            neighbours (0.1 each for four).
        ``learned``: softmax of learnable logits over (centre, neighbours), initialised to the fixed
            weights.
        ``occlusion``: per pixel, neighbour ``v`` gets ``fixed_v * exp(-err_v / tau)`` with ``err_v`` the
            channel-mean ``|warped_v - centre| / value_range``; the centre keeps ``center_weight``.
            ``tau`` is a fraction of ``value_range`` (images in [0, 1] -> ``value_range=1``; 0–255 -> 255).
            With ``learn_tau=True`` tau is a learnable parameter (stored as its log).

    In every mode invalid (out-of-view or non-finite-disparity) neighbour samples get weight 0 and the
    weights are renormalised per pixel over the remaining views.
    """

    def __init__(
        self,
        *,
        offsets: Sequence[tuple[int, int]] = DEFAULT_NEIGHBOUR_OFFSETS,
        mode: str = "fixed",
        center_weight: float = 0.6,
        tau: float = 0.1,
        value_range: float = 1.0,
        learn_tau: bool = False,
    ) -> None:
        super().__init__()
        if mode not in CAAM_MODES:
            raise ValueError(f"CAAM mode: expected one of {CAAM_MODES}, got {mode!r}")
        if len(offsets) == 0:
            raise ValueError("CAAM offsets: expected at least one neighbour (drow, dcol), got none")
        if not 0.0 < center_weight < 1.0:
            raise ValueError(f"center_weight: expected a value in (0, 1), got {center_weight}")
        if tau <= 0.0 or value_range <= 0.0:
            raise ValueError(f"tau and value_range must be > 0, got tau={tau}, value_range={value_range}")
        off = _as_offsets(offsets, len(offsets), torch.device("cpu")).to(torch.long)
        num_views = off.shape[0]
        self.mode = mode
        self.center_weight = float(center_weight)
        self.value_range = float(value_range)
        # Kept as Python floats, not a buffer: ``module.to(torch.bfloat16)`` would round 0.6 to 0.6016.
        self._fixed_weights = [float(center_weight)] + [(1.0 - center_weight) / num_views] * num_views
        # A Python tuple, not a buffer: transformers' ``from_pretrained`` refills non-persistent buffers
        # with ``torch.empty_like`` (uninitialised memory), which would warp with garbage offsets.
        self._offsets: tuple[tuple[int, int], ...] = tuple((int(r), int(c)) for r, c in off.tolist())
        init_logits = torch.tensor(self._fixed_weights, dtype=torch.float32).log()
        self.logits = nn.Parameter(init_logits) if mode == "learned" else None
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau))) if learn_tau else None
        self._tau = float(tau)

    @property
    def offsets(self) -> Tensor:
        """``(V, 2)`` int64 (drow, dcol) of each neighbour, on the CPU."""
        return torch.tensor(self._offsets, dtype=torch.long).view(-1, 2)

    @property
    def num_views(self) -> int:
        return len(self._offsets)

    @property
    def tau(self) -> Tensor:
        if self.log_tau is not None:
            return self.log_tau.float().exp()
        return torch.tensor(self._tau)

    def view_weights(self) -> Tensor:
        """Global weights ``(1 + V,)`` float32 (centre first) before per-pixel occlusion/validity."""
        if self.logits is not None:
            return torch.softmax(self.logits.float(), dim=0)
        return torch.tensor(self._fixed_weights, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_views={self.num_views}, center_weight={self.center_weight}"

    def _check_inputs(self, center: Tensor, views: Tensor, disparity_px: Tensor) -> None:
        b, v, c, h, w = _check_views_and_disparity(views, disparity_px)
        if v != self.num_views:
            raise ValueError(f"views: expected V = {self.num_views} neighbours (one per offset), got {v}")
        if tuple(center.shape) != (b, c, h, w):
            raise ValueError(f"center: expected shape {(b, c, h, w)} (B, C, H, W), got {tuple(center.shape)}")

    def forward(
        self,
        center: Tensor,
        views: Tensor,
        disparity_px: Tensor,
        scale_xy: tuple[float, float] = (1.0, 1.0),
    ) -> Tensor:
        """Aggregate.

        Args:
            center: ``(B, C, H, W)`` centre view.
            views: ``(B, V, C, H, W)`` neighbour views, in the order of ``offsets``.
            disparity_px: ``(B, H, W)`` centre disparity (see module docstring).
            scale_xy: disparity-to-view pixel factors from :func:`rescale_disparity`.

        Returns:
            ``(B, C, H, W)`` aggregated view in ``center.dtype``.
        """
        self._check_inputs(center, views, disparity_px)
        offsets = torch.tensor(self._offsets, dtype=torch.float32, device=views.device).view(-1, 2)
        warped, valid = _warp_float32(views, disparity_px, offsets, scale_xy)
        center32 = center.to(torch.float32)
        weights = self.view_weights().to(center.device)
        w_center = weights[0]
        w_views = weights[1:].view(1, -1, 1, 1, 1) * valid  # (B, V, 1, H, W)
        if self.mode == "occlusion":
            err = (warped - center32[:, None]).abs().mean(dim=2, keepdim=True) / self.value_range
            w_views = w_views * torch.exp(-err / self.tau.to(center.device))
        numerator = w_center * center32 + (w_views * warped).sum(dim=1)
        denominator = w_center + w_views.sum(dim=1)
        return (numerator / denominator).to(center.dtype)
