"""Every flag acts or is refused, and a user error ends with one message: tried as a new user would."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ds
from dataset.scenes import SceneDataset
from model.build import OptionMismatchError, build_lfllm
from model.options import ModelOptions
from tests.conftest import TINY_DS
from training.config import parse_args, parse_config
from training.loaders import EpochSampler, build_val_loader, scene_layouts
from training.preflight import check_main, preflight
from utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _args(base, data, *extra):
    return parse_config(
        ["--version", str(base["llava"]), "--vision_pretrained", str(base["sam"]), "--dataset_dir", str(data),
         "--refer_seg_data", TINY_DS, "--val_dataset", f"{TINY_DS}|syn|val", "--precision", "fp32", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("split", ["person", "Val"])
@pytest.mark.parametrize("eval_only", [False, True])
def test_a_split_that_selects_nothing_stops_before_training_listing_what_exists(
    tiny_base, tiny_dataset, split, eval_only
):
    args = _args(
        tiny_base, tiny_dataset, "--val_dataset", f"{TINY_DS}|syn|{split}", *(["--eval_only"] * eval_only)
    )
    with pytest.raises(ValueError) as info:
        preflight(args, train=not eval_only, is_main=True)
    text = str(info.value)
    assert f"split {split!r} selects 0 expressions in {TINY_DS}" in text
    assert "train, val, no-o" in text


def test_an_empty_or_original_format_version_is_named_before_anything_is_built(tiny_dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"empty is empty: expected an HF LLaVA directory \(config\.json"
    ):
        build_lfllm(empty, "sam.pth")
    original = tmp_path / "llava-v1.5-7b"
    original.mkdir()
    (original / "config.json").write_text(
        json.dumps(
            {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_vision_tower": "clip"}
        )
    )
    with pytest.raises(
        ValueError, match=r"original-format LLaVA checkpoint .*scripts/convert_llava_to_hf\.py"
    ):
        build_lfllm(original, "sam.pth")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', expected 'llava' or 'lfllm'"):
        build_lfllm(other, "sam.pth")


def test_flags_that_disagree_with_the_sam_or_a_merged_model_are_refused(tiny_base, tmp_path):
    with pytest.raises(OptionMismatchError, match=r"--image_size: 1024 given, but the SAM in .* has 256"):
        build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(image_size=1024), given={"image_size"})
    with pytest.raises(OptionMismatchError, match=r"--out_dim: 256 given, but the SAM in .* has 32"):
        build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(), given={"out_dim"})
    # defaults yield to the weights: the reference's 1024 / 256 with a tiny SAM is not an error
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions())
    assert model.config.out_dim == 32 and model.config.sam_config["img_size"] == 256
    merged = tmp_path / "merged"
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    shutil.copy(Path(tiny_base["llava"]) / "preprocessor_config.json", merged)
    (merged / "merge_info.json").write_text(json.dumps({"vision_pretrained": str(tiny_base["sam"])}))
    no_lf = ModelOptions(use_caam=False, use_depth=False)
    with pytest.raises(OptionMismatchError) as info:
        build_lfllm(merged, None, no_lf, given={"use_caam", "use_depth"})
    assert "--caam: --no_caam given, but the merged model" in str(info.value) and "has --caam" in str(
        info.value
    )
    assert "--depth: --no_depth given" in str(info.value)
    other_sam = tmp_path / "other_sam.pth"
    shutil.copy(tiny_base["sam"], other_sam)
    with pytest.raises(OptionMismatchError, match=r"--vision_pretrained .*holds its own SAM"):
        build_lfllm(merged, other_sam, given={"vision_pretrained"})
    same, _ = build_lfllm(merged, tiny_base["sam"], given={"vision_pretrained"})  # the SAM it was merged from
    assert same.config.use_caam


def test_start_epoch_and_bad_sample_rates_are_refused(capsys):
    for argv, message in (
        (["--start_epoch", "3"], "--start_epoch 3: the epoch a run continues from comes from its checkpoint"),
        (["--refer_seg_data", "a||b", "--sample_rates", "3,1,1"], "3 rates for 2 datasets"),
        (["--sample_rates", "0"], "every rate must be a positive number"),
        (["--epochs", "0"], "--epochs 0: must be >= 1"),
        (["--depth_range", "0,0"], "lo must be < hi"),
        (["--caam_views", "5_5"], "is the centre view"),
        (["--lf_dir_pattern", "scenes/{id}"], "must contain {image_id}"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_sample_rates_weight_the_datasets():
    groups = [list(range(0, 10)), list(range(10, 12))]
    picks = list(EpochSampler(12, 4000, seed=0, rank=0, groups=groups, weights=[1.0, 3.0]))
    share = sum(i >= 10 for i in picks) / len(picks)
    assert 0.72 < share < 0.78  # 3/4 of the draws from the second dataset, though it has 2 of 12 scenes
    second = [i for i in picks if i >= 10]
    assert all(set(second[k : k + 2]) == {10, 11} for k in range(0, len(second) - 1, 2))  # permutation stream
    plain = EpochSampler(12, 24, seed=0, rank=0, groups=groups, weights=[2.0, 2.0])
    assert sorted(list(plain)[:12]) == list(range(12))  # equal rates: the plain permutations


def test_the_release_layout_reads_as_is(tiny_base, tiny_dataset, tmp_path):
    """Scenes under images/urbanlf/syn/val/new/Image<id>/ and the disparity under another name."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "refer_seg", data / "refer_seg")
    scenes = data / "images" / "urbanlf" / "syn" / "val" / "new"
    shutil.copytree(tiny_dataset / "lf" / TINY_DS, scenes)
    for d in scenes.iterdir():
        (d / "5_5_disparity.npy").rename(d / "5_5_disparity_OAVC.npy")
    flags = ["--lf_dir_pattern", "images/urbanlf/syn/val/new/Image{image_id}",
             "--disparity_name", f"{TINY_DS}=5_5_disparity_OAVC.npy"]  # fmt: skip
    args = _args(tiny_base, data, *flags)
    assert preflight(args, train=True, is_main=True)["scenes_checked"] == 9
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions())
    batch = next(iter(build_val_loader(args, model.config, tok, 0, 1)))
    assert batch["scene_dir"][0].startswith(str(scenes)) and batch["clip_disparity"].shape[0] == 1
    # without the flags: the default layout is not there, and the check says so
    assert (
        check_main(
            [
                "--dataset_dir",
                str(data),
                "--refer_seg_data",
                TINY_DS,
                "--no_caam",
                "--no_depth",
                "--version",
                "x",
            ]
        )
        == 1
    )


def test_a_refcoco_style_refs_pickle_trains_through_the_same_code(tiny_base, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    root = data / "refer_seg" / TINY_DS
    refs = json.loads((root / f"{TINY_DS}.json").read_text())
    with (root / "refs(unc).p").open("wb") as fh:
        pickle.dump(refs, fh)
    (root / f"{TINY_DS}.json").unlink()
    args = _args(tiny_base, data, "--val_dataset", f"{TINY_DS}|unc|val")
    train = SceneDataset(data, TINY_DS, "train", views=(), **scene_layouts(args.data, TINY_DS))
    assert len(train) == 6 and train.annotations[0].refs_path.name == "refs(unc).p"
    assert preflight(args, train=True, is_main=True)["scenes_checked"] == 9
    (root / "refs(google).p").write_bytes((root / "refs(unc).p").read_bytes())
    with pytest.raises(ValueError, match=r"several REFER files \(splitBy google, unc\)"):
        SceneDataset(data, TINY_DS, "train", views=())
    named = SceneDataset(
        data, f"{TINY_DS}(google)", "train", views=(), **scene_layouts(args.data, f"{TINY_DS}(google)")
    )
    assert named.annotations[0].refs_path.name == "refs(google).p"


def test_integer_or_implausible_disparity_is_refused_when_read(tmp_path):
    from dataset.errors import LightFieldError
    from dataset.lightfield import read_disparity

    for array, message in (
        (np.ones((4, 5), np.int64), "integer dtype int64"),
        (np.full((4, 5), 2000, np.uint16), "integer dtype uint16"),
        (np.full((4, 5), 40.0, np.float32), "beyond the plausible 32 px"),
    ):
        np.save(tmp_path / "d.npy", array)
        with pytest.raises(LightFieldError, match=message):
            read_disparity(tmp_path / "d.npy", (4, 5))


def _clean_env() -> dict[str, str]:
    """This process's environment without the process-group variables in-process tests may have set."""
    group = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in group}


def test_under_the_command_line_a_user_error_is_one_line_not_a_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "train_ds.py", "--version", str(empty), "--log_base_dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**_clean_env(), "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --version ") and "is empty" in last


def test_a_run_in_a_locked_directory_stops(tiny_base, tiny_dataset, tmp_path):
    from training.run_dir import RunInUseError, RunLock

    args = _args(
        tiny_base, tiny_dataset, "--log_base_dir", str(tmp_path), "--exp_name", "busy", "--eval_only"
    )
    with (
        RunLock(tmp_path / "busy"),
        pytest.raises(RunInUseError, match="another run is using this directory"),
    ):
        train_ds.run(args, CPU, tmp_path / "busy")
