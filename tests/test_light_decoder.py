"""The light mask decoder (model/light_decoder.py): shapes, that every input reaches the mask, that it learns
masks chosen by the [SEG] state, the mapping back to the image, its size at the tiny and 7B widths, and the
mask losses on logits against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.light_decoder import LightDecoderConfig, LightMaskDecoder, masks_to_image, parameter_count
from model.losses import dice_per_mask, sigmoid_bce_per_mask
from utils.metrics import mask_iou_stats

TINY = LightDecoderConfig(vision_dim=32, llm_dim=48, grid=8, dim=64, heads=4, upscale=4)


def _inputs(gen: torch.Generator, images: int = 2, convs: int = 3, masks: int = 4):
    p = TINY.grid**2
    detail = torch.randn(images, p, TINY.vision_dim, generator=gen)
    semantic = torch.randn(convs, p, TINY.llm_dim, generator=gen)
    seg = torch.randn(masks, TINY.llm_dim, generator=gen)
    seg_conv = torch.tensor([0, 1, 2, 2][:masks])
    conv_image = torch.tensor([0, 0, 1][:convs])
    return detail, semantic, seg, seg_conv, conv_image


def test_shapes_and_a_clear_error_on_the_wrong_grid():
    torch.manual_seed(0)
    dec = LightMaskDecoder(TINY)
    out = dec(*_inputs(torch.Generator().manual_seed(0)))
    assert out.shape == (4, 32, 32) and out.dtype == torch.float32
    detail, semantic, seg, seg_conv, conv_image = _inputs(torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match="63 detail and 64 semantic tokens for a 8x8 detail and 8x8 semantic grid"
    ):
        dec(detail[:, :63], semantic, seg, seg_conv, conv_image)
    with pytest.raises(ValueError, match="not a multiple"):
        LightDecoderConfig(vision_dim=8, llm_dim=8, grid=4, dim=30, heads=4)


def test_every_input_reaches_the_mask():
    torch.manual_seed(0)
    dec = LightMaskDecoder(TINY)
    detail, semantic, seg, seg_conv, conv_image = _inputs(torch.Generator().manual_seed(1))
    for x in (detail, semantic, seg):
        x.requires_grad_(True)
    dec(detail, semantic, seg, seg_conv, conv_image).sum().backward()
    for name, x in (("detail", detail), ("semantic", semantic), ("seg", seg)):
        assert x.grad is not None and x.grad.abs().sum() > 0, name
    # a mask reads only its own conversation's tokens and its own image's detail
    assert semantic.grad[2].abs().sum() > 0 and seg.grad[3].abs().sum() > 0
    one = LightMaskDecoder(TINY).eval()
    base = one(detail, semantic, seg, seg_conv, conv_image).detach()
    changed = semantic.detach().clone()
    changed[0] += 1.0  # conversation 0 holds mask 0 only
    again = one(detail, changed, seg, seg_conv, conv_image).detach()
    assert not torch.allclose(again[0], base[0]) and torch.allclose(again[1:], base[1:])


def test_it_learns_masks_chosen_by_the_seg_state():
    """Two images, three objects each (rectangles), one conversation per image, the [SEG] state of each
    object a fixed random vector: the decoder must use the query to tell the objects apart."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    detail, semantic, _, _, _ = _inputs(gen, images=2, convs=2)
    seg = torch.randn(6, TINY.llm_dim, generator=gen)
    seg_conv = torch.tensor([0, 0, 0, 1, 1, 1])
    conv_image = torch.tensor([0, 1])
    target = torch.zeros(6, 32, 32)
    for k, (y0, y1, x0, x1) in enumerate(
        [(2, 12, 3, 14), (16, 30, 2, 10), (5, 20, 18, 30), (0, 8, 0, 32), (10, 26, 12, 22), (24, 32, 20, 31)]
    ):
        target[k, y0:y1, x0:x1] = 1
    dec = LightMaskDecoder(TINY)
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)
    for _ in range(300):
        logits = dec(detail, semantic, seg, seg_conv, conv_image)
        loss = sigmoid_bce_per_mask(logits, target).mean() + dice_per_mask(logits, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        inter, union = mask_iou_stats(dec(detail, semantic, seg, seg_conv, conv_image), target)
    assert float((inter / union).min()) > 0.9, (inter / union).tolist()


def test_masks_map_back_to_the_image_through_the_centre_crop():
    # a 20 x 40 image, CLIP size 8: resized 8 x 16, crop columns 4..12; positive on the square's left half
    logits = torch.full((1, 8, 8), -5.0)
    logits[:, :, :4] = 5.0
    out = masks_to_image(logits, 8, (20, 40), (8, 16))
    assert out.shape == (1, 20, 40)
    # the square's left half covers resized columns 4..8, i.e. original columns 10..20; the left margin
    # (columns 0..10) repeats the border: positive up to column 20, negative after
    assert (out[0, :, :18] > 0).all() and (out[0, :, 22:] < 0).all()
    assert torch.allclose(masks_to_image(torch.zeros(2, 4, 4), 8, (8, 8), (8, 8)), torch.zeros(2, 8, 8))


def test_parameter_count_at_the_tiny_and_7b_widths():
    assert parameter_count(TINY) == sum(p.numel() for p in LightMaskDecoder(TINY).parameters())
    seven_b = parameter_count(LightDecoderConfig(vision_dim=1024, llm_dim=4096, grid=16))
    # LLM-width input projections dominate: 2 x (4096 x 256) plus the 256-wide blocks; well under SAM ViT-H
    assert 2 * 4096 * 256 < seven_b < 10_000_000


def test_mask_losses_take_logits_hand_computed():
    logits = torch.tensor([[[0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    # BCE: (ln 2 + ln(1 + e^2)) / 2
    expected_bce = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert sigmoid_bce_per_mask(logits, target).item() == pytest.approx(expected_bce, rel=1e-6)
    # dice: p = (0.5, sigmoid(2)); 1 - (2 * 0.5 / 1000 + 1e-6) / ((0.5 + sigmoid(2) + 1) / 1000 + 1e-6)
    p1 = 1 / (1 + math.exp(-2))
    expected_dice = 1 - (2 * 0.5 / 1000 + 1e-6) / ((0.5 + p1 + 1) / 1000 + 1e-6)
    assert dice_per_mask(logits, target).item() == pytest.approx(expected_dice, rel=1e-5)


# ------------------------------------------------------------------ the grid ceiling (training/experiments)
def test_grid_ceiling_pooling_by_hand():
    from training.experiments.grid_ceiling import pooled_masks

    aligned = torch.zeros(1, 32, 32)
    aligned[0, 8:16, 16:24] = 1  # exactly one cell of a 4 x 4 grid
    line = torch.zeros(1, 32, 32)
    line[0, 5, :] = 1  # 1/8 of each cell of its row: below 0.5 everywhere
    for geometry in ("full", "clip", "sam"):
        inter, union = mask_iou_stats(pooled_masks(aligned, 4, geometry), aligned)
        assert float(inter / union) > 0.55, geometry  # the cell's centre survives the bilinear upsampling
        assert not pooled_masks(line, 4, geometry).any(), geometry
        assert pooled_masks(aligned, 32, geometry).eq(aligned.bool()).all(), geometry  # one pixel a cell
    # clip geometry: only the centre square reaches the grid; an object in the margin is lost
    wide = torch.zeros(1, 20, 40)
    wide[0, :, :8] = 1  # left margin of a 20 x 40 image (the square spans columns 10..30)
    assert not pooled_masks(wide, 20, "clip").any() and pooled_masks(wide, 20, "full").any()
    with pytest.raises(ValueError, match="geometry 'x'"):
        pooled_masks(aligned, 4, "x")


def test_grid_ceiling_rises_with_the_grid_and_reports_every_subset(tiny_dataset, tmp_path, capsys):
    from training.experiments.grid_ceiling import main

    out = tmp_path / "ceiling.json"
    argv = [
        "--dataset_dir",
        str(tiny_dataset),
        "--val_dataset",
        "ref-urbanlf-syn|syn|val",
        "--grids",
        "2,16,96",
    ]
    assert main([*argv, "--geometry", "sam", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    coarse, mid, exact = (record["grids"][g]["subsets"]["All"]["gIoU"] for g in ("2", "16", "96"))
    # SAM's frame pads the 64 x 96 image to 96 x 96: a 96 x 96 grid is one pixel a cell, exact
    assert coarse < mid < exact and exact == pytest.approx(1.0)
    assert "grid ceiling (sam geometry)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv[:4], "--grids", "0,8"])


def test_a_coarser_semantic_grid_is_upsampled_to_the_detail_grid():
    """The LLM's tokens on a 4x4 grid under an 8x8 detail pass: each semantic token reaches the pixels of
    its own region (bilinear), and a semantic grid finer than the detail grid is refused."""
    torch.manual_seed(0)
    cfg = LightDecoderConfig(vision_dim=12, llm_dim=16, grid=8, semantic_grid=4, dim=32, heads=4, upscale=4)
    dec = LightMaskDecoder(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    detail = torch.randn(2, 64, 12, generator=gen)
    semantic = torch.randn(3, 16, 16, generator=gen, requires_grad=True)
    seg = torch.randn(4, 16, generator=gen)
    out = dec(detail, semantic, seg, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1]))
    assert out.shape == (4, 32, 32)
    out[0].sum().backward()
    assert semantic.grad[0].abs().sum() > 0 and semantic.grad[1:].abs().sum() == 0  # mask 0 reads conv 0 only
    with pytest.raises(ValueError, match="semantic grid 9"):
        LightDecoderConfig(vision_dim=8, llm_dim=8, grid=8, semantic_grid=9)
