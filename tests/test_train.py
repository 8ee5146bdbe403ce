"""train_ds.py end to end on the tiny preset, as separate processes (the DeepSpeed launcher for two ranks):
replicas stay identical, metrics reduce to the single-rank numbers, a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_DS

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO)
    )
    return env


def _args(base: dict[str, Path], data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "--version", str(base["llava"]),
        "--vision_pretrained", str(base["sam"]),
        "--dataset_dir", str(data),
        "--refer_seg_data", TINY_DS,
        "--val_dataset", f"{TINY_DS}|syn|val",
        "--log_base_dir", str(runs),
        "--exp_name", name,
        "--precision", "fp32",
        "--workers", "0",
        "--batch_size", "1",
        "--grad_accumulation_steps", "2",
        "--lr", "1e-3",
        "--warmup_steps", "1",
        "--no_gradient_checkpointing",
        *extra,
    ]  # fmt: skip


def _command(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(REPO / "train_ds.py"), *args]
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_free_port())]
    return [*launcher, str(REPO / "train_ds.py"), *args]


def run_train(args: list[str], ranks: int = 1, timeout: int = 900) -> str:
    """Run ``train_ds.py`` to completion; returns its output (fails the test with it on error)."""
    proc = subprocess.run(
        _command(args, ranks), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _log(run: Path) -> dict[int, dict]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def test_two_ranks_identical_weights_and_metrics(tiny_base, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    common = ("--epochs", "1", "--steps_per_epoch", "2")
    run_train(
        _args(
            tiny_base, tiny_dataset, runs, "two", *common, "--precision", "bf16", "--gradient_checkpointing"
        ),
        ranks=2,
    )
    run = runs / "two"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert summary["replicas_identical"], summary["rank_fingerprints"]
    log = _log(run)
    assert sorted(log) == [1, 2] and all(rec["loss"] == rec["loss"] for rec in log.values())
    assert (run / "export" / "last" / "trainable.safetensors").is_file()
    assert (run / "ckpt_model" / "latest").read_text() == "last"
    assert (run / "eval.json").is_file() and (run / "ckpt_model" / "best").is_dir()

    # The same evaluation on one and on two ranks gives the same numbers (reduced once at the end).
    evals = {}
    for ranks in (1, 2):
        out = run_train(_args(tiny_base, tiny_dataset, runs, f"eval{ranks}", "--eval_only"), ranks=ranks)
        evals[ranks] = json.loads((runs / f"eval{ranks}" / "eval.json").read_text())
        assert "largest-object" in out and "gIoU" in out
    assert evals[1]["subsets"] == evals[2]["subsets"], (evals, str(runs))
    n_expr = evals[1]["subsets"]["All"]["n"]
    assert n_expr > 0 and evals[1]["baselines"]["whole-image"]["n"] == n_expr
    assert "val" not in evals[1]["subsets"], "split names are not subsets"


def _wait_then_kill(proc: subprocess.Popen, run: Path, timeout: float = 900) -> int:
    """SIGKILL ``proc`` once a checkpoint exists and at least one later step is logged; returns the
    checkpoint's step."""
    meta = run / "export" / "last" / "trainable.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        try:
            saved = json.loads(meta.read_text())["global_step"]
            logged = max(_log(run))
        except (FileNotFoundError, json.JSONDecodeError, ValueError, KeyError):
            time.sleep(0.05)
            continue
        if logged > saved:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return saved
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def test_sigkill_then_resume_continues_the_run(tiny_base, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    args = _args(
        tiny_base, tiny_dataset, runs, "kill",
        "--epochs", "1", "--steps_per_epoch", "14", "--save_steps", "3", "--no_eval",
    )  # fmt: skip
    run = runs / "kill"
    proc = subprocess.Popen(
        _command(args, 1), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_then_kill(proc, run)
    killed_log = _log(run)
    # The checkpoint to resume from is the one `latest` names (a save may have finished after the
    # step we saw, never a half-written one).
    resumed_from = json.loads((run / "export" / "last" / "trainable.json").read_text())["global_step"]
    out = run_train(args)
    assert f"at step {resumed_from}" in out
    log = _log(run)
    assert sorted(log) == list(range(1, 15)), "every step logged exactly once"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 14
    overlap = [s for s in killed_log if s > resumed_from]
    for s in killed_log:
        if s <= resumed_from:
            assert log[s] == killed_log[s], f"step {s}: the log before the checkpoint was kept as is"
    for s in overlap:
        for key in ("loss", "ce_loss", "bce_loss", "dice_loss", "lr"):
            assert log[s][key] == pytest.approx(killed_log[s][key], rel=1e-4, abs=1e-6), (s, key)


def test_explicit_resume_dir_and_missing_dir(tiny_base, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    run_train(_args(tiny_base, tiny_dataset, runs, "a", "--epochs", "1", "--steps_per_epoch", "2"))
    ckpt = runs / "a" / "ckpt_model"
    # A longer schedule resumed from the first run's checkpoint continues at step 2 (on --extend_schedule,
    # which says how the LR goes on).
    longer = ("--epochs", "2", "--steps_per_epoch", "2", "--no_eval", "--resume", str(ckpt / "last"))
    out = run_train(_args(tiny_base, tiny_dataset, runs, "b", *longer, "--extend_schedule"))
    assert "at step 2" in out and "the learning-rate schedule changes on resume" in out
    assert sorted(_log(runs / "b")) == [3, 4]
    base = ("--epochs", "1", "--steps_per_epoch", "2", "--no_eval")
    proc = subprocess.run(
        _command(_args(tiny_base, tiny_dataset, runs, "c", *base, "--resume", str(tmp_path / "nope")), 1),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode != 0 and "no such checkpoint directory" in proc.stderr

    # The merged model of run "a" reproduces the validation numbers the run reported.
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(REPO / "merge_lora_weights_and_save_hf_model.py"), "--weight",
         str(runs / "a" / "export" / "last"), "--save_path", str(merged), "--precision", "fp32"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_train(_args(tiny_base, tiny_dataset, runs, "m", "--eval_only", "--version", str(merged)))
    trained = json.loads((runs / "a" / "eval.json").read_text())["subsets"]
    again = json.loads((runs / "m" / "eval.json").read_text())["subsets"]
    assert trained.keys() == again.keys()
    for subset, metrics in trained.items():
        for key, value in metrics.items():
            assert again[subset][key] == pytest.approx(value, abs=1e-3), (subset, key)
