"""POPE on light fields: the question sampling (dataset/pope.py), the answer parser and metrics, and the
evaluation end to end on the tiny merged model (training/experiments/pope.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import pytest

from dataset.errors import AnnotationError
from dataset.pope import (
    SAMPLINGS,
    DatasetObjects,
    dataset_objects,
    load_pope_questions,
    pope_questions,
    question_text,
)
from dataset.refer import ReferAnnotations
from tests.conftest import TINY_DS
from training.experiments.pope import main, parse_answer, pope_metrics

CATS = ("cat", "dog", "car", "tree", "sign", "bus")
PRESENT = {
    1: {"car", "tree"},
    2: {"car", "tree"},
    3: {"car", "sign"},
    4: {"dog", "bus"},
    5: {"dog", "bus"},
    6: {"dog"},
    7: {"dog", "cat"},
    8: {"car", "bus"},
    9: {"tree", "sign"},
}
"""Scenes' visible categories: frequencies dog 4, car 4, bus 3, tree 3, sign 2, cat 1; scene 1 also has an
annotated "cat" with an empty mask."""


def objects() -> DatasetObjects:
    annotated = {i: frozenset(c | ({"cat"} if i == 1 else set())) for i, c in PRESENT.items()}
    return DatasetObjects(CATS, {i: frozenset(c) for i, c in PRESENT.items()}, annotated)


def asked(questions, image_id: int, sampling: str, label: str) -> list[str]:
    return [
        q.category
        for q in questions
        if q.image_id == image_id and q.sampling == sampling and q.label == label
    ]


def test_present_never_asked_absent_and_balanced() -> None:
    qs = pope_questions(objects(), sorted(PRESENT), ds="toy", k=2, seed=0)
    for q in qs:
        annotated = objects().annotated[q.image_id]
        assert (q.category in PRESENT[q.image_id]) == (q.label == "yes")
        if q.label == "no":
            assert q.category not in annotated  # the empty-mask "cat" of scene 1 is never "absent"
    for sampling in SAMPLINGS:
        labels = Counter(q.label for q in qs if q.sampling == sampling)
        assert labels["yes"] == labels["no"] == 2 * 8 + 1  # scene 6 has one present category
        for i in PRESENT:  # the same present categories in every sampling
            assert asked(qs, i, sampling, "yes") == asked(qs, i, "random", "yes")
    assert {q.sampling for q in qs} == set(SAMPLINGS)


def test_popular_and_adversarial_rankings() -> None:
    qs = pope_questions(objects(), [1], ds="toy", k=2, seed=0)
    # scene 1 (car, tree; cat annotated but hidden): absent dog 4, bus 3, sign 2 scenes
    assert asked(qs, 1, "popular", "no") == ["dog", "bus"]
    # co-occurrence with car + tree: sign 1 + 1, bus 1 + 0, dog 0
    assert asked(qs, 1, "adversarial", "no") == ["sign", "bus"]
    assert sorted(asked(qs, 1, "random", "no")) in (["bus", "dog"], ["bus", "sign"], ["dog", "sign"])
    one = pope_questions(objects(), [1], ds="toy", k=1, seed=0)
    assert asked(one, 1, "popular", "no") == ["dog"]
    assert asked(one, 1, "adversarial", "no") == ["sign"]
    # scene 6 (dog): adversarial = what co-occurs with dog (bus 2, cat 1)
    assert asked(pope_questions(objects(), [6], ds="toy", k=1), 6, "adversarial", "no") == ["bus"]


def test_deterministic_per_seed_and_scene() -> None:
    ids = sorted(PRESENT)
    first = pope_questions(objects(), ids, ds="toy", k=2, seed=5)
    assert pope_questions(objects(), ids, ds="toy", k=2, seed=5) == first
    alone = pope_questions(objects(), [3], ds="toy", k=2, seed=5)
    assert [q for q in first if q.image_id == 3] == alone  # a scene's draws ignore the other scenes
    others = [pope_questions(objects(), ids, ds="toy", k=2, seed=s) for s in range(10)]
    assert any(o != first for o in others)
    with pytest.raises(ValueError, match="sampling"):
        pope_questions(objects(), ids, ds="toy", samplings=("frequent",))


def test_question_wording() -> None:
    assert question_text("bike") == "Is there a bike in the image?"
    assert question_text("vegetation") == "Is there vegetation in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert "disparity" in question_text("bike", "lightfield")
    with pytest.raises(ValueError, match="style"):
        question_text("bike", "poem")


def write_toy_dataset(root: Path, with_annotations: bool = True) -> Path:
    """refer_seg/toy/: three 20x20 images; image 2's "dog" polygon lies outside the image (empty mask)."""
    box = [[2, 2, 12, 2, 12, 12, 2, 12]]
    outside = [[40, 40, 50, 40, 50, 50, 40, 50]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": box},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": box},
        {"id": 3, "image_id": 2, "category_id": 2, "segmentation": outside},
        {"id": 4, "image_id": 2, "category_id": 3, "segmentation": box},
        {"id": 5, "image_id": 3, "category_id": 1, "segmentation": box},
    ]
    instances = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 20} for i in (1, 2, 3)],
        "annotations": anns if with_annotations else [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(("cat", "dog", "car", "tree"))],
    }
    refs = [
        {"ref_id": r, "ann_id": a, "image_id": i, "split": s, "sentences": [{"sent": "thing"}]}
        for r, a, i, s in ((1, 1, 1, "train"), (2, 4, 2, "val"), (3, 5, 3, "val"))
    ]
    folder = root / "refer_seg" / "toy"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    if not with_annotations:  # refs without objects: gRefCOCO's no-target refs
        refs = [{**r, "ann_id": [-1]} for r in refs]
    (folder / "toy.json").write_text(json.dumps(refs))
    return root


def test_dataset_objects_and_errors(tmp_path: Path) -> None:
    root = write_toy_dataset(tmp_path / "ok")
    found = dataset_objects(ReferAnnotations.load(root, "toy"))
    assert found.categories == ("cat", "dog", "car", "tree")
    assert found.present == {1: {"cat", "car"}, 2: {"car"}, 3: {"cat"}}
    assert found.annotated[2] == {"dog", "car"}
    qs = load_pope_questions(root, "toy", "val", k=3)
    assert {q.image_id for q in qs} == {2, 3}  # the val scenes
    assert not [q for q in qs if q.image_id == 2 and q.category == "dog"]  # hidden: never asked
    with pytest.raises(ValueError, match=r"--split 'test'.*toy\.json.*train, val"):
        load_pope_questions(root, "toy", "test")
    bare = write_toy_dataset(tmp_path / "bare", with_annotations=False)
    with pytest.raises(AnnotationError, match=r"instances\.json: no annotations"):
        load_pope_questions(bare, "toy", "train")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes.", "yes"),
        ("no, there is not", "no"),
        ("  NO", "no"),
        ("Sure", "unparsed"),
        ("", "unparsed"),
        ("Yesterday", "unparsed"),
        ("[SEG] yes", "unparsed"),
    ],
)
def test_parse_answer(text: str, parsed: str) -> None:
    assert parse_answer(text) == parsed


def test_metrics_by_hand() -> None:
    labels = ["yes"] * 4 + ["no"] * 4
    answers = ["yes", "yes", "no", "unparsed", "yes", "no", "no", "unparsed"]
    m = pope_metrics(labels, answers)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unparsed"], m["n"]) == (2, 2, 1, 2, 2, 8)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    always_yes = pope_metrics(labels, ["yes"] * 8)
    assert (always_yes["precision"], always_yes["recall"], always_yes["yes_ratio"]) == (0.5, 1.0, 1.0)
    assert always_yes["accuracy"] == 0.5 and always_yes["f1"] == pytest.approx(2 / 3)
    never = pope_metrics(labels, ["unparsed"] * 8)
    assert (never["accuracy"], never["precision"], never["recall"], never["f1"]) == (0, 0, 0, 0)
    assert never["unparsed"] == 8 and never["yes_ratio"] == 0
    with pytest.raises(ValueError, match="maybe"):
        pope_metrics(["yes"], ["maybe"])


def test_pope_end_to_end(tiny_merged: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pope"
    argv = ["--version", str(tiny_merged), "--dataset_dir", str(tiny_dataset), "--ds", TINY_DS]
    argv += ["--split", "val", "--k", "2", "--batch_size", "2", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((out / "pope.json").read_text())
    assert list(report["metrics"]) == list(SAMPLINGS)
    assert report["max_new_tokens"] == 8
    expected = load_pope_questions(tiny_dataset, TINY_DS, "val", k=2)
    assert len(report["questions"]) == len(expected) > 0
    for sampling, m in report["metrics"].items():
        rows = [q for q in report["questions"] if q["sampling"] == sampling]
        assert m["n"] == len(rows)
        yes_rows = [q for q in rows if q["label"] == "yes"]
        no_rows = [q for q in rows if q["label"] == "no"]
        assert len(yes_rows) == len(no_rows) == m["tp"] + m["fn"]
        assert m["tp"] == sum(q["parsed"] == "yes" for q in yes_rows)
        assert m["fp"] + m["tn"] == sum(q["parsed"] != "unparsed" for q in no_rows)
        assert m["unparsed"] == sum(q["parsed"] == "unparsed" for q in rows)
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert 0.0 <= m[key] <= 1.0
    for q in report["questions"]:
        assert isinstance(q["answer"], str)
        assert q["parsed"] == parse_answer(q["answer"])
    # the same question in two samplings gets the same (once generated) answer
    by_key: dict[tuple, set[str]] = {}
    for q in report["questions"]:
        by_key.setdefault((q["image_id"], q["category"]), set()).add(q["answer"])
    assert all(len(v) == 1 for v in by_key.values())
    picture = cv2.imread(str(out / "pope.png"))
    assert picture is not None and picture.shape[1] >= 512
    printed = capsys.readouterr().out
    assert all(s in printed for s in SAMPLINGS) and "pope.json" in printed


def test_cli_errors_name_the_file_or_flag(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    argv = ["--version", str(tmp_path / "no_model"), "--dataset_dir", str(tiny_dataset), "--ds", TINY_DS]
    assert main([*argv, "--split", "tset", "--out", str(tmp_path / "o")]) == 1
    assert "--split 'tset'" in capsys.readouterr().err
    bare = write_toy_dataset(tmp_path / "bare", with_annotations=False)
    argv[3] = str(bare)
    assert main([*argv[:4], "--ds", "toy", "--split", "train", "--out", str(tmp_path / "o")]) == 1
    assert "instances.json: no annotations" in capsys.readouterr().err


@pytest.mark.parametrize("answerer", ["oracle", "always_yes"])
def test_answers_reach_their_questions(
    answerer: str, tiny_merged: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """The model's generation runs, then its texts are replaced by an oracle's ("Yes." exactly when the
    asked category is visible in that scene) or by "Yes" always: the metrics must be exact, which they are
    only if every answer is scored against its own question."""
    from training.experiments import pope as experiment

    present = dataset_objects(ReferAnnotations.load(tiny_dataset, TINY_DS)).present
    real = experiment.Segmenter.answer_batch

    def patched(self, samples):
        batch, generated = real(self, samples)
        for sample, results in zip(samples, generated, strict=True):
            image_id = int(re.search(r"(\d+)$", str(sample["scene_dir"])).group(1))
            for text, result in zip(sample["sentences"], results, strict=True):
                seen = any(question_text(c) == text for c in present[image_id])
                result.text = "Yes." if answerer == "always_yes" or seen else "No, there is not."
        return batch, generated

    monkeypatch.setattr(experiment.Segmenter, "answer_batch", patched)
    out = tmp_path / answerer
    argv = ["--version", str(tiny_merged), "--dataset_dir", str(tiny_dataset), "--ds", TINY_DS]
    assert main([*argv, "--k", "2", "--batch_size", "2", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "pope.json").read_text())["metrics"]
    for m in metrics.values():
        assert m["unparsed"] == 0
        if answerer == "oracle":
            assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1, 1, 1, 1, 0.5)
        else:
            assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.5, 0.5, 1, 1)
