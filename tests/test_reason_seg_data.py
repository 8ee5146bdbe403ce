"""ReasonSegDataset over hand-written ReasonSeg files (jpg + json) and a light-field version beside a tiny
generated dataset: LISA's mask drawing order, query sampling, explanations, the ``__k`` stem rule, and the
errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.errors import AnnotationError, DataError
from dataset.tasks.base import IGNORE_LABEL, contract_problem
from dataset.tasks.reason_seg import ReasonSegDataset

RS = "ReasonSeg"
DS = "ref-urbanlf-syn"
H, W = 8, 12


def _poly(label: str, points: list) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon", "group_id": None, "flags": {}}


def _rect(label: str, x0: float, y0: float, x1: float, y1: float) -> dict:
    return _poly(label, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


# a: the ignore rectangle is larger, so LISA draws it first and the target over it; a flag is skipped.
A = {
    "text": ["q0", "q1", "q2", "q3"],
    "is_sentence": True,
    "shapes": [_rect("target", 2, 1, 6, 4), _rect("ignore", 4, 2, 9, 6), _poly("flag", [[0, 0]])],
}
# b: the ignore rectangle is smaller, so it overwrites the target; its vertices are truncated (1.9 -> 1);
# any other label ("person") is a target, as in LISA.
B = {
    "text": ["thing"],
    "is_sentence": False,
    "shapes": [
        _rect("target", 0, 0, 7, 7),
        _rect("Ignore", 1.9, 1.2, 3.7, 2.9),
        _rect("person", 9, 5, 10, 6),
    ],
}
C = {"text": ["v0", "v1"], "is_sentence": True, "shapes": [_rect("target", 0, 0, 1, 1)]}


def _expected_a() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:7, 4:10] = IGNORE_LABEL
    mask[1:5, 2:7] = 1
    return mask


def _expected_b() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[:, 0:8] = 1
    mask[5:7, 9:11] = 1
    mask[1:3, 1:4] = IGNORE_LABEL
    return mask


def _write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """ReasonSeg: train/a, train/b, val/c (8x12 jpgs) and an explanation of a.jpg."""
    root = tmp_path / "reason_seg" / RS
    for split, stem, record in (("train", "a", A), ("train", "b", B), ("val", "c", C)):
        _write(root / split / f"{stem}.json", record)
        cv2.imwrite(str(root / split / f"{stem}.jpg"), np.full((H, W, 3), 90, np.uint8))
    _write(
        root / "explanatory" / "train.json", [{"image": "a.jpg", "query": "q0", "outputs": "Because red."}]
    )
    return tmp_path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A tiny generated light-field dataset (3 scenes, 32x48)."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path_factory.mktemp("lf")
    write_dataset(root, SyntheticConfig(height=32, width=48, num_train=2, num_val=1, seed=3))
    return root


@pytest.fixture
def lightfield(tmp_path: Path, generated: Path) -> Path:
    """Light-field ReasonSeg files of the generated scenes: train Image1, Image1__2, Image2; val_explicit
    Image3 with tags; an explanation of Image1__2."""
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / DS).symlink_to(generated / "lf" / DS, target_is_directory=True)
    root = tmp_path / "reason_seg" / DS
    _write(root / "train" / "Image1.json", {**A, "tags": ["implicit"]})
    _write(root / "train" / "Image1__2.json", B)
    _write(root / "train" / "Image2.json", C)
    tagged = {**C, "tags": ["closest", "o-2"], "explicit": ["the red car"]}
    _write(root / "val_explicit" / "Image3.json", tagged)
    _write(root / "explanatory" / "train.json", [{"image": "Image1__2", "query": "x", "outputs": "Why."}])
    return tmp_path


def test_masks_follow_lisa_order_labels_and_truncation(published: Path):
    data = ReasonSegDataset(published, RS, mode="val")
    a, b = data[0], data[1]
    assert a["masks"].shape == (4, H, W) and a["masks"].dtype == np.uint8
    for m in a["masks"]:
        np.testing.assert_array_equal(m, _expected_a())
    np.testing.assert_array_equal(b["masks"][0], _expected_b())
    assert contract_problem(a) is None and contract_problem(b) is None


def test_one_and_two_point_shapes_draw_a_pixel_and_a_segment(published: Path):
    shapes = [_poly("target", [[3, 2]]), _poly("target", [[5, 6], [9, 6]]), _poly("ignore", [[8, 6]])]
    _write(published / "reason_seg" / RS / "val" / "c.json", {**C, "shapes": shapes})
    expected = np.zeros((H, W), np.uint8)
    expected[2, 3] = 1
    expected[6, 5:10] = 1
    expected[6, 8] = IGNORE_LABEL  # the smallest shape is drawn last
    mask = ReasonSegDataset(published, RS, "val")[0]["masks"][0]
    np.testing.assert_array_equal(mask, expected)


def test_train_draws_are_seeded_and_bounded(published: Path):
    data = ReasonSegDataset(published, f"{RS}|train", num_classes_per_sample=3, seed=5)
    item = data[0]
    assert contract_problem(item) is None
    assert len(item["sentences"]) == 3 and len(set(item["ref_ids"])) == 3
    assert item["sentences"] == [A["text"][i] for i in item["ref_ids"]]
    assert item["is_sentence"] == [True] * 3 and item["no_target"] == [False] * 3
    assert item["subsets"] == [("train",)] * 3 and item["task"] == "reason_seg"
    again = ReasonSegDataset(published, RS, num_classes_per_sample=3, seed=5)
    assert again[0]["ref_ids"] == item["ref_ids"]  # reproducible in any worker
    draws = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        draws.add(tuple(data[0]["ref_ids"]))
    assert len(draws) > 1
    few = data[1]  # one query, fewer than asked: all of them
    assert few["sentences"] == ["thing"] and few["ref_ids"] == [0] and few["is_sentence"] == [False]


def test_val_mode_returns_every_query(published: Path):
    data = ReasonSegDataset(published, RS, "val", mode="val")
    item = data[0]
    assert item["sentences"] == ["v0", "v1"] and item["ref_ids"] == [0, 1]
    assert item["masks"].shape == (2, H, W) and item["subsets"] == [("val",), ("val",)]
    assert item["scene_dir"] == str(published / "reason_seg" / RS / "val" / "c.jpg")


def test_explanations_match_images(published: Path):
    data = ReasonSegDataset(published, RS, mode="val", explanatory=0.1)
    assert data.explanation_files == [published / "reason_seg" / RS / "explanatory" / "train.json"]
    assert data[0]["explanations"] == ["Because red."] * 4
    assert data[0]["sentences"] == A["text"]  # LISA asks the json's texts, not the explanatory query
    assert data[1]["explanations"] == [None]
    off = ReasonSegDataset(published, RS, mode="val", explanatory=-1)
    assert off.explanation_files == [None] and off[0]["explanations"] == [None] * 4


def test_joined_splits_and_stable_image_ids(published: Path):
    both = ReasonSegDataset(published, f"{RS}|train_val")
    assert len(both) == 3 and [both[i]["image_id"] for i in range(3)] == [0, 1, 2]
    val = ReasonSegDataset(published, RS, "val")
    assert len(val) == 1 and val[0]["image_id"] == 2 and val.names == [RS]


def test_lightfield_stem_rule_tags_and_explanations(lightfield: Path):
    data = ReasonSegDataset(lightfield, DS, mode="val", views=[(0, 1)], explanatory=0.1)
    assert len(data) == 3
    items = [data[i] for i in range(3)]
    assert [it["image_id"] for it in items] == [1, 1, 2]
    scene = str(lightfield / "lf" / DS / "Image1")
    assert items[0]["scene_dir"] == items[1]["scene_dir"] == scene
    assert items[0]["center"].shape == (32, 48, 3) and items[0]["views"].shape == (1, 32, 48, 3)
    assert items[0]["masks"].shape == (4, 32, 48)
    assert items[0]["subsets"] == [("train", "implicit")] * 4
    assert items[0]["explanations"] == [None] * 4 and items[1]["explanations"] == ["Why."]
    expected = np.zeros((32, 48), np.uint8)
    expected[0:8, 0:8] = 1
    expected[5:7, 9:11] = 1
    expected[1:3, 1:4] = IGNORE_LABEL
    np.testing.assert_array_equal(items[1]["masks"][0], expected)
    for item in items:
        assert contract_problem(item) is None and item["ds"] == DS


def test_lightfield_named_split_and_without_pixels(lightfield: Path):
    data = ReasonSegDataset(lightfield, DS, "val_explicit", mode="val", with_pixels=False)
    item = data[0]
    assert contract_problem(item) is None and "center" not in item
    assert item["hw"] == (32, 48) and item["image_id"] == 3 and item["masks"].shape == (2, 32, 48)
    assert item["subsets"] == [("val_explicit", "closest", "o-2")] * 2
    assert data.items[0].query.explicit == ("the red car",)


def test_published_without_pixels_is_refused(published: Path):
    with pytest.raises(ValueError, match="light-field scenes only"):
        ReasonSegDataset(published, RS, with_pixels=False)


BAD = {
    "text not a list": ({**C, "text": "q"}, "'text' must be a list of non-empty strings"),
    "empty text": ({**C, "text": ["ok", " "]}, "'text' must be a list of non-empty strings"),
    "no text": ({**C, "text": []}, "'text' is empty"),
    "is_sentence": ({**C, "is_sentence": "yes"}, "'is_sentence' must be true or false"),
    "missing shapes": ({"text": ["q"], "is_sentence": True}, "missing keys ['shapes']"),
    "no points": ({**C, "shapes": [_poly("target", [])]}, "'points' must be a non-empty list"),
    "bad points": ({**C, "shapes": [_poly("target", [[0, 0], [3, "a"], [1, 1]])]}, "list of [x, y]"),
    "tags": ({**C, "tags": "closest"}, "'tags' must be a list"),
    "unreadable": ("{", "cannot read as JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_json_is_named_at_construction(published: Path, case: str):
    content, problem = BAD[case]
    path = _write(published / "reason_seg" / RS / "train" / "bad.json", content)
    with pytest.raises(AnnotationError, match=problem.replace("[", r"\[").replace("(", r"\(")) as info:
        ReasonSegDataset(published, RS)
    assert info.value.path == str(path)


def test_missing_folders_are_named(published: Path):
    root = published / "reason_seg"
    with pytest.raises(AnnotationError, match="dataset folder not found") as info:
        ReasonSegDataset(published, "Other")
    assert info.value.path == str(root / "Other")
    with pytest.raises(AnnotationError, match=r"split folder not found \(splits here: train, val\)") as info:
        ReasonSegDataset(published, RS, "test")
    assert info.value.path == str(root / RS / "test")
    (root / RS / "test").mkdir()
    with pytest.raises(AnnotationError, match=r"no \.json annotation") as info:
        ReasonSegDataset(published, RS, "test")
    assert info.value.path == str(root / RS / "test")


def test_bad_explanatory_file_is_named(published: Path):
    path = _write(published / "reason_seg" / RS / "explanatory" / "train.json", [{"image": "a.jpg"}])
    with pytest.raises(AnnotationError, match="record 0 needs strings") as info:
        ReasonSegDataset(published, RS, explanatory=0.1)
    assert info.value.path == str(path)


def test_lightfield_stem_must_name_a_scene(lightfield: Path):
    path = _write(lightfield / "reason_seg" / DS / "train" / "scene_a.json", C)
    with pytest.raises(
        AnnotationError, match=r"not a scene of 'ref-urbanlf-syn' \(Image<id>\[__<k>\]"
    ) as info:
        ReasonSegDataset(lightfield, DS)
    assert info.value.path == str(path)


def test_item_time_errors_name_the_file(published: Path):
    train = published / "reason_seg" / RS / "train"
    path = _write(train / "a.json", {**A, "shapes": [_rect("target", 2, 1, 20, 4)]})
    data = ReasonSegDataset(published, RS)
    with pytest.raises(
        AnnotationError, match=r"shape 0: vertices span x 2\.\.20, .* outside the 12x8 image"
    ) as info:
        data[0]
    assert info.value.path == str(path)
    (train / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"image of .*b\.json not found") as info:
        data[1]
    assert info.value.path == str(train / "b.jpg")
