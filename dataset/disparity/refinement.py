"""Disparity from the filtered cost volume: winner-takes-all with parabola (sub-pixel) refinement."""

from __future__ import annotations

import torch
from torch import Tensor


def winner_takes_all(volume: Tensor, planes: Tensor, subpixel: bool) -> Tensor:
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
