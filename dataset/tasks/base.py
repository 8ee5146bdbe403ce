"""The raw-item contract every task's dataset follows, and the pixel reading they share.

An item is a dict, as :class:`dataset.scenes.SceneDataset` returns for referring segmentation, plus:

* ``task`` (str, one of :data:`TASKS`);
* ``masks`` (N, H, W) uint8 whose values are 0, 1 and :data:`IGNORE_LABEL` (a pixel the loss and the IoU
  leave out: ReasonSeg's "ignore" polygons);
* ``is_sentence`` (N bools, reasoning queries: a full sentence, asked as is, or a noun phrase, asked inside
  a question template);
* ``explanations`` (N, str or None: the explanation ``--explanatory`` may append to an answer);
* ``turns`` (VQA: the conversation as (question, answer) pairs, the image marker removed; ``sentences`` and
  ``masks`` are then empty).

The common keys: ``image_id`` int (unique within ``ds``), ``ds`` str, ``scene_dir`` str (a light-field scene
folder, or the image file of 2D data), ``center`` (H, W, 3) uint8, ``views`` (V, H, W, 3) uint8, ``offsets``
(V, 2) int64, ``disparity`` (H, W) float32 or None (2D data has no neighbours and no disparity),
``sentences`` list[str] (N; what each mask answers: a class name, a query), ``ref_ids`` list[int] (N),
``subsets`` list[tuple[str, ...]] (N; the split then the tags), ``no_target`` list[bool] (N).
Without pixels (a feature cache serves the encodings) ``center`` / ``views`` / ``offsets`` / ``disparity``
are replaced by ``hw`` (H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, LightFieldSample, load_light_field, read_rgb
from utils.metrics import IGNORE_LABEL
from utils.views import Offset

#: The tasks of ``--dataset``, in LISA's order.
TASKS: tuple[str, ...] = ("sem_seg", "refer_seg", "vqa", "reason_seg")
__all__ = ["IGNORE_LABEL", "TASKS", "check_sampling", "contract_problem", "load_pixels", "pixel_fields"]
#: Keys every item carries (besides the pixels or ``hw``).
COMMON_KEYS: tuple[str, ...] = (
    "task",
    "image_id",
    "ds",
    "scene_dir",
    "sentences",
    "masks",
    "ref_ids",
    "subsets",
    "no_target",
)
PIXEL_KEYS: tuple[str, ...] = ("center", "views", "offsets", "disparity")


def load_pixels(
    path: str | Path,
    lightfield: bool,
    offsets: tuple[Offset, ...] | list[Offset] = (),
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    with_disparity: bool = True,
) -> LightFieldSample:
    """The pixels of one item: a light-field scene folder (``lightfield``: centre, the neighbours at
    ``offsets``, the disparity) or a 2D image file (centre only: no neighbours, no disparity).

    Raises ``LightFieldError`` naming the file when it is missing or unreadable."""
    if lightfield:
        return load_light_field(path, offsets, layout, with_disparity)
    center = read_rgb(path)
    return LightFieldSample(
        center=center,
        views=np.empty((0, *center.shape), dtype=np.uint8),
        offsets=np.empty((0, 2), dtype=np.int64),
        disparity=None,
        scene_dir=str(path),
    )


def check_sampling(mode: str, num_classes_per_sample: int) -> None:
    """``ValueError`` unless ``mode`` is ``"train"`` or ``"val"`` and ``num_classes_per_sample`` >= 1 (the
    arguments every task reader and :class:`dataset.scenes.SceneDataset` share)."""
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    if num_classes_per_sample < 1:
        raise ValueError(f"num_classes_per_sample must be ≥ 1, got {num_classes_per_sample}")


def pixel_fields(sample: LightFieldSample) -> dict[str, Any]:
    """The item keys of ``sample``: ``center``, ``views``, ``offsets``, ``disparity``, ``scene_dir``."""
    return {
        "center": sample.center,
        "views": sample.views,
        "offsets": sample.offsets,
        "disparity": sample.disparity,
        "scene_dir": sample.scene_dir,
    }


def contract_problem(item: dict[str, Any]) -> str | None:
    """What in ``item`` breaks the contract of this module (a missing key, lengths that disagree, a mask
    of the wrong shape or values, an unknown task), or None when it is a valid item."""
    missing = [k for k in COMMON_KEYS if k not in item]
    if missing:
        return f"missing keys {missing}"
    if item["task"] not in TASKS:
        return f"task {item['task']!r} is not one of {TASKS}"
    has_pixels = all(k in item for k in PIXEL_KEYS)
    if not has_pixels and "hw" not in item:
        return f"neither the pixels {PIXEL_KEYS} nor hw"
    hw = tuple(item["center"].shape[:2]) if has_pixels else tuple(item["hw"])
    n = len(item["sentences"])
    for key in ("ref_ids", "subsets", "no_target", "is_sentence", "explanations"):
        if key in item and len(item[key]) != n:
            return f"{key} has {len(item[key])} entries for {n} sentences"
    masks = item["masks"]
    if not isinstance(masks, np.ndarray) or masks.dtype != np.uint8 or masks.shape != (n, *hw):
        shape = getattr(masks, "shape", None)
        return f"masks must be uint8 ({n}, {hw[0]}, {hw[1]}), got {getattr(masks, 'dtype', None)} {shape}"
    bad = np.setdiff1d(np.unique(masks), [0, 1, IGNORE_LABEL])
    if bad.size:
        return f"mask values {bad.tolist()} outside 0, 1 and {IGNORE_LABEL} (ignore)"
    if item["task"] == "vqa" and not item.get("turns"):
        return "a VQA item needs its turns"
    if has_pixels:
        views, offsets = item["views"], item["offsets"]
        if views.shape[1:] != item["center"].shape or len(offsets) != len(views):
            return f"views {views.shape} / offsets {offsets.shape} do not match the centre"
        disparity = item["disparity"]
        if disparity is not None and disparity.shape != hw:
            return f"disparity {disparity.shape} is not the centre's {hw}"
    return None
