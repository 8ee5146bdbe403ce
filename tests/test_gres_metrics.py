"""GRES metrics against hand-computed values under both published rules (GSVA/MLLMSeg: a wrongly rejected
target keeps its mask score; ReLA: it scores 0), N-acc / T-acc, the trivial baselines, bad input."""

from __future__ import annotations

import pytest
import torch

from utils.gres_metrics import GresMetrics, effective_counts, mask_area_stats

# (inter, pred_area, gt_area, rejected, no_target, tags)
CASES = [
    (6, 8, 10, False, False, ("val", "multi")),  # a target, answered: IoU 6 / 12
    (4, 4, 5, True, False, ("val",)),  # a target wrongly rejected; its mask covers 4 of 5 pixels
    (0, 3, 0, True, True, ("val", "nt")),  # no target, rejected (the decoder drew 3 pixels anyway)
    (0, 7, 0, False, True, ("val", "nt")),  # no target, answered with 7 pixels
    (0, 0, 0, False, True, ("val", "nt")),  # no target, answered with an empty mask
]


def _metrics(cases=CASES) -> GresMetrics:
    m = GresMetrics()
    cols = list(zip(*cases))
    m.update(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], expr_ids=list(range(len(cases))))
    return m


def test_both_rules_against_hand_computed_values() -> None:
    m = _metrics()
    gsva, rela = m.compute("gsva")["All"], m.compute("rela")["All"]
    # GSVA: IoUs 0.5, 0.8, 1, 0, 1; I = 6+4, U = 12+5+0+7+0
    assert gsva["gIoU"] == pytest.approx(3.3 / 5) and gsva["cIoU"] == pytest.approx(10 / 24)
    # ReLA: the rejected target scores 0 (I 0, U 5): IoUs 0.5, 0, 1, 0, 1
    assert rela["gIoU"] == pytest.approx(2.5 / 5) and rela["cIoU"] == pytest.approx(6 / 24)
    for res in (gsva, rela):
        assert res["N-acc"] == pytest.approx(1 / 3) and res["T-acc"] == pytest.approx(1 / 2)
        assert res["n"] == 5 and res["n_no_target"] == 3
    nt = m.compute("rela")["nt"]
    assert nt["gIoU"] == pytest.approx(2 / 3) and nt["T-acc"] is None and nt["n_no_target"] == 3
    multi = m.compute("gsva")["multi"]
    assert multi["N-acc"] is None and multi["T-acc"] == 1.0 and multi["gIoU"] == pytest.approx(0.5)
    assert "val" not in m.compute("gsva")  # split names are not subsets


def test_trivial_baselines_override_every_decision() -> None:
    m = _metrics()
    seg, rej = m.overridden(False), m.overridden(True)
    # always [SEG]: IoUs 0.5, 0.8, 0 (3 stray pixels), 0, 1; the rules agree when nothing is rejected
    for rule in ("gsva", "rela"):
        res = seg.compute(rule)["All"]
        assert res["gIoU"] == pytest.approx(2.3 / 5) and res["cIoU"] == pytest.approx(10 / 27)
        assert res["N-acc"] == 0.0 and res["T-acc"] == 1.0
    # always [REJ]: GSVA still scores the targets' masks (0.5, 0.8) -- the rule a rejecting model exploits
    assert rej.compute("gsva")["All"]["gIoU"] == pytest.approx(4.3 / 5)
    assert rej.compute("gsva")["All"]["cIoU"] == pytest.approx(10 / 17)
    assert (
        rej.compute("rela")["All"]["gIoU"] == pytest.approx(3 / 5)
        and rej.compute("rela")["All"]["cIoU"] == 0.0
    )
    assert rej.compute("rela")["All"]["N-acc"] == 1.0 and rej.compute("rela")["All"]["T-acc"] == 0.0
    text = m.baselines_table()
    assert "always [REJ]: gIoU 86.00 cIoU 58.82 (gsva)  gIoU 60.00 cIoU  0.00 (rela)" in text
    assert m.to_json()["baselines"]["always_seg"]["rela"]["gIoU"] == pytest.approx(0.46)


def test_table_repeated_ids_and_masks() -> None:
    m = _metrics()
    m.update([6], [8], [10], [False], [False], [("val", "multi")], expr_ids=[0])  # a padded repeat: ignored
    assert len(m) == 5
    table = m.table(columns=("nt",))
    lines = table.splitlines()
    assert lines[0].split() == ["All", "nt", "multi"]
    assert lines[2].split() == ["gIoU", "(gsva)", "66.00", "66.67", "50.00"]
    assert lines[6].split() == ["N-acc", "33.33", "33.33", "-"] and lines[7].split() == [
        "T-acc",
        "50.00",
        "-",
        "100.00",
    ]
    pred = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    gt = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    inter, p, g = mask_area_stats(pred, gt)
    assert inter.tolist() == [1.0, 0.0] and p.tolist() == [2.0, 0.0] and g.tolist() == [2.0, 0.0]


def test_bad_input_is_refused() -> None:
    m = GresMetrics()
    with pytest.raises(ValueError, match="expected equal lengths"):
        m.update([1], [1, 2], [1], [False], [False])
    with pytest.raises(
        ValueError, match=r"intersection 5.0 must lie in \[0, min\(pred_area 3.0, gt_area 9.0\)\]"
    ):
        m.update([5], [3], [9], [False], [False])
    with pytest.raises(ValueError, match=r"a no-target expression has a ground-truth area of 4\.0 pixels"):
        m.update([0], [0], [4], [True], [True])
    with pytest.raises(ValueError, match="rule must be one of"):
        m.compute("refcoco")
    with pytest.raises(ValueError, match="rule must be one of"):
        effective_counts(_metrics().rows()[0], "lisa")
    with pytest.raises(ValueError, match=r"must both be \(N, H, W\)"):
        mask_area_stats(torch.zeros(2, 3), torch.zeros(2, 3))
    empty = GresMetrics().compute("gsva")["All"]
    assert empty["n"] == 0
