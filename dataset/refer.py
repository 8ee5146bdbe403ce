"""Referring-expression annotations: Ref-UrbanLF JSON refs or REFER pickles, plus COCO ``instances.json``.

Layout under ``<dataset_dir>/refer_seg/<ds>/``: ``<ds>.json`` (a JSON list of refs) or, for the
RefCOCO family, ``refs(<split_by>).p`` (a pickled list of the same dicts, read with a restricted
unpickler that builds plain containers only), or, for gRefCOCO (generalised referring expressions),
``grefs(<split_by>).json`` / ``grefs(<split_by>).p``; and ``instances.json`` (COCO images, annotations,
categories). Everything is validated on load; every problem raises :class:`AnnotationError` naming the
file and the ids involved.

Generalised refs (gRefCOCO's convention, read wherever it appears): ``ann_id`` and ``category_id`` may be
lists; a multi-target ref's mask is the union of its annotations; ``ann_id: [-1]`` (with ``no_target: true``
when the field is present) is a ref with no target, whose mask is empty. A plain integer ``ann_id`` is a
one-target ref, as in RefCOCO and Ref-UrbanLF.

Length: about 470 lines, because one reader serves every published refs format (Ref-UrbanLF's JSON, REFER's
pickles through a restricted unpickler, gRefCOCO's lists and no-target refs) with one set of checks; split
into modules it would repeat the validation each format needs.

Split rule: a ref belongs to split ``S`` iff ``ref.split == S`` or ``S`` is one of its subset tags. A
selector ``"A&B"`` needs every part (``"val&closest"``: the val refs tagged ``closest``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dataset.errors import AnnotationError
from utils.splits import SPLIT_NAMES, SUBSET_TAGS


@dataclass(frozen=True)
class Ref:
    """One referring expression group with its target objects (``sent_ids[i]`` is the id of ``sentences[i]``).

    ``ann_ids`` are the targets (several for a multi-target ref, none for a no-target ref); ``ann_id`` is
    the first of them, or -1 when there is none. A one-target ref may give ``ann_id`` alone."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    subsets: tuple[str, ...]
    sentences: tuple[str, ...]
    sent_ids: tuple[int, ...] = ()
    ann_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.ann_ids and self.ann_id >= 0:
            object.__setattr__(self, "ann_ids", (self.ann_id,))
        expected_first = self.ann_ids[0] if self.ann_ids else -1
        if self.ann_id != expected_first:
            raise ValueError(
                f"ref_id {self.ref_id}: ann_id {self.ann_id} is not the first of ann_ids {self.ann_ids}"
            )

    @property
    def no_target(self) -> bool:
        """True for a ref that names no object of its image (gRefCOCO's ``ann_id: [-1]``)."""
        return not self.ann_ids

    def in_split(self, split: str) -> bool:
        """True iff this ref is selected for ``split``: its split field or one of its subset tags equals
        it, or, for ``"A&B&..."``, equals every part (``"val&o-3"``: val refs tagged ``o-3``)."""
        return all(part == self.split or part in self.subsets for part in split_parts(split))

    @property
    def tags(self) -> tuple[str, ...]:
        """The split followed by the subset tags, as attached to each expression."""
        return (self.split, *self.subsets)


def split_parts(split: str) -> tuple[str, ...]:
    """The parts of a split selector: ``"val&closest"`` -> ``("val", "closest")``, ``"val"`` -> ``("val",)``.

    Raises ``ValueError`` on an empty part (``""``, ``"val&"``)."""
    parts = tuple(part.strip() for part in split.split("&"))
    if not all(parts):
        raise ValueError(
            f"bad split selector {split!r}: expected a split or tag, or 'A&B' (e.g. 'val&closest')"
        )
    return parts


class _RefusingUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build without imports: dict, list, tuple, str, bytes, numbers,
    bool and None. Every opcode that needs a global (GLOBAL, STACK_GLOBAL, INST, EXT*, and through them
    REDUCE / NEWOBJ / BUILD) goes through ``find_class``, which refuses."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise AnnotationError(
            self._path, f"refusing to unpickle global '{module}.{name}': only plain lists/dicts are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise AnnotationError(self._path, "refusing to unpickle a persistent id")


def load_refer_pickle(path: str | Path) -> list[dict]:
    """Load a REFER ``refs(<split_by>).p`` file as a list of ref dicts without importing anything.

    Raises ``AnnotationError`` naming the file when it is missing, corrupt, not a list of dicts, or
    asks for any global (``module.name`` is named in the message; nothing is imported or called).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = _RefusingUnpickler(fh, path).load()
    except FileNotFoundError:
        raise AnnotationError(path, "refs pickle not found") from None
    except AnnotationError:
        raise
    except Exception as exc:  # pickle raises many types on corrupt input
        raise AnnotationError(path, f"cannot unpickle refs ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise AnnotationError(path, f"expected a list of ref dicts, got {type(data).__name__}")
    return data


def _load_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot read {what} ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            path, f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_ids(raw: dict, ref_id: Any, path: Path) -> tuple[int, ...]:
    """The target annotation ids of a raw ref: ``ann_id`` as an integer (one target) or a list (gRefCOCO:
    several targets, or ``[-1]`` for none), checked against ``no_target`` when the ref has that field."""
    value = raw["ann_id"]
    if _is_int(value):
        ids: list[int] = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        ids = list(value)
    else:
        raise AnnotationError(
            path, f"ref_id {ref_id}: ann_id must be an integer or a non-empty list of integers, got {value!r}"
        )
    if -1 in ids and len(ids) > 1:
        raise AnnotationError(path, f"ref_id {ref_id}: ann_id {ids} mixes -1 (no target) with targets")
    if len(set(ids)) != len(ids):
        raise AnnotationError(path, f"ref_id {ref_id}: ann_id {ids} lists a target twice")
    if any(v < -1 for v in ids):
        raise AnnotationError(path, f"ref_id {ref_id}: ann_id {ids} holds a negative id other than -1")
    targets = tuple(v for v in ids if v != -1)
    flag = raw.get("no_target")
    if flag is not None and (not isinstance(flag, bool) or flag != (not targets)):
        raise AnnotationError(
            path, f"ref_id {ref_id}: no_target is {flag!r} but ann_id is {value!r} ({len(targets)} target(s))"
        )
    return targets


def _first_category(value: Any) -> int:
    """A ref's category id: the integer, or the first of a gRefCOCO list (-1 when empty or ``[-1]``)."""
    if isinstance(value, list):
        return int(value[0]) if value else -1
    return int(value)


def _parse_ref(raw: Any, index: int, path: Path) -> Ref:
    """Validate one raw ref dict and turn it into a :class:`Ref`."""
    if not isinstance(raw, dict):
        raise AnnotationError(path, f"ref #{index} is a {type(raw).__name__}, expected an object")
    missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in raw]
    if missing:
        raise AnnotationError(path, f"ref #{index} (ref_id {raw.get('ref_id')}) lacks {', '.join(missing)}")
    ref_id = raw["ref_id"]
    sentences, sent_ids = [], []
    raw_sents = raw["sentences"]
    if not isinstance(raw_sents, list) or not raw_sents:
        raise AnnotationError(path, f"ref_id {ref_id} has no sentences")
    for j, sent in enumerate(raw_sents):
        text = sent.get("sent") if isinstance(sent, dict) else None
        sent_id = sent.get("sent_id", j) if isinstance(sent, dict) else j
        if not isinstance(text, str) or not text.strip():
            raise AnnotationError(path, f"ref_id {ref_id} sent_id {sent_id}: empty referring expression")
        sentences.append(text.strip())
        sent_ids.append(sent_id)
    subsets = raw.get("subsets") or []
    if isinstance(subsets, str) or not all(isinstance(s, str) for s in subsets):
        raise AnnotationError(path, f"ref_id {ref_id}: 'subsets' must be a list of strings, got {subsets!r}")
    ann_ids = _target_ids(raw, ref_id, path)
    try:
        return Ref(
            ref_id=int(ref_id),
            ann_id=ann_ids[0] if ann_ids else -1,
            ann_ids=ann_ids,
            image_id=int(raw["image_id"]),
            category_id=_first_category(raw.get("category_id", -1)),
            split=str(raw["split"]),
            subsets=tuple(subsets),
            sentences=tuple(sentences),
            sent_ids=tuple(int(s) for s in sent_ids),
        )
    except (TypeError, ValueError) as exc:
        raise AnnotationError(path, f"ref_id {ref_id}: non-integer id ({exc})") from None


def _index(items: Any, key: str, path: Path) -> dict[int, dict]:
    if not isinstance(items, list):
        raise AnnotationError(path, f"'{key}' must be a list")
    table: dict[int, dict] = {}
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise AnnotationError(path, f"an entry of '{key}' has no 'id': {str(item)[:80]}")
        table[int(item["id"])] = item
    return table


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation as one compressed RLE (what :func:`decode_segmentation` decodes)."""
    if isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if counts is None or size is None:
            raise ValueError("RLE segmentation needs 'counts' and 'size'")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, int(size[0]), int(size[1]))
        else:
            rle = {"size": [int(size[0]), int(size[1])], "counts": counts}
    elif isinstance(segmentation, list) and segmentation:
        polygons = [list(map(float, p)) for p in segmentation]
        if any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise ValueError("each polygon needs an even number ≥ 6 of coordinates")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"unsupported segmentation {str(segmentation)[:80]!r}")
    return rle


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation into an (H, W) uint8 {0, 1} mask.

    Accepts an RLE dict (``counts`` compressed str/bytes or an uncompressed list) or a list of polygons
    ``[[x0, y0, x1, y1, ...], ...]`` in pixels. Raises ``ValueError`` on anything else.
    """
    rle = segmentation_rle(segmentation, height, width)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _extent(segmentation: Any) -> str:
    """Where polygons lie, for a message: ``"x -40..-5, y 3..20"`` (empty for an RLE)."""
    if not isinstance(segmentation, list):
        return ""
    xs = [float(v) for p in segmentation for v in p[0::2]]
    ys = [float(v) for p in segmentation for v in p[1::2]]
    return f"x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}" if xs and ys else ""


def _split_by(path: Path) -> str:
    """``unc`` of ``refs(unc).p`` / ``grefs(unc).json``."""
    return path.name[path.name.index("(") + 1 : path.name.rindex(")")]


def _refer_files(root: Path) -> list[Path]:
    """The REFER refs files of a dataset folder: ``grefs(*).json`` first (gRefCOCO's JSON and pickle of the
    same split are one file set: the JSON stands for both), then ``grefs(*).p`` and ``refs(*).p``."""
    grefs_json = sorted(root.glob("grefs(*).json"))
    json_splits = {_split_by(p) for p in grefs_json}
    grefs_pickle = [p for p in sorted(root.glob("grefs(*).p")) if _split_by(p) not in json_splits]
    files = grefs_json + grefs_pickle + sorted(root.glob("refs(*).p"))
    return sorted(files, key=lambda p: (_split_by(p), p.name.startswith("refs")))


class ReferAnnotations:
    """Validated refs and COCO instances of one dataset ``<ds>``."""

    def __init__(self, refs: list[Ref], instances: dict, refs_path: Path, instances_path: Path) -> None:
        self.refs = refs
        self.refs_path = refs_path
        self.instances_path = instances_path
        self._images = _index(instances.get("images"), "images", instances_path)
        self._anns = _index(instances.get("annotations"), "annotations", instances_path)
        self._categories = _index(instances.get("categories", []), "categories", instances_path)
        self._by_image: dict[int, list[int]] | None = None
        self._check_links()

    @classmethod
    def load(cls, dataset_dir: str | Path, ds: str, split_by: str | None = None) -> ReferAnnotations:
        """Read ``refer_seg/<ds>/<ds>.json`` (or, when there is no JSON, the REFER file of ``split_by``:
        ``refs(<split_by>).p``, gRefCOCO's ``grefs(<split_by>).json`` or ``grefs(<split_by>).p``) and
        ``refer_seg/<ds>/instances.json``; validate them (see module docstring)."""
        root = Path(dataset_dir) / "refer_seg" / ds
        json_path = root / f"{ds}.json"
        refer_files = _refer_files(root)
        if split_by is None and not json_path.is_file() and len(refer_files) == 1:
            refs_path = refer_files[0]  # RefCOCO / gRefCOCO layout: its one refs file
        elif split_by is None and not json_path.is_file() and refer_files:
            names = ", ".join(dict.fromkeys(_split_by(p) for p in refer_files))
            raise AnnotationError(
                json_path,
                f"not found, and {root} holds several REFER files (splitBy {names}): name one, "
                f"e.g. --refer_seg_data '{ds}({_split_by(refer_files[0])})'",
            )
        elif json_path.is_file() or split_by is None:
            refs_path = json_path
        else:
            named = [p for p in refer_files if _split_by(p) == split_by]
            refs_path = named[0] if named else root / f"refs({split_by}).p"
        if refs_path.suffix == ".json":
            raw_refs = _load_json(refs_path, "refs file")
        else:
            raw_refs = load_refer_pickle(refs_path)
        if not isinstance(raw_refs, list):
            raise AnnotationError(refs_path, f"expected a list of refs, got {type(raw_refs).__name__}")
        refs = [_parse_ref(raw, i, refs_path) for i, raw in enumerate(raw_refs)]
        instances_path = root / "instances.json"
        instances = _load_json(instances_path, "instances file")
        if not isinstance(instances, dict):
            raise AnnotationError(instances_path, "expected a COCO object with images/annotations")
        return cls(refs, instances, refs_path, instances_path)

    def _check_links(self) -> None:
        seen: set[int] = set()
        for ref in self.refs:
            where = f"ref_id {ref.ref_id}"
            if ref.ref_id in seen:
                raise AnnotationError(self.refs_path, f"{where} appears twice")
            seen.add(ref.ref_id)
            if ref.image_id not in self._images:
                raise AnnotationError(
                    self.refs_path, f"{where}: image_id {ref.image_id} has no image in {self.instances_path}"
                )
            for ann_id in ref.ann_ids:
                ann = self._anns.get(ann_id)
                if ann is None:
                    raise AnnotationError(
                        self.refs_path, f"{where}: ann_id {ann_id} has no annotation in {self.instances_path}"
                    )
                if int(ann.get("image_id", -1)) != ref.image_id:
                    raise AnnotationError(
                        self.refs_path,
                        f"{where}: image_id {ref.image_id} disagrees with annotation {ann_id} "
                        f"(image_id {ann.get('image_id')}) in {self.instances_path}",
                    )

    def refs_for(self, split: str) -> list[Ref]:
        """Refs selected for ``split`` (by split field or subset tag, or ``"A&B"``), in file order."""
        split_parts(split)  # a bad selector raises even when there are no refs
        return [ref for ref in self.refs if ref.in_split(split)]

    def image(self, image_id: int) -> dict:
        """The COCO image record (``id, file_name, height, width``) of ``image_id``."""
        try:
            return self._images[int(image_id)]
        except KeyError:
            raise AnnotationError(self.instances_path, f"no image with id {image_id}") from None

    def category_name(self, category_id: int) -> str:
        """Name of a category (``str(category_id)`` when ``categories`` does not list it)."""
        category = self._categories.get(int(category_id))
        return str(category.get("name", category_id)) if category else str(category_id)

    def mask(self, ann_id: int) -> np.ndarray:
        """Decode annotation ``ann_id`` into an (H, W) uint8 {0, 1} mask at the image's resolution."""
        ann = self._anns.get(int(ann_id))
        if ann is None:
            raise AnnotationError(self.instances_path, f"no annotation with id {ann_id}")
        image = self.image(ann["image_id"])
        height, width = int(image["height"]), int(image["width"])
        try:
            mask = decode_segmentation(ann.get("segmentation"), height, width)
        except (ValueError, TypeError, KeyError) as exc:
            raise AnnotationError(
                self.instances_path, f"annotation {ann_id} (image {ann['image_id']}): bad segmentation: {exc}"
            ) from None
        if mask.shape != (height, width):
            raise AnnotationError(
                self.instances_path,
                f"annotation {ann_id}: mask size {mask.shape} differs from image {ann['image_id']} "
                f"size {(height, width)}",
            )
        return mask

    def boxes_of_image(self, image_id: int) -> dict[int, tuple[float, float, float, float]]:
        """``{ann_id: (x, y, w, h)}``: the COCO ``bbox`` (pixels) of every annotation of ``image_id``."""
        if self._by_image is None:
            self._by_image = {}
            for ann_id, ann in self._anns.items():
                self._by_image.setdefault(int(ann.get("image_id", -1)), []).append(ann_id)
        out = {}
        for ann_id in self._by_image.get(int(image_id), []):
            box = self._anns[ann_id].get("bbox") or (0.0, 0.0, 0.0, 0.0)
            out[ann_id] = tuple(float(v) for v in box[:4])
        return out

    def ref_mask(self, ref: Ref, cache: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """The (H, W) uint8 {0, 1} target of ``ref``: its one annotation's mask, the union of several
        (a multi-target ref), or all zeros at the image's size (a no-target ref). ``cache`` (ann_id ->
        mask) lets a caller decode each annotation once across refs."""
        if ref.no_target:
            image = self.image(ref.image_id)
            return np.zeros((int(image["height"]), int(image["width"])), dtype=np.uint8)
        cache = {} if cache is None else cache
        for ann_id in ref.ann_ids:
            if ann_id not in cache:
                cache[ann_id] = self.mask(ann_id)
        if len(ref.ann_ids) == 1:
            return cache[ref.ann_id]
        shapes = {cache[a].shape for a in ref.ann_ids}
        if (
            len(shapes) > 1
        ):  # cannot happen for annotations of one image (mask() checks each), kept as a guard
            raise AnnotationError(
                self.instances_path, f"ref_id {ref.ref_id}: its targets' masks differ in size {shapes}"
            )
        return np.bitwise_or.reduce(np.stack([cache[a] for a in ref.ann_ids]), axis=0)

    def empty_mask_problem(self, ann_id: int) -> str | None:
        """Why annotation ``ann_id`` gives no mask (its segmentation covers no pixel of its image, e.g.
        polygons outside it), or None when it covers at least one pixel. The area is read from the RLE,
        nothing is decoded; a malformed segmentation raises as :meth:`mask` does."""
        ann = self._anns.get(int(ann_id))
        if ann is None:
            raise AnnotationError(self.instances_path, f"no annotation with id {ann_id}")
        image = self.image(ann["image_id"])
        height, width = int(image["height"]), int(image["width"])
        segmentation = ann.get("segmentation")
        try:
            area = int(mask_utils.area(segmentation_rle(segmentation, height, width)))
        except (ValueError, TypeError, KeyError) as exc:
            raise AnnotationError(
                self.instances_path, f"annotation {ann_id} (image {ann['image_id']}): bad segmentation: {exc}"
            ) from None
        if area:
            return None
        extent = _extent(segmentation)
        where = f"its polygons span {extent}, " if extent else ""
        return (
            f"annotation {ann_id} (image {ann['image_id']}) covers no pixel of its {width}×{height} image "
            f"({where}outside the image or of zero area): it would train and score as an empty mask"
        )

    def selectors_present(self) -> list[str]:
        """Every split name and subset tag some ref carries (what a split selector can name), splits
        first, then :data:`SUBSET_TAGS` order, then the rest alphabetically."""
        splits = sorted({ref.split for ref in self.refs})
        tags = {tag for ref in self.refs for tag in ref.tags} - set(splits)
        known = [tag for tag in SUBSET_TAGS if tag in tags]
        return splits + known + sorted(tags.difference(SUBSET_TAGS))

    def subsets_present(self, split: str) -> list[str]:
        """Subset tags carried by refs of ``split`` (other than ``split`` itself and plain split names),
        in :data:`SUBSET_TAGS` order, unknown tags after them alphabetically."""
        found: set[str] = set()
        parts = split_parts(split)
        for ref in self.refs_for(split):
            found.update(tag for tag in ref.tags if tag not in parts and tag not in SPLIT_NAMES)
        known = [tag for tag in SUBSET_TAGS if tag in found]
        return known + sorted(found.difference(SUBSET_TAGS))
