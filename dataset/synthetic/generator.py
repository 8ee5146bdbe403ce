"""Procedural light-field referring-segmentation benchmark (Ref-UrbanLF layout, UrbanLF-Syn-like geometry).

Geometry (other modules rely on it). Views are named ``<row>_<col>.png``, 1-based, on an ``A x A`` grid with
centre index ``c = (A + 1) // 2`` (``5_5`` for 9x9); ``5_4`` is left of the centre, ``4_5`` above it. A point
at ``(x, y)`` in the centre view appears in view ``(row, col)`` at ``(x - d*(col - c), y - d*(row - c))``,
``d`` = disparity in pixels between adjacent views, larger ``d`` = nearer. So view pixel ``(x', y')`` shows the
scene point whose centre-view coordinates are ``(x' + d*dcol, y' + d*drow)``. Pixel coordinates refer to pixel
centres (pixel ``i`` covers ``[i - 0.5, i + 0.5]``); every view pixel is a point sample (no anti-aliasing), so
``layer_ids`` says exactly which layer each pixel shows. Disparities follow UrbanLF-Syn: the background plane
lies in ``[-0.5, 0.0]`` px, objects in ``[0.0, 1.6]`` px, independent of the image size.

Scenes: a smooth-textured background plane (ground/sky or wall) and ``min_objects..max_objects``
fronto-parallel objects of the nine Ref-UrbanLF categories, each at its own constant disparity, composited
back to front in every view. About ``same_looking_prob`` of the scenes hold two same-looking objects (same
category and colour) at clearly different disparities. GT disparity = disparity of the front-most layer at
each centre pixel; masks = visible part of each object in the centre view.

On disk (``write_dataset``)::

    <dataset_dir>/refer_seg/<ds>/<ds>.json       refs {ref_id, ann_id, image_id, category_id, split,
                                                 subsets, sentences[{sent_id, sent, tokens}]}
    <dataset_dir>/refer_seg/<ds>/instances.json  COCO images / annotations (RLE) / categories
    <dataset_dir>/refer_seg/<ds>/attributes.json {ann_id: category, colour, disparity, depth bin, occlusion, ...}
                                                 (every annotation; ``dataset/attributes.py``)
    <dataset_dir>/lf/<ds>/Image<id>/<row>_<col>.png and <disparity_name> (float32 (H, W))
    <dataset_dir>/llava_dataset/<ds>.json, reason_seg/<ds>/  with ``cfg.tasks``: VQA and reasoning segmentation
                                                 (``dataset/synthetic/tasks.py``)

Ids: scenes ``1..num_train`` are ``train``, the next ``num_val`` are ``val``; ``ann_id = image_id * 100 +
layer_id`` (every object with a visible pixel gets an annotation); ``ref_id = ann_id`` (one ref per
referable object); ``sent_id = ref_id * 10 + j``.

Splits: every ref has ``split`` in {"train", "val"} and a ``subsets`` list of tags; a loader selects a ref for
split ``S`` iff ``ref["split"] == S or S in ref["subsets"]``. Tags: the occlusion level by visible fraction of
the object in the centre view (``no-o`` >= 0.95, ``o-1`` [0.7, 0.95), ``o-2`` [0.4, 0.7), ``o-3`` < 0.4), and,
when the ref's sentences are depth-referring, their kind: ``closest``, ``distance``, ``behind``, ``front``,
``near`` (rules in ``dataset/synthetic/expressions.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from dataset.attributes import ATTRIBUTES_FILE
from dataset.synthetic.attributes import object_attributes
from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.expressions import (
    DEPTH_KINDS,
    Expression,
    SceneObject,
    generate_expressions,
)
from dataset.synthetic.gres import GRES_REF_OFFSET, gres_expressions
from dataset.synthetic.layout import Layer, full_area, render_view, sample_background, sample_layers
from dataset.synthetic.shapes import CATEGORIES
from dataset.synthetic.tasks import SceneTasks, scene_tasks, task_paths, write_task_files

OCCLUSION_THRESHOLDS: tuple[tuple[str, float], ...] = (
    ("no-o", 0.95),
    ("o-1", 0.7),
    ("o-2", 0.4),
    ("o-3", 0.0),
)
"""Occlusion tag = the first ``(tag, lower bound)`` whose bound the visible fraction reaches."""
MIN_REF_AREA_FRACTION = 0.005
MIN_REF_AREA_PX = 30


@dataclass
class SyntheticScene:
    """A rendered scene. ``views`` maps 1-based ``(row, col)`` to uint8 RGB (H, W, 3); ``layer_ids`` maps the
    same keys to int16 (H, W) (0 = background, k = ``objects[k - 1]``); ``disparity`` is float32 (H, W)."""

    image_id: int
    views: dict[tuple[int, int], np.ndarray]
    layer_ids: dict[tuple[int, int], np.ndarray]
    disparity: np.ndarray
    objects: list[SceneObject]
    expressions: list[Expression]
    background_disparity: float
    same_looking_pairs: list[tuple[int, int]]


def occlusion_tag(visible_fraction: float) -> str:
    """``no-o`` / ``o-1`` / ``o-2`` / ``o-3`` for a visible fraction in [0, 1] (see ``OCCLUSION_THRESHOLDS``)."""
    return next(tag for tag, low in OCCLUSION_THRESHOLDS if visible_fraction >= low)


def _scene_object(layer: Layer, ids: np.ndarray, cfg: SyntheticConfig) -> SceneObject:
    mask = ids == layer.layer_id
    area = int(mask.sum())
    full = max(full_area(layer, cfg), area, 1)
    bbox, centroid = (0, 0, 0, 0), (float("nan"), float("nan"))
    if area:
        rows, cols = np.nonzero(mask)
        bbox = (
            int(cols.min()),
            int(rows.min()),
            int(cols.max() - cols.min() + 1),
            int(rows.max() - rows.min() + 1),
        )
        centroid = (float(cols.mean()), float(rows.mean()))
    min_area = max(MIN_REF_AREA_PX, MIN_REF_AREA_FRACTION * cfg.height * cfg.width)
    return SceneObject(
        index=layer.layer_id - 1,
        category=layer.category,
        category_id=CATEGORIES.index(layer.category) + 1,
        colour=layer.colour,
        disparity=layer.disparity,
        mask=mask,
        visible_fraction=area / full,
        bbox=bbox,
        area=area,
        full_area=full,
        centroid=centroid,
        referable=area >= min_area,
    )


def render_scene(
    image_id: int, cfg: SyntheticConfig, views: Iterable[tuple[int, int]] | None = None
) -> SyntheticScene:
    """Render scene ``image_id``; deterministic per ``(cfg.seed, image_id)`` whatever ``views`` asks for.

    Args:
        image_id: scene id (>= 1).
        cfg: generator settings (image size, grid size, object counts, seed).
        views: 1-based ``(row, col)`` views to render; ``None`` = the full ``angular x angular`` grid.
    Returns:
        The scene: requested views (uint8 (H, W, 3)) and their layer ids (int16 (H, W)), the centre-view
        GT disparity (float32 (H, W)), objects with centre-view visible masks, and expressions.
    """
    cfg.validate()  # fields may have been changed after construction
    rng = np.random.default_rng([cfg.seed, image_id])
    bg, bg_d, horizon = sample_background(rng, cfg)
    layers, pair = sample_layers(rng, cfg, horizon)
    c = cfg.centre
    wanted = (
        [(r, q) for r in range(1, cfg.angular + 1) for q in range(1, cfg.angular + 1)]
        if views is None
        else list(views)
    )
    for r, q in wanted:
        if not (1 <= r <= cfg.angular and 1 <= q <= cfg.angular):
            raise ValueError(f"view {r}_{q} outside the {cfg.angular}x{cfg.angular} grid")
    rendered = {
        (r, q): render_view(bg, bg_d, layers, cfg, r - c, q - c) for r, q in dict.fromkeys([(c, c), *wanted])
    }
    centre_ids = rendered[(c, c)][1]
    lut = np.array([bg_d] + [la.disparity for la in layers], dtype=np.float32)
    objects = [_scene_object(la, centre_ids, cfg) for la in layers]
    expressions = generate_expressions(objects, cfg.width, np.random.default_rng([cfg.seed, image_id, 1]))
    pairs = [(0, 1)] if pair and objects[0].area > 0 and objects[1].area > 0 else []
    return SyntheticScene(
        image_id=image_id,
        views={k: rendered[k][0] for k in wanted},
        layer_ids={k: rendered[k][1] for k in wanted},
        disparity=lut[centre_ids],
        objects=objects,
        expressions=expressions,
        background_disparity=bg_d,
        same_looking_pairs=pairs,
    )


def ann_id_of(image_id: int, layer_id: int) -> int:
    """Annotation id of object ``layer_id`` (1-based) of scene ``image_id``; the ref id is the same."""
    return image_id * 100 + layer_id


def _tags(obj: SceneObject, exprs: list[Expression]) -> list[str]:
    kinds = {e.kind for e in exprs}
    return [occlusion_tag(obj.visible_fraction)] + [k for k in DEPTH_KINDS if k in kinds]


def scene_records(scene: SyntheticScene, cfg: SyntheticConfig) -> tuple[dict, list[dict], list[dict]]:
    """COCO image record, annotations (every visible object) and refs (every object with sentences)."""
    image = {
        "id": scene.image_id,
        "file_name": f"Image{scene.image_id}",
        "height": cfg.height,
        "width": cfg.width,
    }
    anns, refs = [], []
    split = cfg.split_of(scene.image_id)
    for obj in scene.objects:
        if obj.area == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        ann_id = ann_id_of(scene.image_id, obj.layer_id)
        segmentation = {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "id": ann_id,
                "image_id": scene.image_id,
                "category_id": obj.category_id,
                "segmentation": segmentation,
                "area": float(obj.area),
                "bbox": [float(x) for x in obj.bbox],
                "iscrowd": 0,
            }
        )
        exprs = [e for e in scene.expressions if e.object_index == obj.index]
        if not exprs:
            continue
        sentences = [
            {"sent_id": ann_id * 10 + j, "sent": e.sentence, "tokens": e.sentence.lower().split()}
            for j, e in enumerate(exprs)
        ]
        refs.append(
            {
                "ref_id": ann_id,
                "ann_id": ann_id,
                "image_id": scene.image_id,
                "category_id": obj.category_id,
                "split": split,
                "subsets": _tags(obj, exprs),
                "sentences": sentences,
            }
        )
    if cfg.gres:
        refs += gres_records(scene, cfg, split)
    return image, anns, refs


def scene_attributes(scene: SyntheticScene) -> dict[str, dict]:
    """``{str(ann_id): attributes}`` of every annotated (visible) object (``attributes.json``)."""
    return {
        str(ann_id_of(scene.image_id, o.layer_id)): object_attributes(
            o, scene.disparity, occlusion_tag(o.visible_fraction)
        )
        for o in scene.objects
        if o.area
    }


def gres_records(scene: SyntheticScene, cfg: SyntheticConfig, split: str) -> list[dict]:
    """The scene's GRES refs in gRefCOCO's form (``ann_id`` / ``category_id`` lists, ``[-1]`` and
    ``no_target: true`` for none), drawn with their own generator so the other refs do not change."""
    rng = np.random.default_rng([cfg.seed, scene.image_id, 2])
    out = []
    for k, expr in enumerate(gres_expressions(scene.objects, rng)):
        ref_id = scene.image_id * 100 + GRES_REF_OFFSET + k
        targets = [scene.objects[i] for i in expr.targets]
        out.append(
            {
                "ref_id": ref_id,
                "ann_id": [ann_id_of(scene.image_id, o.layer_id) for o in targets] or [-1],
                "image_id": scene.image_id,
                "category_id": [o.category_id for o in targets] or [-1],
                "no_target": not targets,
                "split": split,
                "subsets": list(expr.tags),
                "sentences": [
                    {"sent_id": ref_id * 10, "sent": expr.sentence, "tokens": expr.sentence.lower().split()}
                ],
            }
        )
    return out


def _write_scene(
    job: tuple[int, SyntheticConfig, str],
) -> tuple[dict, list[dict], list[dict], int, SceneTasks | None, dict[str, dict]]:
    """Render scene ``image_id`` and write its views and disparity under ``lf_dir``; returns its records
    (and its VQA and reasoning records with ``cfg.tasks``) and its objects' attributes."""
    image_id, cfg, lf_dir = job
    scene = render_scene(image_id, cfg)
    out = Path(lf_dir) / f"Image{image_id}"
    out.mkdir(parents=True)
    for (row, col), view in scene.views.items():
        if not cv2.imwrite(str(out / f"{row}_{col}.png"), np.ascontiguousarray(view[:, :, ::-1])):
            raise OSError(f"{out / f'{row}_{col}.png'}: cv2.imwrite failed")
    np.save(out / cfg.disparity_name, scene.disparity.astype(np.float32))
    image, anns, refs = scene_records(scene, cfg)
    tasks = scene_tasks(image_id, scene.objects, refs, cfg) if cfg.tasks else None
    return image, anns, refs, len(scene.same_looking_pairs), tasks, scene_attributes(scene)


def _summary(
    cfg: SyntheticConfig, images: list[dict], anns: list[dict], refs: list[dict], pairs: int
) -> dict:
    tags = {
        s: dict(sorted(Counter(t for r in refs if r["split"] == s for t in r["subsets"]).items()))
        for s in ("train", "val")
    }
    sentences = [(r, len(r["sentences"])) for r in refs]
    total = sum(n for _, n in sentences)
    gres = {
        "multi_target_share": sum(
            n for r, n in sentences if isinstance(r["ann_id"], list) and len(r["ann_id"]) > 1
        )
        / max(total, 1),
        "no_target_share": sum(n for r, n in sentences if r.get("no_target")) / max(total, 1),
    }
    return {
        **({"gres": gres} if cfg.gres else {}),
        "ds_name": cfg.ds_name,
        "scenes": {s: sum(cfg.split_of(im["id"]) == s for im in images) for s in ("train", "val")},
        "annotations": len(anns),
        "refs": {s: sum(r["split"] == s for r in refs) for s in ("train", "val")},
        "sentences": {s: sum(len(r["sentences"]) for r in refs if r["split"] == s) for s in ("train", "val")},
        "subsets": tags,
        "scenes_with_same_looking_pair": pairs,
        "config": asdict(cfg),
    }


def _outputs(root: Path, cfg: SyntheticConfig) -> list[Path]:
    """What a run installs under ``root``, in order: ``lf/<ds>``, the task files (``cfg.tasks``), then
    ``refer_seg/<ds>``."""
    tasks = task_paths(root, cfg.ds_name) if cfg.tasks else []
    return [root / "lf" / cfg.ds_name, *tasks, root / "refer_seg" / cfg.ds_name]


def _install(tmp: Path, root: Path, cfg: SyntheticConfig, overwrite: bool) -> None:
    """Move the finished ``tmp/<path>`` of every output into ``root/<path>``; the refs JSON arrives last.
    Replacing ``<ds>`` also removes task files of it that this run does not write (they would be stale)."""
    targets = _outputs(root, cfg)
    stale = [p for p in task_paths(root, cfg.ds_name) if p not in targets and overwrite]
    trash = tmp / "old"
    for target in [*reversed(targets), *stale]:  # refs first: a half-replaced dataset never has a refs JSON
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target}: exists; pass overwrite=True (--overwrite) to replace it")
            (trash / target.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            target.rename(trash / target.relative_to(root))
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp / target.relative_to(root)).rename(target)


def write_dataset(
    dataset_dir: str | Path, cfg: SyntheticConfig, workers: int = 1, overwrite: bool = False
) -> dict:
    """Generate ``cfg.num_train + cfg.num_val`` scenes into ``dataset_dir`` in the Ref-UrbanLF layout.

    Everything is written under a temporary folder inside ``dataset_dir`` and moved into place only when
    complete, so an interrupted run leaves no dataset behind (the refs JSON is moved last).

    Args:
        dataset_dir: root that receives ``refer_seg/<ds>/`` and ``lf/<ds>/``.
        cfg: generator settings.
        workers: processes rendering scenes in parallel (1 = in this process).
        overwrite: replace an existing ``<ds>``; otherwise an existing one raises ``FileExistsError``.
    Returns:
        Summary: scene, annotation, ref and sentence counts per split, tag counts per split, config.
    """
    root = Path(dataset_dir)
    if not overwrite and any(p.exists() for p in _outputs(root, cfg)):
        raise FileExistsError(f"{root}: dataset {cfg.ds_name!r} exists; pass overwrite=True (--overwrite)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cfg.ds_name}-", dir=root))
    try:
        lf_dir, ref_dir = tmp / "lf" / cfg.ds_name, tmp / "refer_seg" / cfg.ds_name
        lf_dir.mkdir(parents=True)
        ref_dir.mkdir(parents=True)
        jobs = [(i, cfg, str(lf_dir)) for i in range(1, cfg.num_train + cfg.num_val + 1)]
        images, anns, refs, pairs, tasks, attributes = [], [], [], 0, [], {}
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_write_scene, jobs)
        else:
            pool, results = None, map(_write_scene, jobs)
        try:
            for image, scene_anns, scene_refs, n_pairs, scene_task, scene_attrs in tqdm(
                results, total=len(jobs), desc="synthetic scenes"
            ):
                images.append(image)
                anns += scene_anns
                refs += scene_refs
                pairs += n_pairs
                tasks += [scene_task] if scene_task else []
                attributes.update(scene_attrs)
        finally:
            if pool is not None:
                pool.terminate()
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
        instances = {"images": images, "annotations": anns, "categories": categories}
        (ref_dir / "instances.json").write_text(json.dumps(instances))
        (ref_dir / ATTRIBUTES_FILE).write_text(json.dumps(attributes, indent=1))
        (ref_dir / f"{cfg.ds_name}.json").write_text(json.dumps(refs, indent=1))
        task_summary = write_task_files(tmp, cfg, tasks) if cfg.tasks else None
        _install(tmp, root, cfg, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = _summary(cfg, images, anns, refs, pairs)
    summary["dataset_dir"] = str(root)
    if task_summary is not None:
        summary["tasks"] = task_summary
    return summary
