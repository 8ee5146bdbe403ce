"""Estimated-disparity cache: the built-in estimator's map, written once into every scene folder.

``scripts/estimate_disparity.py`` (any folder of scenes) and ``train_ds.py --depth_source estimate`` (the
scenes of the splits a run uses, see :func:`training.loaders.prepare_estimated_disparity`) share this code.
Each scene ``<scene>/`` gets ``<scene>/<out_name>`` (default :data:`DEFAULT_ESTIMATED_NAME`,
``5_5_disparity_est.npy``): float32 ``(H, W)``, px between adjacent views, larger = nearer, the convention
of ``5_5_disparity.npy``, so the datasets read it like any disparity file. Files are written atomically
(temporary file in the scene folder + ``os.replace``): an interrupted run leaves only complete maps, and
scenes that already have ``<out_name>`` are skipped (unless ``overwrite``), whatever settings wrote them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.disparity.config import DisparityConfig
from dataset.disparity.estimator import disparity_for_scene
from dataset.errors import LightFieldError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout
from dataset.options import DEFAULT_ESTIMATED_NAME, check_cache_name

__all__ = [
    "DEFAULT_ESTIMATED_NAME",
    "check_cache_name",
    "estimate_scenes",
    "find_scenes",
    "scenes_to_estimate",
    "write_npy_atomic",
]

#: ``estimator(scene_dir, layout, config, device=...) -> (H, W) float32``, like
#: :func:`dataset.disparity.estimator.disparity_for_scene`.
Estimator = Callable[..., np.ndarray]


def _scene_key(path: Path) -> tuple[int, int | str]:
    match = re.search(r"(\d+)$", path.name)
    return (0, int(match.group(1))) if match else (1, path.name)


def find_scenes(lf_root: str | Path, pattern: str = "Image*") -> list[Path]:
    """Scene folders matching ``pattern`` under ``lf_root``, in numeric order of their trailing id.

    Raises ``FileNotFoundError`` when ``lf_root`` is not a folder.
    """
    root = Path(lf_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: --lf_root is not a folder")
    return sorted((p for p in root.glob(pattern) if p.is_dir()), key=_scene_key)


def write_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as .npy via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scenes_to_estimate(
    scene_dirs: Iterable[str | Path], out_name: str, overwrite: bool = False
) -> list[Path]:
    """The scenes of ``scene_dirs`` (order kept, duplicates dropped) that lack ``<scene>/<out_name>``
    (all of them with ``overwrite``)."""
    check_cache_name(out_name)
    seen: set[Path] = set()
    todo: list[Path] = []
    for scene in map(Path, scene_dirs):
        if scene in seen:
            continue
        seen.add(scene)
        if overwrite or not (scene / out_name).is_file():
            todo.append(scene)
    return todo


def estimate_scenes(
    scene_dirs: Sequence[str | Path],
    out_name: str = DEFAULT_ESTIMATED_NAME,
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    config: DisparityConfig | None = None,
    *,
    device: str = "cpu",
    estimator: Estimator | None = None,
    progress: bool = False,
) -> int:
    """Estimate every scene of ``scene_dirs`` and write ``<scene>/<out_name>`` atomically, in order.

    Does not skip anything: pick the scenes with :func:`scenes_to_estimate` first.

    Args:
        scene_dirs: scene folders (``Image<id>/``) holding the views of ``layout``.
        out_name: file written into each scene folder (a plain ``.npy`` name).
        layout: view file names and centre (its ``disparity_name`` is not used).
        config: estimator settings (default ``DisparityConfig()``).
        device: where the estimator runs (``"cpu"``, ``"cuda:0"``, ...).
        estimator: defaults to :func:`dataset.disparity.estimator.disparity_for_scene` (tests pass a stand-in).
        progress: show a tqdm bar.

    Returns:
        The number of files written.

    Raises:
        LightFieldError naming the file: a scene folder or a view the estimator needs is missing,
        unreadable or of another size than the centre view, or the estimate is not a finite (H, W) map.
    """
    check_cache_name(out_name)
    estimator = estimator or disparity_for_scene
    scenes = [Path(s) for s in scene_dirs]
    if progress:
        scenes = tqdm(scenes, desc=f"disparity -> {out_name}", unit="scene")
    written = 0
    for scene in scenes:
        disparity = np.asarray(estimator(scene, layout, config, device=device))
        if disparity.ndim != 2:
            raise LightFieldError(
                scene, f"the estimator returned shape {disparity.shape}, not (H, W); {out_name} not written"
            )
        bad = int(disparity.size - np.isfinite(disparity).sum())
        if bad:
            raise LightFieldError(
                scene, f"the estimator returned {bad} NaN/inf values; {out_name} not written"
            )
        write_npy_atomic(scene / out_name, disparity.astype(np.float32, copy=False))
        written += 1
    return written
