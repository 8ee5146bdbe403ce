"""Synthetic benchmark generator: geometry (neighbours warp onto the centre with the GT disparity), masks,
unambiguous depth-referring expressions (checked by an independent parser), splits and subset tags through
the loader, default difficulty, determinism, the generator CLI and the data benchmark.

Sizes are tiny (64x96) so the whole file runs in seconds on 2 cores."""

from __future__ import annotations

import importlib
import json
import math
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataset.lightfield import LightFieldLayout, load_light_field
from dataset.refer import ReferAnnotations
from dataset.scenes import SceneDataset
from dataset.synthetic import (
    CATEGORIES,
    PALETTE,
    SyntheticConfig,
    SyntheticScene,
    render_scene,
    write_dataset,
)
from dataset.synthetic.generator import scene_records
from utils.views import parse_views

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig(height=64, width=96, num_train=4, num_val=3, seed=11)
DS = CFG.ds_name
CENTRE = (CFG.centre, CFG.centre)
#: The four direct neighbours of 5_5 and their (drow, dcol): 5_4 is left of the centre, 4_5 above it.
NEIGHBOURS: dict[tuple[int, int], tuple[int, int]] = {
    (5, 4): (0, -1),
    (5, 6): (0, 1),
    (4, 5): (-1, 0),
    (6, 5): (1, 0),
}
OCCLUSION_TAGS = ("no-o", "o-1", "o-2", "o-3")
DEPTH_TAGS = ("closest", "distance", "behind", "front", "near")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """``CFG`` written to disk once for the module (7 scenes, 9x9 views of 64x96)."""
    root = tmp_path_factory.mktemp("syn")
    write_dataset(root, CFG)
    return root


@pytest.fixture(scope="module")
def rendered() -> dict[int, SyntheticScene]:
    """The scenes of ``CFG`` re-rendered in memory: centre + 4 neighbours with their layer ids."""
    views = [CENTRE, *NEIGHBOURS]
    return {i: render_scene(i, CFG, views=views) for i in range(1, CFG.num_train + CFG.num_val + 1)}


@pytest.fixture(scope="module")
def default_scenes() -> list[tuple[SyntheticScene, list[dict], list[dict]]]:
    """40 scenes of the default config (default difficulty) at 64x96: (scene, annotations, refs)."""
    cfg = SyntheticConfig(height=64, width=96)
    out = []
    for image_id in range(1, 41):
        scene = render_scene(image_id, cfg, views=[CENTRE])
        _, anns, refs = scene_records(scene, cfg)
        out.append((scene, anns, refs))
    return out


# ----------------------------------------------------------------------------------------------- geometry


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return bgr[:, :, ::-1]


def _sample_positions(
    disparity: np.ndarray, drow: int, dcol: int, sign: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where each centre pixel (x, y) is looked up in the neighbour: (x - s*d*dcol, y - s*d*drow), (H, W) each.

    ``sign=+1`` is the documented convention; ``-1`` the flipped one."""
    h, w = disparity.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    d = disparity.astype(np.float64)
    return x - sign * d * dcol, y - sign * d * drow


def _taps(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The four integer (row, col) taps of bilinear sampling at (x, y), clamped to the image."""
    h, w = shape
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1)
    return [(y0, x0), (y0, x1), (y1, x0), (y1, x1)]


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, 3) ``image`` at float positions ``x``, ``y`` (H, W) -> float64 (H, W, 3)."""
    img = image.astype(np.float64)
    (r0, c0), (_, c1), (r1, _), _ = _taps(x, y, image.shape[:2])
    fx = np.clip(x - np.floor(x), 0, 1)[..., None]
    fy = np.clip(y - np.floor(y), 0, 1)[..., None]
    top = img[r0, c0] * (1 - fx) + img[r0, c1] * fx
    bottom = img[r1, c0] * (1 - fx) + img[r1, c1] * fx
    return top * (1 - fy) + bottom * fy


def _not_occluded(centre_ids: np.ndarray, view_ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(H, W) bool: the sample position lies inside the neighbour and all four bilinear taps there show the
    layer the centre pixel shows (otherwise the centre point is occluded in, or outside, that view)."""
    h, w = centre_ids.shape
    ok = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    for rows, cols in _taps(x, y, (h, w)):
        ok &= view_ids[rows, cols] == centre_ids
    return ok


def _squared_error(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    err = (a - b) ** 2
    return float(err[mask].sum()), int(mask.sum()) * a.shape[-1]


def _psnr(sse: float, n: int) -> float:
    return 10.0 * math.log10(255.0**2 / max(sse / n, 1e-12))


def test_neighbours_warp_onto_centre_with_gt_disparity(written: Path, rendered: dict) -> None:
    """Each direct neighbour, warped with the GT disparity by the documented convention, reproduces the
    centre view on non-occluded pixels (>= 40 dB); the flipped sign does not."""
    flipped_sse, flipped_n = 0.0, 0
    for image_id, scene in rendered.items():
        folder = written / "lf" / DS / f"Image{image_id}"
        centre = _read_rgb(folder / "5_5.png")
        disparity = np.load(folder / CFG.disparity_name)
        np.testing.assert_array_equal(centre, scene.views[CENTRE])  # on-disk == re-rendered
        np.testing.assert_array_equal(disparity, scene.disparity)
        centre_f = centre.astype(np.float64)
        for view, (drow, dcol) in NEIGHBOURS.items():
            neighbour = _read_rgb(folder / f"{view[0]}_{view[1]}.png")
            np.testing.assert_array_equal(neighbour, scene.views[view])
            x, y = _sample_positions(disparity, drow, dcol, +1.0)
            visible = _not_occluded(scene.layer_ids[CENTRE], scene.layer_ids[view], x, y)
            assert visible.mean() > 0.5, f"Image{image_id} {view}: only {visible.mean():.0%} comparable"
            good = _psnr(*_squared_error(_bilinear(neighbour, x, y), centre_f, visible))
            fx, fy = _sample_positions(disparity, drow, dcol, -1.0)
            sse, n = _squared_error(_bilinear(neighbour, fx, fy), centre_f, visible)
            bad = _psnr(sse, n)
            flipped_sse, flipped_n = flipped_sse + sse, flipped_n + n
            assert good >= 40.0, f"Image{image_id} view {view}: warp PSNR {good:.1f} dB"
            assert bad <= good - 10.0, f"Image{image_id} view {view}: flipped {bad:.1f} vs {good:.1f} dB"
    pooled = _psnr(flipped_sse, flipped_n)
    assert pooled < 32.0, f"flipped-sign warp still reaches {pooled:.1f} dB over the dataset"


def _shifted(mask: np.ndarray, drow: int, dcol: int) -> np.ndarray:
    """``mask`` moved by whole pixels (down ``drow``, right ``dcol``), zero-filled, same shape."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(drow, 0) : h + min(drow, 0), max(dcol, 0) : w + min(dcol, 0)] = mask[
        max(-drow, 0) : h + min(-drow, 0), max(-dcol, 0) : w + min(-dcol, 0)
    ]
    return out


def test_near_objects_move_against_the_view_offset(rendered: dict) -> None:
    """The sign without interpolation: an object at disparity d >= 1 px is best matched, in the view at
    offset (drow, dcol), by its centre mask moved by whole pixels (-d*drow, -d*dcol) rounded either way; e.g.
    it moves right in 5_4 (left of the centre) and down in 4_5 (above it)."""
    checked = 0
    for scene in rendered.values():
        ids = scene.layer_ids[CENTRE]
        for obj in scene.objects:
            mask = ids == obj.layer_id
            if obj.disparity < 1.0 or mask.sum() < 40:
                continue
            for view, (drow, dcol) in NEIGHBOURS.items():
                target = scene.layer_ids[view] == obj.layer_id
                steps = range(-3, 4)
                iou = {
                    k: (_shifted(mask, -k * drow, -k * dcol) & target).sum()
                    / max((_shifted(mask, -k * drow, -k * dcol) | target).sum(), 1)
                    for k in steps
                }
                best = max(steps, key=lambda k: iou[k])
                assert best in (math.floor(obj.disparity), math.ceil(obj.disparity)), (
                    f"Image{scene.image_id} object {obj.index} (d={obj.disparity:.2f}) in {view}: "
                    f"best shift {best} x (-drow, -dcol); IoU by shift {iou}"
                )
                checked += 1
    assert checked >= 8


# ------------------------------------------------------------------------------------------------- masks


def _decode(segmentation: dict) -> np.ndarray:
    return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})


def test_masks_are_visible_parts_in_centre(written: Path, rendered: dict) -> None:
    instances = json.loads((written / "refer_seg" / DS / "instances.json").read_text())
    images = {im["id"]: im for im in instances["images"]}
    assert sorted(images) == sorted(rendered)
    assert [c["name"] for c in sorted(instances["categories"], key=lambda c: c["id"])] == list(CATEGORIES)
    by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, scene in rendered.items():
        assert images[image_id] == {
            "id": image_id,
            "file_name": f"Image{image_id}",
            "height": CFG.height,
            "width": CFG.width,
        }
        ids = scene.layer_ids[CENTRE]
        visible = {int(k) for k in np.unique(ids) if k > 0}
        anns = by_image[image_id]
        found: set[int] = set()
        for ann in anns:
            mask = _decode(ann["segmentation"]).astype(bool)
            layers = np.unique(ids[mask])
            assert len(layers) == 1 and layers[0] > 0, f"annotation {ann['id']} spans layers {layers}"
            layer = int(layers[0])
            np.testing.assert_array_equal(mask, ids == layer, err_msg=f"annotation {ann['id']}")
            obj = scene.objects[layer - 1]
            assert ann["category_id"] == CATEGORIES.index(obj.category) + 1
            assert ann["area"] == mask.sum()
            rows, cols = np.nonzero(mask)
            assert ann["bbox"] == [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]
            found.add(layer)
        assert found == visible and len(anns) == len(visible)  # every visible object, once


# ----------------------------------------------------------------------------- independent expression check

#: Disparity differences below this (px) are not "clearly" nearer or farther.
DEPTH_TOL = 0.1
#: A distractor counts as behind / in front of Y when it is more than this (px) behind / in front.
RELATION_SLACK = 0.05
#: "near the camera" means disparity of at least this many px between adjacent views.
NEAR_PX = 1.0
#: Centroids closer than this fraction of the width are not clearly left / right of each other.
SPATIAL_TOL = 0.04

_CAT = "|".join(re.escape(c) for c in sorted(CATEGORIES, key=len, reverse=True))
_COL = "|".join(PALETTE)
_D = rf"(?P<d>(?:(?:{_COL}) )?(?:{_CAT}))"
_Y = rf"(?P<y>(?:(?:{_COL}) )?(?:{_CAT}))"
GRAMMAR: list[tuple[str, re.Pattern]] = [
    (kind, re.compile(pattern))
    for kind, pattern in [
        ("closest", rf"the (?:closest|nearest) {_D}"),
        ("closest", rf"the {_D} (?:nearest|closest) to the camera"),
        ("distance", rf"the (?:farthest|furthest) {_D}"),
        ("distance", rf"the {_D} (?:in the distance|farthest from the camera)"),
        ("near", rf"the {_D} near the (?:camera|viewer)"),
        ("behind", rf"the {_D} (?:that is )?behind the {_Y}"),
        ("front", rf"the {_D} (?:that is )?in front of the {_Y}"),
        ("left", rf"the (?:left|leftmost) {_D}"),
        ("left", rf"the {_D} on the (?:far )?left"),
        ("right", rf"the (?:right|rightmost) {_D}"),
        ("right", rf"the {_D} on the (?:far )?right"),
        ("identity", rf"the {_D}(?: in the image)?"),
    ]
]


@dataclass
class _Obj:
    layer: int
    category: str
    colour: str
    disparity: float  # from the GT disparity map
    x0: int  # visible column extent in the centre view
    x1: int
    cx: float  # visible centroid column


def _universe(scene: SyntheticScene) -> dict[int, _Obj]:
    """Objects visible in the centre view, measured from the rendered layer ids and GT disparity map."""
    ids = scene.layer_ids[CENTRE]
    out = {}
    for layer in (int(k) for k in np.unique(ids) if k > 0):
        mask = ids == layer
        d = scene.disparity[mask]
        assert np.ptp(d) < 1e-6, "objects are fronto-parallel: one disparity each"
        cols = np.nonzero(mask)[1]
        obj = scene.objects[layer - 1]
        out[layer] = _Obj(layer, obj.category, obj.colour, float(d[0]), cols.min(), cols.max(), cols.mean())
    return out


def _parse(sentence: str) -> tuple[str, tuple[str | None, str], tuple[str | None, str] | None]:
    """(kind, description, relation description or None) of a generated sentence; fails if unparsable."""
    text = sentence.strip().lower()
    for kind, pattern in GRAMMAR:
        match = pattern.fullmatch(text)
        if match:
            desc = _split_desc(match.group("d"))
            rel = _split_desc(match.group("y")) if "y" in pattern.groupindex else None
            return kind, desc, rel
    raise AssertionError(f"sentence outside the expected grammar: {sentence!r}")


def _split_desc(phrase: str) -> tuple[str | None, str]:
    first, _, rest = phrase.partition(" ")
    return (first, rest) if first in PALETTE else (None, phrase)


def _members(objs: dict[int, _Obj], desc: tuple[str | None, str]) -> list[_Obj]:
    colour, category = desc
    return [o for o in objs.values() if o.category == category and colour in (None, o.colour)]


def _overlap(a: _Obj, b: _Obj) -> int:
    return min(a.x1, b.x1) + 1 - max(a.x0, b.x0)


def _referents(sentence: str, objs: dict[int, _Obj], width: int) -> tuple[str, set[int]]:
    """(kind, layers of every object that plausibly satisfies the sentence). Plausible = not clearly
    excluded, so a sentence is unambiguous only if this set has exactly one element."""
    kind, desc, rel = _parse(sentence)
    group = _members(objs, desc)
    if kind == "identity":
        return kind, {o.layer for o in group}
    if kind in ("closest", "distance", "near", "left", "right"):
        assert len(group) >= 2, f"{sentence!r}: a superlative needs several {desc} objects, got {len(group)}"
    if kind in ("closest", "distance"):
        s = 1.0 if kind == "closest" else -1.0
        return kind, {
            o.layer
            for o in group
            if all(s * (o.disparity - p.disparity) > -DEPTH_TOL for p in group if p is not o)
        }
    if kind == "near":
        return kind, {o.layer for o in group if o.disparity >= NEAR_PX - DEPTH_TOL}
    if kind in ("left", "right"):
        s = 1.0 if kind == "left" else -1.0
        return kind, {
            o.layer
            for o in group
            if all(s * (p.cx - o.cx) > -SPATIAL_TOL * width for p in group if p is not o)
        }
    anchors = _members(objs, rel)
    assert len(anchors) == 1, f"{sentence!r}: reference object {rel} matches {len(anchors)} objects"
    y = anchors[0]
    s = 1.0 if kind == "behind" else -1.0
    return kind, {
        o.layer
        for o in group
        if o is not y and _overlap(o, y) > 0 and s * (y.disparity - o.disparity) > RELATION_SLACK
    }


def _check_refs(scene: SyntheticScene, anns: list[dict], refs: list[dict], width: int) -> dict[str, int]:
    """Assert every sentence of every ref picks out exactly its own object; returns counts per kind."""
    objs = _universe(scene)
    ids = scene.layer_ids[CENTRE]
    layer_of = {}
    for ann in anns:
        layers = np.unique(ids[_decode(ann["segmentation"]).astype(bool)])
        layer_of[ann["id"]] = int(layers[0])
    counts: dict[str, int] = {}
    for ref in refs:
        target = objs[layer_of[ref["ann_id"]]]
        assert ref["category_id"] == CATEGORIES.index(target.category) + 1
        depth_kinds = set()
        for sent in ref["sentences"]:
            kind, chosen = _referents(sent["sent"], objs, width)
            assert chosen == {target.layer}, (
                f"Image{scene.image_id} {sent['sent']!r}: refers to layers {sorted(chosen)}, "
                f"target {target.layer}; objects {list(objs.values())}"
            )
            if kind == "near":
                assert target.disparity >= NEAR_PX
            if kind in ("behind", "front"):
                y = _members(objs, _parse(sent["sent"])[2])[0]
                gap = y.disparity - target.disparity
                assert (gap if kind == "behind" else -gap) >= DEPTH_TOL
            if kind in DEPTH_TAGS:
                depth_kinds.add(kind)
            counts[kind] = counts.get(kind, 0) + 1
        assert depth_kinds == set(ref["subsets"]) & set(DEPTH_TAGS), (ref["subsets"], depth_kinds)
    return counts


def test_written_expressions_are_unambiguous(written: Path, rendered: dict) -> None:
    refs = json.loads((written / "refer_seg" / DS / f"{DS}.json").read_text())
    anns = json.loads((written / "refer_seg" / DS / "instances.json").read_text())["annotations"]
    assert refs
    total = 0
    for image_id, scene in rendered.items():
        scene_refs = [r for r in refs if r["image_id"] == image_id]
        counts = _check_refs(scene, [a for a in anns if a["image_id"] == image_id], scene_refs, CFG.width)
        total += sum(counts.values())
    assert total == sum(len(r["sentences"]) for r in refs)


def test_default_config_expressions_are_unambiguous(default_scenes: list) -> None:
    counts: dict[str, int] = {}
    for scene, anns, refs in default_scenes:
        for kind, n in _check_refs(scene, anns, refs, 96).items():
            counts[kind] = counts.get(kind, 0) + n
    for kind in DEPTH_TAGS:  # every depth-referring kind is exercised by the checker
        assert counts.get(kind, 0) >= 3, counts


def test_checker_rejects_ambiguous_and_wrong_sentences(default_scenes: list) -> None:
    """The checker itself can fail: a superlative with the sign reversed, or a bare category shared by
    several objects, does not pick out the generated target."""
    tried = 0
    for scene, _, refs in default_scenes:
        objs = _universe(scene)
        for ref in refs:
            for sent in ref["sentences"]:
                text = sent["sent"]
                kind = _parse(text)[0]
                if kind == "closest" and text.startswith("the closest "):
                    flipped = text.replace("the closest ", "the farthest ", 1)
                    _, original = _referents(text, objs, 96)
                    assert _referents(flipped, objs, 96)[1] != original
                    tried += 1
                if kind in ("closest", "distance", "near"):
                    bare = "the " + _parse(text)[1][1]
                    assert len(_referents(bare, objs, 96)[1]) >= 2
                    tried += 1
    assert tried >= 5


# ------------------------------------------------------------------------------------------ splits and tags


def _visible_fraction_tag(fraction: float) -> str:
    if fraction >= 0.95:
        return "no-o"
    if fraction >= 0.7:
        return "o-1"
    return "o-2" if fraction >= 0.4 else "o-3"


def test_refs_have_split_and_subset_tags(written: Path, rendered: dict) -> None:
    refs = json.loads((written / "refer_seg" / DS / f"{DS}.json").read_text())
    for ref in refs:
        expected = "train" if ref["image_id"] <= CFG.num_train else "val"
        assert ref["split"] == expected
        tags = ref["subsets"]
        assert len(set(tags)) == len(tags) and set(tags) <= set(OCCLUSION_TAGS + DEPTH_TAGS)
        occlusion = [t for t in tags if t in OCCLUSION_TAGS]
        assert len(occlusion) == 1, tags
        obj = rendered[ref["image_id"]].objects[ref["ann_id"] - 100 * ref["image_id"] - 1]
        visible = int((rendered[ref["image_id"]].layer_ids[CENTRE] == obj.layer_id).sum())
        assert visible == obj.area > 0
        assert occlusion[0] == _visible_fraction_tag(visible / obj.full_area)
        assert [s["sent_id"] for s in ref["sentences"]] == [
            ref["ref_id"] * 10 + j for j in range(len(ref["sentences"]))
        ]


def test_loader_selects_by_split_and_by_tag(written: Path) -> None:
    refs = json.loads((written / "refer_seg" / DS / f"{DS}.json").read_text())
    for split in ("train", "val"):
        data = SceneDataset(written, DS, split, views="4", mode="val")
        chosen = [r for r in refs if r["split"] == split]
        assert [s.image_id for s in data.scenes] == sorted({r["image_id"] for r in chosen})
        assert data.num_expressions == sum(len(r["sentences"]) for r in chosen)
        item = data[0]
        assert all(tags[0] == split for tags in item["subsets"])
        assert item["views"].shape == (4, CFG.height, CFG.width, 3)
    present = sorted({t for r in refs for t in r["subsets"]})
    assert any(t in DEPTH_TAGS for t in present) and any(t in OCCLUSION_TAGS for t in present)
    across_splits = 0
    for tag in present:
        data = SceneDataset(written, DS, tag, views="4", mode="val")
        chosen = [r for r in refs if tag in r["subsets"]]
        assert data.num_expressions == sum(len(r["sentences"]) for r in chosen) > 0
        got = {ref.ref_id for scene in data.scenes for ref in scene.refs}
        assert got == {r["ref_id"] for r in chosen}
        across_splits += len({r["split"] for r in chosen}) == 2
        for item in data:
            assert all(tag in tags[1:] for tags in item["subsets"])
    assert across_splits > 0  # tags cut across the train / val split
    for tag in present:  # "val&<tag>": the subset of one split
        data = SceneDataset(written, DS, f"val&{tag}", views="4", mode="val")
        chosen = [r for r in refs if r["split"] == "val" and tag in r["subsets"]]
        assert {ref.ref_id for scene in data.scenes for ref in scene.refs} == {r["ref_id"] for r in chosen}
    # the --val_dataset "ds|splitBy|split" form: splitBy is ignored when <ds>.json exists
    ds, split_by, split = f"{DS}|syn|{present[0]}".split("|")
    by_tag = SceneDataset(written, ds, split, split_by=split_by)
    assert by_tag.num_expressions == SceneDataset(written, DS, present[0]).num_expressions
    assert ReferAnnotations.load(written, DS).subsets_present("val")


# ------------------------------------------------------------------------------------------ default difficulty


def test_default_config_difficulty(default_scenes: list) -> None:
    cfg = SyntheticConfig()
    assert (cfg.height, cfg.width, cfg.angular) == (480, 640, 9)
    assert cfg.min_objects >= 3 and cfg.same_looking_prob >= 0.3
    visible = [len(anns) for _, anns, _ in default_scenes]
    assert min(len(s.objects) for s, _, _ in default_scenes) >= 3
    assert np.median(visible) >= 4, visible
    tags: dict[str, int] = {}
    for _, _, refs in default_scenes:
        for ref in refs:
            for tag in ref["subsets"]:
                tags[tag] = tags.get(tag, 0) + 1
    for tag in ("o-1", "o-2", "o-3", *DEPTH_TAGS):
        assert tags.get(tag, 0) >= 3, tags
    n_refs = sum(len(refs) for _, _, refs in default_scenes)
    depth_refs = sum(
        any(t in DEPTH_TAGS for t in r["subsets"]) for _, _, refs in default_scenes for r in refs
    )
    assert depth_refs >= 0.3 * n_refs, (depth_refs, n_refs)
    pairs = [s for s, _, _ in default_scenes if s.same_looking_pairs]
    assert len(pairs) >= 6, len(pairs)
    for scene in pairs:  # same category and colour, clearly different depths
        a, b = (scene.objects[i] for i in scene.same_looking_pairs[0])
        assert (a.category, a.colour) == (b.category, b.colour)
        assert abs(a.disparity - b.disparity) >= 0.3


# ------------------------------------------------------------------------------------ determinism and config


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_is_deterministic_per_seed(tmp_path: Path, capsys) -> None:
    cfg = SyntheticConfig(height=48, width=64, num_train=2, num_val=1, seed=5)
    write_dataset(tmp_path / "a", cfg)
    write_dataset(tmp_path / "b", cfg, workers=2)  # other processes, same bytes
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 3 * (81 + 1) + 3  # per scene 81 views + disparity; refs, instances, attributes
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    cli = importlib.import_module("dataset.synthetic.cli")
    argv = ["--dataset_dir", str(tmp_path / "c"), "--height", "48", "--width", "64"]
    argv += ["--num_train", "2", "--num_val", "1", "--seed", "5"]
    summary = cli.main(argv)
    assert _tree(tmp_path / "c") == a  # the CLI passes every setting through
    out = capsys.readouterr().out
    assert f"refs         train {summary['refs']['train']:>6}   val {summary['refs']['val']:>6}" in out
    for tag, n in summary["subsets"]["train"].items():
        assert re.search(rf"{re.escape(tag)}\s+train\s+{n}\s", out)
    write_dataset(tmp_path / "d", SyntheticConfig(height=48, width=64, num_train=2, num_val=1, seed=6))
    d = _tree(tmp_path / "d")
    assert d[f"refer_seg/{DS}/instances.json"] != a[f"refer_seg/{DS}/instances.json"]
    assert d[f"lf/{DS}/Image1/5_5.png"] != a[f"lf/{DS}/Image1/5_5.png"]


def test_cli_names_overwrite_and_bad_values(tmp_path: Path) -> None:
    cli = importlib.import_module("dataset.synthetic.cli")
    argv = ["--dataset_dir", str(tmp_path), "--height", "48", "--width", "64", "--angular", "3"]
    argv += [
        "--num_train",
        "1",
        "--num_val",
        "1",
        "--ds_name",
        "syn-x",
        "--disparity_name",
        "5_5_disparity_OAVC.npy",
    ]
    summary = cli.main(argv)
    assert summary["scenes"] == {"train": 1, "val": 1}
    scene = tmp_path / "lf" / "syn-x" / "Image2"
    assert sorted(p.name for p in scene.iterdir()) == sorted(
        [f"{r}_{c}.png" for r in (1, 2, 3) for c in (1, 2, 3)] + ["5_5_disparity_OAVC.npy"]
    )
    layout = LightFieldLayout(disparity_name="5_5_disparity_OAVC.npy", center=(2, 2))
    sample = load_light_field(scene, parse_views("2_1,1_2", layout), layout)
    assert sample.views.shape == (2, 48, 64, 3) and sample.disparity.shape == (48, 64)
    with pytest.raises(SystemExit, match="exists; pass overwrite"):
        cli.main(argv)
    cli.main([*argv, "--overwrite"])
    with pytest.raises(SystemExit, match="angular must be odd"):
        cli.main([*argv, "--overwrite", "--angular", "4"])
    with pytest.raises(SystemExit, match="min_objects"):
        cli.main([*argv, "--overwrite", "--min_objects", "7", "--max_objects", "6"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("height", 8, "height and width"),
        ("angular", 1, "angular"),
        ("max_objects", 200, "max_objects"),
        ("same_looking_prob", 1.5, "same_looking_prob"),
        ("perspective", -0.1, "perspective"),
        ("ds_name", "a/b", "ds_name"),
        ("num_val", -1, "num_val"),
    ],
)
def test_config_rejects_bad_values(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{field: value})


@pytest.fixture
def time_limit() -> Iterator[Callable[[float], object]]:
    """Turn a hang into a failure: SIGALRM after ``seconds``."""

    def _fail(signum: int, frame: object) -> None:
        raise TimeoutError("timed out: the generator loops forever")

    previous = signal.signal(signal.SIGALRM, _fail)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_same_looking_bridge_pair_terminates(time_limit: Callable[[float], object]) -> None:
    """A same-looking bridge pair must be >= 0.45 px apart inside the 0.5 px bridge range; the sampler
    used to loop forever when the first bridge drew a middle disparity (seed 0, scene 258)."""
    time_limit(20)
    scene = render_scene(258, SyntheticConfig(height=48, width=64, seed=0), views=[CENTRE])
    a, b = scene.objects[:2]
    assert (a.category, a.colour) == (b.category, b.colour) and a.category == "bridge"
    assert abs(a.disparity - b.disparity) >= 0.45
    assert all(0.0 <= o.disparity <= 0.5 for o in (a, b))


# ---------------------------------------------------------------------------------------------- benchmark


def test_bench_data_runs_on_tiny_dataset(written: Path, capsys) -> None:
    bench = importlib.import_module("dataset.bench")
    rows = bench.main(["--dataset_dir", str(written), "--workers", "0,1", "--samples", "3"])
    assert [r["workers"] for r in rows] == [0, 1]
    assert all(r["items_per_s"] > 0 and r["first_item_s"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert "| num_workers | items/s |" in out and f"{CFG.height}x{CFG.width}" in out


@pytest.mark.parametrize(("perspective", "low", "high"), [(1.0, 0.8, 1.0), (0.0, -0.15, 0.15)])
def test_perspective_sets_how_placement_follows_disparity(
    perspective: float, low: float, high: float
) -> None:
    """Default scenes place nearer objects lower (their ground row follows the disparity); ``perspective=0``
    draws the placement independently, so the row says nothing about depth."""
    from dataset.synthetic.layout import sample_layers

    cfg = SyntheticConfig(height=120, width=160, perspective=perspective)
    disparity, bottom = [], []
    for seed in range(300):
        layers, _ = sample_layers(np.random.default_rng([seed, 7]), cfg, 0.5 * cfg.height)
        disparity += [layer.disparity for layer in layers if layer.category != "bridge"]
        bottom += [layer.bottom for layer in layers if layer.category != "bridge"]
    r = float(np.corrcoef(disparity, bottom)[0, 1])
    assert low <= r <= high, r
