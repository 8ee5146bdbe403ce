"""Readable pictures (utils/visualize.py) and mask scores (utils/mask_scores.py): sizes, what is drawn
where, golden score values, Spearman against scipy, the summary sheet and the score study's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.experiments.score_study import correlations, scatter_plot
from utils import visualize as vis
from utils.mask_scores import SCORE_NAMES, mask_confidence, mask_scores, spearman, stability_score
from utils.metrics import SegMetrics


def _scene(h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    pred = np.zeros((h, w), bool)
    pred[10:30, 20:50] = True
    gt = np.zeros((h, w), bool)
    gt[15:40, 25:60] = True
    return rgb, pred, gt


def test_nearest_upscale_to_512_keeps_pixels_square():
    rgb = _scene()[0]
    f = vis.upscale_factor(60, 80)
    big = vis.upscale_nearest(rgb, f)
    assert f == 7 and big.shape == (420, 560, 3)
    assert np.array_equal(big[::f, ::f], rgb) and np.array_equal(big[f - 1 :: f, f - 1 :: f], rgb)
    assert vis.upscale_factor(600, 800) == 1


def test_overlay_recolours_only_mask_pixels():
    rgb, pred, _ = _scene()
    out = vis.overlay(rgb, pred, 0.5)
    assert np.array_equal(out[~pred], rgb[~pred])
    want = (0.5 * rgb[pred].astype(np.float32) + 0.5 * np.array(vis.PRED_COLOUR, np.float32)).astype(np.uint8)
    assert np.abs(out[pred].astype(int) - want.astype(int)).max() <= 1


def test_annotated_overlay_has_expression_view_and_legend():
    rgb, pred, gt = _scene()
    out = vis.annotated_overlay(
        rgb, pred, expression="the car behind the woman", gt_mask=gt, iou=0.41, score=0.7
    )
    f = vis.upscale_factor(*rgb.shape[:2])
    assert out.shape[1] == 80 * f >= 512 - f and max(out.shape[:2]) >= 512
    header = vis.text_band(
        vis.wrap_text('"the car behind the woman"', out.shape[1] - 16, vis.font_scale(560)), 560
    )
    top = header.shape[0]
    view = out[top : top + 60 * f]
    assert np.array_equal(view[0:4, 0:4], vis.upscale_nearest(rgb, f)[0:4, 0:4])  # the view, unshifted
    inside = view[20 * f, 35 * f]  # prediction interior: blended towards red
    assert (inside[0] > inside[1] and inside[0] > inside[2]) or tuple(inside) != tuple(rgb[20, 35])
    assert (np.abs(view.astype(int) - np.array(vis.GT_COLOUR)).sum(-1) < 30).any()  # GT outline drawn
    legend = out[top + 60 * f :]
    swatches = [np.array(c) for c in (vis.GT_COLOUR, vis.PRED_COLOUR)]
    assert all((np.abs(legend.astype(int) - c).sum(-1) == 0).sum() > 50 for c in swatches)
    assert (legend > 200).all(-1).sum() > 200  # light text on the dark band
    no_mask = vis.annotated_overlay(rgb, None, expression="x")
    assert not (np.abs(no_mask.astype(int) - np.array(vis.PRED_COLOUR)).sum(-1) == 0).any()


def test_wrap_text_fits_and_truncates():
    lines = vis.wrap_text("word " * 200, 300, 0.6, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    import cv2

    assert all(cv2.getTextSize(line, vis.FONT, 0.6, 1)[0][0] <= 300 for line in lines)


def test_colorize_disparity_has_colour_bar_in_px():
    d = np.tile(np.linspace(-0.5, 1.5, 80, dtype=np.float32), (60, 1))
    out = vis.colorize_disparity(d)
    f = vis.upscale_factor(60, 80)
    assert out.shape[0] > 60 * f and out.shape[1] > 80 * f + 40
    body = out[-60 * f :]
    near, far = body[30 * f, 80 * f - 1], body[30 * f, 0]  # turbo: near (1.5 px) red, far (-0.5) dark blue
    assert near[0] > near[2] and far[2] > far[0]
    bar = body[:, 80 * f + 8 + 2]
    assert bar[0][0] > bar[0][2] and bar[-1][2] > bar[-1][0]  # bar runs near (top) to far (bottom)
    flat = vis.colorize_disparity(np.ones((10, 10), np.float32))  # constant map: no division by zero
    assert flat.dtype == np.uint8


def test_summary_sheet_layout():
    tile = np.full((100, 200, 3), 128, np.uint8)
    sheet = vis.summary_sheet(
        [("All (n=9)", [(tile, "IoU 0.9")] * 3, [(tile, "IoU 0.0")] * 3)], tile_width=120
    )
    assert sheet.shape[1] == 160 + 3 * 130 + 5 + 10 + 3 * 130 + 10 and sheet.dtype == np.uint8


def test_mask_score_golden_values():
    logits = torch.tensor([[[3.0, 0.5], [-2.0, -0.5]], [[-1.0, -1.0], [-1.0, -1.0]]])
    conf = mask_confidence(logits)
    assert conf[0].item() == pytest.approx(
        (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(0.5))).item() / 2
    )
    assert conf[1].item() == 0.0  # empty mask
    stab = stability_score(logits)
    assert stab[0].item() == pytest.approx(1 / 3) and stab[1].item() == 0.0  # |x>1| = 1, |x>-1| = 3
    scores = mask_scores(logits, torch.tensor([1.3, -0.2]))
    assert scores["sam_iou"].tolist() == [1.0, 0.0] and set(scores) == set(SCORE_NAMES)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 50).astype(float)
    y = x + rng.normal(0, 2, 50)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_score_study_figures_and_plot():
    m = SegMetrics()
    ious = np.linspace(0, 1, 20)
    records = [
        {"scores": {"sam_iou": 1 - v, "confidence": v, "stability": v**2}, "sentence": f"s{i}"}
        for i, v in enumerate(ious)
    ]
    m.update(ious * 100, [100.0] * 20, expr_ids=list(range(20)), records=records)
    figures = correlations(m.expressions())
    assert figures["spearman"]["confidence"] == pytest.approx(1.0)
    assert figures["spearman"]["sam_iou"] == pytest.approx(-1.0)
    assert figures["best"] in ("confidence", "stability") and figures["n"] == 20
    lo, hi = figures["spearman_95"]["confidence"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    plot = scatter_plot(m.expressions(), figures)
    assert plot.shape[0] >= 420 and plot.shape[1] >= 3 * 420
