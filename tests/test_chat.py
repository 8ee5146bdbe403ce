"""chat.py: one-shot, batch and interactive modes on synthetic scenes with a tiny merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import chat
import merge_lora_weights_and_save_hf_model as merge_script
from dataset.disparity import cache as disparity_cache
from dataset.prompts import VAL_ANSWER
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMForCausalLM
from tests.conftest import TINY_DS, model_batch
from tests.test_merge import make_trained_export
from training import predict

H, W = 64, 96  # the tiny dataset's view size


@pytest.fixture(scope="module")
def merged(tiny_base, tmp_path_factory) -> Path:
    export = make_trained_export(tiny_base, tmp_path_factory.mktemp("export"), seed=2)[2]
    out = tmp_path_factory.mktemp("merged")
    return merge_script.main(["--weight", str(export), "--save_path", str(out), "--precision", "fp32"])


@pytest.fixture(scope="module")
def segmenter(merged) -> predict.Segmenter:
    return predict.Segmenter(
        chat.build_parser().parse_args(["--version", str(merged), "--max_new_tokens", "3"])
    )


def _scene(tiny_dataset: Path, image_id: int = 7) -> Path:
    return tiny_dataset / "lf" / TINY_DS / f"Image{image_id}"


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    assert mask.shape == (H, W) and set(np.unique(mask).tolist()) <= {0, 255}
    return mask


def test_one_shot_cli_writes_mask_and_overlay(merged, tiny_dataset, tmp_path, capsys):
    argv = ["--version", merged, "--lf_dir", _scene(tiny_dataset), "--prompt", "the closest vehicle"]
    status = chat.main([str(a) for a in argv] + ["--out", str(tmp_path), "--max_new_tokens", "4"])
    assert status == 0
    _read_mask(tmp_path / "Image7_mask.png")
    over = cv2.imread(str(tmp_path / "Image7_overlay.png"))
    assert over.shape == (H, W, 3)
    assert "[Image7]" in capsys.readouterr().out  # the text answer is printed


def test_generated_seg_mask_matches_teacher_forced(segmenter, tiny_dataset, tmp_path, monkeypatch):
    """With the answer forced to the validation answer, chat's mask is the teacher-forced one: same
    prompts, preprocessing and [SEG] reading as validation."""
    tok, model = segmenter.tokenizer, segmenter.model
    answer_ids = tok(" " + VAL_ANSWER + "</s>", add_special_tokens=False).input_ids
    monkeypatch.setattr(LFLLMForCausalLM, "generate", lambda self, **kw: torch.tensor([answer_ids]))
    batch = model_batch(model, tok, tiny_dataset, split="val", n=1, train=False)
    want = teacher_forced_masks(model, batch)[0][0]
    sentence = batch["sentences"][0][0]
    result = predict.run_one(segmenter, Path(batch["scene_dir"][0]), sentence, tmp_path, "forced")
    assert "[SEG]" in result.text and result.mask_logits is not None
    assert torch.allclose(result.mask_logits, want, atol=1e-4)
    mask = _read_mask(tmp_path / "forced_mask.png")
    assert np.array_equal(mask > 0, (want > 0).numpy())
    center = cv2.imread(str(Path(batch["center_path"][0])))
    over = cv2.imread(str(tmp_path / "forced_overlay.png"))
    changed = (over != center).any(-1)
    assert np.array_equal(changed & (mask == 0), np.zeros_like(changed))  # only mask pixels recoloured


def test_batch_mode_one_mask_per_expression(segmenter, tiny_dataset, tmp_path, monkeypatch):
    expressions = [
        {"scene": "Image7", "sentence": "the person on the left", "id": "person left"},
        {"scene": "Image8", "sentence": "the closest vehicle"},
        {"scene": "Image7", "sentence": "the pole behind the car"},
    ]
    spec = tmp_path / "expr.json"
    spec.write_text(json.dumps(expressions))
    calls = []
    original = predict.Segmenter.answer
    monkeypatch.setattr(
        predict.Segmenter, "answer", lambda self, s: calls.append(s["image_id"]) or original(self, s)
    )
    out = tmp_path / "out"
    results = predict.run_batch(segmenter, tiny_dataset / "lf" / TINY_DS, spec, out)
    assert sorted(calls) == ["Image7", "Image8"]  # each scene encoded once
    names = ["person_left", "Image8_0001", "Image7_0002"]
    assert sorted(r["id"] for r in results) == sorted(names)
    for name in names:
        _read_mask(out / f"{name}_mask.png")
        assert (out / f"{name}_overlay.png").is_file()
    assert len(list(out.glob("*_mask.png"))) == 3
    saved = json.loads((out / "results.json").read_text())
    assert {r["sentence"] for r in saved} == {e["sentence"] for e in expressions}


def test_batch_file_errors_name_the_file(tmp_path):
    spec = tmp_path / "expr.json"
    spec.write_text(json.dumps([{"scene": "Image7"}]))
    with pytest.raises(ValueError, match=r"expr\.json: entry 0 needs non-empty 'scene' and 'sentence'"):
        predict.read_expressions(spec)
    spec.write_text(
        json.dumps([{"scene": "a", "sentence": "x", "id": "k"}, {"scene": "b", "sentence": "y", "id": "k"}])
    )
    with pytest.raises(ValueError, match="used twice"):
        predict.read_expressions(spec)


def test_interactive_loop(segmenter, tiny_dataset, tmp_path, capsys):
    answers = iter([str(_scene(tiny_dataset, 8)), "the closest vehicle", "", "the bike", "q"])
    chat.interactive(segmenter, tmp_path, read=lambda prompt: next(answers))
    _read_mask(tmp_path / "Image8_001_mask.png")
    _read_mask(tmp_path / "Image8_002_mask.png")  # Enter kept the folder
    assert capsys.readouterr().out.count("[Image8_00") >= 2


def test_missing_disparity_and_estimator(segmenter, merged, tiny_dataset, tmp_path, monkeypatch, capsys):
    scene = tmp_path / "Image7"
    shutil.copytree(_scene(tiny_dataset), scene)
    (scene / "5_5_disparity.npy").unlink()
    status = chat.main(
        [
            "--version",
            str(merged),
            "--lf_dir",
            str(scene),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        status == 1
        and "5_5_disparity.npy: disparity file not found" in err
        and "--depth_source estimate" in err
    )
    # with the estimator: its map (the one route, dataset.disparity.cache) is used, no file needed
    monkeypatch.setattr(segmenter, "depth_source", "estimate")
    seen = {}

    def disparity_for_scene(scene_dir, layout, config=None, device="cpu"):
        seen["args"] = (Path(scene_dir), layout.disparity_name)
        return np.zeros((H, W), np.float32)

    monkeypatch.setattr(disparity_cache, "disparity_for_scene", disparity_for_scene)
    predict.run_one(segmenter, scene, "the car", tmp_path / "o", "est")
    assert seen["args"] == (scene, "5_5_disparity.npy")
    _read_mask(tmp_path / "o" / "est_mask.png")


def test_base_llava_dir_needs_sam(tiny_base, tiny_dataset, tmp_path, capsys):
    argv = [
        "--version",
        str(tiny_base["llava"]),
        "--lf_dir",
        str(_scene(tiny_dataset)),
        "--prompt",
        "the pole",
    ]
    argv += ["--out", str(tmp_path), "--max_new_tokens", "2"]
    assert chat.main(argv) == 1
    assert "--vision_pretrained" in capsys.readouterr().err
    assert chat.main([*argv, "--vision_pretrained", str(tiny_base["sam"]), "--name", "base"]) == 0
    _read_mask(tmp_path / "base_mask.png")


def test_conv_type_comes_from_merge_info_unless_given(merged, segmenter, tmp_path):
    assert json.loads((merged / "merge_info.json").read_text())["conv_type"] == "llava_v1"
    assert segmenter.conv_type == "llava_v1"
    info = tmp_path / "merge_info.json"
    assert predict.recorded_conv_type(tmp_path) is None  # not a merged model: the CLI default applies
    info.write_text(json.dumps({"conv_type": "llava_llama_2"}))
    assert predict.recorded_conv_type(tmp_path) == "llava_llama_2"
    info.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"merge_info\.json: not a JSON object"):
        predict.recorded_conv_type(tmp_path)
    # a recorded llama_2 template is used when --conv_type is not given, and the flag still wins
    shutil.copy(merged / "merge_info.json", tmp_path / "keep.json")
    recorded = json.loads((merged / "merge_info.json").read_text()) | {"conv_type": "llava_llama_2"}
    (merged / "merge_info.json").write_text(json.dumps(recorded))
    try:
        args = ["--version", str(merged), "--max_new_tokens", "1"]
        assert predict.Segmenter(chat.build_parser().parse_args(args)).conv_type == "llava_llama_2"
        flagged = predict.Segmenter(chat.build_parser().parse_args([*args, "--conv_type", "llava_v1"]))
        assert flagged.conv_type == "llava_v1" and flagged.spec.conv_type == "llava_v1"
    finally:
        shutil.copy(tmp_path / "keep.json", merged / "merge_info.json")
