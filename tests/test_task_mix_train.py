"""LISA's task mix end to end on the tiny preset: ``train_ds.py`` trains the four tasks on the generator's
light-field versions plus a LISA-layout ADE20K folder (2D images, read as flat light fields), logs each
task's losses apart, and evaluates the reasoning val set with its ignore pixels; the feature cache serves a
mix of light-field tasks and refuses 2D data."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import TINY_DS
from tests.test_train import REPO, _args, _command, _env, run_train

MIX = ["--dataset", "sem_seg||refer_seg||vqa||reason_seg", "--sample_rates", "1,1,1,1"]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    """The tiny generated dataset with the task files, and a 2-image ADE20K folder in LISA's layout."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path_factory.mktemp("tasks")
    write_dataset(root, SyntheticConfig(height=64, width=96, num_train=6, num_val=3, seed=3, tasks=True))
    images, labels = root / "ade20k/images/training", root / "ade20k/annotations/training"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(2):
        cv2.imwrite(str(images / f"ADE_train_{k}.jpg"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        label = np.zeros((48, 64), np.uint8)
        label[:24] = 3  # class 2 (ADE's labels are 1-based, 0 = other)
        label[24:, :32] = 13
        cv2.imwrite(str(labels / f"ADE_train_{k}.png"), label)
    return root


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_the_mix_trains_every_task_and_logs_each(tiny_base, task_data, tmp_path):
    data = [
        "--sem_seg_data",
        f"ade20k||{TINY_DS}",
        "--vqa_data",
        TINY_DS,
        "--reason_seg_data",
        f"{TINY_DS}|train",
    ]
    args = _args(
        tiny_base, task_data, tmp_path, "mix", *MIX, *data, "--epochs", "1", "--steps_per_epoch", "6"
    )
    args[args.index("--val_dataset") + 1] = f"{TINY_DS}|val"  # the generated reasoning queries
    out = run_train(args)
    records = _log(tmp_path / "mix")
    seen = {key.split("/")[0] for rec in records for key in rec if "/" in key}
    assert seen == {"sem_seg", "refer_seg", "vqa", "reason_seg"}, out[-2000:]
    assert all(rec.get("vqa/bce_loss", 0.0) == 0.0 for rec in records)  # VQA: the language loss only
    assert any(rec.get("vqa/ce_loss", 0.0) > 0 for rec in records)
    assert any(rec.get("sem_seg/dice_loss", 0.0) > 0 for rec in records)
    record = (
        json.loads((tmp_path / "mix" / "eval.json").read_text())
        if (tmp_path / "mix" / "eval.json").exists()
        else None
    )
    summary = json.loads((tmp_path / "mix" / "train_summary.json").read_text())
    assert summary["history"], summary  # the reasoning val set was scored at the epoch's end
    assert record is None or record["val_dataset"] == f"{TINY_DS}|val"


def test_a_mix_with_2d_data_cannot_use_the_feature_cache(tiny_base, task_data, tmp_path):
    data = ["--sem_seg_data", "ade20k", "--vqa_data", TINY_DS, "--reason_seg_data", f"{TINY_DS}|train"]
    args = _args(tiny_base, task_data, tmp_path, "cached", *MIX, *data, "--no_eval")
    args += ["--epochs", "1", "--steps_per_epoch", "1", "--feature_cache", str(tmp_path / "cache")]
    proc = subprocess.run(
        _command(args, 1), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert (
        "task sem_seg also reads ade20k (--sem_seg_data): drop --feature_cache" in proc.stdout + proc.stderr
    )


def test_the_clash_of_sample_rates_is_refused_before_anything_runs(tiny_base, task_data, tmp_path):
    args = _args(
        tiny_base, task_data, tmp_path, "clash", "--dataset", "sem_seg||refer_seg", "--sample_rates", "3,1,2"
    )
    proc = subprocess.run(
        _command(args, 1), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "3 rates for the 2 tasks" in proc.stdout + proc.stderr
    assert not (tmp_path / "clash").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_check_names_a_broken_task_file_before_any_model(task_data, tmp_path, capsys):
    from training.preflight import check_main

    data = tmp_path / "data"
    shutil.copytree(task_data, data)
    flags = ["--dataset_dir", str(data), "--refer_seg_data", TINY_DS, "--val_dataset", f"{TINY_DS}|syn|val"]
    flags += [*MIX, "--sem_seg_data", f"ade20k||{TINY_DS}", "--vqa_data", TINY_DS]
    flags += ["--reason_seg_data", f"{TINY_DS}|train", "--no_caam", "--no_depth"]
    assert check_main(flags) == 0, capsys.readouterr().err
    broken = sorted((data / "reason_seg" / TINY_DS / "train").glob("*.json"))[0]
    broken.write_text(json.dumps({"text": "not a list", "is_sentence": False, "shapes": []}))
    assert check_main(flags) == 1
    assert str(broken) in capsys.readouterr().err
    (data / "llava_dataset" / f"{TINY_DS}.json").unlink()
    assert check_main(flags) == 1
    assert f"llava_dataset/{TINY_DS}.json" in capsys.readouterr().err


def test_two_ranks_train_a_mix_whose_batches_differ_in_kind(tiny_base, task_data, tmp_path):
    """One rank's micro-batch may be a VQA conversation (no mask) while the other's segments: the replicas
    still reduce the same gradients and stay identical."""
    args = _args(
        tiny_base, task_data, tmp_path, "two", "--dataset", "refer_seg||vqa", "--sample_rates", "1,1"
    )
    args += [
        "--vqa_data",
        TINY_DS,
        "--batch_size",
        "1",
        "--epochs",
        "1",
        "--steps_per_epoch",
        "4",
        "--no_eval",
    ]
    args[args.index("--grad_accumulation_steps") + 1] = "1"
    run_train(args, ranks=2)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert summary["replicas_identical"], summary["rank_fingerprints"]
    records = _log(tmp_path / "two")
    assert any("vqa/ce_loss" in r for r in records) and any("refer_seg/bce_loss" in r for r in records)
