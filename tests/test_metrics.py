"""Hand-computed tests of the referring-segmentation metrics (utils/metrics.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from utils import metrics as metrics_mod
from utils.metrics import THRESHOLDS, SegMetrics, mask_iou_stats


def test_mask_iou_stats_logits_and_bool() -> None:
    pred = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.0, 0.0]]])  # logit 0 is background
    gt = torch.tensor([[[1, 1, 0], [0, 0, 1]]], dtype=torch.uint8)
    inter, union = mask_iou_stats(pred, gt)
    assert inter.dtype == union.dtype == torch.float64
    assert inter.tolist() == [1.0] and union.tolist() == [4.0]
    inter_b, union_b = mask_iou_stats(pred > 0, gt.bool())
    assert inter_b.tolist() == [1.0] and union_b.tolist() == [4.0]
    with pytest.raises(ValueError, match="same shape"):
        mask_iou_stats(pred, gt[:, :1])


def test_empty_masks() -> None:
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred = empty.clone()
    pred[1, 0, 0] = True  # second: empty GT, non-empty prediction
    inter, union = mask_iou_stats(pred, empty)
    assert inter.tolist() == [0.0, 0.0] and union.tolist() == [0.0, 1.0]
    m = SegMetrics()
    m.update(inter, union)
    res = m.compute()["All"]
    assert res["gIoU"] == 0.5  # IoU 1 (both empty) and 0
    assert res["cIoU"] == 0.0 and res["n"] == 2
    only_empty = SegMetrics()
    only_empty.update([0.0], [0.0])
    assert only_empty.compute()["All"]["gIoU"] == 1.0 and only_empty.compute()["All"]["cIoU"] == 1.0


def test_two_masks_exact_giou_ciou() -> None:
    m = SegMetrics()
    m.update(torch.tensor([30.0, 10.0], dtype=torch.float64), torch.tensor([40.0, 80.0]), [(), ()])
    res = m.compute()["All"]
    assert res["gIoU"] == pytest.approx((0.75 + 0.125) / 2, abs=1e-15)
    assert res["cIoU"] == pytest.approx(40 / 120, abs=1e-15)
    assert res["P@0.5"] == 0.5 and res["P@0.9"] == 0.0


def test_per_subset_split_and_tags() -> None:
    m = SegMetrics()
    m.update([8, 1, 6], [10, 4, 6], [("o-1", "closest"), "o-1", ("behind", "All")])
    res = m.compute()
    assert list(res) == ["All", "o-1", "closest", "behind"]
    assert res["o-1"]["n"] == 2 and res["o-1"]["gIoU"] == pytest.approx((0.8 + 0.25) / 2)
    assert res["o-1"]["cIoU"] == pytest.approx(9 / 14)
    assert res["closest"]["gIoU"] == pytest.approx(0.8) and res["closest"]["n"] == 1
    assert res["behind"]["gIoU"] == 1.0 and res["All"]["n"] == 3
    assert "o-2" not in res


def test_precision_thresholds_inclusive_at_boundaries() -> None:
    m = SegMetrics()
    # IoUs exactly 0.5, 0.6, 0.7, 0.8, 0.9 and just below 0.5.
    m.update([1, 3, 7, 4, 9, 4999999], [2, 5, 10, 5, 10, 10000000])
    res = m.compute()["All"]
    assert [res[f"P@{t:g}"] for t in THRESHOLDS] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_update_validation_and_empty_compute() -> None:
    m = SegMetrics()
    with pytest.raises(ValueError, match="equal lengths"):
        m.update([1, 2], [2, 2], [()])
    with pytest.raises(ValueError, match="intersection <= union"):
        m.update([3], [2])
    res = m.compute()["All"]
    assert res["n"] == 0
    assert m.to_json()["subsets"]["All"]["gIoU"] is None


def test_missing_seg_counts_zero() -> None:
    m = SegMetrics()
    m.update([0, 0, 2], [0, 5, 4], missing=[True, True, False])
    res = m.compute()["All"]
    assert res["gIoU"] == pytest.approx(0.5 / 3) and res["cIoU"] == pytest.approx(2 / 9)


def test_duplicate_ids_counted_once() -> None:
    m = SegMetrics()
    m.update([1, 2, 1], [2, 2, 2], expr_ids=["a", "b", "a"])
    assert m.compute()["All"]["n"] == 2 and m.compute()["All"]["gIoU"] == 0.75


def test_table_columns_order_and_missing() -> None:
    m = SegMetrics()
    m.update([1, 3], [2, 4], [("o-2", "near"), ("front", "val")])
    text = m.table(title="ref-urbanlf-syn val")
    lines = text.splitlines()
    assert lines[0] == "ref-urbanlf-syn val"
    header = lines[1].split()
    assert header == ["All", "o-1", "o-2", "o-3", "distance", "closest", "behind", "front", "near", "val"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert list(rows) == ["gIoU", "cIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "n"]
    assert rows["gIoU"] == ["62.50", "-", "50.00", "-", "-", "-", "-", "75.00", "50.00", "75.00"]
    assert rows["cIoU"][0] == "66.67" and rows["n"][:3] == ["2", "-", "1"]
    assert "near" not in m.table(include_other=False)
    json.dumps(m.to_json())


def _rows() -> list[tuple[int, int, tuple[str, ...], str]]:
    rng = random.Random(0)
    tags = ["o-1", "o-2", "o-3", "closest", "behind", "front", "distance", "near", "no-o"]
    rows = []
    for k in range(41):
        union = rng.randint(0, 5000)
        rows.append((rng.randint(0, union), union, tuple(rng.sample(tags, 2)), f"e{k}"))
    return rows


def test_reduce_fake_world_matches_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """reduce() with a faked 3-rank gather (order shuffled) equals one rank over the union of data."""
    rows = _rows()
    shards = [SegMetrics() for _ in range(3)]
    for k, (i, u, t, e) in enumerate(rows):
        shards[k % 3].update([i], [u], [t], [e])
    shards[2].update([rows[0][0]], [rows[0][1]], [rows[0][2]], [rows[0][3]])  # sampler padding
    payloads = [(s.inters, s.unions, s.tags, s.ids, s.missing, s.records) for s in shards]
    monkeypatch.setattr(metrics_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics_mod, "gather_objects", lambda obj, group=None: payloads)
    shards[1].reduce()
    with pytest.raises(RuntimeError, match="twice"):
        shards[1].reduce()
    single = SegMetrics()
    for i, u, t, e in rows:
        single.update([i], [u], [t], [e])
    assert shards[1].compute() == single.compute()


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    try:
        m = SegMetrics()
        for i, u, t, e in _rows()[rank::world]:
            m.update(torch.tensor([float(i)]), torch.tensor([float(u)]), [t], [e])
        m.reduce()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(m.to_json()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LFLLM_SLOW") != "1", reason="multi-process; set LFLLM_SLOW=1")
def test_reduce_two_gloo_ranks_matches_one_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = SegMetrics()
    for i, u, t, e in _rows():
        single.update([i], [u], [t], [e])
    expected = json.loads(json.dumps(single.to_json()))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
