"""ILVC answers (LIRA's format, adapted to LLaVA): ``Sure, [SEG] <region> a red car, far away, ... [SEG].``

What the data path adds to a referring item whose answer takes this form (``--ilvc``): the region's masked
crop, which the model encodes with its own vision tower into the ``<region>`` run (``model/regions.py``), and
the region's description, written from the generator's ground truth.

* :func:`region_box` / :func:`region_crop`: the square box around a mask (its bounding box grown by
  :data:`REGION_MARGIN` of its longer side on every side, centred on it) and the centre view cut to that box,
  resized to the vision tower's input, the pixels outside the mask zeroed (the model then sets them to the
  image processor's mean). Parts of the box outside the image count as outside the mask.
* :func:`describe`: one object's description from its ``attributes.json`` record (``dataset/attributes.py``)
  and its relation partner (:func:`relation_partner`).
* :class:`RegionDescriber`: the records of the datasets a run reads; a dataset without ``attributes.json`` is
  refused naming the file (``dataset.attributes.load_attributes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dataset.attributes import load_attributes
from dataset.refer import ReferAnnotations

#: Where the crop comes from: the centre view (original resolution, cut here) or the CAAM-aggregated view
#: the encoders see (CLIP geometry, cut by the model from the same box).
ILVC_CROPS: tuple[str, ...] = ("centre", "caam")
#: Margin of the crop around the mask's bounding box, a share of its longer side on every side.
REGION_MARGIN = 0.1
#: Disparity difference (px) below which two objects are not said to be in front of / behind each other
#: (the generator's own margin for its behind / front expressions).
RELATION_MARGIN_PX = 0.15
DEPTH_PHRASES: dict[str, str] = {
    "far": "far away",
    "middle": "at a middle distance",
    "near": "close to the camera",
}
OCCLUSION_PHRASES: dict[str, str] = {
    "no-o": "fully visible",
    "o-1": "slightly occluded",
    "o-2": "partly occluded",
    "o-3": "mostly occluded",
}


def describe(record: dict[str, Any], partner: tuple[str, dict[str, Any]] | None = None) -> str:
    """``"a red car, far away, partly occluded, in front of the blue tree"``: colour and category, depth bin,
    occlusion level, and the relation to ``partner`` (``("in front of" | "behind", its record)``) when given."""
    colour, category = record["colour"], record["category"]
    article = "an" if colour[:1].lower() in "aeiou" else "a"
    parts = [
        f"{article} {colour} {category}",
        DEPTH_PHRASES[record["depth_bin"]],
        OCCLUSION_PHRASES[record["occlusion"]],
    ]
    if partner is not None:
        relation, other = partner
        parts.append(f"{relation} the {other['colour']} {other['category']}")
    return ", ".join(parts)


def relation_partner(
    ann_id: int,
    boxes: dict[int, tuple[float, float, float, float]],
    records: dict[int, dict[str, Any]],
) -> tuple[str, dict[str, Any]] | None:
    """The object ``ann_id`` is in front of or behind: among the other annotations of its image (``boxes``:
    ann_id -> COCO ``(x, y, w, h)``) that have a record, the one whose box overlaps its box most horizontally
    (> 0 px; ties: the smaller ann_id) with a disparity at least :data:`RELATION_MARGIN_PX` apart. Returns
    (``"in front of"`` when ``ann_id`` is nearer, else ``"behind"``, the partner's record) or None."""
    if ann_id not in boxes or ann_id not in records:
        return None
    x, _, w, _ = boxes[ann_id]
    mine = records[ann_id]["disparity_px"]
    best: tuple[float, int] | None = None
    for other in sorted(boxes):
        if other == ann_id or other not in records:
            continue
        ox, _, ow, _ = boxes[other]
        overlap = min(x + w, ox + ow) - max(x, ox)
        if overlap <= 0 or abs(mine - records[other]["disparity_px"]) < RELATION_MARGIN_PX:
            continue
        if best is None or overlap > best[0]:
            best = (overlap, other)
    if best is None:
        return None
    partner = records[best[1]]
    return ("in front of" if mine > partner["disparity_px"] else "behind"), partner


def region_box(mask: np.ndarray, margin: float = REGION_MARGIN) -> tuple[int, int, int] | None:
    """The square crop box ``(left, top, side)`` (pixels; it may reach outside the image) around the
    foreground of ``mask`` (H, W): its bounding box grown by ``ceil(margin * longer side)`` on every side and
    centred on it along the shorter side. None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    longer = max(x1 - x0, y1 - y0)
    pad = math.ceil(margin * longer)
    side = longer + 2 * pad
    return x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2, side


@dataclass(frozen=True)
class RegionCrop:
    """One region, ready to batch: ``pixels`` (3, S, S) uint8 (0 outside the mask; None when only the box is
    needed, ``--ilvc_crop caam``), ``mask`` (S, S) bool, ``box`` (4,) float32 ``(x0, y0, x1, y1)`` in the
    original image's pixel-edge coordinates."""

    pixels: torch.Tensor | None
    mask: torch.Tensor
    box: torch.Tensor


def region_crop(
    center: np.ndarray | None, mask: np.ndarray, size: int, margin: float = REGION_MARGIN
) -> RegionCrop:
    """The masked crop of ``center`` (H, W, 3) uint8 at :func:`region_box` of ``mask`` (H, W) (foreground:
    value 1), resized to ``size`` x ``size`` (area averaging when shrinking, bilinear when enlarging; the
    mask by nearest neighbour). ``center`` None: the mask and box only. Raises ``ValueError`` on an empty
    mask."""
    fg = np.asarray(mask) == 1
    box = region_box(fg, margin)
    if box is None:
        raise ValueError("an empty mask has no region to crop")
    left, top, side = box
    h, w = fg.shape
    ys, xs = slice(max(top, 0), min(top + side, h)), slice(max(left, 0), min(left + side, w))
    inner = (slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left))
    canvas_mask = np.zeros((side, side), np.uint8)
    canvas_mask[inner] = fg[ys, xs]
    out_mask = cv2.resize(canvas_mask, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    pixels = None
    if center is not None:
        canvas = np.zeros((side, side, 3), np.uint8)
        canvas[inner] = center[ys, xs] * fg[ys, xs, None]
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        resized = cv2.resize(canvas, (size, size), interpolation=interpolation) * out_mask[..., None]
        pixels = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    corners = torch.tensor([left, top, left + side, top + side], dtype=torch.float32)
    return RegionCrop(pixels, torch.from_numpy(out_mask), corners)


class RegionDescriber:
    """Descriptions of the annotated objects of ``names`` (datasets under ``dataset_dir``), from their
    ``attributes.json`` and the boxes of ``instances.json``; a dataset without the file raises
    ``dataset.errors.AnnotationError`` naming it, at construction."""

    def __init__(self, dataset_dir: str | Path, names: list[str]) -> None:
        bare = [n.split("(", 1)[0] for n in names]
        self.records = {ds: load_attributes(dataset_dir, ds) for ds in bare}
        self.annotations = {ds: ReferAnnotations.load(dataset_dir, ds) for ds in bare}

    def description(self, ds: str, image_id: int, ann_id: int) -> str | None:
        """The description of annotation ``ann_id`` of image ``image_id`` of ``ds`` (None: no record)."""
        records = self.records.get(ds)
        if records is None or ann_id not in records:
            return None
        boxes = self.annotations[ds].boxes_of_image(image_id)
        return describe(records[ann_id], relation_partner(ann_id, boxes, records))


@dataclass(frozen=True)
class IlvcSpec:
    """ILVC answers of a training set: ``share`` of the one-target expressions get them (``--ilvc``), their
    crop comes from ``crop`` (:data:`ILVC_CROPS`, ``--ilvc_crop``) at the vision tower's input ``size``, and
    ``describer`` writes their descriptions."""

    share: float
    crop: str
    size: int
    describer: RegionDescriber
