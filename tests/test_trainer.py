"""Trainer pieces that need no process group: NaN stop, resume lookup, sampler resume offsets, atomic save."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoint import COMPLETE_FILE, find_resume_checkpoint, find_resume_tag, save_checkpoint
from training.config import RunConfig, RunOptions
from training.loaders import EpochSampler
from training.trainer import NonFiniteLossError, Trainer, resume_source, weights_fingerprint
from utils.distributed import DistInfo


class _FakeEngine:
    """Returns a fixed loss; counts backward/step calls."""

    def __init__(self, loss: float, global_steps: int = 6) -> None:
        self.loss, self.global_steps, self.calls = loss, global_steps, []

    def __call__(self, lf_batch):
        t = torch.tensor(self.loss)
        return {"loss": t, "ce_loss": t, "bce_loss": torch.tensor(0.5), "dice_loss": torch.tensor(0.25)}

    def backward(self, loss):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")


def _trainer(engine) -> Trainer:
    args = RunConfig().replace(
        loop={"seed": 0, "grad_accumulation_steps": 2}, run={"resume": "", "auto_resume": True}
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(args, engine, None, None, None, None, info, None, Path("."), {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step(bad):
    engine = _FakeEngine(bad, global_steps=6)
    with pytest.raises(NonFiniteLossError, match=r"optimiser step 7 \(micro-step 13, rank 0"):
        _trainer(engine).train_step({"x": torch.zeros(1)}, 13)
    assert engine.calls == [], "no backward/step on a non-finite loss"


def test_finite_loss_steps_and_returns_the_parts():
    engine = _FakeEngine(1.5)
    parts = _trainer(engine).train_step({"x": torch.zeros(1)}, 0)
    assert parts.tolist() == [1.5, 1.5, 0.5, 0.25]
    assert engine.calls == ["backward", "step"]


def _complete(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    (folder / COMPLETE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def test_resume_source_explicit_tag_dir_latest_and_auto(tmp_path):
    ckpt = tmp_path / "ckpt_model"
    _complete(ckpt / "last", 20)
    _complete(ckpt / "best", 10)
    (ckpt / "latest").write_text("last")
    args = RunOptions(resume="", auto_resume=True)
    assert resume_source(args, ckpt) == (ckpt, "last")
    assert resume_source(RunOptions(resume="", auto_resume=False), ckpt) is None
    assert resume_source(RunOptions(resume=str(ckpt / "best"), auto_resume=False), ckpt) == (
        ckpt,
        "best",
    )
    assert resume_source(RunOptions(resume=str(ckpt), auto_resume=False), tmp_path) == (ckpt, "last")
    # 'latest' names a folder that is gone: the newest complete checkpoint is used, and said so
    (ckpt / "latest").write_text("gone")
    assert (
        find_resume_checkpoint(ckpt)[0] == "last"
        and "'latest' names 'gone'" in find_resume_checkpoint(ckpt)[1]
    )
    for name in ("last", "best"):
        shutil.rmtree(ckpt / name)
    assert find_resume_tag(ckpt) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume_source(RunOptions(resume=str(ckpt), auto_resume=False), tmp_path)


def test_a_kill_between_the_renames_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """Killed after 'last' was moved to .old-last and before .tmp-last took its name."""
    _complete(tmp_path / ".old-last", 10)
    _complete(tmp_path / ".tmp-last", 20)
    (tmp_path / ".tmp-best").mkdir()  # half written: no marker
    (tmp_path / ".tmp-best" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("last")
    name, note = find_resume_checkpoint(tmp_path)
    assert name == ".tmp-last" and "step 20" in note and "newest complete" in note
    shutil.rmtree(tmp_path / ".tmp-last")
    assert find_resume_checkpoint(tmp_path)[0] == ".old-last"


def test_epoch_sampler_resume_offset_continues_the_same_order():
    full = list(EpochSampler(5, 12, seed=3, rank=1))
    s = EpochSampler(5, 12, seed=3, rank=1)
    s.set_epoch(0, start=7)
    assert list(s) == full[7:] and len(s) == 5
    s.set_epoch(1)
    assert list(s) != full, "another epoch, another order"
    assert sorted(full[:5]) == list(range(5)), "each epoch pass is a permutation"
    with pytest.raises(ValueError):
        s.set_epoch(0, start=13)


class _FakeSaver:
    """Writes a file per save; can fail half-way like a killed process."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "part1").write_text(str(client_state))
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")
        (d / "part2").write_text("done")


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(_FakeSaver(fail=False), tmp_path, "last", {"step": 1})
    assert (tmp_path / "latest").read_text() == "last"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_FakeSaver(fail=True), tmp_path, "last", {"step": 2})
    assert (tmp_path / "last" / "part1").read_text() == "{'step': 1}"
    assert (tmp_path / "last" / "part2").is_file()
    assert find_resume_tag(tmp_path) == "last"
    # The next save clears the half-written temporary directory and replaces the checkpoint.
    save_checkpoint(_FakeSaver(fail=False), tmp_path, "last", {"step": 3})
    assert (tmp_path / "last" / "part1").read_text() == "{'step': 3}"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_weights_fingerprint_sees_a_single_changed_weight():
    model = torch.nn.Linear(4, 3)
    a = weights_fingerprint(model)
    with torch.no_grad():
        model.weight[1, 2] += 1e-3
    assert weights_fingerprint(model) != a
    model.weight.requires_grad_(False)
    assert len(weights_fingerprint(model)) == 3


class _ModuleEngine(_FakeEngine):
    module = torch.nn.Linear(1, 1)


def test_the_epoch_checkpoint_is_written_before_its_validation(tmp_path, monkeypatch):
    import training.trainer as trainer_module

    saved = []
    monkeypatch.setattr(
        trainer_module, "save_checkpoint", lambda engine, d, tag, state, update_latest: saved.append(tag)
    )
    monkeypatch.setattr(trainer_module, "export_trainable", lambda *a, **k: None)
    trainer = Trainer(
        RunConfig().replace(loop={"grad_accumulation_steps": 1}, generation={"max_new_tokens": 4}),
        _ModuleEngine(1.0, global_steps=10), None, None, object(), None,
        DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), None, tmp_path, {},
    )  # fmt: skip

    def failing_validation(step):
        raise RuntimeError("a corrupt validation scene")

    monkeypatch.setattr(trainer, "validate", failing_validation)
    with pytest.raises(RuntimeError, match="corrupt validation scene"):
        trainer.end_of_epoch(0)
    assert saved == ["last"]
