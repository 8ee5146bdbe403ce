"""Ground-truth attributes of every annotated object: what a model could know about its target.

On disk, beside the refs (written by the synthetic generator, ``dataset/synthetic/attributes.py``)::

    <dataset_dir>/refer_seg/<ds>/attributes.json
        {"<ann_id>": {"category": str, "colour": str, "disparity_px": float, "depth_bin": str,
                      "occlusion": str, "visible_fraction": float}}

* ``disparity_px``: mean centre-view disparity (px between adjacent views, larger = nearer) over the
  object's visible mask.
* ``depth_bin``: ``far`` / ``middle`` / ``near`` by *fixed* thresholds (:data:`DEPTH_BIN_EDGES_PX`), the
  thirds of the generator's object range [0, 1.6] px, so a label never depends on which scenes a dataset
  holds (train and val, a 6-scene and a 5000-scene set, agree). Objects are drawn uniformly in that range,
  so the bins are about balanced; bridges (drawn in [0, 0.5] px) are always ``far``.
* ``occlusion``: the occlusion tag of the refs' ``subsets`` (``no-o`` / ``o-1`` / ``o-2`` / ``o-3``).
* ``visible_fraction``: visible / unoccluded area in the centre view, in [0, 1].

:func:`load_attributes` reads and checks the file; every problem names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dataset.errors import AnnotationError

ATTRIBUTES_FILE = "attributes.json"
#: The categorical attributes a probe reads out, in report order.
PROBED: tuple[str, ...] = ("category", "colour", "depth_bin", "occlusion")
DEPTH_BINS: tuple[str, ...] = ("far", "middle", "near")
#: Disparity edges (px) between ``far`` | ``middle`` | ``near``: thirds of the object range [0, 1.6] px.
DEPTH_BIN_EDGES_PX: tuple[float, float] = (1.6 / 3, 3.2 / 3)
OCCLUSION_LEVELS: tuple[str, ...] = ("no-o", "o-1", "o-2", "o-3")
_FIELDS: dict[str, type] = {
    "category": str,
    "colour": str,
    "disparity_px": float,
    "depth_bin": str,
    "occlusion": str,
    "visible_fraction": float,
}


def depth_bin(disparity_px: float) -> str:
    """``far`` (< 0.533 px), ``middle`` (< 1.067 px) or ``near`` (see :data:`DEPTH_BIN_EDGES_PX`)."""
    low, high = DEPTH_BIN_EDGES_PX
    return "far" if disparity_px < low else ("middle" if disparity_px < high else "near")


def attributes_path(dataset_dir: str | Path, ds: str) -> Path:
    """``<dataset_dir>/refer_seg/<ds>/attributes.json``."""
    return Path(dataset_dir) / "refer_seg" / ds / ATTRIBUTES_FILE


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    missing = [k for k in _FIELDS if k not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, kind in _FIELDS.items():
        value = record[key]
        ok = (
            isinstance(value, str)
            if kind is str
            else isinstance(value, (int, float)) and math.isfinite(value)
        )
        if not ok or isinstance(value, bool):
            return f"{key} = {value!r} is not a {kind.__name__}"
    if record["depth_bin"] not in DEPTH_BINS:
        return f"depth_bin {record['depth_bin']!r} not one of {', '.join(DEPTH_BINS)}"
    if record["occlusion"] not in OCCLUSION_LEVELS:
        return f"occlusion {record['occlusion']!r} not one of {', '.join(OCCLUSION_LEVELS)}"
    if not 0.0 <= record["visible_fraction"] <= 1.0:
        return f"visible_fraction {record['visible_fraction']} outside [0, 1]"
    return None


def load_attributes(dataset_dir: str | Path, ds: str) -> dict[int, dict[str, Any]]:
    """``{ann_id: {category, colour, disparity_px, depth_bin, occlusion, visible_fraction}}`` of ``ds``.

    Raises :class:`dataset.errors.AnnotationError` naming the file when it is missing (a dataset written
    before the generator wrote it: regenerate with ``scripts/make_synthetic_data.py --overwrite``), is not
    JSON, or holds a record with a missing, mistyped or out-of-range field or a non-integer key."""
    path = attributes_path(dataset_dir, ds)
    if not path.is_file():
        raise AnnotationError(
            path, "missing: the synthetic generator writes it; regenerate the dataset (--overwrite)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AnnotationError(path, f"expected an object keyed by ann_id, got {type(raw).__name__}")
    out: dict[int, dict[str, Any]] = {}
    for key, record in raw.items():
        if not key.lstrip("-").isdigit():
            raise AnnotationError(path, f"key {key!r} is not an ann_id")
        problem = _record_problem(record)
        if problem:
            raise AnnotationError(path, f"ann_id {key}: {problem}")
        out[int(key)] = {k: record[k] for k in _FIELDS}
    return out
