"""The ground-truth attributes of a generated object, as ``refer_seg/<ds>/attributes.json`` records them.

The schema, the depth bins and the reader are in ``dataset/attributes.py``; this file only computes a
record from what the generator knows of an object (``SceneObject``) and the scene's centre disparity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataset.attributes import depth_bin
from dataset.synthetic.expressions import SceneObject


def object_attributes(obj: SceneObject, disparity: np.ndarray, occlusion: str) -> dict[str, Any]:
    """The attributes record of one visible object.

    Args:
        obj: the object (``mask`` bool (H, W), its visible part in the centre view; ``area`` > 0).
        disparity: the scene's centre-view GT disparity, float32 (H, W) px (what is written to disk).
        occlusion: its occlusion tag (``generator.occlusion_tag`` of ``obj.visible_fraction``).
    Returns:
        ``{category, colour, disparity_px, depth_bin, occlusion, visible_fraction}``; ``disparity_px`` is the
        float64 mean of the float32 map over the mask (the object's layer disparity, as the map stores it).
    """
    if not obj.area:
        raise ValueError(f"object {obj.layer_id} has no visible pixel: it has no annotation")
    mean = float(disparity[obj.mask].astype(np.float64).mean())
    return {
        "category": obj.category,
        "colour": obj.colour,
        "disparity_px": mean,
        "depth_bin": depth_bin(mean),
        "occlusion": occlusion,
        "visible_fraction": float(obj.visible_fraction),
    }
