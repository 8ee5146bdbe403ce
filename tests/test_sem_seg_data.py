"""SemSegDataset over tiny files in each published layout (ADE20K, COCO-Stuff, Mapillary, PACO-LVIS,
PASCAL-Part) and over a generated light-field dataset: masks against hand-computed ones, class names,
seeded sampling, the item contract, and errors that name the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dataset.errors import AnnotationError, DataError
from dataset.tasks.base import contract_problem
from dataset.tasks.sem_seg import ADE20K_CLASSES, COCOSTUFF_CLASSES, SemSegDataset, part_name

H, W = 8, 12
LF = "ref-urbanlf-syn"


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def _grey(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), label.astype(np.uint8))


def _bands(*values: int) -> np.ndarray:
    """An (H, W) label map: one column band per value, left to right."""
    label = np.zeros((H, W), np.uint8)
    for i, chunk in enumerate(np.array_split(np.arange(W), len(values))):
        label[:, chunk] = values[i]
    return label


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[r0:r1, c0:c1] = 1
    return mask


ADE = {"a": _bands(0, 1, 3, 150), "b": np.zeros((H, W), np.uint8)}  # b: only "other" (no class)
STUFF = {"000000000009": _bands(0, 95, 255, 181), "000000000025": _bands(156, 156)}
VISTAS = {"m1": _bands(0, 1, 2), "m2": _bands(2, 1)}  # 2 = "Unlabeled"
MUG = (_rect(0, 3, 0, 4), _rect(5, 8, 6, 9))  # two mug instances: one class, their union
HANDLE, CAP, HAIR = _rect(3, 5, 0, 2), _rect(0, 2, 9, 12), _rect(0, 2, 0, 12)


def _coco_file(path: Path, images: list[dict], anns: list[tuple[int, int, object]], cats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "images": [{"height": H, "width": W} | r for r in images],
        "annotations": [
            {"id": i + 1, "image_id": img, "category_id": c, "segmentation": seg}
            for i, (img, c, seg) in enumerate(anns)
        ],
        "categories": [{"id": k, "name": v} for k, v in cats.items()],
    }
    path.write_text(json.dumps(raw))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two images per 2D layout, at LISA's paths."""
    for i, (stem, label) in enumerate(ADE.items()):
        _image(tmp_path / "ade20k/images/training" / f"{stem}.jpg", i)
        _grey(tmp_path / "ade20k/annotations/training" / f"{stem}.png", label)
    for i, (stem, label) in enumerate(STUFF.items()):
        _image(tmp_path / "coco/train2017" / f"{stem}.jpg", 10 + i)
        _grey(tmp_path / "cocostuff/train2017" / f"{stem}.png", label)
    labels = [
        {"name": n, "readable": r} for n, r in [("bird", "Bird"), ("road", "Road"), ("void", "Unlabeled")]
    ]
    (tmp_path / "mapillary").mkdir()
    (tmp_path / "mapillary/config_v2.0.json").write_text(json.dumps({"labels": labels}))
    for i, (stem, label) in enumerate(VISTAS.items()):
        _image(tmp_path / "mapillary/training/images" / f"{stem}.jpg", 20 + i)
        palette = Image.fromarray(label, mode="P")
        palette.putpalette([200, 10, 10, 10, 200, 10, 0, 0, 0] + [0] * 759)  # colours unlike the indices
        (tmp_path / "mapillary/training/v2.0/labels").mkdir(parents=True, exist_ok=True)
        palette.save(tmp_path / "mapillary/training/v2.0/labels" / f"{stem}.png")
    cats = {1: "mug", 2: "mug:handle", 3: "bottle_(drink):cap"}
    images = [{"id": 7, "file_name": "train2017/000000000007.jpg"}, {"id": 9, "file_name": "train2017/x.jpg"}]
    anns = [(7, 1, _rle(MUG[0])), (7, 1, [[6, 5, 9, 5, 9, 8, 6, 8]]), (7, 2, _rle(HANDLE)), (7, 3, _rle(CAP))]
    _coco_file(tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json", images, anns, cats)
    _image(tmp_path / "coco/train2017/000000000007.jpg", 30)
    voc = tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    _coco_file(tmp_path / "vlpart/pascal_part/train.json", [{"id": 3, "file_name": "2008_000003.jpg"}],
               [(3, 5, _rle(HAIR))], {5: "person:hair"})  # fmt: skip
    _image(voc / "2008_000003.jpg", 40)
    return tmp_path


@pytest.fixture(scope="module")
def lf_root(tmp_path_factory) -> Path:
    """A tiny light-field dataset from the project's generator (9×9 views, 32×48, 3 scenes)."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path_factory.mktemp("lf")
    write_dataset(root, SyntheticConfig(height=32, width=48, num_train=2, num_val=1, seed=5))
    return root


def _by_name(item: dict) -> dict[str, np.ndarray]:
    assert contract_problem(item) is None, contract_problem(item)
    assert item["task"] == "sem_seg" and not any(item["no_target"])
    return dict(zip(item["sentences"], item["masks"]))


def test_ade20k_labels_shift_by_one_and_zero_is_unlabelled(root: Path) -> None:
    data = SemSegDataset(root, "ade20k", mode="val")
    assert len(data) == 2 and data.names == ["ade20k"]
    item = data[0]
    label = ADE["a"]
    expected = {ADE20K_CLASSES[v - 1]: (label == v).astype(np.uint8) for v in (1, 3, 150)}
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[149] == "flag" and len(ADE20K_CLASSES) == 150
    got = _by_name(item)
    assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in expected)
    assert item["ref_ids"] == [0, 2, 149] and item["subsets"] == [("train", "ade20k")] * 3
    assert item["image_id"] == 0 and item["scene_dir"].endswith("ade20k/images/training/a.jpg")
    assert item["views"].shape == (0, H, W, 3) and item["disparity"] is None
    empty = data[1]  # val: an image with no class is an item with no masks
    assert contract_problem(empty) is None and empty["masks"].shape == (0, H, W) and empty["sentences"] == []
    train = SemSegDataset(root, "ade20k", mode="train")
    assert train[1]["image_id"] == 0  # train: the next image of the dataset stands in


def test_cocostuff_255_and_hyphenated_classes_are_unlabelled(root: Path) -> None:
    data = SemSegDataset(root, "cocostuff", mode="val")
    assert COCOSTUFF_CLASSES[95] == "building-other" and COCOSTUFF_CLASSES[181] == "wood"
    item = data[0]
    label = STUFF["000000000009"]
    assert _by_name(item).keys() == {"person", "wood"} and item["ref_ids"] == [0, 181]
    assert (item["masks"][0] == (label == 0)).all() and (item["masks"][1] == (label == 181)).all()
    assert item["masks"][:, label == 95].sum() == 0 and item["masks"][:, label == 255].sum() == 0
    assert item["scene_dir"].endswith("coco/train2017/000000000009.jpg")
    assert data[1]["sentences"] == ["sky"] and data[1]["masks"].all()


def test_mapillary_reads_palette_indices_and_skips_unlabeled(root: Path) -> None:
    label_path = root / "mapillary/training/v2.0/labels/m1.png"
    assert cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED).ndim == 3  # OpenCV gives colours: PIL needed
    data = SemSegDataset(root, "mapillary", mode="val")
    item = data[0]
    assert item["sentences"] == ["bird", "road"] and item["ref_ids"] == [0, 1]
    assert (item["masks"][1] == (VISTAS["m1"] == 1)).all() and item["masks"][:, VISTAS["m1"] == 2].sum() == 0
    assert item["scene_dir"].endswith("mapillary/training/images/m1.jpg")


def test_paco_lvis_classes_are_unions_and_parts_are_phrased(root: Path) -> None:
    assert part_name("bottle_(drink):cap") == ("bottle", "cap") and part_name("mug") == ("mug", None)
    data = SemSegDataset(root, "paco_lvis", mode="val")
    assert len(data) == 1  # image 9 has no annotation: skipped at indexing
    item = data[0]
    got = _by_name(item)
    assert list(got) == ["mug", "the handle of the mug", "the cap of the bottle"] and item["ref_ids"] == [
        1,
        2,
        3,
    ]
    assert (got["mug"] == (MUG[0] | MUG[1])).all() and (got["the cap of the bottle"] == CAP).all()
    assert item["image_id"] == 7 and item["scene_dir"].endswith("coco/train2017/000000000007.jpg")
    phrasings = set()
    for epoch in range(12):
        data_train = SemSegDataset(root, "paco_lvis", mode="train", num_classes_per_sample=3)
        data_train.set_epoch(epoch)
        phrasings.update(s for s in data_train[0]["sentences"] if "handle" in s)
    assert phrasings == {"mug handle", "the handle of the mug"}  # LISA's two phrasings, by a seeded coin


def test_pascal_part_layout(root: Path) -> None:
    item = SemSegDataset(root, "pascal_part", mode="val")[0]
    assert _by_name(item).keys() == {"the hair of the person"} and (item["masks"][0] == HAIR).all()
    assert item["scene_dir"].endswith("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000003.jpg")


def test_train_sampling_is_seeded_bounded_and_distinct(root: Path) -> None:
    names = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
    data = SemSegDataset(root, names, mode="train", num_classes_per_sample=2, seed=4)
    assert len(data) == 2 + 2 + 1 + 1 + 2 and [data.group_of(i) for i in range(len(data))] == [
        0,
        0,
        1,
        1,
        2,
        3,
        4,
        4,
    ]
    draws = []
    for epoch in range(6):
        data.set_epoch(epoch)
        items = [data[i] for i in range(len(data))]
        again = SemSegDataset(root, names, mode="train", num_classes_per_sample=2, seed=4)
        again.set_epoch(epoch)
        for i, item in enumerate(items):
            assert contract_problem(item) is None and item["ds"] == data.names[data.group_of(i)]
            assert 1 <= len(item["sentences"]) <= 2 and len(set(item["ref_ids"])) == len(item["ref_ids"])
            assert item["sentences"] == again[i]["sentences"] and (item["masks"] == again[i]["masks"]).all()
        draws.append(tuple(items[0]["ref_ids"]))
    assert len(set(draws)) > 1  # the epoch reseeds the draw
    copy = pickle.loads(pickle.dumps(data))  # what a spawned DataLoader worker receives
    assert [copy[i]["sentences"] for i in range(len(data))] == [it["sentences"] for it in items]


def test_light_field_items_share_scenes_with_scene_dataset(lf_root: Path) -> None:
    from dataset.refer import ReferAnnotations
    from dataset.scenes import SceneDataset

    scenes = SceneDataset(lf_root, LF, "train", views="4", mode="val")
    data = SemSegDataset(lf_root, LF, "train", mode="val", views="4")
    assert [(it["ds"], it["image_id"]) for it in data] == [(s["ds"], s["image_id"]) for s in scenes]
    instances = json.loads((lf_root / "refer_seg" / LF / "instances.json").read_text())
    annotations = ReferAnnotations.load(lf_root, LF)
    unions = 0
    for item, scene in zip(data, scenes):
        assert item["scene_dir"] == scene["scene_dir"] and item["views"].shape == scene["views"].shape
        assert (item["disparity"] == scene["disparity"]).all() and (item["center"] == scene["center"]).all()
        expected: dict[int, np.ndarray] = {}
        for ann in instances["annotations"]:
            if ann["image_id"] == item["image_id"]:
                mask = annotations.mask(ann["id"])
                unions += ann["category_id"] in expected
                expected[ann["category_id"]] = expected.get(ann["category_id"], 0) | mask
        expected = {c: m for c, m in expected.items() if m.any()}
        assert item["ref_ids"] == sorted(expected) and contract_problem(item) is None
        assert item["sentences"] == [annotations.category_name(c) for c in sorted(expected)]
        assert all((m == expected[c]).all() for c, m in zip(item["ref_ids"], item["masks"]))
    assert unions  # some category has several instances in a scene: its mask is their union
    cached = SemSegDataset(lf_root, LF, "val", mode="val", with_pixels=False)[0]
    assert contract_problem(cached) is None and cached["hw"] == (32, 48) and "center" not in cached


def test_errors_name_the_file(root: Path) -> None:
    bad = root / "ade20k/annotations/training/a.png"
    _grey(bad, np.zeros((H + 1, W), np.uint8) + 1)
    with pytest.raises(DataError, match="label map is 9×12") as info:
        SemSegDataset(root, "ade20k", mode="val")[0]
    assert info.value.path == str(bad)
    _grey(bad, np.full((H, W), 200, np.uint8))
    with pytest.raises(DataError, match=r"label values \[200\]"):
        SemSegDataset(root, "ade20k", mode="val")[0]
    bad.unlink()
    with pytest.raises(DataError, match="label map not found") as info:
        SemSegDataset(root, "ade20k", mode="val")[0]
    assert info.value.path == str(bad)
    (root / "vlpart/pascal_part/train.json").unlink()
    with pytest.raises(AnnotationError, match="PASCAL-Part annotations not found") as info:
        SemSegDataset(root, "pascal_part")
    assert info.value.path == str(root / "vlpart/pascal_part/train.json")
    with pytest.raises(DataError, match="ADE20K image folder not found") as info:
        SemSegDataset(root, "ade20k", "val")
    assert info.value.path == str(root / "ade20k/images/validation")
    with pytest.raises(ValueError, match="unknown semantic-segmentation dataset 'partimagenet'"):
        SemSegDataset(root, "partimagenet")
    with pytest.raises(ValueError, match="with_pixels=False"):
        SemSegDataset(root, "ade20k", with_pixels=False)
