"""GRES answers: the [REJ] token and answers with several slots. Exact prompt text; slot positions read in
order; a GRES model's forward decides every slot, trains masks on [SEG] slots only, and learns [REJ] (its
embedding and LM-head rows are new, trainable rows: MLLMSeg's issue #8); a model without [REJ] refuses
no-target expressions."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from dataset.prompts import ANSWER_TEMPLATES, REJ_ANSWER_TEMPLATES, build_turns
from model.build import build_lfllm
from model.lfllm import slot_predictor_positions
from model.losses import mask_losses
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import TINY_DS, model_batch
from utils.tokens import REJ_TOKEN

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_answers_with_rej_and_several_slots() -> None:
    turns = build_turns(
        ["the red car", "the blue bridge", "the pole."],
        use_depth=False,
        use_mm_start_end=False,
        pack=False,
        rejects=[False, True, False],
    )
    assert [a for [(_, a)] in turns] == ["[SEG].", "[REJ].", "[SEG]."]  # the bare slot: no leak
    drawn = build_turns(
        ["a", "b"] * 20,
        use_depth=False,
        use_mm_start_end=False,
        pack=False,
        rejects=[False, True] * 20,
        rng=random.Random(0),
    )
    answers = [a for [(_, a)] in drawn]
    assert set(answers[1::2]) == set(REJ_ANSWER_TEMPLATES) and set(answers[::2]) == set(ANSWER_TEMPLATES)
    assert "[REJ]." in REJ_ANSWER_TEMPLATES and "[SEG]." in ANSWER_TEMPLATES  # the bare slots are trained
    multi = build_turns(
        ["the red car", "the blue bridge", "the pole."],
        use_depth=True,
        use_mm_start_end=False,
        pack=False,
        rejects=[False, True, False],
        exprs_per_question=2,
    )
    (q1, a1), (q2, a2) = multi[0][0], multi[1][0]
    assert q1 == (
        "<depth>\n<image>\nThis is a light field with its disparity map. Can you segment the red car and the "
        "blue bridge in this image?"
    )
    assert a1 == "Sure, the red car: [SEG], the blue bridge: [REJ]."
    assert a2 == "Sure, the pole: [SEG]." and q2.endswith("Can you segment the pole in this image?")
    with pytest.raises(ValueError, match="2 target flags for 3 expressions"):
        build_turns(
            ["a", "b", "c"], use_depth=False, use_mm_start_end=False, pack=False, rejects=[True, False]
        )
    with pytest.raises(ValueError, match="one expression per question"):
        build_turns(
            ["a", "b"],
            use_depth=False,
            use_mm_start_end=False,
            pack=False,
            boxes=["x", "y"],
            exprs_per_question=2,
        )


def test_slots_are_read_in_order() -> None:
    seg, rej = 7, 8
    ids = torch.tensor([[1, 2, seg, 3, rej, 4, seg], [1, rej, 0, 0, 0, 0, 0]])
    rows, cols, rejected = slot_predictor_positions(ids, seg, rej)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [1, 3, 5, 0]
    assert rejected.tolist() == [False, True, False, True]
    rows, cols, rejected = slot_predictor_positions(ids, seg, None)  # a model without [REJ]
    assert cols.tolist() == [1, 5] and not rejected.any()


@pytest.fixture(scope="module")
def gres_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset with the first ref of every scene turned into a no-target ref (gRefCOCO's
    ``ann_id: [-1]``)."""
    root = tmp_path_factory.mktemp("gres") / "data"
    shutil.copytree(tiny_dataset, root)
    path = root / "refer_seg" / TINY_DS / f"{TINY_DS}.json"
    refs = json.loads(path.read_text())
    seen = set()
    for ref in refs:
        if ref["image_id"] not in seen:
            seen.add(ref["image_id"])
            ref.update(ann_id=[-1], category_id=[-1], no_target=True)
    path.write_text(json.dumps(refs))
    return root


def _rej_log_prob(model, batch) -> float:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    image_tokens, depth_tokens, _ = inner.encode_frozen(batch)
    ids = batch["input_ids"]
    hidden = inner.language_hidden(
        inner.build_inputs_embeds(ids, batch["conv_image"], image_tokens, depth_tokens),
        batch["attention_mask"],
    )
    rej = inner.config.rej_token_id
    rows, cols = (ids[:, 1:] == rej).nonzero(as_tuple=True)
    return float(inner.lm_head(hidden[rows, cols]).float().log_softmax(-1)[:, rej].mean().detach())


def test_a_gres_model_decides_every_slot_and_learns_rej(tiny_base, gres_dataset) -> None:
    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(gres=True), torch.float32
    )
    rej = tokenizer.convert_tokens_to_ids(REJ_TOKEN)
    assert model.config.rej_token_id == rej and rej in model.config.new_token_ids
    batch = model_batch(model, tokenizer, gres_dataset, split="train", n=3, train=False)
    flags = batch["no_target"]
    assert any(any(f) for f in flags) and any(not all(f) for f in flags)
    n_rej = int((batch["input_ids"] == rej).sum())
    assert n_rej == sum(sum(f) for f in flags)  # one [REJ] slot per no-target expression
    for masks, f in zip(batch["gt_masks"], flags):
        assert all((m.sum() == 0) == bool(t) for m, t in zip(masks, f))
    out = model(lf_batch=batch)
    assert [len(r) for r in out["pred_rejected"]] == [len(m) for m in batch["gt_masks"]]
    assert all(r.dtype == torch.bool for r in out["pred_rejected"])
    # the mask losses are those of the [SEG] slots alone
    keep = [~torch.tensor(f, dtype=torch.bool) for f in flags]
    bce, dice = mask_losses(
        [p[k] for p, k in zip(out["pred_masks"], keep)], [g[k] for g, k in zip(batch["gt_masks"], keep)]
    )
    assert torch.allclose(out["bce_loss"], bce.detach()) and torch.allclose(out["dice_loss"], dice.detach())
    everything, _ = mask_losses(out["pred_masks"], batch["gt_masks"])
    assert not torch.allclose(everything.detach(), bce.detach())
    wrapped = make_trainable(model, TrainableOptions(lora_r=0))  # the new token rows alone
    before = _rej_log_prob(wrapped, batch)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        loss = wrapped(lf_batch=batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _rej_log_prob(wrapped, batch) > before + 0.5


def test_only_a_gres_model_takes_no_target_expressions(tiny_base, gres_dataset) -> None:
    torch.manual_seed(0)
    model, tokenizer = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(), torch.float32)
    assert model.config.rej_token_id is None and REJ_TOKEN not in tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"name no object .*build it with --gres"):
        model_batch(model, tokenizer, gres_dataset, split="train", n=1, train=True)
    # scored, not trained: its answer to a no-target expression is a [SEG], its mask against the empty target
    batch = model_batch(model, tokenizer, gres_dataset, split="val", n=1, train=False)
    assert int((batch["input_ids"] == model.config.seg_token_id).sum()) == len(batch["no_target"][0])
    # the pre-flight check refuses the training run before any model is built, naming the flag
    from training.config import parse_config
    from training.preflight import gres_problem, train_scenes

    argv = [
        "--version",
        str(tiny_base["llava"]),
        "--dataset_dir",
        str(gres_dataset),
        "--refer_seg_data",
        TINY_DS,
    ]
    cfg = parse_config(argv)
    scenes = train_scenes(cfg, (), with_disparity=False)
    assert "add --gres" in gres_problem(cfg, scenes) and "ann_id [-1]" in gres_problem(cfg, scenes)
    assert gres_problem(parse_config([*argv, "--gres"]), scenes) is None


def test_every_slot_a_rej_still_backpropagates(tiny_base, gres_dataset) -> None:
    """A batch whose every slot is [REJ] has no mask to train: the loss is the answer's alone and
    backward runs (the mask losses stay in the graph as zeros)."""
    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(gres=True), torch.float32
    )
    batch = model_batch(model, tokenizer, gres_dataset, split="train", n=1, train=False)
    keep = [i for i, f in enumerate(batch["no_target"][0]) if f]
    assert keep
    # keep only the conversations of no-target expressions
    rows = torch.tensor(keep)
    for key in ("input_ids", "labels", "attention_mask", "conv_image"):
        batch[key] = batch[key][rows]
    batch["gt_masks"] = [batch["gt_masks"][0][rows]]
    out = model(lf_batch=batch)
    assert float(out["bce_loss"]) == 0.0 and float(out["dice_loss"]) == 0.0
    out["loss"].backward()
    head = model.get_output_embeddings().weight.grad
    assert head is not None and head.abs().sum() > 0  # the answer trains
    decoder = [p.grad for p in model.sam.mask_decoder.parameters()]
    # in the graph (its mask path has a gradient; SAM's IoU head never does), and that gradient is zero
    assert any(g is not None for g in decoder) and all(g is None or not g.any() for g in decoder)


def test_records_score_rejections_by_both_rules() -> None:
    """Hand-made predictions for 3 expressions: a hit, a target wrongly rejected (its drawn mask is exact),
    a no-target expression answered without any slot (a rejection)."""
    from training.evaluate import _records
    from utils.gres_metrics import GresMetrics
    from utils.metrics import SegMetrics

    gt = torch.zeros(3, 2, 4)
    gt[0, :, :2] = 1  # 4 pixels
    gt[1, 0, :] = 1  # 4 pixels
    hit = torch.full((2, 4), -1.0)
    hit[:, :1] = 1.0  # 2 of the 4 pixels: IoU 0.5
    exact = torch.where(gt[1] > 0, 1.0, -1.0)
    batch = {
        "gt_masks": [gt],
        "ds": ["d"],
        "image_id": [1],
        "subsets": [[("val",), ("val",), ("val", "none")]],
        "no_target": [[False, False, True]],
        "sentences": [["a", "b", "c"]],
    }
    preds = [[(hit, 0.9, False), (exact, 0.8, True), (None, None, False)]]
    seg, gres = SegMetrics(), GresMetrics()
    records = _records(batch, preds, seg, gres)
    assert [r["iou"] for r in records[0]] == [0.5, 0.0, 1.0]  # rejected -> empty; no slot -> empty, right
    assert [r["rejected"] for r in records[0]] == [False, True, True]
    assert seg.compute()["All"]["gIoU"] == pytest.approx(1.5 / 3)
    assert gres.compute("gsva")["All"]["gIoU"] == pytest.approx(2.5 / 3)  # the rejected target keeps its 1.0
    assert gres.compute("rela")["All"]["gIoU"] == pytest.approx(1.5 / 3)
    assert gres.compute("rela")["All"]["N-acc"] == 1.0 and gres.compute("rela")["All"]["T-acc"] == 0.5


@pytest.mark.parametrize("protocol", ["teacher_forced", "generated"])
def test_a_gres_model_evaluates_every_expression(tiny_base, gres_dataset, protocol) -> None:
    from dataset.collate import TokenSpec, collate_batch
    from dataset.refer_seg import ReferSegDataset, SampleSpec
    from dataset.scenes import SceneDataset
    from training.evaluate import evaluate
    from utils.gres_metrics import GresMetrics

    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(gres=True), torch.float32
    )
    scenes = SceneDataset(gres_dataset, TINY_DS, "val", mode="val")
    tokens = TokenSpec.from_tokenizer(tokenizer, model.config.image_seq_length, 512)
    data = ReferSegDataset(
        scenes,
        tokenizer,
        SampleSpec.from_model_config(model.config),
        tokens,
        train=False,
        with_answers=protocol == "teacher_forced",
    )
    loader = [collate_batch([data[i]], tokenizer.pad_token_id) for i in range(len(data))]
    gres = GresMetrics()
    metrics = evaluate(
        model,
        loader,
        torch.device("cpu"),
        protocol=protocol,
        tokenizer=tokenizer,
        max_new_tokens=4,
        show_progress=False,
        gres=gres,
    )
    refs = [r for s in scenes.scenes for r in s.refs]
    n = sum(len(r.sentences) for r in refs)
    assert len(metrics) == n and len(gres) == n and metrics.gres is gres
    assert (
        gres.compute("gsva")["All"]["n_no_target"] == sum(len(r.sentences) for r in refs if r.no_target) > 0
    )
    assert "rejected" in metrics.expressions()[0]


def test_generated_answers_decode_every_slot_in_order(tiny_base, gres_dataset) -> None:
    """A written answer with three slots gives three masks in its order, the [REJ] one flagged; a slot
    written inside the prompt (an expression quoting "[SEG]") is not an answer slot."""
    from dataset.collate import TokenSpec, collate_batch
    from dataset.refer_seg import ReferSegDataset, SampleSpec
    from dataset.scenes import SceneDataset
    from model.inference import _masks_for_sequences

    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(gres=True), torch.float32
    )
    model.eval()
    scenes = SceneDataset(gres_dataset, TINY_DS, "val", mode="val")
    tokens = TokenSpec.from_tokenizer(tokenizer, model.config.image_seq_length, 512)
    data = ReferSegDataset(
        scenes, tokenizer, SampleSpec.from_model_config(model.config), tokens, train=False, with_answers=False
    )
    batch = collate_batch([data[0]], tokenizer.pad_token_id)
    length = int(batch["attention_mask"][0].sum())
    prompt = batch["input_ids"][0, :length]
    answer = tokenizer("Sure, a: [SEG], b: [REJ], c: [SEG].", add_special_tokens=False, return_tensors="pt")
    full = torch.cat([prompt, answer.input_ids[0]])
    with torch.no_grad():
        image_tokens, depth_tokens, visual = model.encode_frozen(batch)
        slots = _masks_for_sequences(
            model,
            [full, prompt],
            [0, 0],
            image_tokens,
            depth_tokens,
            visual,
            batch,
            tokenizer.pad_token_id,
            [length, length],
        )
    assert [s.rejected for s in slots[0]] == [False, True, False] and slots[1] == []
    h, w = batch["original_hw"][0]
    assert all(s.mask_logits.shape == (h, w) for s in slots[0])
    assert not torch.equal(slots[0][0].mask_logits, slots[0][2].mask_logits)  # each slot its own state


def test_gres_stage_from_a_merged_model_trains_merges_and_scores(tiny_merged, gres_dataset, tmp_path) -> None:
    """MLLMSeg's GRES stage: a merged one-target model given --gres gains [REJ], trains on the GRES data with
    train_ds.py, merges (its merged base named by the export) and is scored with the GRES table."""
    import merge_lora_weights_and_save_hf_model as merge_script
    from tests.test_train import run_train

    runs = tmp_path / "runs"
    common = [
        "--dataset_dir",
        str(gres_dataset),
        "--val_dataset",
        f"{TINY_DS}|syn|val",
        "--log_base_dir",
        str(runs),
    ]
    args = [
        "--version", str(tiny_merged), "--gres", "--refer_seg_data", TINY_DS, *common, "--exp_name", "stage2",
        "--precision", "fp32", "--workers", "0", "--batch_size", "1", "--grad_accumulation_steps", "1",
        "--epochs", "1", "--steps_per_epoch", "2", "--lr", "1e-3", "--warmup_steps", "0",
        "--no_gradient_checkpointing",
    ]  # fmt: skip
    out = run_train(args)
    assert "GRES (both rules)" in out and "N-acc" in out
    with pytest.raises(AssertionError, match="add --gres"):  # without the flag: refused before training
        run_train([*(a for a in args if a != "--gres"), "--exp_name", "x"])  # the last --exp_name counts
    merged = merge_script.main(
        [
            "--weight",
            str(runs / "stage2" / "export" / "last"),
            "--save_path",
            str(tmp_path / "m"),
            "--precision",
            "fp32",
        ]
    )
    model, tokenizer = build_lfllm(merged)
    assert model.config.gres and model.config.rej_token_id == tokenizer.convert_tokens_to_ids(REJ_TOKEN)
    base, _ = build_lfllm(tiny_merged)
    assert model.get_input_embeddings().weight.shape[0] == base.get_input_embeddings().weight.shape[0] + 1
    evaluated = run_train(
        ["--version", str(merged), "--eval_only", *common, "--exp_name", "ev", "--workers", "0"]
    )
    assert "GRES baselines" in evaluated
    record = json.loads((runs / "ev" / "eval.json").read_text())
    assert (
        set(record["gres"]["rules"]) == {"gsva", "rela"}
        and record["gres"]["rules"]["rela"]["All"]["n_no_target"] > 0
    )


def test_several_expressions_per_question_train_slot_by_slot(tiny_base, gres_dataset) -> None:
    """--exprs_per_question 2: one question per two expressions, one slot each in order; the forward matches
    every slot to its mask and trains."""
    import dataclasses

    from dataset.collate import TokenSpec, collate_batch
    from dataset.refer_seg import ReferSegDataset, SampleSpec
    from dataset.scenes import SceneDataset

    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(gres=True), torch.float32
    )
    scenes = SceneDataset(gres_dataset, TINY_DS, "train", mode="train", num_classes_per_sample=3)
    spec = dataclasses.replace(SampleSpec.from_model_config(model.config), exprs_per_question=2)
    tokens = TokenSpec.from_tokenizer(tokenizer, model.config.image_seq_length, 512)
    data = ReferSegDataset(scenes, tokenizer, spec, tokens, train=True)
    batch = collate_batch([data[i] for i in range(2)], tokenizer.pad_token_id)
    per_scene = [len(s) for s in batch["sentences"]]
    assert len(batch["input_ids"]) == sum((k + 1) // 2 for k in per_scene)  # ceil(k / 2) questions a scene
    slots = (batch["input_ids"] == model.config.seg_token_id) | (
        batch["input_ids"] == model.config.rej_token_id
    )
    assert int(slots.sum()) == sum(per_scene)
    rej = int((batch["input_ids"] == model.config.rej_token_id).sum())
    assert rej == sum(sum(f) for f in batch["no_target"])
    out = model(lf_batch=batch)
    assert torch.isfinite(out["loss"]) and [len(r) for r in out["pred_rejected"]] == per_scene


def test_chat_and_demo_say_no_such_object_for_rej(tmp_path) -> None:
    """A [REJ] answer: chat writes an empty mask and says so, the demo's score line says so; the decoder's
    mask for the slot (kept for the GSVA rule) is not shown."""
    import cv2
    import numpy as np

    from model.inference import Generated, Slot
    from training.serve.demo import score_text
    from training.serve.predict import _report, result_images, write_result

    drawn = torch.full((6, 8), 5.0)  # what the decoder drew for the [REJ] slot: everything
    rej = Generated([1, 2], "[REJ].", drawn, 0.9, [Slot(drawn, 0.9, True)], rejected=True)
    seg = Generated([1, 2], "[SEG].", drawn, 0.9, [Slot(drawn, 0.9, False)])
    rgb = np.zeros((6, 8, 3), np.uint8)
    mask, _, scores = result_images(rgb, "the blue bridge", rej)
    assert not mask.any() and scores is None
    assert result_images(rgb, "the car", seg)[0].all()
    assert score_text(rej) == ("no such object: the model answered [REJ]", None)
    center = tmp_path / "c.png"
    cv2.imwrite(str(center), rgb)
    written = write_result(tmp_path / "out", "q", str(center), rej, "the blue bridge")
    said = []
    _report("q", rej, written, said.append)
    assert said[1].startswith("[q] no such object ([REJ]): wrote an empty mask")
    assert not cv2.imread(str(written.mask_path), cv2.IMREAD_GRAYSCALE).any()
