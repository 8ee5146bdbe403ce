"""The depth-cue measurement of a generated benchmark (``dataset.synthetic.cues``) on hand-made scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataset.synthetic.cues import cue_table


def _write(root: Path, objects: dict[int, tuple[str, str, float, list[float]]], refs: list[dict]) -> None:
    """One scene (image 1): ann_id -> (category, colour, disparity, bbox)."""
    folder = root / "refer_seg" / "toy"
    folder.mkdir(parents=True)
    anns = [{"id": k, "image_id": 1, "bbox": box} for k, (_, _, _, box) in objects.items()]
    attrs = {
        str(k): {"category": c, "colour": col, "disparity_px": d} for k, (c, col, d, _) in objects.items()
    }
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": anns, "categories": []}))
    (folder / "attributes.json").write_text(json.dumps(attrs))
    (folder / "toy.json").write_text(json.dumps(refs))


def _ref(ann: int, kind: str, *sentences: str) -> dict:
    return {"ann_id": ann, "image_id": 1, "split": "val", "subsets": ["no-o", kind],
            "sentences": [{"sent": s} for s in sentences]}  # fmt: skip


def test_cue_table_against_hand_counts(tmp_path: Path) -> None:
    # three poles: 11 nearest by disparity but ending highest in the image (a cue conflict), 12 lowest, 13 far;
    # a red car 21 as the partner, overlapping 11 and 12 horizontally; a tree 31 alone in its category.
    objects = {
        11: ("pole", "grey", 1.5, [10, 10, 10, 40]),  # bottom 50
        12: ("pole", "grey", 0.8, [14, 30, 10, 60]),  # bottom 90
        13: ("pole", "orange", 0.1, [100, 5, 10, 30]),  # bottom 35
        21: ("car", "red", 1.0, [5, 20, 30, 50]),  # bottom 70
        31: ("tree", "green", 0.5, [60, 0, 20, 80]),
    }
    refs = [
        _ref(11, "closest", "the closest pole", "the grey pole closest to the camera"),
        _ref(13, "distance", "the farthest pole"),
        _ref(11, "front", "the pole in front of the red car"),
        _ref(31, "behind", "the tree behind the car"),
    ]
    _write(tmp_path, objects, refs)
    table = cue_table(tmp_path, "toy")
    # closest: the row rule picks 12 (lowest) in both sentences, the disparity picks 11; members 3, then 2.
    assert table["closest"]["row"] == 0.0 and table["closest"]["disparity"] == 1.0
    assert table["closest"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # distance: 13 ends highest (35) and is farthest: both rules right.
    assert table["distance"]["row"] == 1.0 and table["distance"]["n"] == 1
    # front of the car (bottom 70, disparity 1.0): the row rule picks 12 (90 > 70), the disparity 11 (1.5 > 1.0).
    assert table["front"] == pytest.approx(
        {"unique": 0.0, "row": 0.0, "row_or_unique": 0.0, "disparity": 1.0, "chance": 1 / 3, "n": 1}
    )
    # the only tree: no depth reading needed; neither rule finds it behind the car (its box ends lower).
    assert table["behind"]["unique"] == 1.0 and table["behind"]["row_or_unique"] == 1.0
    assert table["depth kinds"]["n"] == 5
    assert table["depth kinds"]["disparity"] == pytest.approx(4 / 5)


def test_cue_table_names_a_missing_file(tmp_path: Path) -> None:
    _write(tmp_path, {1: ("pole", "grey", 1.0, [0, 0, 1, 1])}, [])
    (tmp_path / "refer_seg" / "toy" / "attributes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"attributes\.json"):
        cue_table(tmp_path, "toy")


def test_depth_cues_script_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.experiments.depth_cues import main

    _write(tmp_path, {1: ("pole", "grey", 1.0, [0, 0, 4, 9]), 2: ("pole", "red", 0.2, [9, 0, 4, 5])},
           [_ref(1, "closest", "the closest pole")])  # fmt: skip
    out = tmp_path / "cues.json"
    assert main(["--dataset_dir", str(tmp_path), "--ds", "toy", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "closest" in text and "100.0" in text  # the lower box is the nearer pole: the row rule is right
    assert json.loads(out.read_text())["closest"]["chance"] == 0.5
    with pytest.raises(SystemExit):
        main(["--dataset_dir", str(tmp_path), "--ds", "toy", "--split", "train"])  # no sentence there
