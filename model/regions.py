"""A region's own visual tokens (LIRA's ILVC): the masked crop of one object, read by the model's vision tower
and projector exactly as the image is (:meth:`model.lfllm.LFLLMForCausalLM.encode_regions` calls these).

The crop comes from one of two images (``--ilvc_crop``):

* ``centre``: the centre view at its original resolution, cropped by the data path
  (``dataset/regions.py``) and carried as ``region_pixels`` (R, 3, S, S) uint8;
* ``caam``: the CAAM-aggregated view the encoders see, at CLIP geometry, sampled here from the same square
  box (``region_boxes``, original pixels) by :func:`sample_boxes`.

Either way the pixels outside the region's mask (``region_masks``) become the image processor's mean, i.e.
zero after normalisation (:func:`masked_normalised`).

Shapes: R regions, S the tower's input size, Sc the CLIP-geometry size of the batch's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.geometry import shortest_side_shape


def clip_frame_boxes(boxes: torch.Tensor, original_hw: list[tuple[int, int]], size: int) -> torch.Tensor:
    """Boxes (R, 4) ``(x0, y0, x1, y1)`` in original pixel-edge coordinates of images of size
    ``original_hw[r]`` -> the same boxes in the CLIP-geometry frame (shortest side resized to ``size``, then
    the centre ``size`` x ``size`` crop, as ``dataset.transforms.clip_geometry``). (R, 4) float32."""
    out = boxes.float().clone()
    for r, (h, w) in enumerate(original_hw):
        nh, nw = shortest_side_shape(int(h), int(w), size)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[r, 0::2] = out[r, 0::2] * (nw / int(w)) - left
        out[r, 1::2] = out[r, 1::2] * (nh / int(h)) - top
    return out


def sample_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear crops of ``images`` (R, 3, Sc, Sc) float at ``boxes`` (R, 4) (pixel-edge coordinates of that
    frame), each resized to ``size`` x ``size``. Returns (pixels (R, 3, size, size), inside (R, size, size)
    bool: the output pixel lies within the image; outside it the pixels are 0)."""
    r, _, height, width = images.shape
    theta = images.new_zeros((r, 2, 3), dtype=torch.float32)
    b = boxes.float()
    theta[:, 0, 0] = (b[:, 2] - b[:, 0]) / width
    theta[:, 0, 2] = (b[:, 0] + b[:, 2]) / width - 1
    theta[:, 1, 1] = (b[:, 3] - b[:, 1]) / height
    theta[:, 1, 2] = (b[:, 1] + b[:, 3]) / height - 1
    grid = F.affine_grid(theta, [r, 1, size, size], align_corners=False)
    pixels = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = images.new_ones((r, 1, height, width), dtype=torch.float32)
    inside = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] > 0.5
    return pixels, inside


def masked_normalised(
    pixels: torch.Tensor, masks: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``(pixels - mean) / std`` inside the mask, 0 (the mean) outside: ``pixels`` (R, 3, S, S) in [0, 1],
    ``masks`` (R, S, S) bool or {0, 1} -> (R, 3, S, S) float32."""
    m = pixels.new_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = pixels.new_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float() - m) / s * masks.float().unsqueeze(1)
