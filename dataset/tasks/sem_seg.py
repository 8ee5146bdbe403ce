"""Semantic-segmentation readers (LISA's ``sem_seg`` task) as items of :mod:`dataset.tasks.base`.

One item = one image with the classes it shows: ``sentences`` the class names, ``masks`` (N, H, W) uint8
1 on the class's pixels and 0 elsewhere. Unlabelled pixels are 0 in every mask (LISA's masks are
``label == class``: what no class claims counts as background, never :data:`IGNORE_LABEL`), and an
unlabelled value is never asked for.

Length: about 490 lines, because five published layouts each need their own paths, label conventions and
checks, and two of them (ADE20K, COCO-Stuff) ship no class-name file, so their 332 names live here; split
into modules, the readers would share only the item assembly below.

Layouts under ``dataset_dir`` (LISA's ``utils/sem_seg_dataset.py``;
``split`` ``"train"`` / ``"val"`` picks the first / second folder or file name):

* ``ade20k``: ``ade20k/images/{training,validation}/<n>.jpg`` (sorted; ``image_id`` = the index) and
  ``ade20k/annotations/{training,validation}/<n>.png`` (grey); value v ∈ 1..150 is class v − 1 of
  :data:`ADE20K_CLASSES` (the SceneParsing-150 names, as LISA's ``ade20k_classes.json``: the layout
  ships no names file), 0 (and 255) unlabelled.
* ``cocostuff``: ``cocostuff/{train2017,val2017}/<n>.png`` label maps (sorted; ``image_id`` = the index),
  images ``coco/{train2017,val2017}/<n>.jpg``; value v is class v of :data:`COCOSTUFF_CLASSES` (the
  COCO-Stuff ``labels.txt`` less its ``0: unlabeled`` line, as LISA reads ``cocostuff_classes.txt``), 255
  unlabelled, and, as in LISA, every class whose name holds a ``-`` (``wall-other``, ``floor-wood``, …)
  is unlabelled too.
* ``mapillary``: ``mapillary/config_v2.0.json`` (``labels[i]["readable"]`` lower-cased names class i),
  ``mapillary/{training,validation}/v2.0/labels/<n>.png`` (sorted; ``image_id`` = the index; 8-bit
  palette PNGs, read with PIL: OpenCV would expand the palette to colours), images
  ``mapillary/{training,validation}/images/<n>.jpg``. The ``unlabeled`` label (v2.0's last) and 255 are
  unlabelled: LISA would ask for "unlabeled" as a class, we do not.
* ``paco_lvis``: ``vlpart/paco/annotations/paco_lvis_v1_{train,val}.json`` (COCO format), images
  ``coco/<file_name>``; ``pascal_part``: ``vlpart/pascal_part/{train,val}.json``, images
  ``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>``. ``image_id`` = the COCO image id;
  a class is a category and its mask the union of the image's annotations of it (LISA draws single
  annotations instead). Category ``"object:part"`` (LVIS's ``_(sense)`` suffixes dropped, as LISA) is
  asked as "object part" or "the part of the object" (a seeded coin per class in train mode, as LISA's
  coin; the latter in val mode); a name without ``:`` is asked as is.
* a light-field referring dataset ``<ds>`` (any other name whose ``lf/<ds>/``, per ``lf_root``, exists):
  ``refer_seg/<ds>/<ds>.json`` + ``instances.json`` (:class:`dataset.refer.ReferAnnotations`); the scenes
  of ``split`` are the images of its refs, as in :class:`dataset.scenes.SceneDataset`, with the same
  ``image_id`` (a feature cache is keyed by (ds, image_id)); a class is a category of the scene's
  instances (all of them, referred or not), its mask their union; pixels are the light field's.

Images with no usable class: COCO-format images and scenes without an annotation are skipped at indexing;
a label map is decoded only at item time, so one with no class gives, in train mode, the next image of its
dataset (cyclically) and, in val mode, an item with no masks (N = 0).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.utils.data
from PIL import Image

from dataset.errors import AnnotationError, DataError
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout
from dataset.refer import ReferAnnotations, decode_segmentation
from dataset.scenes import split_datasets
from dataset.tasks.base import check_sampling, load_pixels, pixel_fields
from utils.views import Offset, parse_views


def _names(*lines: str) -> tuple[str, ...]:
    return tuple("".join(lines).split(","))


#: ADE20K SceneParsing-150 class names; class ``v - 1`` is label value ``v``.
ADE20K_CLASSES: tuple[str, ...] = _names(
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,"
    "table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,"
    "armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,"
    "chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,"
    "runway,case,pool table,pillow,screen door,stairway,river,bridge,bookcase,blind,coffee table,"
    "toilet,flower,book,hill,bench,countertop,stove,palm,kitchen island,computer,swivel chair,boat,bar,"
    "arcade machine,hovel,bus,towel,light,truck,tower,chandelier,awning,streetlight,booth,"
    "television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,ottoman,bottle,"
    "buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,stool,"
    "barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,"
    "pot,animal,bicycle,lake,dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,"
    "ashcan,fan,pier,crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag"
)
#: COCO-Stuff class names; class ``v`` is label value ``v`` (``0: unlabeled`` left out, as in LISA).
COCOSTUFF_CLASSES: tuple[str, ...] = _names(
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "street sign,stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,"
    "giraffe,hat,backpack,umbrella,shoe,eye glasses,handbag,tie,suitcase,frisbee,skis,snowboard,"
    "sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,plate,"
    "wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,"
    "donut,cake,chair,couch,potted plant,bed,mirror,dining table,window,desk,toilet,door,tv,laptop,"
    "mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,blender,book,clock,vase,"
    "scissors,teddy bear,hair drier,toothbrush,hair brush,banner,blanket,branch,bridge,building-other,"
    "bush,cabinet,cage,cardboard,carpet,ceiling-other,ceiling-tile,cloth,clothes,clouds,counter,"
    "cupboard,curtain,desk-stuff,dirt,door-stuff,fence,floor-marble,floor-other,floor-stone,floor-tile,"
    "floor-wood,flower,fog,food-other,fruit,furniture-other,grass,gravel,ground-other,hill,house,"
    "leaves,light,mat,metal,mirror-stuff,moss,mountain,mud,napkin,net,paper,pavement,pillow,"
    "plant-other,plastic,platform,playingfield,railing,railroad,river,road,rock,roof,rug,salad,sand,"
    "sea,shelf,sky,skyscraper,snow,solid-other,stairs,stone,straw,structural-other,table,tent,"
    "textile-other,towel,tree,vegetable,wall-brick,wall-concrete,wall-other,wall-panel,wall-stone,"
    "wall-tile,wall-wood,water-other,waterdrops,window-blind,window-other,wood"
)
#: The 2D datasets this module reads (LISA's ``--sem_seg_data`` names).
SEM_SEG_DATASETS: tuple[str, ...] = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")
#: Raw label value every dataset leaves unlabelled.
UNLABELLED_VALUE = 255
#: The folder or file part of each 2D layout, by split.
SPLIT_PARTS: dict[str, dict[str, str]] = {
    "ade20k": {"train": "training", "val": "validation"},
    "cocostuff": {"train": "train2017", "val": "val2017"},
    "mapillary": {"train": "training", "val": "validation"},
    "paco_lvis": {"train": "train", "val": "val"},
    "pascal_part": {"train": "train", "val": "val"},
}


@dataclass(frozen=True)
class _LabelMaps:
    """Label-map PNGs: ``files[i]`` = (image, label map); ``classes`` maps a raw value to its class id
    (an index into ``names``), ``unlabelled`` holds the raw values that are no class."""

    names: tuple[str, ...]
    files: list[tuple[Path, Path]]
    classes: dict[int, int]
    unlabelled: frozenset[int]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class _Instances:
    """COCO-format instances: the image records kept (each with an annotation), their annotations by
    image id, category names by id, and the folder of the images (or, with a layout, of the scenes)."""

    path: Path
    records: list[dict]
    anns: dict[int, list[dict]]
    names: dict[int, str]
    images: Path
    layout: LightFieldLayout | None = None  # a light-field set's layout; None: 2D images

    def __len__(self) -> int:
        return len(self.records)

    def pixels_path(self, record: dict) -> Path:
        """The image file (``images/<file_name>``) or light-field scene folder of ``record``."""
        if self.layout is not None:
            return self.images / self.layout.scene_name(record["id"])
        return self.images / record["file_name"]


def read_label_map(path: str | Path) -> np.ndarray:
    """The (H, W) raw class values of a label-map PNG (grey, 16-bit or 8-bit palette: PIL gives a
    palette's indices). Raises ``DataError`` naming the file when it is missing, unreadable or colour."""
    try:
        with Image.open(path) as image:
            mode, label = image.mode, np.array(image)
    except FileNotFoundError:
        raise DataError(path, "label map not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read label map ({exc})") from None
    if label.ndim != 2:
        raise DataError(path, f"label map is {mode} {label.shape}: expected class indices (grey or palette)")
    return label


def part_name(name: str) -> tuple[str, str | None]:
    """``"mug:handle"`` → ``("mug", "handle")``, ``"bottle_(drink):cap"`` → ``("bottle", "cap")``,
    ``"mug"`` → ``("mug", None)``; ``ValueError`` on more than one ``:`` or an empty piece."""
    pieces = [piece.split("_(")[0].strip() for piece in name.strip().split(":")]
    if len(pieces) > 2 or not all(pieces):
        raise ValueError(f"category name {name!r} is neither 'object' nor 'object:part'")
    return pieces[0], (pieces[1] if len(pieces) == 2 else None)


def _phrase(name: str, rng: np.random.Generator | None) -> str:
    """How a category is asked: its name, or for a part "object part" / "the part of the object"."""
    obj, part = part_name(name)
    if part is None:
        return obj
    return f"{obj} {part}" if rng is not None and rng.random() < 0.5 else f"the {part} of the {obj}"


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"{what} folder not found")
    return path


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"cannot read {what} as JSON ({exc})") from None


def _paired(listed: Path, pattern: str, other: Path, suffix: str, what: str) -> list[tuple[Path, Path]]:
    """(listed file, its namesake in ``other`` with ``suffix``) for every ``pattern`` file of ``listed``,
    sorted by name."""
    files = sorted(_folder(listed, what).glob(pattern))
    if not files:
        raise DataError(listed, f"no {pattern} files in the {what} folder")
    return [(f, other / f"{f.stem}{suffix}") for f in files]


def _ade20k(root: Path, part: str) -> _LabelMaps:
    base = root / "ade20k"
    files = _paired(base / "images" / part, "*.jpg", base / "annotations" / part, ".png", "ADE20K image")
    _folder(base / "annotations" / part, "ADE20K annotation")
    classes = {v: v - 1 for v in range(1, len(ADE20K_CLASSES) + 1)}
    return _LabelMaps(ADE20K_CLASSES, files, classes, frozenset({0, UNLABELLED_VALUE}))


def _cocostuff(root: Path, part: str) -> _LabelMaps:
    images = _folder(root / "coco" / part, "COCO image")
    labels = _paired(root / "cocostuff" / part, "*.png", images, ".jpg", "COCO-Stuff label")
    skipped = {v for v, name in enumerate(COCOSTUFF_CLASSES) if "-" in name}
    classes = {v: v for v in range(len(COCOSTUFF_CLASSES)) if v not in skipped}
    return _LabelMaps(
        COCOSTUFF_CLASSES, [(i, lb) for lb, i in labels], classes, frozenset(skipped | {UNLABELLED_VALUE})
    )


def _mapillary(root: Path, part: str) -> _LabelMaps:
    path = root / "mapillary" / "config_v2.0.json"
    config = _read_json(path, "Mapillary config")
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, dict) and "readable" in x for x in labels):
        raise AnnotationError(path, "'labels' must be a list of objects with a 'readable' name")
    names = tuple(str(x["readable"]).lower() for x in labels)
    images = _folder(root / "mapillary" / part / "images", "Mapillary image")
    listed = root / "mapillary" / part / "v2.0" / "labels"
    files = [(i, lb) for lb, i in _paired(listed, "*.png", images, ".jpg", "Mapillary label")]
    skipped = {v for v, name in enumerate(names) if name == "unlabeled"}
    classes = {v: v for v in range(len(names)) if v not in skipped}
    return _LabelMaps(names, files, classes, frozenset(skipped | {UNLABELLED_VALUE}))


def _require(entry: Any, keys: tuple[str, ...], what: str, path: Path) -> None:
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise AnnotationError(path, f"{what} {str(entry)[:60]} lacks {', '.join(missing)}")


def _instances(
    path: Path,
    raw: Any,
    images: Path,
    keep: set[int] | None = None,
    layout: LightFieldLayout | None = None,
) -> _Instances:
    """Index a COCO-format file: the images (those in ``keep`` when given) having an annotation, by id."""
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list) for k in ("images", "annotations")):
        raise AnnotationError(path, "expected a COCO object with 'images' and 'annotations' lists")
    image_keys = ("id", "height", "width") if layout else ("id", "height", "width", "file_name")
    records: dict[int, dict] = {}
    for record in raw["images"]:
        _require(record, image_keys, "image", path)
        if keep is None or int(record["id"]) in keep:
            records[int(record["id"])] = record
    names: dict[int, str] = {}
    for category in raw.get("categories") or []:
        _require(category, ("id", "name"), "category", path)
        try:
            part_name(str(category["name"]))
        except ValueError as exc:
            raise AnnotationError(path, f"category {category['id']}: {exc}") from None
        names[int(category["id"])] = str(category["name"])
    anns: dict[int, list[dict]] = {}
    for ann in raw["annotations"]:
        _require(ann, ("id", "image_id", "category_id", "segmentation"), "annotation", path)
        if int(ann["image_id"]) in records:
            anns.setdefault(int(ann["image_id"]), []).append(ann)
            names.setdefault(int(ann["category_id"]), str(ann["category_id"]))
    kept = [records[i] for i in sorted(records) if i in anns]
    return _Instances(path, kept, anns, names, images, layout)


def _paco_lvis(root: Path, part: str) -> _Instances:
    path = root / "vlpart" / "paco" / "annotations" / f"paco_lvis_v1_{part}.json"
    images = _folder(root / "coco", "COCO image")
    return _instances(path, _read_json(path, "PACO-LVIS annotations"), images)


def _pascal_part(root: Path, part: str) -> _Instances:
    path = root / "vlpart" / "pascal_part" / f"{part}.json"
    images = _folder(
        root / "vlpart" / "pascal_part" / "VOCdevkit" / "VOC2010" / "JPEGImages", "VOC2010 image"
    )
    return _instances(path, _read_json(path, "PASCAL-Part annotations"), images)


_READERS: dict[str, Callable[[Path, str], _LabelMaps | _Instances]] = dict(
    ade20k=_ade20k, cocostuff=_cocostuff, mapillary=_mapillary, paco_lvis=_paco_lvis, pascal_part=_pascal_part
)


def _per_dataset(value: Any, ds: str) -> Any:
    return value.get(ds) if isinstance(value, Mapping) else value


class SemSegDataset(torch.utils.data.Dataset):
    """Images of one or more semantic-segmentation datasets with the classes they show (see the module).

    Args:
        dataset_dir: root of the layouts.
        datasets: names (``"ade20k||cocostuff"`` or a list): :data:`SEM_SEG_DATASETS` or light-field sets.
        split: ``"train"`` / ``"val"`` for a 2D set (:data:`SPLIT_PARTS`); for a light-field set, a split
            selector of its refs (:meth:`dataset.refer.Ref.in_split`).
        mode: ``"train"`` draws up to ``num_classes_per_sample`` distinct classes (and each part's phrasing)
            with an RNG seeded by ``(seed, epoch, index)`` (reproducible in any worker; call
            :meth:`set_epoch`); ``"val"`` returns every class present, by class id.
        views, layout, lf_root, with_disparity: the light-field input, as in
            :class:`dataset.scenes.SceneDataset` (``layout`` / ``lf_root`` may map dataset names).
        with_pixels: False (a feature cache serves the encodings): ``hw`` (H, W) instead of the pixels;
            light-field sets only (``ValueError`` for a 2D one).

    Items follow :mod:`dataset.tasks.base` with task ``"sem_seg"``: ``image_id`` int, ``ds``, ``scene_dir``
    (the image file or scene folder), the pixels or ``hw``, ``sentences`` (N class phrases), ``masks``
    (N, H, W) uint8 {0, 1}, ``ref_ids`` (N class ids: ADE20K's 0..149, the COCO-Stuff or Mapillary label
    value, a category id), ``subsets`` (N × ``(split, ds)``), ``no_target`` (N × False).
    """

    task = "sem_seg"

    def __init__(
        self,
        dataset_dir: str | Path,
        datasets: str | Sequence[str],
        split: str = "train",
        *,
        mode: Literal["train", "val"] = "train",
        num_classes_per_sample: int = 3,
        seed: int = 0,
        views: Sequence[Offset] | str = (),
        layout: LightFieldLayout | Mapping[str, LightFieldLayout] = DEFAULT_LAYOUT,
        lf_root: str | Mapping[str, str] = "lf/{ds}",
        with_disparity: bool = True,
        with_pixels: bool = True,
    ) -> None:
        check_sampling(mode, num_classes_per_sample)
        self.dataset_dir = Path(dataset_dir)
        self.names = split_datasets(datasets)
        self.split, self.mode, self.seed = split, mode, seed
        self.num_classes_per_sample = num_classes_per_sample
        self.with_disparity, self.with_pixels = with_disparity, with_pixels
        self.epoch = 0
        self.sources = [self._open(ds, layout, lf_root) for ds in self.names]
        grid = next(
            (s.layout for s in self.sources if isinstance(s, _Instances) and s.layout), DEFAULT_LAYOUT
        )
        self.offsets: tuple[Offset, ...] = (
            parse_views(views, grid) if isinstance(views, str) else tuple(tuple(o) for o in views)
        )
        self.starts = [0]
        for source in self.sources[:-1]:
            self.starts.append(self.starts[-1] + len(source))

    def _open(self, ds: str, layout: Any, lf_root: Any) -> _LabelMaps | _Instances:
        """Index dataset ``ds``: a 2D layout of :data:`SEM_SEG_DATASETS` or a light-field set."""
        if ds in _READERS:
            if not self.with_pixels:
                raise ValueError(f"{ds} is a 2D dataset: with_pixels=False serves light-field scenes only")
            parts = SPLIT_PARTS[ds]
            if self.split not in parts:
                raise ValueError(f"{ds}: split must be one of {', '.join(parts)}, got {self.split!r}")
            return _READERS[ds](self.dataset_dir, parts[self.split])
        root = _per_dataset(lf_root, ds)
        lf_dir = self.dataset_dir / root.format(ds=ds) if root else None
        if lf_dir is None or not lf_dir.is_dir():
            raise ValueError(
                f"unknown semantic-segmentation dataset {ds!r}: not one of {', '.join(SEM_SEG_DATASETS)}, "
                f"nor a light-field set ({lf_dir or f'no lf_root given for {ds}'} not found)"
            )
        lf_layout = _per_dataset(layout, ds)
        if lf_layout is None:
            raise ValueError(f"no layout given for light-field dataset {ds!r}")
        annotations = ReferAnnotations.load(self.dataset_dir, ds)
        scenes = {ref.image_id for ref in annotations.refs_for(self.split)}
        raw = _read_json(annotations.instances_path, "instances file")
        return _instances(annotations.instances_path, raw, lf_dir, scenes, lf_layout)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds training-mode sampling."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(len(source) for source in self.sources)

    def group_of(self, index: int) -> int:
        """Which entry of :attr:`names` item ``index`` belongs to."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return bisect.bisect_right(self.starts, index) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self.group_of(index)
        source, local = self.sources[group], index - self.starts[group]
        read = self._label_item if isinstance(source, _LabelMaps) else self._instance_item
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.mode == "train" else None
        for step in range(len(source) if rng is not None else 1):  # train: skip images with no class
            item = read(source, (local + step) % len(source), rng)
            if item is not None:
                ds, n = self.names[group], len(item["sentences"])
                hw = tuple(item["hw"]) if "hw" in item else item["center"].shape[:2]
                masks = np.stack(item["masks"]).astype(np.uint8) if n else np.zeros((0, *hw), np.uint8)
                extra = {"masks": masks, "subsets": [(self.split, ds)] * n, "no_target": [False] * n}
                return {"task": self.task, "ds": ds, **item, **extra}
        raise DataError(self.dataset_dir, f"no {self.split} image of {self.names[group]} shows a class")

    def _pick(self, count: int, rng: np.random.Generator | None) -> list[int]:
        """Which of ``count`` present classes an item asks for: all (val) or a seeded draw (train)."""
        if rng is None:
            return list(range(count))
        return [
            int(i) for i in rng.choice(count, size=min(self.num_classes_per_sample, count), replace=False)
        ]

    def _label_item(self, source: _LabelMaps, local: int, rng: np.random.Generator | None) -> dict | None:
        """Image ``local`` of a label-map set (masks as a list), or None in train mode when it has no class."""
        image_path, label_path = source.files[local]
        label = read_label_map(label_path)
        values = np.unique(label).tolist()
        bad = [v for v in values if v not in source.classes and v not in source.unlabelled]
        if bad:
            raise DataError(
                label_path, f"label values {bad[:8]} are no class ({len(source.names)}) nor unlabelled"
            )
        present = sorted((source.classes[v], v) for v in values if v in source.classes)
        chosen = [present[i] for i in self._pick(len(present), rng)]
        if not chosen and rng is not None:
            return None
        pixels = load_pixels(image_path, False)
        if label.shape != pixels.center.shape[:2]:
            size = "×".join(map(str, pixels.center.shape[:2]))
            raise DataError(
                label_path, f"label map is {label.shape[0]}×{label.shape[1]}, image {image_path} is {size}"
            )
        return {
            "image_id": local,
            **pixel_fields(pixels),
            "sentences": [source.names[c] for c, _ in chosen],
            "masks": [label == raw for _, raw in chosen],
            "ref_ids": [c for c, _ in chosen],
        }

    def _instance_item(self, source: _Instances, local: int, rng: np.random.Generator | None) -> dict | None:
        """Image ``local`` of a COCO-format or light-field set (masks as a list), or None in train mode when
        no category has a pixel."""
        record = source.records[local]
        path, hw = source.pixels_path(record), (int(record["height"]), int(record["width"]))
        masks: dict[int, np.ndarray] = {}
        for ann in source.anns[int(record["id"])]:
            try:
                mask = decode_segmentation(ann["segmentation"], *hw)
            except (ValueError, TypeError, KeyError) as exc:
                raise AnnotationError(
                    source.path, f"annotation {ann['id']}: bad segmentation ({exc})"
                ) from None
            if mask.shape != hw:
                raise AnnotationError(
                    source.path, f"annotation {ann['id']}: mask {mask.shape} is not its image's {hw}"
                )
            category = int(ann["category_id"])
            masks[category] = mask | masks[category] if category in masks else mask
        present = [c for c in sorted(masks) if masks[c].any()]
        chosen = [present[i] for i in self._pick(len(present), rng)]
        if not chosen and rng is not None:
            return None
        fields: dict[str, Any] = {"scene_dir": str(path), "hw": hw}
        if self.with_pixels:
            layout = source.layout or DEFAULT_LAYOUT
            pixels = load_pixels(path, source.layout is not None, self.offsets, layout, self.with_disparity)
            if pixels.center.shape[:2] != hw:
                size = "×".join(map(str, pixels.center.shape[:2]))
                raise AnnotationError(
                    source.path, f"image {record['id']} is {hw[0]}×{hw[1]} here, {path} is {size}"
                )
            fields = pixel_fields(pixels)
        return {
            "image_id": int(record["id"]),
            **fields,
            "sentences": [_phrase(source.names[c], rng) for c in chosen],
            "masks": [masks[c] for c in chosen],
            "ref_ids": chosen,
        }
