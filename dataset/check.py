"""Pre-flight check of the scenes a run will read: every problem found at once, before any model is built.

For each light-field scene of the given :class:`dataset.scenes.SceneDataset` splits: the scene folder
exists; the centre view and each neighbour the model uses exist and have a decodable image header
(Pillow reads and CRC-checks the header chunks, without decoding the pixels), all of the centre's size;
the disparity file (when the model reads one) is a ``.npy`` array of a real float dtype and the centre's
(H, W), finite, and within the plausible range of the documented convention (px between adjacent views,
:data:`MAX_ABS_DISPARITY_PX`). 2D (image) datasets: the image exists and decodes. ``scripts/check_dataset.py``
runs the same check alone; ``train_ds.py`` runs it before the model is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataset.errors import AnnotationError
from dataset.lightfield import MAX_ABS_DISPARITY_PX, check_disparity_values
from dataset.refer import ReferAnnotations
from dataset.scenes import SceneDataset
from utils.views import Offset


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: Path
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((H, W), None) of a readable image file, or (None, why not) — header only, no pixel decoding."""
    if not path.is_file():
        return None, "file not found"
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"not a decodable image ({type(exc).__name__}: {exc})"
    return (size[1], size[0]), None


def check_disparity_file(path: Path, hw: tuple[int, int] | None) -> str | None:
    """What is wrong with a disparity file (None when it is fine): missing, not one .npy array, not a
    float dtype, not (H, W) = ``hw``, non-finite or implausible values."""
    if not path.is_file():
        return "disparity file not found"
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        return f"cannot read as a .npy array ({exc})"
    if not isinstance(array, np.ndarray):
        return "not a single .npy array"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        return f"disparity must be (H, W), got shape {tuple(array.shape)}"
    if hw is not None and tuple(array.shape) != tuple(hw):
        return f"disparity shape {tuple(array.shape)} does not match the centre view's (H, W) {tuple(hw)}"
    try:
        check_disparity_values(np.asarray(array))
    except ValueError as exc:
        return str(exc)
    return None


def check_scene(scene_dir: Path, offsets: Sequence[Offset], layout, need_disparity: bool) -> list[Problem]:
    """Every problem of one light-field scene folder (see the module docstring)."""
    if not scene_dir.is_dir():
        return [Problem(scene_dir, "light-field scene folder not found")]
    problems = []
    centre = scene_dir / layout.view_name((0, 0))
    hw, why = image_size(centre)
    if why:
        problems.append(Problem(centre, why))
    for offset in offsets:
        path = scene_dir / layout.view_name(tuple(offset))
        view_hw, why = image_size(path)
        if why:
            problems.append(Problem(path, why))
        elif hw is not None and view_hw != hw:
            problems.append(Problem(path, f"view size {view_hw} differs from the centre view's {hw}"))
    if need_disparity:
        path = scene_dir / layout.disparity_name
        why = check_disparity_file(path, hw)
        if why:
            problems.append(Problem(path, why))
    return problems


def check_datasets(
    groups: Iterable[SceneDataset], need_disparity: bool, progress: bool = True
) -> tuple[int, list[Problem]]:
    """Check every scene of ``groups`` (each scene folder once). Returns (scenes checked, problems)."""
    jobs: dict[Path, tuple[SceneDataset, int]] = {}
    for scenes in groups:
        for i, scene in enumerate(scenes.scenes):
            jobs.setdefault(scenes.scene_path(i), (scenes, scene.ds_index))
    problems: list[Problem] = []
    for path, (scenes, ds_index) in tqdm(
        jobs.items(), desc="pre-flight check", unit="scene", disable=not progress, dynamic_ncols=True
    ):
        if scenes.sources[ds_index] == "lightfield":
            problems += check_scene(path, scenes.offsets, scenes.layouts[ds_index], need_disparity)
        else:
            _, why = image_size(path)
            if why:
                problems.append(Problem(path, why))
    return len(jobs), problems


def check_annotations(groups: Iterable[SceneDataset]) -> list[Problem]:
    """Every annotation a ref of ``groups`` points at that covers no pixel of its image (polygons outside
    it, zero area) or does not decode: one problem each, naming the instances file, the annotation and
    its refs. Areas are read from the RLE; nothing is decoded."""
    used: dict[tuple[int, int], tuple[ReferAnnotations, list[int]]] = {}
    for scenes in groups:
        for scene in scenes.scenes:
            ann = scenes.annotations[scene.ds_index]
            for ref in scene.refs:
                for ann_id in ref.ann_ids:  # a no-target ref has none: its empty mask is what it says
                    ref_ids = used.setdefault((id(ann), ann_id), (ann, []))[1]
                    if ref.ref_id not in ref_ids:
                        ref_ids.append(ref.ref_id)
    problems = []
    for (_, ann_id), (ann, ref_ids) in used.items():
        refs = f"ref_id {', '.join(map(str, ref_ids))}"
        try:
            why = ann.empty_mask_problem(ann_id)
        except AnnotationError as exc:
            why = exc.problem
        if why:
            problems.append(Problem(ann.instances_path, f"{refs}: {why}"))
    return problems


def report(problems: Sequence[Problem], checked: int, limit: int = 50) -> str:
    """A readable summary: the count, then one line per problem (the first ``limit``)."""
    head = f"{len(problems)} problem(s) in {checked} scene(s):"
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join([head, *lines])


__all__ = ["MAX_ABS_DISPARITY_PX", "Problem", "check_annotations", "check_datasets", "check_scene", "report"]
