"""Read reasoning-segmentation queries: ReasonSeg as LISA reads it, and its light-field version.

Files (relative to ``dataset_dir``) of dataset ``<ds>`` (``--reason_seg_data "ReasonSeg|train"``: the name,
then the split):

* ``reason_seg/<ds>/<split>/<stem>.json``, one target per file: ``{"text": [str, …]`` (queries that all ask
  for the target), ``"is_sentence": bool`` (full sentences, or noun phrases), ``"shapes": [{"label": str,
  "points": [[x, y], …], "shape_type": "polygon", …}, …]}``; light-field data may add ``"tags": [str, …]``
  (``"closest"``, ``"o-2"``, ``"implicit"``) and ``"explicit": [str, …]``;
* published (2D) data: the image is ``<stem>.jpg`` beside the json; ``image_id`` is the json's index in the
  sorted (split, stem) list of every split folder of ``<ds>``;
* light-field data (``lf/<ds>/`` exists): no jpg; the image is the scene folder named by the stem without an
  optional ``__<k>`` suffix (``Image12.json`` and ``Image12__2.json`` -> ``lf/<ds>/Image12``, image_id 12);
* ``reason_seg/<ds>/explanatory/train.json``: a list of ``{"image": "<stem>.jpg"`` (light field:
  ``"<stem>"``), ``"query": str, "outputs": str}``; ``outputs`` is the explanation of that image's target.
  LISA asks its json's ``text`` queries, never ``query``: so do the items here.

``split`` names a folder; when no folder has that name, LISA's ``_``-joined list (``"train_val"``: both).

The mask follows LISA's ``get_mask_from_json``: a shape labelled ``"flag"`` (any case) is skipped; the others
are drawn (outline and inside, vertices truncated to int) largest first, so a smaller shape overwrites a
larger one where they overlap: a label containing ``"ignore"`` (any case) draws :data:`IGNORE_LABEL`, any other
label 1. Points are (x, y) px, each within 1 px of the image; a shape of one or two points (a traced contour
of a thin part) is drawn as LISA draws it: a pixel, a segment (a labelme 2-point rectangle too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch.utils.data

from dataset.errors import AnnotationError, DataError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout
from dataset.scenes import split_datasets
from dataset.tasks.base import IGNORE_LABEL, check_sampling
from dataset.tasks.vqa import image_sources
from utils.views import Offset

#: Folder of the reasoning datasets, relative to ``dataset_dir``.
REASON_SEG_ROOT = "reason_seg"
#: Folder (inside a dataset) of the explanations; never a split.
EXPLANATORY = "explanatory"
#: How far (px) a vertex may lie outside the image (annotation tools round at the border).
BORDER_PX = 1.0
_SUFFIX = re.compile(r"(.+?)(?:__\d+)?")


@dataclass(frozen=True)
class ReasonQuery:
    """One annotation file: the queries of one target and its shapes.

    Attributes:
        path: the json file.
        split: the split folder it was found in.
        texts: the queries (stripped, non-empty).
        is_sentence: the queries are full sentences.
        shapes: (index in the json's ``shapes``, mask value 1 or IGNORE_LABEL, (K, 2) float64 x, y px)
            of every shape but the flags.
        tags: the light-field tags (empty for ReasonSeg).
        explicit: the light-field explicit expressions (empty for ReasonSeg).
    """

    path: Path
    split: str
    texts: tuple[str, ...]
    is_sentence: bool
    shapes: tuple[tuple[int, int, np.ndarray], ...]
    tags: tuple[str, ...] = ()
    explicit: tuple[str, ...] = ()


def read_json(path: Path) -> Any:
    """The json at ``path`` (UTF-8, else cp1252 as LISA falls back to). Raises ``AnnotationError``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            return json.loads(data.decode("cp1252"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"cannot read as JSON ({exc})") from None


def _strings(raw: Any, key: str, path: Path, required: bool = True) -> tuple[str, ...]:
    value = raw.get(key, None if required else [])
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise AnnotationError(path, f"{key!r} must be a list of non-empty strings, got {str(value)[:80]!r}")
    if required and not value:
        raise AnnotationError(path, f"{key!r} is empty: a query file needs at least one query")
    return tuple(t.strip() for t in value)


def _shape(raw: Any, k: int, path: Path) -> tuple[int, int, np.ndarray] | None:
    """(k, mask value, (K, 2) points) of shape ``k``, or None for a flag."""
    label = raw.get("label") if isinstance(raw, dict) else None
    if not isinstance(label, str):
        raise AnnotationError(path, f"shape {k} needs a string 'label'")
    if label.lower() == "flag":  # LISA: meaningless deprecated annotations
        return None
    try:
        points = np.asarray(raw.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        points = np.empty((0,))
    if points.ndim != 2 or points.shape[1] != 2 or not len(points) or not np.isfinite(points).all():
        raise AnnotationError(
            path, f"shape {k} ({label!r}): 'points' must be a non-empty list of [x, y] numbers"
        )
    return k, IGNORE_LABEL if "ignore" in label.lower() else 1, points


def parse_query(raw: Any, path: Path, split: str) -> ReasonQuery:
    """Validate one annotation file's content (see the module docstring). Raises ``AnnotationError``."""
    if not isinstance(raw, dict):
        raise AnnotationError(path, f"expected an object, got {type(raw).__name__}")
    missing = [k for k in ("text", "is_sentence", "shapes") if k not in raw]
    if missing:
        raise AnnotationError(path, f"missing keys {missing}")
    if not isinstance(raw["is_sentence"], bool):
        raise AnnotationError(path, f"'is_sentence' must be true or false, got {raw['is_sentence']!r}")
    if not isinstance(raw["shapes"], list):
        raise AnnotationError(path, "'shapes' must be a list")
    shapes = [_shape(s, k, path) for k, s in enumerate(raw["shapes"])]
    return ReasonQuery(
        path=path,
        split=split,
        texts=_strings(raw, "text", path),
        is_sentence=raw["is_sentence"],
        shapes=tuple(s for s in shapes if s is not None),
        tags=_strings(raw, "tags", path, required=False),
        explicit=_strings(raw, "explicit", path, required=False),
    )


def query_mask(query: ReasonQuery, hw: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 mask of ``query`` (0, 1, IGNORE_LABEL) drawn as LISA draws it (module docstring).

    Raises ``AnnotationError`` naming the json when a vertex lies more than :data:`BORDER_PX` outside."""
    height, width = hw
    regions, areas = [], []
    for k, value, points in query.shapes:
        low, high = points.min(axis=0), points.max(axis=0)  # (x, y) each
        if (low < -BORDER_PX).any() or (high > np.array([width, height]) - 1 + BORDER_PX).any():
            raise AnnotationError(
                query.path,
                f"shape {k}: vertices span x {low[0]:g}..{high[0]:g}, y {low[1]:g}..{high[1]:g}, "
                f"outside the {width}x{height} image (x, y in px)",
            )
        region = np.zeros(hw, dtype=np.uint8)
        polygon = points.astype(np.int32)[None]  # truncation, as LISA's np.array(..., dtype=np.int32)
        cv2.polylines(region, polygon, True, 1, 1)
        cv2.fillPoly(region, polygon, 1)
        regions.append((value, region.astype(bool)))
        areas.append(int(np.count_nonzero(region)))
    mask = np.zeros(hw, dtype=np.uint8)
    for i in np.argsort(areas, kind="stable")[::-1]:  # largest first; LISA's order for equal areas
        value, region = regions[i]
        mask[region] = value
    return mask


@dataclass(frozen=True)
class _Item:
    ds_index: int
    query: ReasonQuery
    image_id: int
    image: Path
    image_key: str  # the explanatory json's "image"


class ReasonSegDataset(torch.utils.data.Dataset):
    """Reasoning-segmentation queries, one item per annotation file, over one or more datasets.

    Args:
        dataset_dir: root holding ``reason_seg/`` and ``lf/``.
        datasets: ``"ReasonSeg"``, ``"ReasonSeg|train"`` (the split after ``|`` overrides ``split``),
            ``"a||b|val"`` or a list.
        split: the split folder (or ``_``-joined folders) of names without their own.
        mode: ``"train"`` draws up to ``num_classes_per_sample`` of a file's queries (all, in order, when it
            has fewer, as LISA) with an RNG seeded by ``(seed, epoch, index)`` (call :meth:`set_epoch`);
            ``"val"`` returns every query.
        views, layout, lf_root, with_disparity: light-field scenes (as :class:`dataset.tasks.vqa.VQADataset`).
        with_pixels: False: items hold ``hw`` (H, W) instead of pixels (light-field data only).
        explanatory: ≥ 0 reads each dataset's ``explanatory/train.json`` when it exists (:attr:`explanation_files`
            says which were read); < 0 gives every item None explanations.

    Items: ``task`` "reason_seg", ``image_id``, ``ds``, ``scene_dir``, the pixels or ``hw``, and for the N
    queries drawn: ``sentences`` (N), ``masks`` (N, H, W) uint8 (the file's one mask repeated; 0, 1,
    IGNORE_LABEL), ``is_sentence`` (N), ``ref_ids`` (N, the query's index in ``text``), ``subsets`` (N,
    (split, *tags)), ``no_target`` (N, False), ``explanations`` (N, the image's explanation or None).
    """

    task = "reason_seg"

    def __init__(
        self,
        dataset_dir: str | Path,
        datasets: str | Sequence[str],
        split: str = "train",
        *,
        mode: Literal["train", "val"] = "train",
        num_classes_per_sample: int = 3,
        seed: int = 0,
        views: Sequence[Offset] = (),
        layout: LightFieldLayout | Mapping[str, LightFieldLayout] = DEFAULT_LAYOUT,
        lf_root: str | Mapping[str, str] = "lf/{ds}",
        with_disparity: bool = True,
        with_pixels: bool = True,
        explanatory: float = -1.0,
    ) -> None:
        check_sampling(mode, num_classes_per_sample)
        self.dataset_dir = Path(dataset_dir)
        entries = [name.partition("|") for name in split_datasets(datasets)]
        self.names = [ds.strip() for ds, _, _ in entries]
        self.splits = [own.strip() if bar else split for _, bar, own in entries]
        self.mode, self.seed, self.epoch = mode, seed, 0
        self.num_classes_per_sample = num_classes_per_sample
        self.offsets: tuple[Offset, ...] = tuple((int(r), int(c)) for r, c in views)
        self.with_disparity, self.with_pixels = with_disparity, with_pixels
        self.sources = image_sources(self.dataset_dir, self.names, layout, lf_root, with_pixels)
        self.layout = self.sources[0].layout
        self.explanatory = explanatory
        self.explanation_files: list[Path | None] = []
        self.explanations: list[dict[str, str]] = []
        self.items: list[_Item] = []
        for ds_index in range(len(self.names)):
            self.items.extend(self._index(ds_index))
            self.explanations.append(self._read_explanations(ds_index))

    def _root(self, ds_index: int) -> Path:
        return self.dataset_dir / REASON_SEG_ROOT / self.names[ds_index]

    def _split_folders(self, ds_index: int) -> list[Path]:
        """The folders of dataset ``ds_index``'s split: itself, else its ``_``-joined parts."""
        root, split = self._root(ds_index), self.splits[ds_index]
        if not root.is_dir():
            raise AnnotationError(root, "reasoning-segmentation dataset folder not found")
        if (root / split).is_dir():
            return [root / split]
        parts = split.split("_")
        if len(parts) > 1 and all(p and (root / p).is_dir() for p in parts):
            return [root / p for p in parts]
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != EXPLANATORY)
        raise AnnotationError(
            root / split, f"split folder not found (splits here: {', '.join(have) or 'none'})"
        )

    def _index(self, ds_index: int) -> list[_Item]:
        """The validated annotation files of dataset ``ds_index``'s split, sorted by (split, stem)."""
        source, root = self.sources[ds_index], self._root(ds_index)
        if not source.lightfield:  # a stable id per image over every split folder
            every = sorted(
                (p.parent.name, p.stem) for p in root.glob("*/*.json") if p.parent.name != EXPLANATORY
            )
            ids = {key: i for i, key in enumerate(every)}
        items = []
        for folder in self._split_folders(ds_index):
            paths = sorted(folder.glob("*.json"))
            if not paths:
                raise AnnotationError(folder, "no .json annotation file in this split folder")
            for path in paths:
                query = parse_query(read_json(path), path, folder.name)
                if source.lightfield:
                    scene = _SUFFIX.fullmatch(path.stem).group(1)
                    image_id = source.scene_id(scene)
                    if image_id is None:
                        expected = source.layout.scene_name("<id>")
                        raise AnnotationError(
                            path, f"name is not a scene of {source.ds!r} ({expected}[__<k>].json)"
                        )
                    items.append(_Item(ds_index, query, image_id, source.lf_dir / scene, path.stem))
                else:
                    image = path.with_suffix(".jpg")
                    items.append(_Item(ds_index, query, ids[(folder.name, path.stem)], image, image.name))
        return items

    def _read_explanations(self, ds_index: int) -> dict[str, str]:
        """image name -> explanation of dataset ``ds_index`` (empty when not read)."""
        path = self._root(ds_index) / EXPLANATORY / "train.json"
        if self.explanatory < 0 or not path.is_file():
            self.explanation_files.append(None)
            return {}
        raw = read_json(path)
        if not isinstance(raw, list):
            raise AnnotationError(path, f"expected a list of records, got {type(raw).__name__}")
        out = {}
        for i, record in enumerate(raw):
            fields = [
                record.get(k) if isinstance(record, dict) else None for k in ("image", "query", "outputs")
            ]
            if not all(isinstance(f, str) for f in fields):
                raise AnnotationError(path, f"record {i} needs strings 'image', 'query' and 'outputs'")
            out[fields[0]] = fields[2]
        self.explanation_files.append(path)
        return out

    def __len__(self) -> int:
        return len(self.items)

    def group_of(self, index: int) -> int:
        """Index into :attr:`names` of item ``index``'s dataset."""
        return self.items[index].ds_index

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds training-mode sampling."""
        self.epoch = int(epoch)

    def _pick(self, index: int, count: int) -> list[int]:
        """Indices of the queries item ``index`` asks: all (val, or fewer than asked) or a seeded draw."""
        if self.mode == "val" or count < self.num_classes_per_sample:
            return list(range(count))
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return [int(i) for i in rng.choice(count, size=self.num_classes_per_sample, replace=False)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        query, source = item.query, self.sources[item.ds_index]
        if not source.lightfield and not item.image.is_file():
            raise DataError(item.image, f"image of {query.path} not found")
        fields, hw = source.image_fields(item.image, self.with_pixels, self.offsets, self.with_disparity)
        mask = query_mask(query, hw)
        picks = self._pick(index, len(query.texts))
        n = len(picks)
        explanation = self.explanations[item.ds_index].get(item.image_key)
        return {
            "task": self.task,
            "image_id": item.image_id,
            "ds": source.ds,
            **fields,
            "sentences": [query.texts[i] for i in picks],
            "masks": np.repeat(mask[None], n, axis=0),
            "is_sentence": [query.is_sentence] * n,
            "ref_ids": picks,
            "subsets": [(query.split, *query.tags)] * n,
            "no_target": [False] * n,
            "explanations": [explanation] * n,
        }
