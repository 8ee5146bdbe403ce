"""The [SEG] oracle probe (training/experiments/seg_oracle.py): what it hands SAM, that its head learns, its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_DS, model_batch
from training.experiments.seg_oracle import SegOracle, main, oracle_targets, parse_mode
from utils.boxes import grid_box, interior_point, mask_box


def test_interior_point_is_the_pixel_farthest_from_the_border():
    mask = np.zeros((20, 30), bool)
    mask[4:11, 10:17] = True  # 7 x 7 block: centre (13, 7)
    mask[0:20, 25] = True  # a thin pole elsewhere: never the interior point
    assert interior_point(mask) == (13.5, 7.5)
    mask[4:11, 10:19] = True  # 7 x 9: the centre row ties over x = 13..15, the first is taken
    assert interior_point(mask) == (13.5, 7.5)
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4), bool))


def test_mask_box_and_grid_box():
    mask = np.zeros((20, 40), bool)
    mask[3:9, 4:12] = True
    assert mask_box(mask) == (4, 3, 12, 9)
    assert grid_box(mask_box(mask), 20, 40) == (0.1, 0.15, 0.3, 0.45)
    assert grid_box(mask_box(mask), 20, 40, 0.1) == (0.1, 0.1, 0.3, 0.5)  # grown outwards
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((3, 3), bool))


def test_oracle_targets_by_mode():
    mask = torch.zeros(2, 20, 30)
    mask[0, 4:11, 11:18] = 1  # 7 x 7 block: interior pixel (14, 7)
    mask[1, 0:4, 0:3] = 1
    pts = oracle_targets(mask, "point", 0)
    assert pts.shape == (2, 2)
    assert torch.allclose(pts[0], torch.tensor([14.5 / 30, 7.5 / 20]))
    cells = oracle_targets(mask, "cell", 4)
    assert torch.allclose(cells[0], torch.tensor([0.375, 0.375]))  # cell (1, 1) of 4 x 4
    assert torch.allclose(cells[1], torch.tensor([0.125, 0.125]))
    boxes = oracle_targets(mask, "box", 10)
    assert torch.allclose(boxes[0], torch.tensor([0.3, 0.2, 0.6, 0.6]))  # 11/30 -> 0.3, 18/30 -> 0.6
    assert torch.allclose(boxes[1], torch.tensor([0.0, 0.0, 0.1, 0.2]))


@pytest.mark.parametrize("bad", ["cell", "box:0", "box:x", "points", "code:3", "cell:1001"])
def test_parse_mode_refuses_bad_modes(bad):
    with pytest.raises(ValueError, match="--mode"):
        parse_mode(bad)
    assert parse_mode("box:10") == ("box", 10) and parse_mode("point") == ("point", 0)


def test_point_oracle_is_sams_own_point_prompt(tiny_model, tiny_dataset):
    model, tok = tiny_model
    batch = model_batch(model, tok, tiny_dataset, n=2)
    oracle = SegOracle(model, "point")
    sparse, seg_image = oracle.prompts(batch)
    n_masks = [len(m) for m in batch["gt_masks"]]
    assert sparse.shape == (sum(n_masks), model.config.out_dim)
    assert seg_image.tolist() == [i for i, k in enumerate(n_masks) for _ in range(k)]
    # the same prompt through SAM's own prompt encoder (which adds 0.5 to pixel coordinates itself)
    m = 0
    for i, gts in enumerate(batch["gt_masks"]):
        (h, w), (rh, rw) = batch["original_hw"][i], batch["sam_resized_hw"][i].tolist()
        sx, sy = rw / int(w), rh / int(h)  # per axis, as SAM's ResizeLongestSide.apply_coords
        for gt in gts:
            x, y = interior_point(gt.numpy() > 0)
            coords = torch.tensor([[[x * sx - 0.5, y * sy - 0.5]]])
            ref, _ = model.sam.prompt_encoder(points=(coords, torch.ones(1, 1)), boxes=None, masks=None)
            assert torch.allclose(sparse[m], ref[0, 0], atol=1e-4)
            m += 1


@pytest.mark.parametrize("mode", ["point", "box:4"])
def test_oracle_head_learns_one_batch(tiny_model, tiny_dataset, one_torch_thread, mode):
    model, tok = tiny_model
    batch = model_batch(model, tok, tiny_dataset, n=2)
    oracle = SegOracle(model, mode)
    model.requires_grad_(False)
    params = oracle.trainable()
    for p in params:
        p.requires_grad_(True)
    n_proj = sum(p.numel() for p in model.seg_projector.parameters())
    n_dec = sum(p.numel() for p in model.sam.mask_decoder.parameters())
    assert sum(p.numel() for p in params) == n_dec + (0 if mode == "point" else n_proj)
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(25):
        out = oracle.forward_lf(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_cli_writes_the_report(tiny_base, tiny_dataset, tmp_path, one_torch_thread, capsys):
    out = tmp_path / "oracle.json"
    result = main([
        "--mode", "point", "--mode", "code", "--eval_every", "2", "--out", str(out),
        "--version", str(tiny_base["llava"]), "--vision_pretrained", str(tiny_base["sam"]),
        "--dataset_dir", str(tiny_dataset), "--refer_seg_data", TINY_DS, "--val_dataset", f"{TINY_DS}|syn|val",
        "--epochs", "1", "--steps_per_epoch", "3", "--batch_size", "2", "--workers", "0", "--warmup_steps", "1",
        "--precision", "fp32",
    ])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["steps"] == 3 and set(saved["modes"]) == {"point", "code"}
    for rec in saved["modes"].values():
        assert rec["steps"] == [0, 2, 3]
        assert len(rec["gIoU"]) == len(rec["cIoU"]) == len(rec["dice"]) == 3
        assert all(0.0 <= v <= 1.0 for v in rec["gIoU"] + rec["cIoU"])
    assert result["modes"]["point"]["gIoU"] == saved["modes"]["point"]["gIoU"]
    table = capsys.readouterr().out
    assert "point" in table and "code" in table and str(out) in table


def test_cli_refuses_a_bad_mode_and_flags_that_would_not_act(tiny_base, capsys):
    with pytest.raises(SystemExit):
        main(["--mode", "grid:3", "--version", "x"])
    assert "--mode 'grid:3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version", str(tiny_base["llava"]), "--lora_r", "16", "--eval_protocol", "generated"])
    err = capsys.readouterr().err
    assert "--eval_protocol, --lora_r: not used by the oracle probe" in err
