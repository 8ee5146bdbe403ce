"""Trust: nothing executes from a file we read, runs are never mixed, every data problem is found up front."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.check import check_datasets, check_scene
from dataset.lightfield import DEFAULT_LAYOUT
from dataset.scenes import SceneDataset
from tests.conftest import TINY_DS
from training.config import parse_config
from training.run_dir import RunInUseError, RunLock, check_resume_options
from utils.safe_load import UnsafeCheckpointError, verify_deepspeed_checkpoint, verify_torch_file
from utils.views import NEIGHBOURHOODS


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path) -> Path:
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    return path


def test_a_pickle_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "PWNED"
    bad = write_payload(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to load: it asks for posix\.system"):
        verify_torch_file(bad)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(verify_torch_file(good)["w"], torch.arange(3.0))


def test_a_deepspeed_folder_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    tag = tmp_path / "ckpt_model" / "last"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "ds_version": "0.19.8"}, tag / "mp_rank_00_model_states.pt")
    assert verify_deepspeed_checkpoint(tag) == 1
    write_payload(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"optim_states\.pt: refused"):
        verify_deepspeed_checkpoint(tag)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match=r"no DeepSpeed checkpoint files \(\*\.pt\)"):
        verify_deepspeed_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ runs
def test_a_second_live_run_in_the_same_directory_is_stopped(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert first.took_over is None
        with pytest.raises(RunInUseError, match=rf"another run is using this directory \(pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run") as again:  # released cleanly: free again, and nothing to take over
        assert again.took_over is None


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    code = (
        "import sys, time; from training.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"pid {child.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None and f"pid {child.pid}" in lock.took_over
    lock.release()


def test_resuming_with_other_options_is_refused_with_the_differences(tmp_path):
    run = tmp_path / "run"
    base = ["--version", "llava", "--lora_r", "8"]
    assert check_resume_options(run, parse_config(base), resuming=False) == []
    assert check_resume_options(run, parse_config(base), resuming=True) == []
    assert check_resume_options(run, parse_config([*base, "--epochs", "20"]), resuming=True) == []
    changed = parse_config([*base, "--no_caam", "--no_depth", "--lora_r", "16"])
    with pytest.raises(ValueError) as info:
        check_resume_options(run, changed, resuming=True)
    text = str(info.value)
    for line in ("model_options.use_caam: True -> False", "model_options.use_depth: True -> False"):
        assert line in text
    assert "trainable_options.lora_r: 8 -> 16" in text and "--resume_with_changes" in text
    forced = parse_config([*base, "--lora_r", "16", "--resume_with_changes"])
    assert check_resume_options(run, forced, resuming=True) == ["trainable_options.lora_r: 8 -> 16"]
    assert check_resume_options(run, forced, resuming=True) == []  # the accepted options are the record now


# ------------------------------------------------------------------------------------------- pre-flight
@pytest.fixture
def broken_dataset(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny dataset with one problem of each kind in its first val scenes."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    return root


def _val(root: Path) -> SceneDataset:
    return SceneDataset(root, TINY_DS, "val", views=NEIGHBOURHOODS["4"], mode="val", with_disparity=False)


def test_preflight_reports_every_problem_at_once(broken_dataset):
    scenes = _val(broken_dataset)
    dirs = [scenes.scene_path(i) for i in range(len(scenes))]
    assert len(dirs) == 3
    a, b, c = dirs
    # a: a truncated view, a missing view, a view of another size
    data = (a / "5_4.png").read_bytes()
    (a / "5_4.png").write_bytes(data[: len(data) // 3])
    (a / "5_6.png").unlink()
    cv2.imwrite(str(a / "4_5.png"), np.zeros((10, 12, 3), np.uint8))
    # b: integer disparity of a depth camera (mm); c: NaN and an implausible value
    np.save(b / "5_5_disparity.npy", np.full((64, 96), 1000, np.uint16))
    bad = np.zeros((64, 96), np.float32)
    bad[0, 0], bad[1, 1] = np.nan, 500.0
    np.save(c / "5_5_disparity.npy", bad)
    tic = time.perf_counter()
    checked, problems = check_datasets([scenes], need_disparity=True, progress=False)
    assert checked == 3 and time.perf_counter() - tic < 5
    found = {(p.path.name, p.path.parent.name): p.what for p in problems}
    assert "not a decodable image" in found[("5_4.png", a.name)]
    assert found[("5_6.png", a.name)] == "file not found"
    assert "view size (10, 12) differs from the centre view's (64, 96)" in found[("4_5.png", a.name)]
    assert "integer dtype uint16" in found[("5_5_disparity.npy", b.name)]
    assert "1 NaN" in found[("5_5_disparity.npy", c.name)]
    assert len(problems) == 5


def test_preflight_passes_a_clean_dataset_and_names_a_missing_folder(tiny_dataset, tmp_path):
    scenes = _val(tiny_dataset)
    assert check_datasets([scenes], need_disparity=True, progress=False) == (3, [])
    problems = check_scene(tmp_path / "Image99", NEIGHBOURHOODS["4"], DEFAULT_LAYOUT, True)
    assert [p.what for p in problems] == ["light-field scene folder not found"]


def test_resume_keys_cover_what_changes_the_model(tmp_path):
    args = parse_config(["--version", "x"])
    assert check_resume_options(tmp_path, args, resuming=False) == []
    args = args.replace(run={"version": "y"})
    with pytest.raises(ValueError, match=r"version: 'x' -> 'y'"):
        check_resume_options(tmp_path, args, resuming=True)
