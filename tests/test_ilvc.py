"""ILVC answers (``--ilvc``, LIRA's format): the answer and its token positions, the descriptions from the
generator's attributes, the region crop, both [SEG] masks supervised, a training step, the feature cache,
generation stopping at the first [SEG], and chat's "segment, then describe"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import chat
from dataset.collate import TokenSpec, collate_batch
from dataset.errors import AnnotationError
from dataset.prompts import build_turns
from dataset.refer_seg import ReferSegDataset, SampleSpec
from dataset.regions import (
    IlvcSpec,
    RegionDescriber,
    describe,
    region_box,
    region_crop,
    relation_partner,
)
from dataset.scenes import SceneDataset
from model.build import build_lfllm
from model.inference import _answer_ids
from model.lfllm import LFLLMForCausalLM, seg_predictor_positions
from model.losses import dice_per_mask, sigmoid_bce_per_mask
from model.options import ModelOptions
from model.regions import clip_frame_boxes, masked_normalised, sample_boxes
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import TINY_DS
from training.config import RunConfig
from training.features import cached_batch
from training.options import DatasetOptions, LoopOptions, RunOptions
from training.preflight import ilvc_problem
from training.serve import predict
from training.serve.merge import save_merged
from utils.geometry import shortest_side_shape
from utils.tokens import IGNORE_INDEX, REGION_TOKEN
from utils.views import parse_views

CAR = {"category": "car", "colour": "red", "disparity_px": 0.2, "depth_bin": "far", "occlusion": "o-2"}
TREE = {"category": "tree", "colour": "orange", "disparity_px": 1.3, "depth_bin": "near", "occlusion": "no-o"}
BIKE = {"category": "bike", "colour": "blue", "disparity_px": 0.25, "depth_bin": "far", "occlusion": "o-1"}


@pytest.fixture(scope="module")
def region_model(tiny_base):
    torch.manual_seed(0)
    return build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(), region_token=True)


def ilvc_data(
    model, tokenizer, root: Path, share: float = 1.0, crop: str = "centre", **kw
) -> ReferSegDataset:
    """The tiny training split with ILVC answers (``share`` of the one-target expressions)."""
    with_pixels = kw.pop("with_pixels", True)
    scenes = SceneDataset(
        root, TINY_DS, "train", views=parse_views("4"), mode="train", with_pixels=with_pixels
    )
    cfg = model.config
    tokens = TokenSpec.from_tokenizer(tokenizer, cfg.image_seq_length, 512)
    ilvc = IlvcSpec(share, crop, cfg.vision_config.image_size, RegionDescriber(root, [TINY_DS]))
    return ReferSegDataset(
        scenes,
        tokenizer,
        SampleSpec.from_model_config(cfg),
        tokens,
        train=kw.pop("train", True),
        ilvc=ilvc,
        **kw,
    )


# ------------------------------------------------------------------ descriptions
def test_descriptions_from_hand_made_records():
    assert describe(CAR) == "a red car, far away, partly occluded"
    assert describe(TREE) == "an orange tree, close to the camera, fully visible"
    records = {1: CAR, 2: TREE, 3: BIKE}
    # boxes (x, y, w, h): the tree overlaps the car by 6 px, the bike by 8 px but at nearly its depth
    boxes = {1: (10.0, 5.0, 20.0, 10.0), 2: (24.0, 0.0, 10.0, 30.0), 3: (2.0, 0.0, 16.0, 4.0)}
    assert relation_partner(1, boxes, records) == ("behind", TREE)  # 0.2 px < 1.3 px: farther
    assert relation_partner(2, boxes, records) == ("in front of", CAR)
    assert relation_partner(3, boxes, records) is None  # overlaps only the car, 0.05 px apart
    assert describe(CAR, ("behind", TREE)) == "a red car, far away, partly occluded, behind the orange tree"
    wider = {**boxes, 4: (12.0, 0.0, 30.0, 5.0)}  # overlaps the car by 18 px: the stronger partner
    assert relation_partner(1, wider, {**records, 4: TREE}) == ("behind", TREE)
    assert relation_partner(1, {1: boxes[1]}, records) is None


def test_the_describer_reads_the_generators_attributes(tiny_dataset, tmp_path):
    describer = RegionDescriber(tiny_dataset, [TINY_DS])
    ann_id = min(describer.records[TINY_DS])
    text = describer.description(TINY_DS, ann_id // 100, ann_id)
    record = describer.records[TINY_DS][ann_id]
    assert text.startswith(describe(record)) and record["category"] in text
    assert describer.description(TINY_DS, 1, 10**9) is None
    with pytest.raises(AnnotationError, match=r"attributes\.json: missing"):
        RegionDescriber(tmp_path, ["ds"])
    cfg = RunConfig(datasets=DatasetOptions(dataset_dir=str(tmp_path), refer_seg_data="ds", ilvc=0.5))
    assert "attributes.json" in ilvc_problem(cfg) and str(tmp_path) in ilvc_problem(cfg)
    assert (
        ilvc_problem(RunConfig(datasets=DatasetOptions(dataset_dir=str(tmp_path), refer_seg_data="ds")))
        is None
    )


def test_the_options_are_checked():
    with pytest.raises(ValueError, match=r"--ilvc.*share"):
        RunConfig(datasets=DatasetOptions(ilvc=1.5))
    with pytest.raises(ValueError, match="exprs_per_question"):
        RunConfig(datasets=DatasetOptions(ilvc=0.5), loop=LoopOptions(exprs_per_question=2))
    with pytest.raises(ValueError, match="feature_cache"):
        RunConfig(datasets=DatasetOptions(ilvc=0.5, ilvc_crop="caam"), run=RunOptions(feature_cache="c"))
    RunConfig(datasets=DatasetOptions(ilvc=0.5), run=RunOptions(feature_cache="c"))  # centre: served per step
    with pytest.raises(ValueError, match="one expression"):
        build_turns(["a", "b"], use_depth=False, use_mm_start_end=False, pack=False, exprs_per_question=2,
                    ilvc_answers=["x", None])  # fmt: skip


# ------------------------------------------------------------------ the region crop
def test_region_crop_against_a_hand_made_mask():
    rng = np.random.default_rng(0)
    center = rng.integers(1, 255, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 10:18] = 1  # 5 x 8: padded by ceil(0.1 * 8) = 1 -> a 10 x 10 square box
    mask[6, 11] = 0
    assert region_box(mask) == (9, 3, 10)
    crop = region_crop(center, mask, 10)  # 10 px: no resizing
    assert crop.box.tolist() == [9.0, 3.0, 19.0, 13.0]
    inside = mask[3:13, 9:19].astype(bool)
    assert torch.equal(crop.mask, torch.from_numpy(inside))
    want = center[3:13, 9:19] * inside[..., None]
    assert torch.equal(crop.pixels, torch.from_numpy(want.transpose(2, 0, 1).copy()))
    # at the border the box leaves the image: the outside is outside the mask
    corner = np.zeros((20, 30), np.uint8)
    corner[:4, :2] = 1
    left, top, side = region_box(corner)
    assert (left, top, side) == (-2, -1, 6)
    edge = region_crop(center, corner, 6)
    assert edge.mask[1:5, 2:4].all() and int(edge.mask.sum()) == 8
    assert int(edge.pixels[:, 0].sum()) == 0 and region_crop(None, corner, 6).pixels is None
    with pytest.raises(ValueError, match="empty mask"):
        region_crop(center, np.zeros((20, 30), np.uint8), 6)
    # the model's normalisation: the processor's mean (0) outside the mask
    pixels = crop.pixels[None].float() / 255
    normed = masked_normalised(pixels, crop.mask[None], (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    assert torch.all(normed[0][:, ~crop.mask] == 0)
    assert torch.allclose(normed[0, 1][crop.mask], (pixels[0, 1][crop.mask] - 0.4) / 0.25)


def test_the_caam_crop_samples_the_same_box_of_the_aggregated_view():
    image = torch.arange(2 * 3 * 64, dtype=torch.float32).view(2, 3, 8, 8) / 400
    pixels, inside = sample_boxes(image, torch.tensor([[2.0, 2.0, 6.0, 6.0], [-4.0, 0.0, 4.0, 8.0]]), 4)
    assert torch.allclose(pixels[0], image[0, :, 2:6, 2:6], atol=1e-6) and inside[0].all()
    assert not inside[1, :, :2].any() and inside[1, :, 2:].all()  # the box's left half lies outside
    nh, nw = shortest_side_shape(64, 96, 56)
    box = clip_frame_boxes(torch.tensor([[16.0, 8.0, 32.0, 24.0]]), [(64, 96)], 56)
    left = (nw - 56) // 2
    assert torch.allclose(
        box[0], torch.tensor([16 * nw / 96 - left, 8 * nh / 64, 32 * nw / 96 - left, 24 * nh / 64])
    )


# ------------------------------------------------------------------ answers and token positions
def _answer_start(labels: list[int]) -> int:
    return next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)


def test_the_answer_format_and_its_token_positions(region_model, tiny_dataset):
    model, tok = region_model
    data = ilvc_data(model, tok, tiny_dataset)
    plain = ilvc_data(model, tok, tiny_dataset, share=0.0)
    t = model.config.image_seq_length
    seg, region = model.config.seg_token_id, model.config.region_token_id
    sample, raw = data[0], data.scenes[0]
    k = len(sample["sentences"])
    assert sample["masks"].shape[0] == 2 * k  # each mask once per [SEG]
    assert torch.equal(sample["masks"][0::2], sample["masks"][1::2])
    assert sample["region_conv"].tolist() == list(range(k))
    size = model.config.vision_config.image_size
    assert sample["region_pixels"].shape == (k, 3, size, size) and sample["region_masks"].shape == (
        k,
        size,
        size,
    )
    pairs = zip(sample["conversations"], plain[0]["conversations"], strict=True)
    for j, ((ids, labels), (plain_ids, plain_labels)) in enumerate(pairs):
        ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
        segs = (ids_t == seg).nonzero().flatten().tolist()
        run = (ids_t == region).nonzero().flatten()
        assert len(segs) == 2 and len(run) == t  # the region run: one tower's worth of tokens
        assert run.tolist() == list(range(int(run[0]), int(run[0]) + t))  # contiguous
        assert segs[0] < int(run[0]) and int(run[-1]) < segs[1]  # between the two [SEG]s
        assert (labels_t[run] == IGNORE_INDEX).all()  # never predicted
        assert labels_t[segs[0]] == seg and labels_t[segs[1]] == seg  # both [SEG]s are
        between = tok.decode(ids[int(run[-1]) + 1 : segs[1]], skip_special_tokens=True)
        ann_id = raw["ann_ids"][j][0]
        text = data.ilvc.describer.description(TINY_DS, raw["image_id"], ann_id)
        assert " ".join(between.split()) == " ".join(text.split())
        assert (labels_t[int(run[-1]) + 1 : segs[1]] != IGNORE_INDEX).all()  # the description is
        start, plain_start = _answer_start(labels), _answer_start(plain_labels)
        assert ids[:start] == plain_ids[:plain_start]  # the same question: the prompts' draws are unchanged
        assert REGION_TOKEN in tok.decode(ids)
    # the region pixels are the GT-masked crop of the centre view
    crop = region_crop(raw["center"], raw["masks"][0], size)
    assert torch.equal(sample["region_pixels"][0], crop.pixels)
    # validation and prediction keep the plain answer
    val = ilvc_data(model, tok, tiny_dataset, train=False)[0]
    assert "region_conv" not in val and all(
        seg in ids and region not in ids for ids, _ in val["conversations"]
    )
    assert "region_conv" not in plain[0]


def test_both_masks_are_supervised(region_model, tiny_dataset):
    model, tok = region_model
    data = ilvc_data(model, tok, tiny_dataset)
    batch = collate_batch([data[0], data[1]], tok.pad_token_id)
    rows, _ = seg_predictor_positions(batch["input_ids"], model.config.seg_token_id)
    assert len(rows) == sum(len(g) for g in batch["gt_masks"]) == 2 * len(batch["region_conv"])
    with torch.no_grad():
        out = model.forward_lf(batch)
    preds, gts = out["pred_masks"], batch["gt_masks"]
    bce = torch.cat([sigmoid_bce_per_mask(p, g) for p, g in zip(preds, gts)])
    dice = torch.cat([dice_per_mask(p, g) for p, g in zip(preds, gts)])
    # the mean over every slot, the two slots of each answer against the same mask
    assert out["bce_loss"] == pytest.approx(float(bce.mean()), rel=1e-5)
    assert out["dice_loss"] == pytest.approx(float(dice.mean()), rel=1e-5)
    first, second = preds[0][0::2], preds[0][1::2]
    assert not torch.allclose(first, second)  # two states, two predictions, both in the mean
    first_only = torch.cat([sigmoid_bce_per_mask(p[0::2], g[0::2]) for p, g in zip(preds, gts)])
    assert float(bce.mean()) != pytest.approx(float(first_only.mean()))  # the second slot changes the loss


def test_a_training_step_with_ilvc_lowers_the_loss(tiny_base, tiny_dataset, one_torch_thread):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(), region_token=True)
    assert model.config.region_token_id in model.config.new_token_ids
    wrapped = make_trainable(model, TrainableOptions(lora_dropout=0.0))
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    batch = collate_batch([ilvc_data(model, tok, tiny_dataset)[0]], tok.pad_token_id)
    assert len(batch["region_conv"]) >= 1
    losses = []
    for _ in range(8):
        loss = wrapped(lf_batch=batch)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_a_cached_batch_still_carries_the_regions(region_model, tiny_dataset):
    model, tok = region_model
    pixels = ilvc_data(model, tok, tiny_dataset)
    cached = ilvc_data(model, tok, tiny_dataset, with_pixels=False, features=lambda raw: {})
    a, b = pixels[2], cached[2]
    assert torch.equal(a["region_pixels"], b["region_pixels"])  # the centre view, read per step
    batch = collate_batch([a], tok.pad_token_id)
    with torch.no_grad():
        full = model.forward_lf(batch)
        served = model.forward_lf(cached_batch(model, batch))
    assert float(served["loss"]) == pytest.approx(float(full["loss"]), rel=1e-4)


def test_the_caam_crop_trains(region_model, tiny_dataset):
    model, tok = region_model
    batch = collate_batch([ilvc_data(model, tok, tiny_dataset, crop="caam")[0]], tok.pad_token_id)
    assert "region_boxes" in batch and "region_pixels" not in batch
    with torch.no_grad():
        tokens = model.encode_regions(batch)
        out = model.forward_lf(batch)
    assert tokens.shape[:2] == (len(batch["region_conv"]), model.config.image_seq_length)
    assert torch.isfinite(out["loss"])


# ------------------------------------------------------------------ generation and chat
def test_generation_stops_at_the_first_slot():
    row = torch.tensor([5, 9, 7, 9, 2, 0])
    assert _answer_ids(row, 2) == [5, 9, 7, 9]
    assert _answer_ids(row, 2, slots=(9,)) == [5, 9]
    assert _answer_ids(torch.tensor([5, 2, 9]), 2, slots=(9,)) == [5]


def test_chat_segments_then_describes(region_model, tiny_base, tiny_dataset, tmp_path, monkeypatch, capsys):
    model, tok = region_model
    folder = save_merged(model, tok, tiny_base["llava"], tmp_path / "merged", "5GB", {})
    seg_id, region_id = model.config.seg_token_id, model.config.region_token_id
    word = tok.convert_tokens_to_ids(tok.tokenize("car")[0])
    calls = {"n": 0}
    seen = []

    def steer(_module, _inputs, logits):  # first answer token [SEG], then the word, as a trained model might
        logits = logits.clone()
        logits[..., seg_id if calls["n"] == 0 else word] += 1e4
        calls["n"] += 1
        return logits

    original = LFLLMForCausalLM.build_inputs_embeds

    def spy(self, input_ids, conv_image, image_tokens, depth_tokens, region_tokens=None):
        seen.append(
            (int((input_ids == region_id).sum()), None if region_tokens is None else region_tokens.shape)
        )
        return original(self, input_ids, conv_image, image_tokens, depth_tokens, region_tokens)

    monkeypatch.setattr(LFLLMForCausalLM, "build_inputs_embeds", spy)
    decode = LFLLMForCausalLM.predict_masks

    def some_mask(self, *args):  # an untrained head's mask may be empty: give it a region to describe
        masks, scores = decode(self, *args)
        for m in masks:
            m[:, 20:40, 30:60] = 10.0
        return masks, scores

    monkeypatch.setattr(LFLLMForCausalLM, "predict_masks", some_mask)
    real_init = predict.Segmenter.__init__

    def hooked(self, serve):
        real_init(self, serve)
        self.model.lm_head.register_forward_hook(steer)

    monkeypatch.setattr(predict.Segmenter, "__init__", hooked)
    scene = tiny_dataset / "lf" / TINY_DS / "Image7"
    argv = ["--version", str(folder), "--lf_dir", str(scene), "--prompt", "the closest vehicle", "--describe"]
    assert chat.main([*argv, "--out", str(tmp_path / "out"), "--max_new_tokens", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    t = model.config.image_seq_length
    assert "mask:" in printed  # the first [SEG]'s mask was decoded
    spliced = (t, (1, t, model.config.text_config.hidden_size))
    assert spliced in seen, (seen, printed)  # the predicted region's tokens spliced after [SEG]
    line = next(x for x in printed.splitlines() if "description:" in x)
    wanted = tok.decode([word] * 3, skip_special_tokens=True).strip()
    assert line.split("description: ", 1)[1] == wanted  # three more tokens generated after the region


def test_describe_needs_a_model_trained_with_ilvc(tiny_base):
    serve = predict.ServeConfig(
        RunConfig(run=RunOptions(version=str(tiny_base["llava"]), vision_pretrained=str(tiny_base["sam"]))),
        device="cpu",
        describe=True,
    )
    with pytest.raises(ValueError, match=r"--describe.*<region>"):
        predict.Segmenter(serve)


def test_train_ds_with_ilvc_the_cache_and_a_merge(tiny_base, tiny_dataset, tmp_path):
    """End to end: two steps with ILVC answers served beside the feature cache, the generated protocol at the
    epoch's end, and a merge that keeps <region> (the model ``chat.py --describe`` needs)."""
    import merge_lora_weights_and_save_hf_model as merge_script
    from tests.test_train import _args, run_train

    runs = tmp_path / "runs"
    extra = [
        "--ilvc",
        "1",
        "--epochs",
        "1",
        "--steps_per_epoch",
        "2",
        "--feature_cache",
        str(tmp_path / "cache"),
    ]
    extra += ["--eval_protocol", "generated", "--max_new_tokens", "4"]
    run_train(_args(tiny_base, tiny_dataset, runs, "ilvc", *extra))
    record = json.loads((runs / "ilvc" / "run_options.json").read_text())
    assert record["dataset_options"]["ilvc"] == 1.0
    assert json.loads((runs / "ilvc" / "eval.json").read_text())["val_dataset"] == f"{TINY_DS}|syn|val"
    out = tmp_path / "merged"
    export = runs / "ilvc" / "export" / "last" / "trainable.safetensors"
    merge_script.main(["--weight", str(export), "--save_path", str(out), "--precision", "fp32"])
    merged, tok = build_lfllm(out)
    assert merged.config.region_token_id == tok.convert_tokens_to_ids(REGION_TOKEN)
