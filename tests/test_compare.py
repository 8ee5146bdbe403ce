"""scripts/compare_evals.py on hand-written eval.json files: mean ± std per row, the paired change table,
refusals of malformed rows and of files from another val set, and the written plot."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from training.experiments.compare import main, parse_row

SUBSETS = ("All", "distance", "closest", "behind", "front")


def _eval(path: Path, giou: dict[str, float], n: int = 10) -> Path:
    subsets = {s: {"gIoU": g, "cIoU": g / 2, "n": n} for s, g in giou.items()}
    path.write_text(json.dumps({"val_dataset": "toy|syn|val", "subsets": subsets}))
    return path


def test_rows_tables_changes_and_plot(tmp_path, capsys):
    a = [_eval(tmp_path / f"a{i}.json", {s: 0.30 + 0.02 * i for s in SUBSETS}) for i in range(3)]
    # b: each file 0.06 below a's on the depth kinds, 0.01 below on All
    b = [
        _eval(tmp_path / f"b{i}.json", {s: 0.30 + 0.02 * i - (0.01 if s == "All" else 0.06) for s in SUBSETS})
        for i in range(3)
    ]
    rows = [f"exact={','.join(map(str, a))}", f"swapped={','.join(map(str, b))}"]
    out = tmp_path / "out"
    argv = ["--row", rows[0], "--row", rows[1], "--out", str(out), "--subsets", " ".join(SUBSETS)]
    assert main([*argv, "--baseline_row", "exact", "--title", "toy"]) == 0
    text = (out / "compare.md").read_text()
    # a: 30, 32, 34 -> mean 32.00, sample std 2.00; cIoU half of that
    assert "| exact (3) | **32.00 ± 2.00** |" in text
    assert "| exact (3) | **16.00 ± 1.00** |" in text
    # the change, file by file: All -1.00 exactly, each depth kind -6.00, so their mean -6.00
    assert (
        "| swapped | -1.00 ± 0.00 | -6.00 ± 0.00 | -6.00 ± 0.00 | -6.00 ± 0.00 | -6.00 ± 0.00 | **-6.00 ± 0.00** |"
        in text
    )
    summary = json.loads((out / "compare.json").read_text())
    assert summary["n"]["All"] == 10 and [v["label"] for v in summary["variants"]] == ["exact", "swapped"]
    image = cv2.imread(str(out / "compare.png"))
    assert image is not None and min(image.shape[:2]) >= 512
    capsys.readouterr()

    other = _eval(tmp_path / "other.json", {s: 0.3 for s in SUBSETS}, n=11)
    assert main(["--row", f"x={a[0]},{other}", "--out", str(out), "--subsets", " ".join(SUBSETS)]) == 2
    assert "not one val set" in capsys.readouterr().err
    assert (
        main(["--row", f"x={a[0]}", "--row", f"y={a[0]},{a[1]}", "--out", str(out), "--baseline_row", "x"])
        == 2
    )
    assert "not paired" in capsys.readouterr().err
    assert main(["--row", f"x={tmp_path / 'nope.json'}", "--out", str(out)]) == 2
    assert "nope.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["nolabel", "=a.json", "x=", "x= , "])
def test_a_malformed_row_is_named(text):
    with pytest.raises(ValueError, match=r"expected LABEL=eval\.json"):
        parse_row(text)


def test_gres_rows_read_the_gres_metrics(tmp_path, capsys):
    def gres_eval(path: Path, nacc: float, giou_rela: float) -> Path:
        rules = {
            rule: {
                "All": {
                    "gIoU": giou_rela + (0.1 if rule == "gsva" else 0.0),
                    "N-acc": nacc,
                    "T-acc": 0.9,
                    "n": 10,
                },
                "nt-depth": {"gIoU": nacc, "N-acc": nacc, "T-acc": None, "n": 4},
            }
            for rule in ("gsva", "rela")
        }
        subsets = {"All": {"gIoU": giou_rela, "cIoU": giou_rela, "n": 10}, "nt-depth": {"gIoU": 0, "n": 4}}
        path.write_text(
            json.dumps({"val_dataset": "g|syn|val", "subsets": subsets, "gres": {"rules": rules}})
        )
        return path

    on = gres_eval(tmp_path / "on.json", 0.5, 0.4)
    off = gres_eval(tmp_path / "off.json", 0.25, 0.3)
    out = tmp_path / "g"
    argv = [
        "--row",
        f"depth on={on}",
        "--row",
        f"depth off={off}",
        "--out",
        str(out),
        "--subsets",
        "All nt-depth",
    ]
    assert main([*argv, "--gres", "--baseline_row", "depth on"]) == 0
    text = (out / "compare.md").read_text()
    assert "g|syn|val, N-acc" in text and "| depth on (1) | **50.00** | **50.00** |" in text
    assert "| depth off (1) | **90.00** | - |" in text  # T-acc: nt-depth has no target expression
    assert "| n (expressions) | 10 | 4 |" in text
    assert (
        "| depth on (1) | **40.00** |" in text and "| depth on (1) | **50.00** |" in text
    )  # rela, gsva gIoU
    assert "| depth off | -25.00" in text  # the N-acc change
    assert cv2.imread(str(out / "compare.png")).shape[0] >= 4 * 540  # one panel per GRES metric
    capsys.readouterr()
    plain = _eval(tmp_path / "plain.json", {"All": 0.3})
    assert main(["--row", f"x={plain}", "--out", str(out), "--subsets", "All", "--gres"]) == 2
    assert "has no GRES metrics" in capsys.readouterr().err
