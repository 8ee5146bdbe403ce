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
from dataset.disparity import cache as disparity_cache
from dataset.prompts import VAL_ANSWER
from dataset.single_scene import SceneQuery
from model.inference import teacher_forced_scored
from model.lfllm import LFLLMForCausalLM
from tests.conftest import TINY_DS, model_batch
from training.serve import predict

H, W = 64, 96  # the tiny dataset's view size


@pytest.fixture(scope="module")
def merged(tiny_merged) -> Path:
    return tiny_merged


@pytest.fixture(scope="module")
def segmenter(merged) -> predict.Segmenter:
    return predict.Segmenter(chat.serve_config(["--version", str(merged), "--max_new_tokens", "3"]))


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
    assert max(over.shape[:2]) >= 512 and over.shape[1] > 2 * W * 5  # enlarged view + disparity beside
    assert "[Image7]" in capsys.readouterr().out  # the text answer is printed


def test_generated_seg_mask_matches_teacher_forced(segmenter, tiny_dataset, tmp_path, monkeypatch):
    """With the answer forced to the validation answer, chat's mask and SAM IoU are the teacher-forced
    ones: same prompts, preprocessing and [SEG] reading as validation."""
    tok, model = segmenter.tokenizer, segmenter.model
    answer_ids = tok(" " + VAL_ANSWER + "</s>", add_special_tokens=False).input_ids
    monkeypatch.setattr(LFLLMForCausalLM, "generate", lambda self, **kw: torch.tensor([answer_ids]))
    batch = model_batch(model, tok, tiny_dataset, split="val", n=1, train=False)
    masks, ious, _ = teacher_forced_scored(model, batch)
    want = masks[0][0]
    sentence = batch["sentences"][0][0]
    result = predict.run_one(segmenter, Path(batch["scene_dir"][0]), sentence, tmp_path, "forced")
    assert "[SEG]" in result.text and result.mask_logits is not None
    assert torch.allclose(result.mask_logits, want, atol=1e-4)
    assert result.sam_iou == pytest.approx(float(ious[0][0]), abs=1e-4)
    mask = _read_mask(tmp_path / "forced_mask.png")
    assert np.array_equal(mask > 0, (want > 0).numpy())


@pytest.mark.parametrize("batch_size, forwards", [(4, [["Image7", "Image8"]]), (1, [["Image7"], ["Image8"]])])
def test_batch_mode_one_mask_per_expression(
    segmenter, tiny_dataset, tmp_path, monkeypatch, batch_size, forwards
):
    expressions = [
        {"scene": "Image7", "sentence": "the person on the left", "id": "person left"},
        {"scene": "Image8", "sentence": "the closest vehicle"},
        {"scene": "Image7", "sentence": "the pole behind the car"},
    ]
    spec = tmp_path / "expr.json"
    spec.write_text(json.dumps(expressions))
    calls = []
    original = predict.Segmenter.answer_batch
    monkeypatch.setattr(
        predict.Segmenter,
        "answer_batch",
        lambda self, s: calls.append([x["image_id"] for x in s]) or original(self, s),
    )
    out = tmp_path / "out"
    results = predict.run_batch(segmenter, tiny_dataset / "lf" / TINY_DS, spec, out, batch_size)
    assert calls == forwards  # batch_size scenes per forward, each scene encoded once
    names = ["person_left", "Image8_0001", "Image7_0002"]
    assert sorted(r["id"] for r in results) == sorted(names)
    for name in names:
        _read_mask(out / f"{name}_mask.png")
        assert max(cv2.imread(str(out / f"{name}_overlay.png")).shape[:2]) >= 512
    assert len(list(out.glob("*_mask.png"))) == 3
    saved = json.loads((out / "results.json").read_text())
    assert {r["sentence"] for r in saved} == {e["sentence"] for e in expressions}
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == saved
    for line in lines:
        assert line["time_s"] > 0 and line["mask"] == f"{line['id']}_mask.png"
        if line["has_seg"]:
            assert 0.0 <= line["score"] <= 1.0 and set(line["scores"]) == {
                "sam_iou",
                "confidence",
                "stability",
            }
        else:
            assert line["score"] is None


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
        assert predict.Segmenter(chat.serve_config(args)).conv_type == "llava_llama_2"
        flagged = predict.Segmenter(chat.serve_config([*args, "--conv_type", "llava_v1"]))
        assert flagged.conv_type == "llava_v1" and flagged.spec.conv_type == "llava_v1"
    finally:
        shutil.copy(tmp_path / "keep.json", merged / "merge_info.json")


def test_batched_generation_matches_one_conversation_at_a_time(segmenter, tiny_dataset, monkeypatch):
    """generate_masks runs all conversations of a 2-scene batch (prompts of different lengths) in one
    left-padded generate and one right-padded mask forward: the same answers as one conversation per call,
    and, with answers forced (two with [SEG] at different places, one without), the same masks and IoUs."""
    queries = [
        SceneQuery(_scene(tiny_dataset, 7), ("the closest vehicle", "the pole behind the car on the left")),
        SceneQuery(_scene(tiny_dataset, 8), ("the bike",)),
    ]
    data = segmenter.dataset(queries)
    singles = [(q.scene_dir, s) for q in queries for s in q.sentences]

    def one(scene_dir, sentence):
        return segmenter.answer(segmenter.dataset([SceneQuery(scene_dir, (sentence,))])[0])[0]

    together = [g for per_scene in segmenter.answer_batch([data[0], data[1]])[1] for g in per_scene]
    assert [g.token_ids for g in together] == [one(*q).token_ids for q in singles]

    tok = segmenter.tokenizer
    forced = [
        tok(" " + VAL_ANSWER + "</s>", add_special_tokens=False).input_ids,
        tok(" [SEG] .</s>", add_special_tokens=False).input_ids,
        tok(" no</s>", add_special_tokens=False).input_ids,
    ]
    longest = max(map(len, forced))
    rows = torch.tensor([a + [tok.pad_token_id] * (longest - len(a)) for a in forced])
    queue = []

    def fake_generate(self, **kw):
        n = kw["inputs_embeds"].shape[0]
        return rows if n == len(forced) else torch.tensor([forced[queue.pop(0)]])

    monkeypatch.setattr(LFLLMForCausalLM, "generate", fake_generate)
    together = [g for per_scene in segmenter.answer_batch([data[0], data[1]])[1] for g in per_scene]
    assert [g.mask_logits is None for g in together] == [False, False, True]
    for n, q in enumerate(singles):
        queue.append(n)
        alone = one(*q)
        assert together[n].token_ids == alone.token_ids == forced[n][:-1]
        if alone.mask_logits is not None:
            assert torch.allclose(together[n].mask_logits, alone.mask_logits, atol=1e-4)
            assert together[n].sam_iou == pytest.approx(alone.sam_iou, abs=1e-5)
