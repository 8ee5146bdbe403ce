"""Cost filtering of the disparity estimator: O(1) box filters, the (fast) guided filter, the median filter
and the edge-preserving pre-smoothing of the views (all vectorised, no loops over pixels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def box_sum_1d(x: Tensor, r: int, dim: int) -> Tensor:
    """Sum over a window of ``2r + 1`` along ``dim`` (zero padding), via a cumulative sum."""
    n = x.shape[dim]
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [r + 1, r]
    c = F.pad(x, pad).cumsum(dim)
    return c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)


def box_mean(x: Tensor, r: int, inv_count: Tensor) -> Tensor:
    """Mean over the in-image part of a ``(2r+1)^2`` window of the last two dims of ``x``."""
    return box_sum_1d(box_sum_1d(x, r, -2), r, -1) * inv_count


def inv_count(h: int, w: int, r: int, device: torch.device) -> Tensor:
    ones = torch.ones(1, 1, h, w, device=device)
    return 1.0 / box_sum_1d(box_sum_1d(ones, r, -2), r, -1)


class GuidedFilter:
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
        self.inv_n = inv_count(*self.small_hw, self.r, guide.device)
        self.mean_i = box_mean(small, self.r, self.inv_n)  # (B, C, h, w)
        if c == 1:
            var = box_mean(small * small, self.r, self.inv_n) - self.mean_i**2
            self.inv = (1.0 / (var + eps))[:, :, None]  # (B, 1, 1, h, w)
        else:
            prod = small[:, :, None] * small[:, None, :]  # (B, 3, 3, h, w)
            corr = box_mean(prod.flatten(1, 2), self.r, self.inv_n).reshape(prod.shape)
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
        mean_p = box_mean(small_p, r, inv_n)  # (B, S, h, w)
        mi = self.mean_i[:, :, None]  # (B, C, 1, h, w)
        mean_ip = box_mean(self._down(self.guide)[:, :, None] * small_p[:, None], r, inv_n)  # (B, C, S, h, w)
        cov_ip = mean_ip - mi * mean_p[:, None]
        if self.guide.shape[1] == 1:
            a = cov_ip * self.inv  # (B, 1, S, h, w)
        else:
            a = (self.inv[:, :, :, None] * cov_ip[:, None]).sum(dim=2)  # (B, 3, S, h, w)
        bias = mean_p - (a * mi).sum(dim=1)
        mean_a = self._up(box_mean(a, r, inv_n))  # (B, C, S, H, W)
        return (mean_a * self.guide[:, :, None]).sum(dim=1) + self._up(box_mean(bias, r, inv_n))


def median_filter(x: Tensor, k: int) -> Tensor:
    """``k x k`` median filter of ``(B, H, W)`` with replicate padding."""
    pad = k // 2
    patches = F.unfold(F.pad(x[:, None], (pad, pad, pad, pad), mode="replicate"), k)  # (B, k*k, H*W)
    return patches.median(dim=1).values.reshape(x.shape)


def smooth_views(images: Tensor, radius: int, eps: float) -> Tensor:
    """Edge-preserving smoothing: self-guided filter of each channel of ``images`` (..., H, W).

    Variations with a local variance well below ``eps`` (uint8 quantisation steps, sensor noise) are
    averaged over a ``2r + 1`` window; stronger edges and textures are kept. Shift-invariant, so it commutes
    with the view-to-centre translations of the sweep.
    """
    if radius == 0:
        return images
    shape = images.shape
    flat = images.reshape(-1, shape[-3], shape[-2], shape[-1])
    inv_n = inv_count(shape[-2], shape[-1], radius, images.device)[0]
    out = torch.empty_like(flat)
    for i, x in enumerate(flat):  # one image at a time keeps the temporaries small
        mean = box_mean(x, radius, inv_n)
        var = box_mean(x * x, radius, inv_n) - mean * mean
        a = var / (var + eps)
        b = mean - a * mean
        out[i] = box_mean(a, radius, inv_n) * x + box_mean(b, radius, inv_n)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Plane sweep
# ---------------------------------------------------------------------------------------------------
