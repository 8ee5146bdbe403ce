"""LISA's task mix as one dataset: the items of several task datasets, drawn by task and dataset weights.

:class:`TaskMix` concatenates the task datasets (each following :mod:`dataset.tasks.base`'s contract; a
:class:`dataset.scenes.SceneDataset` serves ``refer_seg``) and names its groups, one per (task, dataset),
with the weight the sampler draws it with: the task's rate (``--sample_rates`` over ``--dataset``) times the
dataset's share within its task. A 2D image given to a model that reads a light field becomes a *flat*
light field: every neighbour view is the image itself and the disparity is zero everywhere -- what a camera
array sees of a fronto-parallel photograph at the focal plane -- so LISA's 2D data trains the same model.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.utils.data

from dataset.lightfield import DEFAULT_LAYOUT
from dataset.tasks.base import TASKS
from utils.views import Offset


def flat_light_field(item: dict[str, Any], offsets: Sequence[Offset], with_disparity: bool) -> dict[str, Any]:
    """``item`` (a 2D image: no neighbours, no disparity) as a flat light field: ``views`` (V, H, W, 3) the
    centre repeated for each of ``offsets`` (V, 2), ``disparity`` (H, W) zeros when ``with_disparity``.
    An item that already has views or a disparity, or has no pixels, is returned unchanged."""
    if "center" not in item or item["disparity"] is not None or len(item["views"]):
        return item
    center = item["center"]
    views = np.broadcast_to(center, (len(offsets), *center.shape)).copy()
    disparity = np.zeros(center.shape[:2], dtype=np.float32) if with_disparity else None
    return {
        **item,
        "views": views,
        "offsets": np.asarray(offsets, dtype=np.int64).reshape(len(offsets), 2),
        "disparity": disparity,
    }


class TaskMix(torch.utils.data.Dataset):
    """The items of ``parts`` (task name -> its dataset), in the given order, each with its ``task`` key.

    Args:
        parts: ``(task, dataset)`` pairs; a dataset has ``names`` (its datasets), ``__len__``,
            ``__getitem__`` and either ``group_of(index)`` or, for ``SceneDataset``, ``scenes[i].ds_index``.
        task_weights: one positive weight per part (the task's rate).
        dataset_weights: per part, one positive weight per entry of its ``names``.
        offsets: the neighbour views the model reads (a 2D image is repeated for each).
        flat_2d: turn 2D items into flat light fields (a model that reads views or a disparity).
        with_disparity: the flat light field carries a zero disparity.
    """

    def __init__(
        self,
        parts: Sequence[tuple[str, Any]],
        task_weights: Sequence[float],
        dataset_weights: Sequence[Sequence[float]],
        offsets: Sequence[Offset] = (),
        flat_2d: bool = False,
        with_disparity: bool = True,
    ) -> None:
        if not parts:
            raise ValueError("no task in the mix")
        if len(task_weights) != len(parts) or len(dataset_weights) != len(parts):
            raise ValueError(
                f"{len(parts)} tasks, {len(task_weights)} task weights, {len(dataset_weights)} lists"
            )
        for task, data in parts:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
            if len(data) == 0:
                raise ValueError(f"task {task}: no training item in {', '.join(data.names)}")
        self.parts = list(parts)
        self.offsets, self.flat_2d, self.with_disparity = list(offsets), flat_2d, with_disparity
        self.starts = [0]
        for _, data in self.parts:
            self.starts.append(self.starts[-1] + len(data))
        self.task_weights = [float(w) for w in task_weights]
        self.dataset_weights = [[float(w) for w in ws] for ws in dataset_weights]
        # the light-field file names the model-ready wrapper names a centre view with (the first part's)
        layouts = [getattr(data, "layout", None) for _, data in self.parts]
        self.layout = next((lay for lay in layouts if lay is not None), DEFAULT_LAYOUT)

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within it) of flat ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    def _group_in_part(self, part: int, local: int) -> int:
        data = self.parts[part][1]
        if hasattr(data, "group_of"):
            return int(data.group_of(local))
        return int(data.scenes[local].ds_index)

    def groups(self) -> tuple[list[list[int]], list[float]]:
        """Flat indices per (task, dataset) group and each group's weight: the task's weight times the
        dataset's share of its task's weights (groups without items are dropped, their share moved to the
        task's other datasets). Raises ``ValueError`` when a task has no item in any of its datasets."""
        groups: list[list[int]] = []
        weights: list[float] = []
        for p, (_, data) in enumerate(self.parts):
            members: list[list[int]] = [[] for _ in data.names]
            for local in range(len(data)):
                members[self._group_in_part(p, local)].append(self.starts[p] + local)
            shares = [w for w, m in zip(self.dataset_weights[p], members) if m]
            for w, m in zip(self.dataset_weights[p], members):
                if m:
                    groups.append(m)
                    weights.append(self.task_weights[p] * w / sum(shares))
        return groups, weights

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds every part's sampling."""
        for _, data in self.parts:
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, local = self.locate(index)
        task, data = self.parts[part]
        item = {**data[local], "task": task}
        if self.flat_2d:
            item = flat_light_field(item, self.offsets, self.with_disparity)
        return item
