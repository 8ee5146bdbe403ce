"""Depth Convergence Module: disparity map -> depth image (-> ``<DEPTH>`` tokens).

Contents:
    1. Disparity -> depth image: the grey 3-channel image the vision tower encodes.
    2. The depth stream (``--depth_stream``): the disparity, pooled near SAM's grid, into SAM's mask
       decoder as a dense-prompt term.

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


# ---------------------------------------------------------------------------------------------------
# 2. The depth stream: the disparity map into SAM's mask decoder (``--depth_stream``)
# ---------------------------------------------------------------------------------------------------

#: The depth stream's input is at this many times SAM's embedding grid (the mask decoder's output grid).
DEPTH_STREAM_UPSCALE = 4


def depth_grid(
    disparity_px: Tensor, resized_hw: Tensor, grid: int, disp_range: tuple[float, float]
) -> Tensor:
    """The depth stream's input: SAM-geometry disparity pooled to ``DEPTH_STREAM_UPSCALE * grid`` square.

    Channel 0 is the disparity mapped linearly by ``disp_range`` (``lo`` -> 0, ``hi`` -> 1, *not* clipped,
    so the nearest objects stay apart); channel 1 is 1 inside the resized image and 0 on SAM's padding
    (and where the disparity is NaN). Channel 0 is averaged over valid pixels only.

    Args:
        disparity_px: (B, T, T) disparity in px, zero-padded bottom/right (``dataset.transforms.sam_geometry``).
        resized_hw: (B, 2) the unpadded size inside T x T.
        grid: SAM's image-embedding grid g (T / 16 for every SAM).
        disp_range: (lo, hi), lo < hi.

    Returns:
        (B, 2, 4g, 4g) float32.
    """
    lo, hi = (float(v) for v in disp_range)
    if not lo < hi:
        raise ValueError(f"disp_range: expected lo < hi, got {disp_range}")
    if disparity_px.ndim != 3 or disparity_px.shape[-1] != disparity_px.shape[-2]:
        raise ValueError(f"disparity_px: expected shape (B, T, T), got {tuple(disparity_px.shape)}")
    b, t = disparity_px.shape[0], disparity_px.shape[-1]
    side = DEPTH_STREAM_UPSCALE * grid
    if t % side:
        raise ValueError(f"depth stream: SAM input {t} is not a multiple of {side} (4 x grid {grid})")
    disp = disparity_px.to(torch.float32)
    rows = torch.arange(t, device=disp.device).view(1, t, 1)
    cols = torch.arange(t, device=disp.device).view(1, 1, t)
    hw = resized_hw.to(disp.device).view(b, 2, 1, 1)
    valid = (rows < hw[:, 0]) & (cols < hw[:, 1]) & disp.isfinite()
    value = torch.where(valid, (disp - lo) / (hi - lo), torch.zeros((), device=disp.device))
    pooled = torch.nn.functional.avg_pool2d(
        torch.stack([value, valid.float()], dim=1), kernel_size=t // side
    )  # (B, 2, side, side): mean value over all pixels, valid fraction
    mean = pooled[:, :1] / pooled[:, 1:].clamp_min(1e-6)
    return torch.cat([mean * (pooled[:, 1:] > 0), pooled[:, 1:]], dim=1)


class DepthStream(torch.nn.Module):
    """The depth stream: a small conv net from the depth grid (B, 2, 4g, 4g) (:func:`depth_grid`) to SAM's
    embedding grid (B, C, g, g), added to the mask decoder's dense prompt, so the decoder's image side
    sees the disparity directly (not only through the ``<DEPTH>`` tokens the LM may ignore).

    With ``detail_dim`` > 0 (``--depth_detail``) a second branch keeps the grid's full 4g x 4g resolution and
    gives ``detail_dim`` channels for the decoder's upscaled embedding (:meth:`detail`): the grid the mask logits
    are read from, where the disparity's object edges are four times finer than on SAM's embedding grid.

    Both output convolutions start at zero: an untrained stream leaves the SAM route exactly as it was.
    """

    def __init__(self, out_dim: int, detail_dim: int = 0) -> None:
        super().__init__()
        mid = max(out_dim // 4, 8)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(2, mid // 2, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(mid // 2, mid, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(mid, mid, 3, padding=1),
            torch.nn.GELU(),
        )
        self.out = torch.nn.Conv2d(mid, out_dim, 1)
        self.out.zero_init = True  # kept zero by LFLLMForCausalLM._init_weights
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        self.detail_net = None
        if detail_dim > 0:
            width = max(detail_dim // 2, 8)
            self.detail_net = torch.nn.Sequential(
                torch.nn.Conv2d(2, width, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(width, width, 3, padding=1),
                torch.nn.GELU(),
            )
            self.detail_out = torch.nn.Conv2d(width, detail_dim, 1)
            self.detail_out.zero_init = True
            torch.nn.init.zeros_(self.detail_out.weight)
            torch.nn.init.zeros_(self.detail_out.bias)

    def forward(self, grid: Tensor) -> Tensor:
        """(B, 2, 4g, 4g) depth grid -> (B, C, g, g) dense-prompt term, in the output layer's dtype."""
        return self.out(self.net(grid.to(self.out.weight.dtype)))

    def detail(self, grid: Tensor) -> Tensor | None:
        """(B, 2, 4g, 4g) depth grid -> (B, detail_dim, 4g, 4g), the term added to SAM's upscaled mask
        embedding; None without the branch."""
        if self.detail_net is None:
            return None
        return self.detail_out(self.detail_net(grid.to(self.detail_out.weight.dtype)))
