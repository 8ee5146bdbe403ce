"""gRefCOCO read as published: ``grefs(<splitBy>).json`` and its pickle form (through the restricted reader),
``ann_id`` / ``category_id`` as lists, ``[-1]`` for no target; a multi-target mask is the union of its
annotations, a no-target mask is empty; malformed refs name the file and the ref; the same code path serves
the one-target datasets (the baselines, the scene dataset's masks)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataset.errors import AnnotationError
from dataset.refer import Ref, ReferAnnotations

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DS = "grefcoco"
# Hand-made 4x5 masks: A is rows 0-1 x cols 0-1, B is rows 2-3 x cols 3-4, C overlaps A at (1, 1).
A = np.zeros((4, 5), np.uint8)
A[0:2, 0:2] = 1
B = np.zeros((4, 5), np.uint8)
B[2:4, 3:5] = 1
C = np.zeros((4, 5), np.uint8)
C[1:3, 1:3] = 1


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _instances() -> dict:
    return {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 4, "width": 5}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "segmentation": _rle(A)},
            {"id": 11, "image_id": 1, "category_id": 3, "segmentation": _rle(B)},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": _rle(C)},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }


def _gref(ref_id: int, ann_id, category_id, split: str, sent: str, **extra) -> dict:
    """A ref as gRefCOCO's ``grefs(unc).json`` writes it (lists of ids, REFER's sentence fields)."""
    return {
        "ref_id": ref_id,
        "image_id": 1,
        "ann_id": ann_id,
        "category_id": category_id,
        "split": split,
        "file_name": f"COCO_train2014_000000000001_{ref_id}.jpg",
        "sent_ids": [ref_id * 10],
        "sentences": [{"sent_id": ref_id * 10, "sent": sent, "raw": sent, "tokens": sent.split()}],
        **extra,
    }


def _grefs() -> list[dict]:
    return [
        _gref(1, [10, 11], [3, 3], "train", "the two cars", no_target=False),
        _gref(2, [-1], [-1], "val", "the blue bus", no_target=True),
        _gref(3, [12], [1], "val", "the person", no_target=False),
        _gref(4, 10, 3, "val", "left car"),  # a one-target ref in RefCOCO's integer form
        _gref(5, [10, 12], [3, 1], "val", "the car and the person"),  # no no_target field
    ]


def _write(root: Path, refs: list[dict], form: str = "json") -> Path:
    folder = root / "refer_seg" / DS
    folder.mkdir(parents=True, exist_ok=True)
    if form == "json":
        (folder / "grefs(unc).json").write_text(json.dumps(refs))
    else:
        (folder / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (folder / "instances.json").write_text(json.dumps(_instances()))
    return folder


@pytest.mark.parametrize("form", ["json", "pickle"])
def test_grefs_load_with_lists_and_no_target(tmp_path: Path, form: str) -> None:
    folder = _write(tmp_path, _grefs(), form)
    ann = ReferAnnotations.load(tmp_path, DS)  # its one refs file, found without naming the splitBy
    assert ann.refs_path == folder / ("grefs(unc).json" if form == "json" else "grefs(unc).p")
    refs = {r.ref_id: r for r in ann.refs}
    assert refs[1].ann_ids == (10, 11) and refs[1].ann_id == 10 and not refs[1].no_target
    assert refs[1].category_id == 3
    assert refs[2].ann_ids == () and refs[2].ann_id == -1 and refs[2].no_target and refs[2].category_id == -1
    assert refs[3].ann_ids == (12,) and refs[4].ann_ids == (10,)
    assert [r.ref_id for r in ann.refs_for("val")] == [2, 3, 4, 5]
    assert ReferAnnotations.load(tmp_path, DS, split_by="unc").refs_path == ann.refs_path


def test_target_masks_are_unions_and_no_target_is_empty(tmp_path: Path) -> None:
    _write(tmp_path, _grefs())
    ann = ReferAnnotations.load(tmp_path, DS)
    refs = {r.ref_id: r for r in ann.refs}
    union_ab = np.zeros((4, 5), np.uint8)
    union_ab[0:2, 0:2] = 1
    union_ab[2:4, 3:5] = 1
    np.testing.assert_array_equal(ann.ref_mask(refs[1]), union_ab)
    assert int(ann.ref_mask(refs[1]).sum()) == 8
    empty = ann.ref_mask(refs[2])
    assert empty.dtype == np.uint8 and empty.shape == (4, 5) and not empty.any()
    np.testing.assert_array_equal(ann.ref_mask(refs[3]), C)
    overlap = ann.ref_mask(refs[5])  # A ∪ C share pixel (1, 1): 4 + 4 - 1
    assert int(overlap.sum()) == 7 and overlap.max() == 1
    cache: dict[int, np.ndarray] = {}
    ann.ref_mask(refs[1], cache)
    assert sorted(cache) == [10, 11]  # each annotation decoded once, kept for the next ref


def test_one_target_ref_keeps_its_plain_form() -> None:
    ref = Ref(7, 11, 1, 2, "val", (), ("x",))
    assert ref.ann_ids == (11,) and not ref.no_target
    with pytest.raises(ValueError, match="ann_id 11 is not the first of ann_ids"):
        Ref(7, 11, 1, 2, "val", (), ("x",), ann_ids=(12, 11))


@pytest.mark.parametrize(
    ("ann_id", "extra", "message"),
    [
        ([-1, 10], {}, r"ref_id 1: ann_id \[-1, 10\] mixes -1 \(no target\) with targets"),
        ([], {}, "ann_id must be an integer or a non-empty list of integers, got"),
        (["10"], {}, "ann_id must be an integer or a non-empty list of integers"),
        ([10, 10], {}, r"ann_id \[10, 10\] lists a target twice"),
        ([-2], {}, "negative id other than -1"),
        ([10], {"no_target": True}, r"no_target is True but ann_id is \[10\] \(1 target\(s\)\)"),
        ([-1], {"no_target": False}, r"no_target is False but ann_id is \[-1\] \(0 target\(s\)\)"),
        ([10, 99], {}, "ref_id 1: ann_id 99 has no annotation in"),
    ],
)
def test_malformed_grefs_name_the_file_and_the_ref(tmp_path: Path, ann_id, extra: dict, message: str) -> None:
    folder = _write(tmp_path, [_gref(1, ann_id, [3], "val", "cars", **extra)])
    with pytest.raises(AnnotationError, match=message) as info:
        ReferAnnotations.load(tmp_path, DS)
    assert info.value.path == str(folder / "grefs(unc).json")


def test_several_refer_files_ask_for_a_split_by(tmp_path: Path) -> None:
    folder = _write(tmp_path, _grefs())
    (folder / "grefs(umd).json").write_text(json.dumps(_grefs()[:2]))
    with pytest.raises(AnnotationError, match=r"several REFER files \(splitBy umd, unc\)"):
        ReferAnnotations.load(tmp_path, DS)
    assert len(ReferAnnotations.load(tmp_path, DS, split_by="umd").refs) == 2
    # the JSON and the pickle of one splitBy are one file set: the JSON is read
    (folder / "grefs(umd).json").unlink()
    (folder / "grefs(unc).p").write_bytes(pickle.dumps(_grefs()[:1], protocol=2))
    assert ReferAnnotations.load(tmp_path, DS).refs_path == folder / "grefs(unc).json"


def test_scene_dataset_and_baselines_read_unions_and_empty_targets(tmp_path: Path) -> None:
    """The 2D scene dataset (the path RefCOCO-family datasets and light fields share) gives each expression
    its union or empty mask, in order; the largest-object baseline scores them against hand-computed IoUs
    (the largest object is A, id 10, the first of the tied 4-pixel annotations)."""
    from dataset.scenes import SceneDataset
    from training.baselines import baseline_metrics

    folder = _write(tmp_path, _grefs())
    (folder / "images").mkdir()
    cv2.imwrite(str(folder / "images" / "COCO_train2014_000000000001.jpg"), np.zeros((4, 5, 3), np.uint8))
    scenes = SceneDataset(tmp_path, DS, "val", mode="val", with_disparity=False, source="image")
    item = scenes[0]
    assert item["ref_ids"] == [2, 3, 4, 5]
    want = [np.zeros((4, 5), np.uint8), C, A, A | C]
    assert item["masks"].shape == (4, 4, 5)
    for got, expected in zip(item["masks"], want):
        np.testing.assert_array_equal(got, expected)
    out = baseline_metrics(scenes)["largest-object"]
    out.reduce()
    # val refs 2 (none), 3 (C), 4 (A), 5 (A ∪ C) against A: IoU 0, 1/7, 1, 4/7
    assert out.compute()["All"]["gIoU"] == pytest.approx((0 + 1 / 7 + 1 + 4 / 7) / 4)


@pytest.mark.parametrize(
    ("ds", "folder"),
    [("refcoco", "refer_seg/images/mscoco/images/train2014"), ("grefcoco", "refer_seg/images/mscoco/images/train2014"),
     ("refclef", "refer_seg/images/saiapr_tc-12")],
)  # fmt: skip
def test_lisa_image_layout_is_found(tmp_path: Path, ds: str, folder: str) -> None:
    """A LISA-layout folder (refs beside instances.json, the images where LISA keeps them) reads as it is;
    a dataset's own images/ folder, when present, wins."""
    from dataset.check import check_datasets
    from dataset.scenes import SceneDataset, image_root_of

    root = tmp_path / "refer_seg" / ds
    root.mkdir(parents=True)
    (root / "grefs(unc).json").write_text(json.dumps(_grefs()))
    (root / "instances.json").write_text(json.dumps(_instances()))
    images = tmp_path / folder
    images.mkdir(parents=True)
    cv2.imwrite(str(images / "COCO_train2014_000000000001.jpg"), np.zeros((4, 5, 3), np.uint8))
    scenes = SceneDataset(tmp_path, ds, "val", mode="val", with_disparity=False, source="image")
    assert scenes.scene_path(0) == images / "COCO_train2014_000000000001.jpg"
    assert scenes[0]["center"].shape == (4, 5, 3)
    checked, problems = check_datasets([scenes], False, progress=False)
    assert checked == 1 and problems == []
    (root / "images").mkdir()
    assert image_root_of(tmp_path, ds) == f"refer_seg/{ds}/images"  # its own folder first
