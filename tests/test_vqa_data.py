"""VQADataset over hand-written LLaVA-Instruct files (2D COCO layout) and a light-field version beside a tiny
generated dataset: parsed turns, image ids, pixels or hw, and the errors naming the file and record."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.errors import AnnotationError
from dataset.tasks.base import contract_problem
from dataset.tasks.vqa import VQADataset, strip_image_marker

LLAVA = "llava_instruct_150k"
DS = "ref-urbanlf-syn"
H, W = 8, 12


def _conv(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


RECORDS = [
    {
        "id": "b1",
        "image": "b.jpg",
        "conversations": _conv("<image>\nWhat is red?", "The bus.", "Why?", "Paint."),
    },
    {"id": "a1", "image": "a.jpg", "conversations": _conv("How many cats?\n<image>", "Two.")},
    {
        "id": "b2",
        "image": "b.jpg",
        "conversations": [{"from": "gpt", "value": "Hello."}, *_conv("<image>\nIs it day?", "Yes.")],
    },
]


def _write(root: Path, name: str, records: list) -> Path:
    path = root / "llava_dataset" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), np.full((H, W, 3), 128, np.uint8))
    _write(tmp_path, LLAVA, RECORDS)
    return tmp_path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A tiny generated light-field dataset (3 scenes, 32x48)."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path_factory.mktemp("lf")
    write_dataset(root, SyntheticConfig(height=32, width=48, num_train=2, num_val=1, seed=3))
    return root


@pytest.fixture
def lf_root(tmp_path: Path, generated: Path) -> Path:
    """A dataset folder whose ``lf/<DS>`` is the generated scenes (shared, read-only)."""
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / DS).symlink_to(generated / "lf" / DS, target_is_directory=True)
    return tmp_path


def test_strip_image_marker_at_either_end():
    assert strip_image_marker("<image>\nWhat is it?") == "What is it?"
    assert strip_image_marker("What is it?\n<image>") == "What is it?"
    assert strip_image_marker("<image> What is it?") == "What is it?"
    assert strip_image_marker("No marker.") == "No marker."


def test_published_items_turns_ids_and_pixels(coco: Path):
    data = VQADataset(coco, LLAVA)
    assert len(data) == 3 and data.names == [LLAVA] and data.group_of(2) == 0
    items = [data[i] for i in range(3)]
    assert items[0]["turns"] == [("What is red?", "The bus."), ("Why?", "Paint.")]
    assert items[1]["turns"] == [("How many cats?", "Two.")]
    assert items[2]["turns"] == [("Is it day?", "Yes.")]  # LISA drops a leading gpt message
    assert [it["image_id"] for it in items] == [1, 0, 1]  # index in the sorted image names a, b
    assert items[1]["scene_dir"] == str(coco / "coco" / "train2017" / "a.jpg")
    for item in items:
        assert contract_problem(item) is None
        assert item["task"] == "vqa" and item["ds"] == LLAVA
        assert item["center"].shape == (H, W, 3) and item["views"].shape == (0, H, W, 3)
        assert item["disparity"] is None
        assert item["masks"].shape == (0, H, W) and item["masks"].dtype == np.uint8
        assert item["sentences"] == item["ref_ids"] == item["subsets"] == item["no_target"] == []


def test_published_val_file_missing_is_named(coco: Path):
    with pytest.raises(AnnotationError, match=rf"{LLAVA}_val\.json: validation conversation file"):
        VQADataset(coco, LLAVA, "val")


def test_published_without_pixels_is_refused(coco: Path):
    with pytest.raises(ValueError, match="light-field scenes only"):
        VQADataset(coco, LLAVA, with_pixels=False)


def test_lightfield_items_and_val_split(lf_root: Path):
    _write(lf_root, DS, [{"id": 0, "image": "Image2", "conversations": _conv("<image>\nQ?", "A.")}])
    _write(lf_root, f"{DS}_val", [{"id": 7, "image": "Image3", "conversations": _conv("V?\n<image>", "W.")}])
    data = VQADataset(lf_root, DS, views=[(0, -1), (0, 1)])
    item = data[0]
    assert contract_problem(item) is None
    assert item["image_id"] == 2 and item["ds"] == DS
    assert item["scene_dir"] == str(lf_root / "lf" / DS / "Image2")
    assert item["center"].shape == (32, 48, 3) and item["views"].shape == (2, 32, 48, 3)
    assert item["offsets"].tolist() == [[0, -1], [0, 1]] and item["disparity"].shape == (32, 48)
    assert item["masks"].shape == (0, 32, 48) and item["turns"] == [("Q?", "A.")]

    val = VQADataset(lf_root, DS, "val", with_pixels=False)
    item = val[0]
    assert contract_problem(item) is None
    assert item["image_id"] == 3 and item["hw"] == (32, 48) and "center" not in item
    assert item["masks"].shape == (0, 32, 48) and item["turns"] == [("V?", "W.")]


def test_two_datasets_are_two_groups(coco: Path, lf_root: Path):
    assert coco == lf_root  # both fixtures fill the test's one folder
    _write(lf_root, DS, [{"id": 0, "image": "Image1", "conversations": _conv("Q?", "A.")}])
    data = VQADataset(lf_root, f"{LLAVA}||{DS}")
    assert len(data) == 4 and [data.group_of(i) for i in range(4)] == [0, 0, 0, 1]
    assert data[3]["image_id"] == 1 and data[3]["ds"] == DS


BAD = {
    "not alternating": (_conv("Q?") + _conv("Q2?"), "must alternate"),
    "empty": ([], "non-empty list"),
    "unanswered": (_conv("Q?", "A.", "Q2?"), "each question needs an answer"),
    "unknown role": ([{"from": "system", "value": "x"}, *_conv("Q?", "A.")], "'system'"),
    "empty answer": (_conv("Q?", "  "), "message 1 is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_conversation_names_file_and_record(coco: Path, case: str):
    conversations, problem = BAD[case]
    path = _write(coco, LLAVA, [RECORDS[0], {"id": "bad", "image": "a.jpg", "conversations": conversations}])
    with pytest.raises(AnnotationError, match="record 1 \\(id 'bad'\\)") as info:
        VQADataset(coco, LLAVA)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_image_key_and_bad_scene_name(coco: Path, lf_root: Path):
    path = _write(coco, LLAVA, [{"id": 5, "conversations": _conv("Q?", "A.")}])
    with pytest.raises(AnnotationError, match="record 0 \\(id '5'\\): missing image") as info:
        VQADataset(coco, LLAVA)
    assert info.value.path == str(path)
    path = _write(lf_root, DS, [{"id": 1, "image": "a.jpg", "conversations": _conv("Q?", "A.")}])
    with pytest.raises(
        AnnotationError, match=r"'a\.jpg' is not a scene folder name like 'Image<id>'"
    ) as info:
        VQADataset(lf_root, DS)
    assert info.value.path == str(path)


def test_missing_image_is_found_at_item_time(coco: Path, lf_root: Path):
    path = _write(coco, LLAVA, [{"id": "x", "image": "gone.jpg", "conversations": _conv("Q?", "A.")}])
    data = VQADataset(coco, LLAVA)  # structure only at construction
    with pytest.raises(
        AnnotationError, match=r"record 0 \(id 'x'\): image file .*gone\.jpg not found"
    ) as info:
        data[0]
    assert info.value.path == str(path)
    _write(lf_root, DS, [{"id": 1, "image": "Image99", "conversations": _conv("Q?", "A.")}])
    with pytest.raises(AnnotationError, match=r"scene folder .*Image99 not found"):
        VQADataset(lf_root, DS)[0]


def test_unreadable_json_is_named(coco: Path):
    path = coco / "llava_dataset" / f"{LLAVA}.json"
    path.write_text("[{")
    with pytest.raises(AnnotationError, match="cannot read as JSON") as info:
        VQADataset(coco, LLAVA)
    assert info.value.path == str(path)
