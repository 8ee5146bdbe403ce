"""Raw scenes for prediction: any light-field folder + free-text expressions, no annotations (``chat.py``).

Items have the :class:`dataset.scenes.SceneDataset` format (``center`` (H, W, 3) uint8, ``views``
(V, H, W, 3) uint8, ``offsets`` (V, 2), ``disparity`` (H, W) float32 or None, ``sentences`` …) with
``masks=None``, so :class:`dataset.refer_seg.ReferSegDataset` and :func:`dataset.collate.collate_batch`
turn them into model inputs exactly as in training and validation (same geometry, prompts, tokens).

The disparity comes from the scene's file (``LightFieldLayout.disparity_name``) or, with
``depth_source="estimate"``, from the estimator ``model.disparity.disparity_for_scene`` (imported only then).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.utils.data

from dataset.errors import LightFieldError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, Offset, load_light_field

DepthSource = Literal["file", "estimate"]
DEPTH_SOURCES: tuple[str, ...] = ("file", "estimate")


@dataclass(frozen=True)
class SceneQuery:
    """One light-field folder and the expressions to segment in it (one mask each, in order)."""

    scene_dir: Path
    sentences: tuple[str, ...]


def estimate_disparity(scene_dir: str | Path, layout: LightFieldLayout) -> np.ndarray:
    """Centre disparity (H, W) float32 from ``model.disparity.disparity_for_scene(scene_dir, layout, config)``
    with the estimator's default config. Raises ``RuntimeError`` when that module is not installed."""
    try:
        estimator = importlib.import_module("model.disparity")
    except ImportError as exc:
        if exc.name not in ("model.disparity", None):
            raise
        raise RuntimeError(
            "--depth_source estimate needs the disparity estimator model/disparity.py "
            "(disparity_for_scene), which is not in this checkout; use --depth_source file with a "
            "precomputed map (--disparity_name, e.g. 5_5_disparity_OAVC.npy)"
        ) from exc
    fn = getattr(estimator, "disparity_for_scene", None)
    if fn is None:
        raise RuntimeError(
            f"--depth_source estimate: {estimator.__file__} has no disparity_for_scene(scene_dir, layout, "
            "config) yet; use --depth_source file with a precomputed map (--disparity_name)"
        )
    params = inspect.signature(fn).parameters
    if "config" in params and params["config"].default is not inspect.Parameter.empty:
        disp = fn(scene_dir, layout)
    else:
        config_cls = getattr(estimator, "DisparityConfig", None)
        disp = fn(scene_dir, layout, config_cls() if config_cls is not None else None)
    return np.ascontiguousarray(np.asarray(disp, dtype=np.float32))


def load_scene(
    query: SceneQuery,
    *,
    offsets: Sequence[Offset] = (),
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    need_disparity: bool = True,
    depth_source: DepthSource = "file",
) -> dict[str, Any]:
    """Read one scene for prediction.

    Args:
        query: the folder and its expressions (at least one).
        offsets: neighbour views to load, ``(drow, dcol)`` from the centre (those CAAM uses; may be empty).
        layout: file names of views and disparity.
        need_disparity: the model uses the disparity (depth tokens or CAAM); when False none is read.
        depth_source: ``"file"`` reads ``layout.disparity_name``; ``"estimate"`` runs the estimator.

    Returns:
        A raw scene dict (``SceneDataset`` item format) with ``masks=None`` and ``subsets`` all empty.

    Raises:
        LightFieldError naming the file when a view or the needed disparity is missing or unreadable.
    """
    if depth_source not in DEPTH_SOURCES:
        raise ValueError(f"depth_source must be one of {DEPTH_SOURCES}, got {depth_source!r}")
    sentences = [s.strip() for s in query.sentences]
    if not sentences or not all(sentences):
        raise ValueError(
            f"{query.scene_dir}: every query needs a non-empty expression, got {query.sentences}"
        )
    scene = Path(query.scene_dir)
    disparity_path = scene / layout.disparity_name
    from_file = need_disparity and depth_source == "file"
    if from_file and scene.is_dir() and not disparity_path.is_file():
        raise LightFieldError(
            disparity_path,
            "disparity file not found; this model reads the disparity map (depth tokens / CAAM): "
            "name another file with --disparity_name, or estimate one with --depth_source estimate",
        )
    sample = load_light_field(scene, tuple(offsets), layout, with_disparity=from_file)
    disparity = sample.disparity
    if need_disparity and depth_source == "estimate":
        disparity = estimate_disparity(scene, layout)
        if disparity.shape != sample.center.shape[:2]:
            raise LightFieldError(
                scene,
                f"estimated disparity is {disparity.shape}, the centre view is {sample.center.shape[:2]}",
            )
    return {
        "image_id": scene.name,
        "ds": "chat",
        "scene_dir": sample.scene_dir,
        "center": sample.center,
        "views": sample.views,
        "offsets": sample.offsets,
        "disparity": disparity,
        "sentences": sentences,
        "masks": None,
        "ref_ids": [],
        "subsets": [() for _ in sentences],
    }


class SceneQueries(torch.utils.data.Dataset):
    """Scenes to predict on, read lazily (one item = one :class:`SceneQuery`, see :func:`load_scene`).

    Exposes ``layout`` like :class:`dataset.scenes.SceneDataset`, so ``ReferSegDataset`` can wrap it.
    """

    def __init__(
        self,
        queries: Sequence[SceneQuery],
        *,
        offsets: Sequence[Offset] = (),
        layout: LightFieldLayout = DEFAULT_LAYOUT,
        need_disparity: bool = True,
        depth_source: DepthSource = "file",
    ) -> None:
        self.queries = list(queries)
        self.offsets = tuple(tuple(o) for o in offsets)
        self.layout = layout
        self.need_disparity = need_disparity
        self.depth_source = depth_source

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_scene(
            self.queries[index],
            offsets=self.offsets,
            layout=self.layout,
            need_disparity=self.need_disparity,
            depth_source=self.depth_source,
        )
