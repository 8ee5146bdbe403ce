"""LISA's task mix for training: one dataset per task of ``--dataset``, combined by :class:`TaskMix`.

``--dataset "sem_seg||refer_seg||vqa||reason_seg" --sample_rates "9,3,3,1"`` trains on all four: each sample
draws its task in proportion to the task rates, then a dataset of that task (``--refer_seg_sample_rates``
weights the referring datasets, the other tasks draw theirs evenly, as LISA does), then the next item of that
dataset's own permutation. ``--dataset refer_seg`` alone keeps the loader of referring segmentation (and
``--sample_rates`` its meaning there). The readers: :mod:`dataset.tasks` (a light-field dataset name given to
``--sem_seg_data``, ``--vqa_data`` or ``--reason_seg_data`` reads the generator's light-field version).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dataset.scenes import SceneDataset
from dataset.tasks.mix import TaskMix
from dataset.tasks.reason_seg import ReasonSegDataset
from dataset.tasks.sem_seg import SemSegDataset
from dataset.tasks.vqa import VQADataset
from training.config import RunConfig
from utils.views import Offset


def reason_parts(value: str, flag: str = "--reason_seg_data") -> tuple[list[str], str]:
    """``"ReasonSeg|train"`` -> (["ReasonSeg"], "train"); several datasets share the split:
    ``"ReasonSeg||ref-urbanlf-syn|train"``. Raises ``ValueError`` naming ``flag``."""
    names, sep, split = value.rpartition("|")
    if not sep or not split or not names.strip("|"):
        raise ValueError(f"{flag} {value!r}: expected 'name|split', e.g. 'ReasonSeg|train'")
    return [n for n in names.split("||") if n], split


def task_parts(
    cfg: RunConfig,
    refer: Callable[[], SceneDataset],
    layouts: Callable[[str], dict[str, Any]],
    views: Sequence[Offset],
    rank: int,
    with_disparity: bool,
    with_pixels: bool,
) -> list[tuple[str, Any]]:
    """(task, training dataset) for every task of ``--dataset``, in its order. ``refer()`` builds the
    referring scenes; ``layouts(datasets)`` the light-field layouts of a ``||``-joined name list
    (``training.loaders.scene_layouts``)."""
    d, loop = cfg.datasets, cfg.loop
    common = {
        "views": list(views),
        "mode": "train",
        "num_classes_per_sample": loop.num_classes_per_sample,
        "seed": loop.seed + rank,
        "with_disparity": with_disparity,
        "with_pixels": with_pixels,
    }
    parts: list[tuple[str, Any]] = []
    for task in d.tasks:
        if task == "refer_seg":
            parts.append((task, refer()))
        elif task == "sem_seg":
            names = d.sem_seg_data
            parts.append((task, SemSegDataset(d.dataset_dir, names, "train", **layouts(names), **common)))
        elif task == "vqa":
            names = d.vqa_data
            parts.append((task, VQADataset(d.dataset_dir, names, "train", **layouts(names), **common)))
        else:
            names, split = reason_parts(d.reason_seg_data)
            joined = "||".join(names)
            data = ReasonSegDataset(
                d.dataset_dir, names, split, explanatory=d.explanatory, **layouts(joined), **common
            )
            parts.append((task, data))
    return parts


def build_task_mix(
    cfg: RunConfig,
    refer: Callable[[], SceneDataset],
    layouts: Callable[[str], dict[str, Any]],
    views: Sequence[Offset],
    rank: int,
    with_disparity: bool,
    with_pixels: bool,
    flat_2d: bool,
) -> TaskMix:
    """The training items of every task of ``--dataset`` with their sampling weights (see the module doc);
    ``flat_2d``: a 2D image becomes a flat light field (a model that reads views or a disparity)."""
    parts = task_parts(cfg, refer, layouts, views, rank, with_disparity, with_pixels)
    d = cfg.datasets
    weights = [d.dataset_weights(task) for task, _ in parts]
    for (task, data), ws in zip(parts, weights):
        if len(ws) != len(data.names):
            raise ValueError(f"--{task}_data: {len(ws)} weights for the datasets {data.names}")
    return TaskMix(parts, d.task_weights(), weights, views, flat_2d=flat_2d, with_disparity=with_disparity)
