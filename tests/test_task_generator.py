"""The generator's VQA and reasoning-segmentation data (``--tasks``, :mod:`dataset.synthetic.tasks`): written
at LISA's paths and formats, every answer recomputed here from the written refs, instances, centre views and
disparity maps (not from the generator's objects), polygons that give back the ref masks, explicit twins of
the val targets, determinism, and nothing new without the flag."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataset.synthetic import PALETTE, SyntheticConfig, write_dataset
from dataset.synthetic.expressions import DEPTH_MARGIN
from dataset.synthetic.gres import PLURALS
from dataset.synthetic.tasks import fill_polygons, mask_polygons

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CFG = dict(height=64, width=96, angular=3, num_train=14, num_val=8, seed=1)
DS = "tasks-syn"
WORDS = ("no", "one", "two", "three", "four", "five", "six")
LEVELS = {
    "not occluded": "no-o",
    "slightly occluded": "o-1",
    "partly occluded": "o-2",
    "heavily occluded": "o-3",
}
BOUNDS = {"no-o": (0.95, 1.0), "o-1": (0.7, 0.95), "o-2": (0.4, 0.7), "o-3": (0.0, 0.4)}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tasks")
    return root, write_dataset(root, SyntheticConfig(**CFG, ds_name=DS, tasks=True))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(root: Path) -> dict[int, dict]:
    """Per image id, from the written files only: refs, and objects {ann_id, category, colour, mask, d}."""
    inst = json.loads((root / "refer_seg" / DS / "instances.json").read_text())
    refs = json.loads((root / "refer_seg" / DS / f"{DS}.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    out: dict[int, dict] = {im["id"]: {"objects": [], "refs": []} for im in inst["images"]}
    for image_id, scene in out.items():
        folder = root / "lf" / DS / f"Image{image_id}"
        scene["rgb"] = cv2.imread(str(folder / "2_2.png"))[:, :, ::-1].astype(float)
        scene["disparity"] = np.load(folder / "5_5_disparity.npy")
    for ann in inst["annotations"]:
        scene = out[ann["image_id"]]
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        mean = scene["rgb"][mask].mean(axis=0)
        colour = min(PALETTE, key=lambda c: float(np.linalg.norm(mean - np.array(PALETTE[c]))))
        d = float(scene["disparity"][mask].mean())
        obj = {"ann_id": ann["id"], "category": names[ann["category_id"]], "colour": colour, "mask": mask}
        scene["objects"].append({**obj, "d": d})
    for ref in refs:
        out[ref["image_id"]]["refs"].append(ref)
    return out


def _named(scene: dict, phrase: str) -> dict:
    """The one object a VQA name ("vehicle", "red vehicle") describes."""
    (obj,) = [o for o in scene["objects"] if phrase in (o["category"], f"{o['colour']} {o['category']}")]
    return obj


def _level(scene: dict, obj: dict) -> str:
    (ref,) = [r for r in scene["refs"] if r["ann_id"] == obj["ann_id"]]
    return next(t for t in ref["subsets"] if t in BOUNDS)


def _reason(root: Path, sub: str) -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text()) for p in sorted((root / "reason_seg" / DS / sub).glob("*.json"))
    }


def test_files_at_lisa_paths_with_their_counts(written) -> None:
    root, summary = written
    train = json.loads((root / "llava_dataset" / f"{DS}.json").read_text())
    val = json.loads((root / "llava_dataset" / f"{DS}_val.json").read_text())
    assert {r["id"] for r in train} == {f"{DS}-{i}" for i in range(1, 15)}
    assert {r["image"] for r in val} == {f"Image{i}" for i in range(15, 23)}
    reason = {s: _reason(root, s) for s in ("train", "val", "val_explicit")}
    assert all(re.fullmatch(r"Image\d+(__[2-9])?", stem) for s in reason.values() for stem in s)
    assert all(int(stem[5:].split("__")[0]) <= 14 for stem in reason["train"])
    assert summary["tasks"]["reason_seg"] == {"train": len(reason["train"]), "val": len(reason["val"])}
    assert 1.0 <= (len(reason["train"]) + len(reason["val"])) / 22 <= 2.0  # one to two targets a scene
    explanations = json.loads((root / "reason_seg" / DS / "explanatory" / "train.json").read_text())
    assert sorted(e["image"] for e in explanations) == sorted(reason["train"])
    for e in explanations:
        assert e["query"] in reason["train"][e["image"]]["text"] and e["outputs"].startswith("The target is ")
    assert summary["tasks"]["polygon_iou"]["train"]["min"] == 1.0


def test_vqa_turns_alternate_with_one_image_marker(written) -> None:
    root, _ = written
    for name in (f"{DS}.json", f"{DS}_val.json"):
        for record in json.loads((root / "llava_dataset" / name).read_text()):
            turns = record["conversations"]
            assert 4 <= len(turns) <= 8 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in turns) == 1


def _check_turn(scene: dict, question: str, answer: str) -> str:
    """Assert ``answer`` from the written ground truth; returns the question's kind."""
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        category = next(c for c, p in PLURALS.items() if p == m.group(1))
        n = sum(o["category"] == category for o in scene["objects"])
        noun = m.group(1) if n > 1 else {"vegetation": "patch of vegetation"}.get(category, category)
        assert answer == f"There {'is' if n == 1 else 'are'} {WORDS[n]} {noun}.", (question, answer)
        return "count"
    if m := re.fullmatch(r"What colour is the (.+)\?", question):
        assert answer == f"The {m.group(1)} is {_named(scene, m.group(1))['colour']}.", (question, answer)
        return "colour"
    if m := re.fullmatch(r"Which is (nearer to|farther from) the camera, the (.+) or the (.+)\?", question):
        a, b = _named(scene, m.group(2)), _named(scene, m.group(3))
        assert abs(a["d"] - b["d"]) >= DEPTH_MARGIN - 1e-6
        near, far = (m.group(2), m.group(3)) if a["d"] > b["d"] else (m.group(3), m.group(2))
        want = near if m.group(1) == "nearer to" else far
        assert answer == f"The {want} is {m.group(1)} the camera.", (question, answer)
        return "nearer"
    if m := re.fullmatch(r"How much of the (.+) is visible\?", question):
        level = _level(scene, _named(scene, m.group(1)))
        if level == "no-o":
            assert answer == f"All of it: the {m.group(1)} is not occluded."
        else:
            pct, words = re.fullmatch(
                rf"About (\d+) % of the {m.group(1)} is visible: it is (.+)\.", answer
            ).groups()
            lo, hi = BOUNDS[level]
            assert LEVELS[words] == level and 100 * lo - 5 <= int(pct) <= 100 * hi + 5, (question, answer)
        return "occlusion"
    if question == "Which object is the most hidden behind other things?":
        name, pct = re.fullmatch(r"The (.+): only about (\d+) % of it is visible\.", answer).groups()
        assert _level(scene, _named(scene, name)) in ("o-2", "o-3") and int(pct) <= 70
        return "occlusion"
    m = re.fullmatch(r"Is there (?:a )?(.+) in the scene\?", question)
    present = any(o["category"] == m.group(1) for o in scene["objects"])
    assert answer.startswith("Yes, " if present else "No, "), (question, answer)
    return "exists-yes" if present else "exists-no"


def test_vqa_answers_agree_with_the_written_ground_truth(written) -> None:
    root, _ = written
    scenes = _scenes(root)
    kinds: set[str] = set()
    for name in (f"{DS}.json", f"{DS}_val.json"):
        for record in json.loads((root / "llava_dataset" / name).read_text()):
            scene = scenes[int(record["image"][len("Image") :])]
            turns = record["conversations"]
            for q, a in zip(turns[::2], turns[1::2]):
                kinds.add(_check_turn(scene, q["value"].removeprefix("<image>\n"), a["value"]))
    assert kinds == {"count", "colour", "nearer", "occlusion", "exists-yes", "exists-no"}


def test_reasoning_polygons_give_back_the_ref_mask_and_the_kind_holds(written) -> None:
    root, _ = written
    scenes = _scenes(root)
    kinds, ious = set(), []
    for split in ("train", "val"):
        for stem, rec in _reason(root, split).items():
            scene = scenes[int(stem[5:].split("__")[0])]
            (ref,) = [r for r in scene["refs"] if rec["explicit"][0] in [s["sent"] for s in r["sentences"]]]
            assert rec["explicit"] == [s["sent"] for s in ref["sentences"]]
            obj = next(o for o in scene["objects"] if o["ann_id"] == ref["ann_id"])
            assert {s["label"] for s in rec["shapes"]} == {"target"} and 1 <= len(rec["text"]) <= 3
            filled = fill_polygons([s["points"] for s in rec["shapes"]], obj["mask"].shape)
            ious.append((filled & obj["mask"]).sum() / (filled | obj["mask"]).sum())
            assert ious[-1] >= 0.9, stem
            kind, level, implicit, category = rec["tags"]
            assert implicit == "implicit" and category == obj["category"] and level == _level(scene, obj)
            others = [o for o in scene["objects"] if o["ann_id"] != obj["ann_id"]]
            if kind == "closest":
                assert all(obj["d"] >= o["d"] + DEPTH_MARGIN - 1e-6 for o in others)
            elif kind == "farthest":
                assert all(obj["d"] <= o["d"] - DEPTH_MARGIN + 1e-6 for o in others)
            elif kind == "function":
                assert not any(o["category"] == category for o in others)
            else:
                assert kind == "occluded" and level in ("o-2", "o-3")
            assert not any(category in t for t in rec["text"])  # implicit: never the name
            kinds.add(kind)
    assert kinds == {"closest", "farthest", "function", "occluded"}
    assert np.mean(ious) >= 0.95


def test_val_explicit_holds_the_same_targets(written) -> None:
    root, _ = written
    val, explicit = _reason(root, "val"), _reason(root, "val_explicit")
    assert val and list(val) == list(explicit)
    for stem, rec in explicit.items():
        assert rec["text"] == rec["explicit"] == val[stem]["explicit"] and rec["is_sentence"] is False
        assert rec["shapes"] == val[stem]["shapes"]
        assert rec["tags"] == [("explicit" if t == "implicit" else t) for t in val[stem]["tags"]]
    styles = {rec["is_sentence"] for s in ("train", "val") for rec in _reason(root, s).values()}
    assert styles == {True, False}


def test_polygons_cut_holes_open_and_fill_back_exactly() -> None:
    mask = np.zeros((40, 50), bool)
    yy, xx = np.mgrid[:40, :50]
    r2 = (yy - 20) ** 2 + (xx - 18) ** 2
    mask |= (r2 <= 15**2) & (r2 >= 9**2)  # a wheel
    mask |= (r2 <= 5**2) & (r2 >= 3**2)  # a ring inside its hole
    mask[5:35, 38:48] = True
    mask[10:30:4, 40:46] = False  # slots: a fence-like piece
    mask[20, 20] = mask[1, 1] = True  # single pixels
    outer, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert fill_polygons([c.reshape(-1, 2) for c in outer], mask.shape).sum() > mask.sum()  # holes filled
    polygons = mask_polygons(mask)
    np.testing.assert_array_equal(fill_polygons(polygons, mask.shape), mask)
    lisa = np.zeros(mask.shape, np.uint8)  # ReasonSeg's reader also draws each outline
    for p in polygons:
        cv2.polylines(lisa, np.array([p], np.int32), True, 1, 1)
        cv2.fillPoly(lisa, np.array([p], np.int32), 1)
    np.testing.assert_array_equal(lisa.astype(bool), mask)


def test_deterministic_and_nothing_new_without_the_flag(tmp_path: Path) -> None:
    small = dict(height=48, width=64, angular=3, num_train=3, num_val=2, seed=4)
    write_dataset(tmp_path / "a", SyntheticConfig(**small, tasks=True))
    write_dataset(tmp_path / "b", SyntheticConfig(**small, tasks=True), workers=2)
    write_dataset(tmp_path / "off", SyntheticConfig(**small))
    a, b, off = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "off")
    assert a == b and any(k.startswith("reason_seg/") for k in a)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["lf", "refer_seg"]
    assert {k: v for k, v in a.items() if k.split("/")[0] in ("lf", "refer_seg")} == off


def test_cli_flag_overwrite_and_stale_task_files(tmp_path: Path, capsys) -> None:
    cli = importlib.import_module("dataset.synthetic.cli")
    argv = ["--dataset_dir", str(tmp_path), "--height", "48", "--width", "64", "--angular", "3"]
    argv += ["--num_train", "2", "--num_val", "1", "--ds_name", "t"]
    summary = cli.main([*argv, "--tasks"])
    assert "VQA: 2 + 1 conversations" in capsys.readouterr().out
    assert summary["tasks"]["vqa"]["val"]["records"] == 1
    with pytest.raises(SystemExit, match="exists; pass overwrite"):
        cli.main([*argv, "--tasks"])
    cli.main([*argv, "--overwrite"])  # replacing <ds> without the tasks leaves none of the old ones
    assert not (tmp_path / "reason_seg" / "t").exists() and not any((tmp_path / "llava_dataset").iterdir())
    assert not list(tmp_path.glob(".tmp-*"))
