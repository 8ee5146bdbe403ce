"""Mask baselines that ignore the expression, measured like the model on the same val set.

* ``whole-image``: the whole image as the mask.
* ``largest-object``: the biggest annotated object of the scene (largest visible area), whatever the
  expression says. A model that does not read the expression scores about this.
"""

from __future__ import annotations

import numpy as np
import torch

from dataset.scenes import SceneDataset
from utils.metrics import SegMetrics, mask_iou_stats, subset_tags


def baseline_metrics(scenes: SceneDataset) -> dict[str, SegMetrics]:
    """``{"whole-image": ..., "largest-object": ...}`` over every (ref, sentence) of ``scenes``.

    Only annotations are read (no views). The largest object is chosen among the annotated objects of
    the image that any ref (of any split) points at.
    """
    out = {"whole-image": SegMetrics(), "largest-object": SegMetrics()}
    for scene in scenes.scenes:
        ann = scenes.annotations[scene.ds_index]
        image_ann_ids = sorted({a for r in ann.refs if r.image_id == scene.image_id for a in r.ann_ids})
        decoded: dict[int, np.ndarray] = {}
        pairs = [(ref, s) for ref in scene.refs for s in ref.sentences]
        gt = torch.stack([torch.from_numpy(ann.ref_mask(ref, decoded).astype(bool)) for ref, _ in pairs])
        for a in image_ann_ids:
            if a not in decoded:
                decoded[a] = ann.mask(a)
        areas = {a: int(decoded[a].sum()) for a in image_ann_ids}
        # no annotated object at all (only no-target refs): the largest object is an empty mask
        largest = max(image_ann_ids, key=lambda a: (areas[a], -a)) if image_ann_ids else None
        tags = [subset_tags(ref.tags) for ref, _ in pairs]
        ids = [(scenes.names[scene.ds_index], scene.image_id, k) for k in range(len(pairs))]
        whole = torch.ones_like(gt)
        big = (
            torch.zeros_like(gt[0]) if largest is None else torch.from_numpy(decoded[largest].astype(bool))
        ).expand_as(gt)
        for name, pred in (("whole-image", whole), ("largest-object", big)):
            inter, union = mask_iou_stats(pred, gt)
            out[name].update(inter, union, tags, expr_ids=ids)
    return out


def summary_line(name: str, metrics: SegMetrics) -> str:
    """``name: gIoU 12.34  cIoU 23.45  (n=…)`` for the All column."""
    res = metrics.compute()["All"]
    return f"{name:>16}: gIoU {100 * res['gIoU']:6.2f}  cIoU {100 * res['cIoU']:6.2f}  (n={int(res['n'])})"
