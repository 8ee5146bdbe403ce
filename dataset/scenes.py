"""Raw per-scene dataset: one item = one scene (image) with its views, disparity, expressions and masks.

This is the layer under the training and validation datasets: it returns arrays at original resolution
and does no model-specific preprocessing (resizing, normalisation, prompts, tokenisation).

Two sources of pixels per ``<ds>``:

* ``"lightfield"``: ``<dataset_dir>/lf/<ds>/Image<id>/`` read by :func:`load_light_field` (centre,
  neighbours, disparity);
* ``"image"``: a 2D RefCOCO-style dataset, centre from ``<dataset_dir>/refer_seg/<ds>/images/<file_name>``,
  or, when that folder does not exist, from where LISA keeps the images (:data:`LISA_IMAGE_ROOTS`:
  ``refer_seg/images/mscoco/images/train2014/`` for the RefCOCO family and gRefCOCO,
  ``refer_seg/images/saiapr_tc-12/`` for RefCLEF); no neighbours (``views`` is (0, H, W, 3)) and no disparity.

``source="auto"`` picks ``"lightfield"`` when ``lf/<ds>/`` exists, else ``"image"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch.utils.data

from dataset.errors import AnnotationError
from dataset.lightfield import (
    DEFAULT_LAYOUT,
    LightFieldLayout,
    LightFieldSample,
    read_disparity,
)
from dataset.options import PROBES
from dataset.refer import Ref, ReferAnnotations
from dataset.tasks.base import check_sampling, load_pixels
from utils.views import NEIGHBOURHOODS, Offset, parse_views

Source = Literal["auto", "lightfield", "image"]
DEFAULT_IMAGE_ROOT = "refer_seg/{ds}/images"
#: Where LISA's layout keeps a 2D dataset's images (relative to ``dataset_dir``), by dataset name; any other
#: name uses the COCO folder, as LISA does for every RefCOCO-family dataset.
LISA_IMAGE_ROOTS: dict[str, str] = {"refclef": "refer_seg/images/saiapr_tc-12"}
LISA_COCO_ROOT = "refer_seg/images/mscoco/images/train2014"


def image_root_of(dataset_dir: Path, ds: str, image_root: str = DEFAULT_IMAGE_ROOT) -> str:
    """The image folder of 2D dataset ``ds``: ``image_root`` when given or present, else LISA's layout
    (:data:`LISA_IMAGE_ROOTS`) when that folder exists, else ``image_root`` (the pre-flight check then
    names the missing files there)."""
    own = image_root.format(ds=ds)
    if image_root != DEFAULT_IMAGE_ROOT or (dataset_dir / own).is_dir():
        return own
    lisa = LISA_IMAGE_ROOTS.get(ds.split("(")[0], LISA_COCO_ROOT)
    return lisa if (dataset_dir / lisa).is_dir() else own


@dataclass(frozen=True)
class _Scene:
    ds_index: int
    image_id: int
    refs: tuple[Ref, ...]


def _name_and_split_by(name: str) -> tuple[str, str | None]:
    """``"refcocog(umd)"`` -> ``("refcocog", "umd")`` (REFER ``refs(umd).p``); ``"ref-urbanlf-syn"`` ->
    ``("ref-urbanlf-syn", None)``."""
    if name.endswith(")") and "(" in name:
        ds, split_by = name[:-1].split("(", 1)
        if ds and split_by:
            return ds, split_by
    return name, None


def _per_dataset(value: Any, ds: str, what: str) -> Any:
    """``value`` itself, or its entry for ``ds`` when it is a mapping of dataset names."""
    if isinstance(value, Mapping):
        if ds not in value:
            raise ValueError(f"no {what} given for dataset {ds!r} (given for {sorted(value)})")
        return value[ds]
    return value


def split_datasets(datasets: str | Sequence[str]) -> list[str]:
    """``"a||b"`` or ``["a", "b"]`` → ``["a", "b"]`` (the ``--refer_seg_data`` convention)."""
    names = datasets.split("||") if isinstance(datasets, str) else list(datasets)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no dataset names in {datasets!r}")
    return names


class SceneDataset(torch.utils.data.Dataset):
    """Scenes having at least one ref in ``split``, over one or more datasets.

    Args:
        dataset_dir: root holding ``refer_seg/`` and ``lf/``.
        datasets: dataset names (``"a||b"`` or a list).
        split: split name or subset tag, or ``"A&B"`` for both (``"val&closest"``; see :meth:`Ref.in_split`).
        views: neighbour offsets ``(drow, dcol)`` or a spec for :func:`parse_views`.
        layout: light-field file names.
        mode: ``"train"`` samples up to ``num_classes_per_sample`` (ref, sentence) pairs from distinct
            refs with an RNG seeded by ``(seed, epoch, index)`` (reproducible in any worker; call
            :meth:`set_epoch`); ``"val"`` returns every (ref, sentence) pair of the scene.
        with_disparity: load the centre disparity of light-field scenes.
        split_by: REFER ``refs(<split_by>).p`` to read when ``<ds>.json`` is absent.
        source: ``"auto"``, ``"lightfield"`` or ``"image"`` (see module docstring).
        lf_root, image_root: folders relative to ``dataset_dir``; ``{ds}`` is the dataset name.
        with_pixels: False (a feature cache serves the encodings): items hold ``hw`` (H, W) from the
            annotations instead of ``center`` / ``views`` / ``offsets`` / ``disparity``; no image is read.
        probe: what the light-field input is replaced with, to measure what a model reads (one of
            :data:`PROBES`): ``"exact"`` (as on disk), ``"swapped_disparity"`` (each light-field scene gets
            the disparity of the next light-field scene of this set, the last the first's; resized to the
            scene's size, values scaled by the width ratio, when the sizes differ) or ``"centre_views"``
            (every neighbour view replaced by the centre view). Masks and text are never changed.

    Items are dicts: ``image_id`` int, ``ds`` str, ``scene_dir`` str (the image file for 2D data),
    ``center`` (H, W, 3) uint8, ``views`` (V, H, W, 3) uint8, ``offsets`` (V, 2) int64, ``disparity``
    (H, W) float32 or None, ``sentences`` list[str] (N), ``masks`` (N, H, W) uint8 {0, 1},
    ``ref_ids`` list[int] (N), ``ann_ids`` list[tuple[int, ...]] (N; each ref's targets), ``subsets``
    list[tuple[str, ...]] (N; the ref's split then its tags).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        datasets: str | Sequence[str],
        split: str,
        views: Sequence[Offset] | str = NEIGHBOURHOODS["4"],
        layout: LightFieldLayout | Mapping[str, LightFieldLayout] = DEFAULT_LAYOUT,
        mode: Literal["train", "val"] = "val",
        num_classes_per_sample: int = 3,
        with_disparity: bool = True,
        split_by: str | None = None,
        source: Source = "auto",
        lf_root: str | Mapping[str, str] = "lf/{ds}",
        image_root: str = DEFAULT_IMAGE_ROOT,
        seed: int = 0,
        with_pixels: bool = True,
        probe: str = "exact",
    ) -> None:
        check_sampling(mode, num_classes_per_sample)
        self.dataset_dir = Path(dataset_dir)
        named = [_name_and_split_by(n) for n in split_datasets(datasets)]
        self.names = [ds for ds, _ in named]
        self.split = split
        self.layouts = [_per_dataset(layout, ds, "layout") for ds in self.names]
        self.layout = self.layouts[0]
        self.offsets: tuple[Offset, ...] = (
            parse_views(views, self.layout) if isinstance(views, str) else tuple(tuple(o) for o in views)
        )
        self.mode = mode
        self.num_classes_per_sample = num_classes_per_sample
        self.with_disparity = with_disparity
        self.lf_roots = [_per_dataset(lf_root, ds, "lf_root").format(ds=ds) for ds in self.names]
        self.image_roots = [image_root_of(self.dataset_dir, ds, image_root) for ds in self.names]
        self.seed = seed
        self.with_pixels = with_pixels
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
        if probe != "exact" and not with_pixels:
            raise ValueError(f"probe {probe!r} changes the pixels: it cannot be served from a feature cache")
        self.probe = probe
        self.epoch = 0
        self.annotations = [ReferAnnotations.load(self.dataset_dir, ds, own or split_by) for ds, own in named]
        self.sources = [self._resolve_source(ds, source) for ds in self.names]
        self.scenes = self._index_scenes()

    def _resolve_source(self, ds: str, source: Source) -> str:
        if source not in ("auto", "lightfield", "image"):
            raise ValueError(f"source must be 'auto', 'lightfield' or 'image', got {source!r}")
        if source != "auto":
            return source
        root = self.lf_roots[self.names.index(ds)]
        return "lightfield" if (self.dataset_dir / root).is_dir() else "image"

    def _index_scenes(self) -> list[_Scene]:
        scenes: list[_Scene] = []
        for ds_index, ann in enumerate(self.annotations):
            by_image: dict[int, list[Ref]] = {}
            for ref in ann.refs_for(self.split):
                by_image.setdefault(ref.image_id, []).append(ref)
            scenes.extend(
                _Scene(ds_index, image_id, tuple(by_image[image_id])) for image_id in sorted(by_image)
            )
        return scenes

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds training-mode sampling."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def num_expressions(self) -> int:
        """Total (ref, sentence) pairs over all scenes (what ``mode="val"`` returns)."""
        return sum(len(ref.sentences) for scene in self.scenes for ref in scene.refs)

    def scene_path(self, index: int) -> Path:
        """Scene folder (light field) or image file (2D) of item ``index``."""
        scene = self.scenes[index]
        if self.sources[scene.ds_index] == "lightfield":
            root = self.lf_roots[scene.ds_index]
            return self.dataset_dir / root / self.layouts[scene.ds_index].scene_name(scene.image_id)
        file_name = self.annotations[scene.ds_index].image(scene.image_id)["file_name"]
        return self.dataset_dir / self.image_roots[scene.ds_index] / file_name

    def _pick(self, index: int, refs: tuple[Ref, ...]) -> list[tuple[Ref, str]]:
        """(ref, sentence) pairs of one item: all of them (val) or a seeded sample (train)."""
        if self.mode == "val":
            return [(ref, sent) for ref in refs for sent in ref.sentences]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        count = min(self.num_classes_per_sample, len(refs))
        chosen = rng.choice(len(refs), size=count, replace=False)
        return [(refs[i], refs[i].sentences[int(rng.integers(len(refs[i].sentences)))]) for i in chosen]

    def _load_pixels(self, index: int) -> LightFieldSample:
        ds_index = self.scenes[index].ds_index
        lightfield = self.sources[ds_index] == "lightfield"
        sample = load_pixels(
            self.scene_path(index), lightfield, self.offsets, self.layouts[ds_index], self.with_disparity
        )
        return self._probed(index, sample) if lightfield else sample

    def _probed(self, index: int, sample: LightFieldSample) -> LightFieldSample:
        """``sample`` with its input replaced as :attr:`probe` says (see the class doc)."""
        if self.probe == "centre_views":
            views = np.broadcast_to(sample.center, sample.views.shape).copy()
            return dataclasses.replace(sample, views=views)
        if self.probe == "swapped_disparity" and sample.disparity is not None:
            donor = self._donor(index)
            if donor is None:
                raise ValueError(
                    f"probe 'swapped_disparity': {self.scene_path(index)} is the only light-field scene of "
                    "the set; another scene's disparity is needed"
                )
            layout = self.layouts[self.scenes[donor].ds_index]
            other = read_disparity(self.scene_path(donor) / layout.disparity_name)
            h, w = sample.disparity.shape
            if other.shape != (h, w):
                scale = w / other.shape[1]
                other = cv2.resize(other, (w, h), interpolation=cv2.INTER_NEAREST) * np.float32(scale)
            return dataclasses.replace(sample, disparity=np.ascontiguousarray(other, dtype=np.float32))
        return sample

    def _donor(self, index: int) -> int | None:
        """The light-field scene after ``index`` (cyclically) whose disparity the swap probe gives it."""
        n = len(self.scenes)
        for step in range(1, n):
            other = (index + step) % n
            if self.sources[self.scenes[other].ds_index] == "lightfield":
                return other
        return None

    def _masks(self, index: int, refs: list[Ref], hw: tuple[int, int]) -> np.ndarray:
        """(N, H, W) uint8 masks of ``refs`` (a multi-target ref's union, a no-target ref's zeros), each
        annotation decoded once, checked against the centre's (H, W)."""
        ann = self.annotations[self.scenes[index].ds_index]
        decoded: dict[int, np.ndarray] = {}
        masks = np.empty((len(refs), *hw), dtype=np.uint8)
        for i, ref in enumerate(refs):
            mask = ann.ref_mask(ref, decoded)
            if mask.shape != hw:
                ids = ", ".join(map(str, ref.ann_ids))
                what = f"annotation {ids}" if len(ref.ann_ids) == 1 else f"annotations {ids}"
                raise AnnotationError(
                    ann.instances_path,
                    f"image {ref.image_id}: mask of {what} is {mask.shape}, centre view of "
                    f"{self.scene_path(index)} is {hw} (ref_id {ref.ref_id})",
                )
            masks[i] = mask
        return masks

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``index`` from its annotation record (no image is read)."""
        scene = self.scenes[index]
        record = self.annotations[scene.ds_index].image(scene.image_id)
        return int(record["height"]), int(record["width"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scenes[index]
        pairs = self._pick(index, scene.refs)
        refs = [ref for ref, _ in pairs]
        if not self.with_pixels:  # a feature cache holds the images' encodings: masks and text only
            hw = self.image_hw(index)
            return {
                "image_id": scene.image_id,
                "ds": self.names[scene.ds_index],
                "scene_dir": str(self.scene_path(index)),
                "hw": hw,
                "sentences": [sent for _, sent in pairs],
                "masks": self._masks(index, refs, hw),
                "ref_ids": [ref.ref_id for ref in refs],
                "ann_ids": [ref.ann_ids for ref in refs],
                "subsets": [ref.tags for ref in refs],
                "no_target": [ref.no_target for ref in refs],
            }
        pixels = self._load_pixels(index)
        return {
            "image_id": scene.image_id,
            "ds": self.names[scene.ds_index],
            "scene_dir": pixels.scene_dir,
            "center": pixels.center,
            "views": pixels.views,
            "offsets": pixels.offsets,
            "disparity": pixels.disparity,
            "sentences": [sent for _, sent in pairs],
            "masks": self._masks(index, refs, pixels.center.shape[:2]),
            "ref_ids": [ref.ref_id for ref in refs],
            "ann_ids": [ref.ann_ids for ref in refs],
            "subsets": [ref.tags for ref in refs],
            "no_target": [ref.no_target for ref in refs],
        }
