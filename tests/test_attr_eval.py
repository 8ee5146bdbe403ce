"""AttrEval: the generator's attributes file, the linear probe, the rank correlation, the script end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from dataset.attributes import (
    DEPTH_BINS,
    OCCLUSION_LEVELS,
    PROBED,
    attributes_path,
    depth_bin,
    load_attributes,
)
from dataset.errors import AnnotationError
from dataset.synthetic import SyntheticConfig
from dataset.synthetic.generator import render_scene
from tests.conftest import TINY_DS
from training.experiments.attr_probe import fit_probe, iou_by_readout, majority_class, probe_attributes
from utils.mask_scores import spearman


def _tiny_cfg() -> SyntheticConfig:
    return SyntheticConfig(height=64, width=96, num_train=6, num_val=3, seed=3)  # conftest's tiny_dataset


def test_attributes_file_matches_the_generator(tiny_dataset: Path) -> None:
    attributes = load_attributes(tiny_dataset, TINY_DS)
    ref_dir = tiny_dataset / "refer_seg" / TINY_DS
    instances = json.loads((ref_dir / "instances.json").read_text())
    refs = json.loads((ref_dir / f"{TINY_DS}.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    assert set(attributes) == {a["id"] for a in instances["annotations"]}
    cfg = _tiny_cfg()
    for ann in instances["annotations"]:
        rec = attributes[ann["id"]]
        assert rec["category"] == names[ann["category_id"]]
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        disparity = np.load(tiny_dataset / "lf" / TINY_DS / f"Image{ann['image_id']}" / cfg.disparity_name)
        assert rec["disparity_px"] == pytest.approx(float(disparity[mask].mean()), abs=1e-6)
        assert rec["depth_bin"] == depth_bin(rec["disparity_px"]) and rec["depth_bin"] in DEPTH_BINS
    for ref in refs:
        tags = [t for t in ref["subsets"] if t in OCCLUSION_LEVELS]
        assert [attributes[ref["ann_id"]]["occlusion"]] == tags
    # colour and visible fraction are the scene objects' own (re-rendered in memory)
    for image_id in (1, 7):
        for obj in render_scene(image_id, cfg, views=[(cfg.centre, cfg.centre)]).objects:
            if obj.area:
                rec = attributes[image_id * 100 + obj.layer_id]
                assert (rec["colour"], rec["visible_fraction"]) == (obj.colour, obj.visible_fraction)
    bins = {rec["depth_bin"] for rec in attributes.values()}
    assert len(bins) >= 2, bins  # the fixed thresholds split even a tiny dataset


def test_depth_bin_edges() -> None:
    assert [depth_bin(d) for d in (-0.1, 0.0, 0.53, 0.54, 1.06, 1.07, 1.6)] == [
        "far", "far", "far", "middle", "middle", "near", "near",
    ]  # fmt: skip


def test_load_attributes_names_the_file(tmp_path: Path) -> None:
    path = attributes_path(tmp_path, "ds")
    with pytest.raises(AnnotationError, match=r"attributes\.json: missing"):
        load_attributes(tmp_path, "ds")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"attributes\.json: not readable JSON"):
        load_attributes(tmp_path, "ds")
    good = {"category": "car", "colour": "red", "disparity_px": 0.2, "depth_bin": "far"}
    good.update(occlusion="o-1", visible_fraction=0.8)
    path.write_text(json.dumps({"101": good}))
    assert load_attributes(tmp_path, "ds") == {101: good}
    for bad, message in (
        ({"x1": good}, "key 'x1' is not an ann_id"),
        ({"101": {**good, "depth_bin": "close"}}, "ann_id 101: depth_bin 'close'"),
        ({"101": {k: v for k, v in good.items() if k != "colour"}}, "ann_id 101: missing colour"),
        ({"101": {**good, "disparity_px": "0.2"}}, "disparity_px = '0.2' is not a float"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(AnnotationError, match=message):
            load_attributes(tmp_path, "ds")


def test_probe_reads_a_separable_toy_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4
    names = ["red", "green", "blue"]

    def draw(n: int) -> tuple[torch.Tensor, list[str]]:
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + 0.3 * torch.randn(n, 16, generator=g) + 100.0, [names[i] for i in y]

    (xt, yt), (xv, yv) = draw(90), draw(60)
    figures, right = probe_attributes(xt, {"colour": yt}, xv, {"colour": yv})
    assert figures["colour"]["probe_acc"] == 1.0 and all(right["colour"])
    assert figures["colour"]["majority_acc"] < 0.6
    assert figures["colour"]["majority"] == majority_class(yt)


def test_probe_on_random_labels_is_near_chance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1400, 32, generator=g)
    y = [str(int(v)) for v in torch.randint(0, 3, (1400,), generator=g)]
    probe = fit_probe(x[:400], y[:400], l2=1e-3)
    val = np.mean([p == t for p, t in zip(probe.predict(x[400:]), y[400:])])
    train = np.mean([p == t for p, t in zip(probe.predict(x[:400]), y[:400])])
    assert abs(val - 1 / 3) < 0.06, val
    assert train > val + 0.1, (train, val)  # it did fit the training labels: chance on val is not no fit


def test_probe_with_one_class_always_answers_it() -> None:
    probe = fit_probe(torch.randn(5, 4), ["car"] * 5)
    assert probe.predict(torch.randn(3, 4)) == ["car"] * 3


def test_spearman_with_ties_by_hand() -> None:
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> covariance 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [0.1, 0.7, 0.5, 0.9]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1], [0.1, 0.2, 0.3]))


def test_iou_by_readout_by_hand() -> None:
    right = {"a": [True, True, False, False], "b": [True, False, False, True]}
    out = iou_by_readout(right, [0.9, 0.5, 0.1, 0.6])  # number right: 2, 1, 0, 1
    assert out["number_right"] == [2, 1, 0, 1]
    assert out["spearman_right_vs_iou"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert out["mean_iou_all_right"] == pytest.approx(0.9) and out["n_all_right"] == 1
    assert out["mean_iou_not_all_right"] == pytest.approx(0.4)
    assert out["by_number_right"]["1"] == {"n": 2, "mean_iou": pytest.approx(0.55)}
    assert out["per_attribute"]["b"] == {"mean_iou_right": pytest.approx(0.75), "mean_iou_wrong": 0.3}


def test_answers_are_scored_exactly() -> None:
    from training.experiments.attr_ask import normalise_answer, score_answer

    assert normalise_answer("It is a Traffic Sign.</s>") == "traffic sign"
    assert score_answer("Red.", "red") == {"exact": True, "mentions": True}
    assert score_answer("the red car", "red") == {"exact": False, "mentions": True}
    assert score_answer("reddish", "red") == {"exact": False, "mentions": False}
    assert score_answer("[SEG] blue", "blue")["exact"]


def _single_target_sentences(dataset: Path, split: str) -> int:
    refs = json.loads((dataset / "refer_seg" / TINY_DS / f"{TINY_DS}.json").read_text())
    return sum(len(r["sentences"]) for r in refs if r["split"] == split and isinstance(r["ann_id"], int))


def test_script_end_to_end(tiny_merged, tiny_dataset, tmp_path, one_torch_thread, capsys) -> None:
    from training.experiments.attr_eval import main

    out = tmp_path / "attr"
    figures = main([
        "--out", str(out), "--scenes_per_batch", "3", "--version", str(tiny_merged),
        "--dataset_dir", str(tiny_dataset), "--val_dataset", f"{TINY_DS}|syn|val",
        "--precision", "fp32", "--workers", "0", "--ask", "--max_new_tokens", "4",
    ])  # fmt: skip
    saved = json.loads((out / "attr_eval.json").read_text())
    assert set(saved["probes"]) == set(PROBED)
    for p in saved["probes"].values():
        assert 0.0 <= p["probe_acc"] <= 1.0 and 0.0 <= p["majority_acc"] <= 1.0
    assert saved["n_val"] == len(saved["expressions"]) == _single_target_sentences(tiny_dataset, "val")
    assert saved["n_train"] == _single_target_sentences(tiny_dataset, "train")
    assert all(0.0 <= e["iou"] <= 1.0 and 0 <= e["number_right"] <= 4 for e in saved["expressions"])
    by = saved["readout_vs_iou"]["by_number_right"]
    assert sum(v["n"] for v in by.values()) == saved["n_val"]
    assert saved["probes"]["colour"]["probe_acc"] == figures["probes"]["colour"]["probe_acc"]
    assert set(saved["asked"]) == {"colour", "category"}
    assert all(0.0 <= a["exact_acc"] <= a["mention_acc"] <= 1.0 for a in saved["asked"].values())
    assert all(set(e["answers"]) == {"colour", "category"} for e in saved["expressions"])
    image = cv2.imread(str(out / "attr_eval.png"))
    assert image is not None and min(image.shape[:2]) >= 512
    table = capsys.readouterr().out
    assert "Spearman(#attributes right, IoU)" in table and all(a in table for a in PROBED)


def test_states_do_not_depend_on_the_batching(tiny_merged, tiny_dataset, one_torch_thread) -> None:
    """The [SEG] state and IoU of every expression are the same whether scenes are batched or not (the
    slots are matched to their expressions, and right padding leaves the states alone)."""
    from model.build import build_lfllm
    from training.config import parse_config
    from training.experiments.attr_eval import collect_states
    from training.loaders import build_val_loader

    model, tokenizer = build_lfllm(str(tiny_merged))
    runs = []
    for per_batch in ("1", "3"):
        cfg = parse_config([
            "--version", str(tiny_merged), "--dataset_dir", str(tiny_dataset), "--workers", "0",
            "--val_dataset", f"{TINY_DS}|syn|val", "--val_batch_size", per_batch, "--eval_only",
        ])  # fmt: skip
        loader = build_val_loader(cfg, model.config, tokenizer, 0, 1)
        runs.append(collect_states(model, loader, torch.device("cpu")))
    one, three = runs
    assert len(one) == len(three) == _single_target_sentences(tiny_dataset, "val")
    for a, b in zip(one, three):
        assert (a["sentence"], a["ann_ids"]) == (b["sentence"], b["ann_ids"])
        torch.testing.assert_close(a["state"], b["state"], atol=1e-4, rtol=1e-4)
        assert a["iou"] == pytest.approx(b["iou"], abs=1e-6)
    assert len({tuple(r["state"][:4].tolist()) for r in one}) > 1  # states differ between expressions
