"""Raw scenes for prediction: any light-field folder + free-text expressions, no annotations (``chat.py``).

Items have the :class:`dataset.scenes.SceneDataset` format (``center`` (H, W, 3) uint8, ``views``
(V, H, W, 3) uint8, ``offsets`` (V, 2), ``disparity`` (H, W) float32 or None, ``sentences`` …) with
``masks=None``, so :class:`dataset.refer_seg.ReferSegDataset` and :func:`dataset.collate.collate_batch`
turn them into model inputs exactly as in training and validation (same geometry, prompts, tokens).

The disparity comes from the scene's file (``LightFieldLayout.disparity_name``) or, with
``depth_source="estimate"``, from the estimator's cache file in the scene folder (written when missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from dataset.disparity.cache import estimate_scenes, scenes_to_estimate
from dataset.errors import LightFieldError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, load_light_field, read_disparity
from dataset.options import DEFAULT_ESTIMATED_NAME, DEPTH_SOURCES, DepthSource
from dataset.prompts import text_problem
from utils.views import Offset


@dataclass(frozen=True)
class SceneQuery:
    """One light-field folder and the expressions to segment in it (one mask each, in order)."""

    scene_dir: Path
    sentences: tuple[str, ...]


def estimated_disparity(scene_dir: Path, layout: LightFieldLayout, out_name: str) -> np.ndarray:
    """The estimator's centre disparity (H, W) float32 of ``scene_dir``: read from its cache file
    ``<scene_dir>/<out_name>``, which :func:`dataset.disparity.cache.estimate_scenes` (the one route of every
    estimated map: training, ``--eval_only``, chat, ``scripts/estimate_disparity.py``) writes first when it
    is missing, with the default estimator settings."""
    estimate_scenes(scenes_to_estimate([scene_dir], out_name), out_name, layout)
    return read_disparity(scene_dir / out_name)


def load_scene(
    query: SceneQuery,
    *,
    offsets: Sequence[Offset] = (),
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    need_disparity: bool = True,
    depth_source: DepthSource = "file",
    estimated_name: str = DEFAULT_ESTIMATED_NAME,
) -> dict[str, Any]:
    """Read one scene for prediction.

    Args:
        query: the folder and its expressions (at least one).
        offsets: neighbour views to load, ``(drow, dcol)`` from the centre (those CAAM uses; may be empty).
        layout: file names of views and disparity.
        need_disparity: the model uses the disparity (depth tokens or CAAM); when False none is read.
        depth_source: ``"file"`` reads ``layout.disparity_name``; ``"estimate"`` reads the estimator's
            cache file ``estimated_name`` (written first when missing, see :func:`estimated_disparity`).
        estimated_name: that cache file's name in the scene folder.

    Returns:
        A raw scene dict (``SceneDataset`` item format) with ``masks=None`` and ``subsets`` all empty.

    Raises:
        LightFieldError naming the file when a view or the needed disparity is missing or unreadable.
    """
    if depth_source not in DEPTH_SOURCES:
        raise ValueError(f"depth_source must be one of {DEPTH_SOURCES}, got {depth_source!r}")
    for i, sentence in enumerate(query.sentences):
        why = text_problem(sentence)
        if why:
            raise ValueError(f"{query.scene_dir}: expression {i + 1} {why}")
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
        disparity = estimated_disparity(scene, layout, estimated_name)
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
        estimated_name: str = DEFAULT_ESTIMATED_NAME,
    ) -> None:
        self.queries = list(queries)
        self.offsets = tuple(tuple(o) for o in offsets)
        self.layout = layout
        self.need_disparity = need_disparity
        self.depth_source = depth_source
        self.estimated_name = estimated_name

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_scene(
            self.queries[index],
            offsets=self.offsets,
            layout=self.layout,
            need_disparity=self.need_disparity,
            depth_source=self.depth_source,
            estimated_name=self.estimated_name,
        )
