"""The grid ceiling of a mask head: the score of the ground-truth masks pooled to the head's feature grid and
upsampled back (``scripts/grid_ceiling.py``).

A head whose mask is read from a g x g grid of tokens cannot draw finer than that grid: this is the best it
could score if every token were right. Three geometries, one per way an image reaches a grid:

* ``full``: the whole image pooled to g x g (a plain upper bound);
* ``clip``: what a light head on CLIP tokens sees (``model/light_decoder.py``): the centre square of the
  shortest side (``dataset.transforms.clip_geometry``) pooled to g x g, upsampled back to the crop and the
  margins outside it repeated from the border (``model.light_decoder.masks_to_image``);
* ``sam``: SAM's frame: the longest side padded to a square at the bottom/right, pooled, upsampled, cropped.

A pixel is in the mask when its upsampled cell mean is above 0.5. Scores are gIoU / cIoU over every
expression of the split (``utils.metrics.SegMetrics``), per subset.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.scenes import SceneDataset
from model.light_decoder import masks_to_image
from training.config import RunConfig
from training.loaders import val_scenes
from training.options import DatasetOptions, EvalOptions
from utils.metrics import SegMetrics, mask_iou_stats, subset_tags
from utils.options import add_option_flags, option, options_from_args

GEOMETRIES: tuple[str, ...] = ("full", "clip", "sam")


def _parse_grids(text: str) -> tuple[int, ...]:
    try:
        grids = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--grids {text!r}: expected sizes like '8,16,32'") from None
    if not grids or min(grids) < 1:
        raise ValueError(f"--grids {text!r}: every size must be >= 1")
    return grids


@dataclass(frozen=True)
class CeilingOptions:
    """What the grid ceiling measures."""

    grids: tuple[int, ...] = option(
        (8, 16, 20, 32),
        "grid sizes g (g x g tokens)",
        parse=_parse_grids,
        show=lambda g: ",".join(map(str, g)),
    )
    geometry: str = option(
        "clip", "how the image reaches the grid (see the module docstring)", choices=GEOMETRIES
    )
    json_path: str = option("", "also write the results here", flag="json")


def pooled_masks(masks: torch.Tensor, grid: int, geometry: str) -> torch.Tensor:
    """(k, H, W) {0, 1} masks -> what a g x g grid can draw of them, (k, H, W) bool (see the module docstring)."""
    h, w = masks.shape[-2:]
    m = masks.float()[:, None]
    if geometry == "full":
        cells = F.adaptive_avg_pool2d(m, (grid, grid))
        return F.interpolate(cells, size=(h, w), mode="bilinear")[:, 0] > 0.5
    if geometry == "clip":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        cells = F.adaptive_avg_pool2d(m[..., top : top + side, left : left + side], (grid, grid))[:, 0]
        return masks_to_image(cells, side, (h, w), (h, w)) > 0.5
    if geometry == "sam":
        side = max(h, w)
        padded = F.pad(m, (0, side - w, 0, side - h))
        cells = F.adaptive_avg_pool2d(padded, (grid, grid))
        return F.interpolate(cells, size=(side, side), mode="bilinear")[:, 0, :h, :w] > 0.5
    raise ValueError(f"geometry {geometry!r}: expected one of {GEOMETRIES}")


def grid_ceilings(scenes: SceneDataset, grids: Sequence[int], geometry: str) -> dict[int, SegMetrics]:
    """grid -> the metrics of the pooled ground truth over every (ref, sentence) of ``scenes`` (only the
    annotations are read)."""
    out = {g: SegMetrics() for g in grids}
    for scene in scenes.scenes:
        ann = scenes.annotations[scene.ds_index]
        pairs = [(ref, s) for ref in scene.refs for s in ref.sentences]
        gt = torch.stack([torch.from_numpy(ann.ref_mask(ref).astype(bool)) for ref, _ in pairs])
        tags = [subset_tags(ref.tags) for ref, _ in pairs]
        ids = [(scenes.names[scene.ds_index], scene.image_id, k) for k in range(len(pairs))]
        for g in grids:
            inter, union = mask_iou_stats(pooled_masks(gt, g, geometry), gt)
            out[g].update(inter, union, tags, expr_ids=ids)
    return out


def report(results: dict[int, SegMetrics], geometry: str) -> str:
    """One line per grid: gIoU / cIoU of All and of every subset, in percent."""
    subsets = sorted({s for m in results.values() for s in m.compute()})
    subsets = ["All", *(s for s in subsets if s != "All")]
    head = f"{'grid':>8} " + " ".join(f"{s:>9}" for s in subsets)
    lines = [f"grid ceiling ({geometry} geometry): gIoU / cIoU of the pooled ground truth", head]
    for g, metrics in results.items():
        res = metrics.compute()
        cells = [
            f"{100 * res[s]['gIoU']:4.1f}/{100 * res[s]['cIoU']:4.1f}" if s in res else "-" for s in subsets
        ]
        lines.append(f"{f'{g}x{g}':>8} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/grid_ceiling.py``: the ceiling of each grid on ``--val_dataset`` of ``--dataset_dir``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_flags(p, CeilingOptions)
    add_option_flags(p, DatasetOptions, only=("dataset_dir",))
    add_option_flags(p, EvalOptions, only=("val_dataset",))
    args = p.parse_args(argv)
    opts = options_from_args(CeilingOptions, args)
    cfg = RunConfig().replace(
        datasets=options_from_args(DatasetOptions, args), eval=options_from_args(EvalOptions, args)
    )
    results = grid_ceilings(
        val_scenes(cfg, with_disparity=False, with_pixels=False), opts.grids, opts.geometry
    )
    print(report(results, opts.geometry))
    if opts.json_path:
        record = {str(g): m.to_json(with_expressions=False) for g, m in results.items()}
        Path(opts.json_path).write_text(json.dumps({"geometry": opts.geometry, "grids": record}, indent=2))
    return 0
