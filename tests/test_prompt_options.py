"""--prompt_order and --answer_box: where the visual placeholders go, answers that state the target's box
before [SEG], how both reach the model config, and the protocol an answer_box model is scored with."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dataset.collate import TokenSpec, encode_conversation
from dataset.prompts import BOX_ANSWER_TEMPLATES, build_turns
from dataset.refer_seg import SampleSpec
from model.build import build_lfllm
from model.options import ModelOptions
from tests.conftest import model_batch
from training.evaluate import check_protocol, evaluate
from utils.boxes import box_text, mask_box, parse_box
from utils.conversation import render_segments


@pytest.fixture(scope="module")
def base_with_digits(tmp_path_factory, tiny_dataset):
    """A tiny base whose tokenizer also learnt box coordinates (the shipped base's is trained so)."""
    import json

    from tests.conftest import TINY_DS
    from training.pretrain.tiny_base import write_tiny_base

    refs = json.loads((tiny_dataset / "refer_seg" / TINY_DS / f"{TINY_DS}.json").read_text())
    corpus = [s["sent"] for r in refs for s in r["sentences"]]
    corpus += [f"Sure, [0.{a}0, 0.{b}0, 0.{b}5, 1.00] [SEG]." for a in range(10) for b in range(10)]
    return write_tiny_base(tmp_path_factory.mktemp("digits"), corpus)


def _visual_positions(question: str) -> tuple[int, int, int]:
    return question.index("<depth>"), question.index("<image>"), question.index("segment")


def test_prompt_order_moves_the_placeholders_after_the_request():
    first = build_turns(["the red car"], use_depth=True, use_mm_start_end=False, pack=False)[0][0][0]
    after = build_turns(
        ["the red car"], use_depth=True, use_mm_start_end=False, pack=False, order="expression_first"
    )[0][0][0]
    d, i, s = _visual_positions(first)
    assert d < i < s and first.startswith("<depth>\n<image>\n")
    d, i, s = _visual_positions(after)
    assert s < d < i and after.endswith("\n<depth>\n<image>")
    assert after.replace("\n<depth>\n<image>", "") == first.replace("<depth>\n<image>\n", "")
    packed = build_turns(
        ["a", "b"], use_depth=False, use_mm_start_end=True, pack=True, order="expression_first"
    )[0]
    assert packed[0][0].endswith("\n<im_start><image><im_end>") and "<image>" not in packed[1][0]
    with pytest.raises(ValueError, match="prompt order 'sideways'"):
        build_turns(["a"], use_depth=False, use_mm_start_end=False, pack=False, order="sideways")


def test_box_answers_state_the_box_then_seg_and_keep_the_rng_order():
    boxes = ["[0.10, 0.20, 0.30, 0.40]", "[0.50, 0.50, 1.00, 0.90]"]
    convs = build_turns(["a", "b"], use_depth=False, use_mm_start_end=False, pack=False, boxes=boxes)
    for conv, box in zip(convs, boxes):
        ans = conv[0][1]
        assert ans.index(box) < ans.index("[SEG]") and parse_box(ans) == parse_box(box)
    for seed in range(20):  # random templates in training, each with the box before [SEG]
        ans = build_turns(["a"], use_depth=False, use_mm_start_end=False, pack=False,
                          rng=random.Random(seed), boxes=boxes[:1])[0][0][1]  # fmt: skip
        assert ans in {t.format(box=boxes[0]) for t in BOX_ANSWER_TEMPLATES}
    # the questions drawn are those of a plain model with the same rng (the answers draw after them)
    plain = build_turns(["a", "b"], use_depth=False, use_mm_start_end=False, pack=False, rng=random.Random(3))
    boxed = build_turns(["a", "b"], use_depth=False, use_mm_start_end=False, pack=False, rng=random.Random(3),
                        boxes=boxes)  # fmt: skip
    assert [c[0][0] for c in plain] == [c[0][0] for c in boxed]
    with pytest.raises(ValueError, match="1 boxes for 2 expressions"):
        build_turns(["a", "b"], use_depth=False, use_mm_start_end=False, pack=False, boxes=boxes[:1])


def test_box_answer_is_supervised_and_seg_follows_the_box(base_with_digits):
    _, tok = build_lfllm(base_with_digits["llava"], base_with_digits["sam"], ModelOptions())
    spec = TokenSpec.from_tokenizer(tok, num_visual_tokens=16, model_max_length=512)
    conv = build_turns(["the red vehicle"], use_depth=True, use_mm_start_end=False, pack=False,
                       boxes=["[0.10, 0.20, 0.30, 0.40]"], order="expression_first")[0]  # fmt: skip
    ids, labels = encode_conversation(tok, render_segments("llava_v1", conv), spec)
    supervised = [t for t in labels if t != -100]
    text = tok.decode(supervised)
    assert parse_box(text) == (0.1, 0.2, 0.3, 0.4)
    assert text.index("]") < text.index("[SEG]")
    assert "the red vehicle" in tok.decode(ids[: ids.index(spec.image_id)])  # the request, then the image


def test_options_reach_the_config_and_the_samples(base_with_digits, tiny_base, tiny_dataset):
    torch.manual_seed(0)
    opts = ModelOptions(prompt_order="expression_first", answer_box=True)
    model, tok = build_lfllm(base_with_digits["llava"], base_with_digits["sam"], opts)
    assert model.config.prompt_order == "expression_first" and model.config.answer_box is True
    spec = SampleSpec.from_model_config(model.config)
    assert spec.prompt_order == "expression_first" and spec.answer_box
    batch = model_batch(model, tok, tiny_dataset, n=1)
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = zip(batch["input_ids"], batch["labels"], batch["gt_masks"][0], batch["sentences"][0], strict=True)
    for row, lab, gt, sentence in rows:
        ids = row.tolist()
        answer = tok.decode([t for t in lab.tolist() if t >= 0])
        h, w = gt.shape
        assert parse_box(answer) == parse_box(box_text(mask_box(gt.numpy() > 0), h, w, 0.1))
        assert sentence.rstrip(".") in tok.decode(ids[: ids.index(image_id)])  # expression first
    # the forward runs: one [SEG] per mask, the answer's box tokens carry text loss
    out = model.forward_lf(batch)
    assert [m.shape for m in out["pred_masks"]] == [m.shape for m in batch["gt_masks"]]
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="--prompt_order 'left'"):
        ModelOptions(prompt_order="left")
    # the test fixtures' tokenizer has no digits: answer_box is refused before any sample is built
    plain, plain_tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], opts)
    with pytest.raises(ValueError, match="cannot write box coordinates"):
        model_batch(plain, plain_tok, tiny_dataset, n=1)


def test_answer_box_model_refuses_teacher_forced_scoring(tiny_base):
    model, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(answer_box=True))
    with pytest.raises(ValueError, match="teacher-forced answer would give it the true box"):
        check_protocol(model.config, "teacher_forced")
    check_protocol(model.config, "generated")
    with pytest.raises(ValueError, match="generated"):
        evaluate(model, [], torch.device("cpu"), protocol="teacher_forced", show_progress=False)
    plain, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions())
    check_protocol(plain.config, "teacher_forced")
    with pytest.raises(ValueError, match="unknown eval protocol"):
        check_protocol(plain.config, "oracle")


def test_mask_box_matches_the_mask():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == (3, 2, 9, 5)
    assert box_text(mask_box(m), 10, 20, 0.1) == "[0.10, 0.20, 0.50, 0.50]"


def test_training_an_answer_box_model_with_teacher_forced_validation_stops_before_a_step(
    base_with_digits, tiny_dataset, tmp_path
):
    import train_ds
    from training.config import parse_config
    from utils.distributed import DistInfo

    args = parse_config(
        ["--version", str(base_with_digits["llava"]), "--vision_pretrained", str(base_with_digits["sam"]),
         "--dataset_dir", str(tiny_dataset), "--refer_seg_data", "ref-urbanlf-syn",
         "--val_dataset", "ref-urbanlf-syn|syn|val", "--precision", "fp32", "--answer_box",
         "--log_base_dir", str(tmp_path), "--exp_name", "boxed", "--epochs", "1", "--steps_per_epoch", "2"]
    )  # fmt: skip
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="use --eval_protocol generated"):
        train_ds.run(args, cpu, tmp_path / "boxed")
    assert not (tmp_path / "boxed" / "ckpt_model").exists()


def test_merged_model_keeps_the_options_and_is_scored_on_generated_answers(
    base_with_digits, tiny_dataset, tmp_path, one_torch_thread
):
    import dataclasses
    import json

    import merge_lora_weights_and_save_hf_model as merge_script
    from model.trainable import TrainableOptions, make_trainable
    from training.checkpoint import export_trainable
    from training.config import parse_config
    from training.loaders import build_val_loader

    opts = ModelOptions(prompt_order="expression_first", answer_box=True)
    model, _ = build_lfllm(base_with_digits["llava"], base_with_digits["sam"], opts)
    wrapped = make_trainable(model, TrainableOptions())
    meta = {"version": str(base_with_digits["llava"]), "vision_pretrained": str(base_with_digits["sam"]),
            "model_options": dataclasses.asdict(opts), "trainable_options": dataclasses.asdict(TrainableOptions())}  # fmt: skip
    export_trainable(wrapped, tmp_path / "export", json.loads(json.dumps(meta)))
    out = merge_script.main(["--weight", str(tmp_path / "export"), "--save_path", str(tmp_path / "merged"),
                             "--precision", "fp32"])  # fmt: skip
    merged, tok = build_lfllm(out, None, ModelOptions())
    assert merged.config.prompt_order == "expression_first" and merged.config.answer_box is True
    args = parse_config(["--eval_only", "--version", str(out), "--dataset_dir", str(tiny_dataset),
                       "--val_dataset", "ref-urbanlf-syn|syn|val", "--workers", "0", "--eval_protocol", "generated",
                       "--max_new_tokens", "4"])  # fmt: skip
    loader = build_val_loader(args, merged.config, tok, 0, 1, generated=True)
    first = next(iter(loader))
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = first["input_ids"][0].tolist()
    assert "Can you segment" in tok.decode(ids[: ids.index(image_id)])  # the request, then the image
    metrics = evaluate(merged, [first], torch.device("cpu"), protocol="generated", tokenizer=tok,
                       max_new_tokens=4, show_progress=False)  # fmt: skip
    assert metrics.compute()["All"]["n"] == sum(len(m) for m in first["gt_masks"])
    with pytest.raises(ValueError, match="use --eval_protocol generated"):
        evaluate(merged, [first], torch.device("cpu"), protocol="teacher_forced", show_progress=False)
