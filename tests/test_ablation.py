"""The LISA-vs-LFLLM ablation's library (training/experiments/ablation.py) on hand-made eval.json files: the plan, mean and
std computed by hand, the paper's table layout, the missing-run / other-val-set / too-few-expressions errors,
the settings guard, and the plot's file and size. No training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import pytest

from training.experiments import ablation as abl

SUBSETS = ("All", *abl.REPORTED)
N = {
    "All": 500,
    "o-1": 150,
    "o-2": 120,
    "o-3": 101,
    "distance": 110,
    "closest": 105,
    "behind": 130,
    "front": 140,
}
#: gIoU / cIoU of All per (variant key, seed), in [0, 1]; every other subset gets a fixed offset of them.
ALL_GIOU = {
    "lisa": (0.10, 0.12, 0.14),
    "depth": (0.11, 0.11, 0.14),
    "caam": (0.13, 0.15, 0.17),
    "lfllm": (0.20, 0.18, 0.22),
}
ALL_CIOU = {
    "lisa": (0.20, 0.20, 0.26),
    "depth": (0.21, 0.21, 0.21),
    "caam": (0.2, 0.3, 0.4),
    "lfllm": (0.3,) * 3,
}


def _eval_json(giou: float, ciou: float, n: dict[str, int] = N) -> dict:
    subsets = {}
    for k, s in enumerate(SUBSETS):
        offset = 0.01 * k  # o-1: +0.01, o-2: +0.02, ...
        subsets[s] = {"gIoU": giou + offset, "cIoU": ciou + offset, "P@0.5": 0.0, "n": n[s]}
    subsets["no-o"] = {"gIoU": 0.5, "cIoU": 0.5, "n": 7}  # not reported: ignored
    return {"val_dataset": "ref-urbanlf-syn-abl|syn|val", "protocol": "teacher_forced", "subsets": subsets}


def _write_results(out: Path, seeds=(0, 1, 2)) -> Path:
    for key in ALL_GIOU:
        for seed in seeds:
            run = out / "results" / f"{key}_seed{seed}"
            run.mkdir(parents=True)
            (run / "eval.json").write_text(json.dumps(_eval_json(ALL_GIOU[key][seed], ALL_CIOU[key][seed])))
            times = {"train_s": 100 + seed, "merge_s": 5, "eval_s": 20}
            (run / "run.json").write_text(json.dumps({"run": run.name, "total_steps": 750, **times}))
    settings = {"base": "pretrained/tiny_base", "epochs": 3, "steps_per_epoch": 250, "total_steps": 750}
    (out / "settings.json").write_text(json.dumps(settings))
    return out


def test_plan_is_four_variants_times_seeds_with_the_reference_flags():
    runs = abl.plan([0, 1, 2])
    assert [name for name, _, _ in runs[:4]] == ["lisa_seed0", "lisa_seed1", "lisa_seed2", "depth_seed0"]
    assert len(runs) == 12
    flags = {v.label: v.flags for _, v, _ in runs}
    assert flags == {
        "LISA": ("--no_caam", "--no_depth"),
        "+depth": ("--no_caam",),
        "+CAAM": ("--no_depth",),
        "LFLLM": (),
    }
    assert all(v.cacheable and v.caam_mode == "fixed" == abl.DEFAULT_CAAM_MODE for _, v, _ in runs)
    extra = abl.variants(["learned", "fixed", "learned"])  # the default mode is LFLLM itself; duplicates once
    assert [v.label for v in extra] == ["LISA", "+depth", "+CAAM", "LFLLM", "LFLLM (learned)"]
    assert extra[-1].flags == ("--caam_mode", "learned") and not extra[-1].cacheable
    with pytest.raises(abl.AblationError, match="CAAM mode 'fancy'"):
        abl.variants(["fancy"])
    with pytest.raises(abl.AblationError, match="no seeds"):
        abl.plan([])


def test_mean_and_sample_std_by_hand(tmp_path):
    summary = abl.build_report(
        _write_results(tmp_path), [0, 1, 2], wall_s=1234.0, command="bash scripts/ablate.sh"
    )
    rows = {v["label"]: v for v in summary["variants"]}
    assert list(rows) == ["LISA", "+depth", "+CAAM", "LFLLM"]
    lisa = rows["LISA"]
    # gIoU All 10, 12, 14 -> mean 12, std sqrt((4 + 0 + 4) / 2) = 2
    assert lisa["gIoU"]["All"]["values"] == pytest.approx([10.0, 12.0, 14.0])
    assert lisa["gIoU"]["All"]["mean"] == pytest.approx(12.0) and lisa["gIoU"]["All"]["std"] == pytest.approx(
        2.0
    )
    # cIoU All 20, 20, 26 -> mean 22, std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    assert lisa["cIoU"]["All"]["mean"] == pytest.approx(22.0)
    assert lisa["cIoU"]["All"]["std"] == pytest.approx(math.sqrt(12.0))
    # o-3 is the 4th column: +3 points on every seed, same std
    assert lisa["gIoU"]["o-3"]["mean"] == pytest.approx(15.0) and lisa["gIoU"]["o-3"]["std"] == pytest.approx(
        2.0
    )
    # +CAAM cIoU 20, 30, 40 -> mean 30, std 10; constant LFLLM cIoU -> std 0
    assert rows["+CAAM"]["cIoU"]["All"]["std"] == pytest.approx(10.0)
    assert rows["LFLLM"]["cIoU"]["behind"]["std"] == pytest.approx(0.0)
    assert summary["n"] == N and summary["seeds"] == [0, 1, 2] and summary["caam_mode"] == "fixed"
    assert summary["timing"]["runs"]["lisa_seed1"] == {
        "train_s": 101,
        "merge_s": 5,
        "eval_s": 20,
        "total_s": 126,
    }
    assert summary["timing"]["runs_total_s"] == pytest.approx(4 * (100 + 101 + 102) + 4 * 3 * 25)
    assert summary["timing"]["wall_s"] == 1234.0
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["variants"][0]["gIoU"]["All"]["mean"] == pytest.approx(12.0)


def test_markdown_tables_in_the_paper_layout(tmp_path):
    abl.build_report(
        _write_results(tmp_path), [0, 1, 2], wall_s=90.0, command="SEEDS='0 1 2' bash scripts/ablate.sh"
    )
    md = (tmp_path / "ablation.md").read_text()
    header = "| method | CAAM | depth | All | o-1 | o-2 | o-3 | distance | closest | behind | front |"
    assert md.count(header) == 2 and md.index("### gIoU") < md.index("### cIoU")
    giou = md[md.index("### gIoU") : md.index("### cIoU")].strip().splitlines()
    rows = [line for line in giou if line.startswith("| ")][1:]  # after the header
    assert [r.split(" | ")[0] for r in rows] == [
        "| LISA",
        "| +depth",
        "| +CAAM",
        "| LFLLM",
        "| n (expressions)",
    ]
    lisa = rows[0].strip("| ").split(" | ")
    assert lisa[:5] == ["LISA", "", "", "12.00 ± 2.00", "13.00 ± 2.00"]
    lfllm = rows[3].strip("| ").split(" | ")
    assert lfllm[1:4] == ["✓", "✓", "**20.00 ± 2.00**"]  # best mean of the column in bold
    assert rows[2].strip("| ").split(" | ")[1:3] == ["✓", ""]  # +CAAM: CAAM, no depth
    assert rows[4] == "| n (expressions) | | | 500 | 150 | 120 | 101 | 110 | 105 | 130 | 140 |"
    assert "Command: `SEEDS='0 1 2' bash scripts/ablate.sh`" in md
    assert "750 steps (3 × 250)" in md and "3 seed(s)" in md and "`pretrained/tiny_base`" in md
    assert "90 s (1.5 min)" in md
    assert abl.cell_text({"mean": 12.345, "std": None}) == "12.35"  # one seed: no std
    assert abl.cell_text({"mean": None, "std": None}) == "-"


def test_missing_run_and_another_val_set_are_named(tmp_path, capsys):
    out = _write_results(tmp_path)
    (out / "results" / "caam_seed1" / "eval.json").unlink()
    (out / "results" / "lfllm_seed2" / "eval.json").unlink()
    with pytest.raises(abl.AblationError, match=r"2 of 12 runs have no eval.json .*caam_seed1, lfllm_seed2"):
        abl.build_report(out, [0, 1, 2])
    assert abl.main(["report", "--out", str(out), "--seeds", "0 1 2"]) == 2
    assert "error: 2 of 12 runs" in capsys.readouterr().err
    abl.build_report(out, [0])  # seed 0 alone is complete
    other = _eval_json(0.1, 0.1, {**N, "o-3": 99})
    (out / "results" / "depth_seed0" / "eval.json").write_text(json.dumps(other))
    with pytest.raises(abl.AblationError, match="depth_seed0 has 99 o-3 expressions, lisa_seed0 101"):
        abl.build_report(out, [0])


def test_too_few_expressions_names_each_subset(tmp_path, capsys):
    counts = {
        "All": 900,
        "o-1": 300,
        "o-2": 200,
        "o-3": 40,
        "distance": 99,
        "closest": 100,
        "behind": 150,
        "front": 160,
    }
    abl.check_counts(counts, 40)
    with pytest.raises(
        abl.AblationError, match=r"subset o-3 has 40, distance has 99 expressions, fewer than 100"
    ) as e:
        abl.check_counts(counts, 100, scenes=120)
    assert "NUM_VAL=330" in str(e.value)  # 1.1 * 120 * 100 / 40
    with pytest.raises(abl.AblationError, match="o-2 has 0"):
        abl.check_counts({"All": 5}, 1)
    # on disk: refs with their sentences, as the evaluation counts them
    root = tmp_path / "refer_seg" / "toy"
    root.mkdir(parents=True)
    refs = [
        {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "subsets": ["o-3", "closest"], "sentences": [{"sent": "a"}, {"sent": "b"}]},
        {"ref_id": 2, "ann_id": 2, "image_id": 2, "split": "val", "subsets": ["o-1"], "sentences": [{"sent": "c"}]},
        {"ref_id": 3, "ann_id": 3, "image_id": 3, "split": "train", "subsets": ["o-3"], "sentences": [{"sent": "d"}]},
    ]  # fmt: skip
    (root / "toy.json").write_text(json.dumps(refs))
    instances = {
        "images": [{"id": i, "height": 4, "width": 4} for i in (1, 2, 3)],
        "annotations": [{"id": i, "image_id": i} for i in (1, 2, 3)],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    assert abl.expression_counts(tmp_path, "toy") == ({"All": 3, "o-3": 2, "closest": 2, "o-1": 1}, 2)
    assert abl.main(["count", "--dataset_dir", str(tmp_path), "--ds", "toy", "--min", "2"]) == 2
    io = capsys.readouterr()
    assert "All 3  o-1 1  o-2 0  o-3 2" in io.out
    assert "error: val set toy" in io.err and "o-1 has 1, o-2 has 0, distance has 0" in io.err
    assert abl.main(["count", "--dataset_dir", str(tmp_path), "--ds", "toy", "--min", "0"]) == 0


def test_settings_may_not_change_between_invocations(tmp_path):
    path = tmp_path / "settings.json"
    abl.update_record(path, ["total_steps=750", "base=pretrained/tiny_base", "lr=1e-3"], frozen=True)
    assert json.loads(path.read_text()) == {"total_steps": 750, "base": "pretrained/tiny_base", "lr": 0.001}
    abl.update_record(path, ["total_steps=750", "num_val=600"], frozen=True)  # same value, a new key: fine
    with pytest.raises(abl.AblationError, match="made with total_steps=750, this one asks total_steps=5"):
        abl.update_record(path, ["total_steps=5"], frozen=True)
    abl.update_record(path, ["total_steps=5"])  # a run's record may be rewritten
    with pytest.raises(abl.AblationError, match="KEY=VALUE"):
        abl.update_record(path, ["oops"])


def test_plot_is_written_large_enough(tmp_path):
    abl.build_report(_write_results(tmp_path), [0, 1, 2])
    image = cv2.imread(str(tmp_path / "ablation.png"))
    assert image is not None and image.shape[1] >= 1000 and image.shape[0] >= 500
    one_seed = tmp_path / "one"
    abl.build_report(_write_results(one_seed, seeds=(0,)), [0], caam_modes=())  # no std: bars without errors
    assert cv2.imread(str(one_seed / "ablation.png")).shape == image.shape
    assert abl.nice_ticks(23.0) == [0, 5, 10, 15, 20, 25]
    assert abl.nice_ticks(0.8)[-1] >= 0.8


def test_plan_command_prints_one_line_per_run(capsys):
    assert abl.main(["plan", "--seeds", "3", "--caam_modes", "occlusion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # name|label|flags|cacheable|the SAM route's extras (the depth stream only with the depth module)
    assert lines[0] == "lisa_seed3|LISA|--no_caam --no_depth|1|--semantic_fusion"
    assert lines[1] == "depth_seed3|+depth|--no_caam|1|--semantic_fusion --depth_stream --depth_detail"
    assert (
        lines[3] == "lfllm_seed3|LFLLM||1|--semantic_fusion --depth_stream --depth_detail"
    )  # no flags: an empty field
    assert (
        lines[4]
        == "lfllm-occlusion_seed3|LFLLM (occlusion)|--caam_mode occlusion|0|--semantic_fusion --depth_stream --depth_detail"
    )
    assert abl.main(["plan", "--seeds", "0", "--estimate"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert (
        last
        == "lfllm-estimate_seed0|LFLLM (estimated disparity)|--depth_source estimate|1|--semantic_fusion --depth_stream --depth_detail"
    )


def test_probe_tables_are_the_change_of_each_variant_seed_by_seed(tmp_path):
    out = _write_results(tmp_path)
    summary = abl.build_report(out, [0, 1, 2])
    assert summary["probes"] == {}, "no probe results yet: no probe table"
    for key in ALL_GIOU:  # the swap costs variant k exactly (k + 1) points on every subset, all seeds
        k = list(ALL_GIOU).index(key)
        for seed in (0, 1, 2):
            run = out / "results" / f"{key}_seed{seed}-swapped_disparity"
            run.mkdir(parents=True)
            probed = _eval_json(ALL_GIOU[key][seed] - 0.01 * (k + 1), ALL_CIOU[key][seed])
            (run / "eval.json").write_text(json.dumps(probed))
    summary = abl.build_report(out, [0, 1, 2])
    table = summary["probes"]["swapped_disparity"]
    assert "centre_views" not in summary["probes"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["LISA", "+depth", "+CAAM", "LFLLM"]
    assert rows["LISA"].count("-1.00 ± 0.00") == 9 and rows["LISA"].endswith("**-1.00 ± 0.00** |")
    assert rows["LFLLM"].endswith("**-4.00 ± 0.00** |")
    md = (out / "ablation.md").read_text()
    assert "What each variant reads: each val scene given another val scene's disparity" in md
