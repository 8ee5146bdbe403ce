"""Annotations: validation errors name the file and ids; masks decode to hand-computed pixels; the REFER
pickle reader refuses anything but plain containers; split selection by split field and subset tag."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataset.errors import AnnotationError
from dataset.refer import Ref, ReferAnnotations, decode_segmentation, load_refer_pickle

# pycocotools 2.0.11's decode trips a numpy-2 DeprecationWarning inside its Cython code; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DS = "tiny"
# Hand-computed 4x5 masks.
BOX = np.zeros((4, 5), np.uint8)
BOX[1:3, 2:4] = 1  # rows 1-2, cols 2-3
COLS = np.zeros((4, 5), np.uint8)
COLS[2:4, 1:3] = 1  # uncompressed counts [6, 2, 2, 2, 8], column-major
POLY = np.zeros((4, 5), np.uint8)
POLY[1:3, 1:3] = 1  # polygon (1,1)-(3,1)-(3,3)-(1,3) covers pixel centres 1..2


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str], **extra) -> dict:
    sentences = [{"sent_id": 100 * ref_id + i, "sent": s, "tokens": s.split()} for i, s in enumerate(sents)]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "sentences": sentences,
        **extra,
    }


def _refs() -> list[dict]:
    return [
        _ref(1, 10, 1, "train", ["the box", "square thing"]),
        _ref(2, 11, 1, "val", ["the left car"], subsets=["o-1", "closest"]),
        _ref(3, 12, 2, "val", ["the bike behind"], subsets=["behind"]),
        _ref(4, 12, 2, "o-2", ["a tag as split"]),
    ]


def _instances() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 4, "width": 5},
            {"id": 2, "file_name": "b.png", "height": 4, "width": 5},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "segmentation": _compressed(BOX),
                "bbox": [2, 1, 2, 2],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "segmentation": {"size": [4, 5], "counts": [6, 2, 2, 2, 8]},
            },
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
        ],
        "categories": [{"id": 1, "name": "bike"}, {"id": 2, "name": "vehicle"}],
    }


def _write(root: Path, refs: list[dict] | None = None, instances: dict | None = None) -> Path:
    folder = root / "refer_seg" / DS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DS}.json").write_text(json.dumps(_refs() if refs is None else refs))
    (folder / "instances.json").write_text(json.dumps(_instances() if instances is None else instances))
    return folder


def test_load_and_split_selection(tmp_path: Path) -> None:
    _write(tmp_path)
    ann = ReferAnnotations.load(tmp_path, DS)
    assert [r.ref_id for r in ann.refs_for("train")] == [1]
    assert [r.ref_id for r in ann.refs_for("val")] == [2, 3]
    assert [r.ref_id for r in ann.refs_for("closest")] == [2]
    assert [r.ref_id for r in ann.refs_for("o-2")] == [4]  # tag written in the split field
    assert ann.refs_for("front") == []
    ref = ann.refs_for("val")[0]
    assert ref == Ref(2, 11, 1, 1, "val", ("o-1", "closest"), ("the left car",), (200,))
    assert ref.tags == ("val", "o-1", "closest")
    assert ann.subsets_present("val") == ["o-1", "closest", "behind"]
    assert ann.subsets_present("train") == []
    assert ann.subsets_present("o-1") == ["closest"]
    # "A&B": both must hold (a subset of one split)
    assert [r.ref_id for r in ann.refs_for("val&closest")] == [2]
    assert [r.ref_id for r in ann.refs_for("val & behind")] == [3]
    assert ann.refs_for("train&closest") == [] and ann.refs_for("val&o-2") == []
    assert ann.subsets_present("val&closest") == ["o-1"]
    for bad in ("val&", "&closest", ""):
        with pytest.raises(ValueError, match="bad split selector"):
            ann.refs_for(bad)
    assert ann.image(2)["file_name"] == "b.png"
    assert ann.category_name(2) == "vehicle" and ann.category_name(9) == "9"


def test_masks_decode_to_hand_computed_pixels(tmp_path: Path) -> None:
    _write(tmp_path)
    ann = ReferAnnotations.load(tmp_path, DS)
    for ann_id, expected in ((10, BOX), (11, COLS), (12, POLY)):
        mask = ann.mask(ann_id)
        assert mask.dtype == np.uint8 and mask.shape == (4, 5)
        np.testing.assert_array_equal(mask, expected, err_msg=f"annotation {ann_id}")


def test_decode_segmentation_variants() -> None:
    rle = mask_utils.encode(np.asfortranarray(BOX))  # bytes counts
    np.testing.assert_array_equal(decode_segmentation(rle, 4, 5), BOX)
    two = decode_segmentation([[0, 0, 1, 0, 1, 1, 0, 1], [3, 2, 4, 2, 4, 3, 3, 3]], 4, 5)
    assert two.sum() == 2 and two[0, 0] == 1 and two[2, 3] == 1
    for bad in ([], [[1, 2, 3]], "x", {"counts": "abc"}):
        with pytest.raises(ValueError):
            decode_segmentation(bad, 4, 5)


def test_bad_segmentation_names_instances_and_ann(tmp_path: Path) -> None:
    instances = _instances()
    instances["annotations"][2]["segmentation"] = [[1, 2, 3]]
    instances["annotations"][0]["segmentation"] = _compressed(np.zeros((3, 5), np.uint8))
    folder = _write(tmp_path, instances=instances)
    ann = ReferAnnotations.load(tmp_path, DS)
    with pytest.raises(AnnotationError, match=r"annotation 12 .*bad segmentation") as info:
        ann.mask(12)
    assert info.value.path == str(folder / "instances.json")
    with pytest.raises(AnnotationError, match=r"annotation 10: mask size \(3, 5\) differs"):
        ann.mask(10)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda refs, inst: refs[0].update(ann_id=99),
            r"ref_id 1: ann_id 99 has no annotation in .*instances\.json",
        ),
        (
            lambda refs, inst: refs[0].update(image_id=5),
            r"ref_id 1: image_id 5 has no image in .*instances\.json",
        ),
        (lambda refs, inst: refs[0].update(image_id=2), r"ref_id 1: image_id 2 disagrees with annotation 10"),
        (
            lambda refs, inst: refs[1]["sentences"][0].update(sent="  \t"),
            "ref_id 2 sent_id 200: empty referring",
        ),
        (lambda refs, inst: refs[1]["sentences"][0].pop("sent"), "ref_id 2 sent_id 200: empty referring"),
        (lambda refs, inst: refs[2].update(sentences=[]), "ref_id 3 has no sentences"),
        (lambda refs, inst: refs[2].pop("ann_id"), r"ref #2 \(ref_id 3\) lacks ann_id"),
        (lambda refs, inst: refs[3].update(ref_id=1), "ref_id 1 appears twice"),
        (lambda refs, inst: refs[3].update(subsets="o-1"), "'subsets' must be a list"),
    ],
)
def test_bad_refs_name_file_and_ids(tmp_path: Path, mutate, message: str) -> None:
    refs, instances = _refs(), _instances()
    mutate(refs, instances)
    folder = _write(tmp_path, refs, instances)
    with pytest.raises(AnnotationError, match=message) as info:
        ReferAnnotations.load(tmp_path, DS)
    assert info.value.path == str(folder / f"{DS}.json")


def test_missing_files_and_json_syntax(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="refs file not found") as info:
        ReferAnnotations.load(tmp_path, DS)
    assert info.value.path == str(tmp_path / "refer_seg" / DS / f"{DS}.json")
    folder = _write(tmp_path)
    (folder / "instances.json").unlink()
    with pytest.raises(AnnotationError, match="instances file not found"):
        ReferAnnotations.load(tmp_path, DS)
    (folder / "instances.json").write_text('{\n  "images": [\n  ,]\n}')
    with pytest.raises(AnnotationError, match="JSON syntax error at line 3") as info:
        ReferAnnotations.load(tmp_path, DS)
    assert info.value.path == str(folder / "instances.json")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_reader_refuses_globals_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=protocol))
    with pytest.raises(AnnotationError, match=r"refusing to unpickle global '(posix|nt|os)\.system'") as info:
        load_refer_pickle(path)
    assert info.value.path == str(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([Path("x")], protocol=protocol))
    with pytest.raises(AnnotationError, match="refusing to unpickle global 'pathlib"):
        load_refer_pickle(path)


def test_pickle_reader_rejects_corrupt_and_non_list(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(AnnotationError, match="cannot unpickle refs"):
        load_refer_pickle(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(AnnotationError, match="expected a list of ref dicts"):
        load_refer_pickle(path)
    with pytest.raises(AnnotationError, match="refs pickle not found"):
        load_refer_pickle(tmp_path / "none.p")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refcoco_pickle_loads_through_annotations(tmp_path: Path, protocol: int) -> None:
    folder = _write(tmp_path)
    (folder / f"{DS}.json").unlink()
    refs = _refs()
    for r in refs:  # REFER refs carry a few more plain fields
        r["sent_ids"] = [s["sent_id"] for s in r["sentences"]]
        r["file_name"] = "a_1.jpg"
        for s in r["sentences"]:
            s["raw"] = s["sent"]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    assert load_refer_pickle(folder / "refs(unc).p") == refs
    ann = ReferAnnotations.load(tmp_path, DS, split_by="unc")
    assert ann.refs_path == folder / "refs(unc).p"
    assert [r.ref_id for r in ann.refs_for("val")] == [2, 3]
    assert ann.refs[0].sentences == ("the box", "square thing")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_reader_refuses_non_builtin_objects(tmp_path: Path, protocol: int) -> None:
    """Harmless-looking library objects (a numpy array in a ref) are refused too: no global is ever resolved."""
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "bbox": np.zeros(4)}], protocol=protocol))
    with pytest.raises(AnnotationError, match=r"refusing to unpickle global 'numpy\.") as info:
        load_refer_pickle(path)
    assert info.value.path == str(path)


def test_refs_pointing_at_missing_image_or_annotation_through_pickle(tmp_path: Path) -> None:
    """The same link checks apply to REFER pickles: the error names the pickle and the ids."""
    folder = _write(tmp_path)
    (folder / f"{DS}.json").unlink()
    refs = _refs()
    refs[2]["ann_id"] = 77
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(AnnotationError, match="ref_id 3: ann_id 77 has no annotation") as info:
        ReferAnnotations.load(tmp_path, DS, split_by="unc")
    assert info.value.path == str(folder / "refs(unc).p")
