"""Point-prompt pretraining of the tiny SAM (the stand-in for SAM's own pretraining in CPU runs):
train-split data only, a loss that falls, deterministic, and reachable from scripts/make_tiny_base.py."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch

from model.sam import build_sam, sam_config
from tests.conftest import TINY_DS
from training.pretrain.tiny_base import SamPretrainOptions, pretrain_tiny_sam, train_split_objects


def _refs(root):
    return json.loads((root / "refer_seg" / TINY_DS / f"{TINY_DS}.json").read_text())


def test_objects_come_from_train_images_only(tiny_dataset):
    objects = train_split_objects(tiny_dataset, TINY_DS)
    refs = _refs(tiny_dataset)
    train_images = {r["image_id"] for r in refs if r["split"] == "train"}
    val_images = {r["image_id"] for r in refs if r["split"] != "train"}
    assert 0 < len(objects) <= len(train_images - val_images)
    for center, masks in objects:
        assert center.dtype == np.uint8 and center.ndim == 3 and center.shape[2] == 3
        assert masks.ndim == 3 and masks.shape[1:] == center.shape[:2]
        assert masks.reshape(len(masks), -1).any(1).all()  # no empty mask
        # one mask per annotated object: no two identical
        flat = masks.reshape(len(masks), -1)
        assert len({m.tobytes() for m in flat}) == len(flat)


def test_no_train_image_is_an_error(tiny_dataset, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_dataset, root)
    path = root / "refer_seg" / TINY_DS / f"{TINY_DS}.json"
    path.write_text(json.dumps([r | {"split": "val"} for r in _refs(root)]))
    with pytest.raises(ValueError, match="no train-split image"):
        train_split_objects(root, TINY_DS)


def _pretrained(objects, steps: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    options = SamPretrainOptions(steps=steps, images_per_step=2, max_objects=3, lr=3e-3, warmup=5)
    result = pretrain_tiny_sam(sam, objects, options, seed=1)
    assert not sam.training
    return result, sam.state_dict()


def test_pretraining_lowers_the_loss(tiny_dataset):
    """(Mask IoU only starts to rise after ~100 steps, too long for the suite: the loss is the signal.)"""
    result, _ = _pretrained(train_split_objects(tiny_dataset, TINY_DS), steps=50)
    assert result["loss"] < 0.8 * result["first_loss"], result


def test_pretraining_is_deterministic(tiny_dataset):
    objects = train_split_objects(tiny_dataset, TINY_DS)
    (a, sa), (b, sb) = _pretrained(objects, steps=4), _pretrained(objects, steps=4)
    assert a == b
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_make_tiny_base_cli_pretrains_sam(tiny_dataset, tiny_base, tmp_path, capsys):
    make = importlib.import_module("training.pretrain.tiny_base")
    out = tmp_path / "b"
    argv = [
        "--out",
        str(out),
        "--dataset_dir",
        str(tiny_dataset),
        "--ds",
        TINY_DS,
        "--sam_pretrain_steps",
        "3",
    ]
    paths = make.main(argv)
    assert "tiny SAM pretrained 3 steps on" in capsys.readouterr().out
    record = json.loads((out / "sam_pretrain.json").read_text())
    assert record["options"]["steps"] == 3 and record["images"] > 0 and record["loss"] > 0
    pretrained = torch.load(paths["sam"], weights_only=True)
    random = torch.load(tiny_base["sam"], weights_only=True)  # same seed, no pretraining
    assert pretrained.keys() == random.keys()
    changed = [k for k in random if not torch.equal(random[k], pretrained[k])]
    assert any(k.startswith("image_encoder.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)
