"""LISA's task mix, the parts that do not depend on a reader: the flags and their clash, the sampler's task
proportions, the mix's groups and flat light fields, the task prompts, ignore pixels in the losses and the
IoU, per-task loss sums, and the truncation of a long VQA answer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset.collate import TokenSpec, encode_conversation
from dataset.prompts import (
    ANSWER_TEMPLATES,
    EXPLAINED_ANSWER,
    REASON_PHRASE_TEMPLATES,
    SEM_SEG_QUESTION_TEMPLATES,
    build_task_turns,
)
from dataset.tasks.mix import TaskMix, flat_light_field
from model.losses import dice_per_mask, sigmoid_bce_per_mask, task_loss_sums
from training.loaders import EpochSampler
from training.options import DatasetOptions, EvalOptions
from training.trainer import task_scalars
from utils.metrics import IGNORE_LABEL, mask_iou_stats
from utils.options import problems

LISA = "sem_seg||refer_seg||vqa||reason_seg"


def test_sample_rates_weight_tasks_or_datasets_and_refuse_the_clash() -> None:
    one = DatasetOptions(refer_seg_data="a||b", sample_rates="3,1")
    assert one.task_weights() == [1.0] and one.sample_weights() == [3.0, 1.0]  # LFLLM's own meaning kept
    mix = DatasetOptions(dataset=LISA, sample_rates="9,3,3,1", refer_seg_data="a||b")
    assert mix.task_weights() == [9.0, 3.0, 3.0, 1.0]
    assert mix.sample_weights() == [1.0, 1.0] and len(mix.dataset_weights("sem_seg")) == 5
    weighted = DatasetOptions(
        dataset=LISA, sample_rates="9,3,3,1", refer_seg_data="a||b", refer_seg_sample_rates="2,1"
    )
    assert weighted.sample_weights() == [2.0, 1.0]
    with pytest.raises(ValueError, match="use --refer_seg_sample_rates '3,1,2'"):
        DatasetOptions(
            dataset="sem_seg||refer_seg", sample_rates="3,1,2", refer_seg_data="a||b||c"
        ).task_weights()
    with pytest.raises(ValueError, match=r"both weight --refer_seg_data .* give one of them"):
        DatasetOptions(
            refer_seg_data="a||b", sample_rates="3,1", refer_seg_sample_rates="1,2"
        ).sample_weights()
    with pytest.raises(ValueError, match="every rate must be a positive number"):
        DatasetOptions(dataset=LISA, sample_rates="9,3,0,1").task_weights()
    assert any("unknown task" in p for p in problems(DatasetOptions(dataset="sem_seg||depth_seg")))
    assert any("named twice" in p for p in problems(DatasetOptions(dataset="vqa||vqa")))
    assert not problems(EvalOptions(val_dataset="ReasonSeg|val"))
    assert EvalOptions(val_dataset="ReasonSeg|val").reasoning and not EvalOptions().reasoning
    assert problems(EvalOptions(val_dataset="a|b|c|d")) and problems(EvalOptions(val_dataset="ReasonSeg|"))


def test_sampler_draws_tasks_by_rate_whatever_their_size() -> None:
    groups = [list(range(0, 100)), list(range(100, 110))]  # a big and a small task
    drawn = list(EpochSampler(110, 4000, seed=0, rank=0, groups=groups, weights=[1.0, 1.0], by_group=True))
    small = sum(i >= 100 for i in drawn) / len(drawn)
    assert abs(small - 0.5) < 0.03  # equal rates: half the samples each, not 10/110
    plain = list(EpochSampler(110, 4400, seed=0, rank=0, groups=groups, weights=[1.0, 1.0]))
    assert sum(i >= 100 for i in plain) == 400  # without by_group: plain permutations (the refer_seg loader)
    nine = list(EpochSampler(110, 4000, seed=0, rank=0, groups=groups, weights=[9.0, 1.0], by_group=True))
    assert abs(sum(i >= 100 for i in nine) / 4000 - 0.1) < 0.02


class _Part(torch.utils.data.Dataset):
    """A task dataset stand-in: ``n`` 2D items of 4 x 6 over ``names`` (item i in group i % len)."""

    def __init__(self, n: int, names: list[str]) -> None:
        self.n, self.names = n, names

    def __len__(self) -> int:
        return self.n

    def group_of(self, index: int) -> int:
        return index % len(self.names)

    def __getitem__(self, index: int) -> dict:
        center = np.full((4, 6, 3), index, dtype=np.uint8)
        return {
            "center": center,
            "views": np.empty((0, 4, 6, 3), np.uint8),
            "offsets": np.empty((0, 2), np.int64),
            "disparity": None,
            "image_id": index,
        }


def test_mix_groups_weights_and_flat_light_fields() -> None:
    mix = TaskMix(
        [("sem_seg", _Part(6, ["ade20k", "cocostuff", "mapillary"])), ("vqa", _Part(4, ["llava"]))],
        task_weights=[3.0, 1.0],
        dataset_weights=[[1.0, 1.0, 2.0], [1.0]],
        offsets=[(0, -1), (0, 1)],
        flat_2d=True,
    )
    groups, weights = mix.groups()
    assert groups == [[0, 3], [1, 4], [2, 5], [6, 7, 8, 9]]
    assert weights == pytest.approx([0.75, 0.75, 1.5, 1.0])  # task rate x the dataset's share of its task
    item = mix[7]
    assert item["task"] == "vqa" and item["image_id"] == 1
    assert item["views"].shape == (2, 4, 6, 3) and (item["views"] == item["center"]).all()
    assert item["disparity"].shape == (4, 6) and not item["disparity"].any()  # flat: disparity 0 everywhere
    assert item["offsets"].tolist() == [[0, -1], [0, 1]]
    plain = flat_light_field(mix.parts[0][1][0], [(0, 1)], with_disparity=False)
    assert plain["disparity"] is None and plain["views"].shape == (1, 4, 6, 3)
    with pytest.raises(IndexError):
        mix[10]
    with pytest.raises(ValueError, match="no training item"):
        TaskMix([("vqa", _Part(0, ["llava"]))], [1.0], [[1.0]])


def test_task_prompts() -> None:
    sem = {"task": "sem_seg", "sentences": ["car", "person"]}
    convs, keep = build_task_turns(sem, use_depth=True, use_mm_start_end=False, pack=False)
    assert keep == [True, True]
    assert convs[0] == [
        ("<depth>\n<image>\n" + SEM_SEG_QUESTION_TEMPLATES[0].format(expr="car"), ANSWER_TEMPLATES[1])
    ]
    reason = {
        "task": "reason_seg",
        "sentences": ["If I walk in, what do I reach first?", "the thing nearest to me"],
        "is_sentence": [True, False],
        "explanations": ["It is the closest object.", None],
    }
    convs, keep = build_task_turns(reason, use_depth=False, use_mm_start_end=False, pack=False)
    assert (
        convs[0][0][0] == "<image>\nIf I walk in, what do I reach first? Please output a segmentation mask."
    )
    assert convs[1][0][0] == "<image>\n" + REASON_PHRASE_TEMPLATES[0].format(expr="the thing nearest to me")
    assert keep == [True, True]  # validation (no rng): never an explanation
    text_only, keep = build_task_turns(
        reason, use_depth=False, use_mm_start_end=False, pack=False, rng=random.Random(0), explanatory=1.0
    )
    assert keep == [False, True] and text_only[0][0][1] == "It is the closest object."
    answers = set()
    for seed in range(40):
        convs, keep = build_task_turns(
            reason,
            use_depth=False,
            use_mm_start_end=False,
            pack=False,
            rng=random.Random(seed),
            explanatory=0.0,
        )
        assert keep == [True, True]
        answers.add(convs[0][0][1])
    assert EXPLAINED_ANSWER.format(explanation="It is the closest object.") in answers
    assert answers & set(ANSWER_TEMPLATES)  # [SEG] with and without the explanation
    none, keep = build_task_turns(
        reason, use_depth=False, use_mm_start_end=False, pack=False, rng=random.Random(0), explanatory=-1.0
    )
    assert keep == [True, True] and all("closest" not in c[0][1] for c in none)
    vqa = {"task": "vqa", "sentences": [], "turns": [("How many cars?", "Two."), ("Is it red?", "Yes.")]}
    convs, keep = build_task_turns(
        vqa, use_depth=True, use_mm_start_end=False, pack=False, order="expression_first"
    )
    assert keep == [] and convs == [[("How many cars?\n<depth>\n<image>", "Two."), ("Is it red?", "Yes.")]]


def test_ignored_pixels_leave_the_losses_and_the_iou() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [IGNORE_LABEL, 1.0]]])
    keep = [(0, 0), (0, 1), (1, 1)]
    by_hand = sum(F.binary_cross_entropy_with_logits(logits[0][p], target[0][p]) for p in keep) / 3
    assert sigmoid_bce_per_mask(logits, target).item() == pytest.approx(by_hand.item(), rel=1e-6)
    p = logits.sigmoid()[0]
    num = 2 * (p[0, 0] + p[1, 1]) / 1000 + 1e-6
    den = (p[0, 0] + p[0, 1] + p[1, 1] + 2) / 1000 + 1e-6
    assert dice_per_mask(logits, target).item() == pytest.approx(1 - (num / den).item(), rel=1e-5)
    plain = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert (
        sigmoid_bce_per_mask(logits, plain).item() == F.binary_cross_entropy_with_logits(logits, plain).item()
    )
    pred = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])  # foreground on three pixels, one of them ignored
    inter, union = mask_iou_stats(pred, target)
    assert (inter.item(), union.item()) == (1.0, 3.0)  # (0,0) hit; (0,1) false positive; (1,1) missed


def test_task_loss_sums_split_the_step_by_task() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(3, 5, 4)
    labels = torch.full((3, 5), -100)
    labels[0, 2:4] = torch.tensor([1, 2])
    labels[1, 3] = 4
    labels[2, 1:5] = torch.tensor([3, 3, 5, 6])
    conv_image = torch.tensor([0, 0, 1])
    preds = [torch.randn(2, 3, 3), torch.zeros(0, 2, 2)]
    gts = [(torch.rand(2, 3, 3) > 0.5).float(), torch.zeros(0, 2, 2)]
    sums = task_loss_sums(
        hidden, labels, head, conv_image, preds, gts, ["sem_seg", "vqa"], ["sem_seg", "refer_seg", "vqa"]
    )
    token_ce = F.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none"
    )
    token_ce = token_ce.view(3, 4)
    assert sums[0, 0].item() == pytest.approx((token_ce[0].sum() + token_ce[1].sum()).item(), rel=1e-5)
    assert sums[0, 1].item() == 3 and sums[2, 1].item() == 4 and not sums[1].any()
    assert sums[0, 2].item() == pytest.approx(sigmoid_bce_per_mask(preds[0], gts[0]).sum().item(), rel=1e-6)
    assert sums[0, 4].item() == 2 and sums[2, 4].item() == 0
    scalars = task_scalars(sums.flatten(), ["sem_seg", "refer_seg", "vqa"], (1.0, 2.0, 0.5))
    assert set(scalars) == {
        f"{t}/{k}" for t in ("sem_seg", "vqa") for k in ("loss", "ce_loss", "bce_loss", "dice_loss")
    }
    assert scalars["vqa/ce_loss"] == pytest.approx(token_ce[2].mean().item(), rel=1e-5)
    assert scalars["vqa/bce_loss"] == 0.0
    expect = scalars["sem_seg/ce_loss"] + 2 * scalars["sem_seg/bce_loss"] + 0.5 * scalars["sem_seg/dice_loss"]
    assert math.isclose(scalars["sem_seg/loss"], expect, rel_tol=1e-6)


class _CharTokenizer:
    """One token per character (ids 10+), so lengths are exact."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> object:
        return type("Enc", (), {"input_ids": [10 + (ord(c) % 50) for c in text]})()


def test_a_long_vqa_answer_is_cut_and_a_question_is_not() -> None:
    spec = TokenSpec(
        bos_id=1,
        pad_id=0,
        image_id=2,
        depth_id=3,
        seg_id=4,
        num_image_tokens=1,
        num_depth_tokens=1,
        model_max_length=20,
    )
    ids, labels = encode_conversation(
        _CharTokenizer(), [("Q: what?", False), ("A long answer indeed.", True)], spec
    )
    assert len(ids) == 20 and labels[-1] != -100  # cut inside the answer, which keeps its start
    with pytest.raises(ValueError, match="drop the end of the question"):
        encode_conversation(_CharTokenizer(), [("A question far too long to fit here.", False)], spec)


def test_a_batch_without_masks_gives_every_trainable_weight_a_gradient(tiny_base, tiny_dataset) -> None:
    """A VQA-only batch has no [SEG]: the mask head still runs (weighted by zero), so the same weights get a
    gradient as for a referring batch -- data-parallel ranks reduce them side by side (ZeRO-2 mismatches
    otherwise)."""
    from dataset.collate import collate_batch
    from dataset.refer_seg import ReferSegDataset, SampleSpec
    from dataset.scenes import SceneDataset
    from model.build import build_lfllm
    from model.options import ModelOptions
    from model.trainable import TrainableOptions, make_trainable
    from tests.conftest import TINY_DS
    from utils.views import parse_views

    torch.manual_seed(0)
    model, tokenizer = build_lfllm(
        tiny_base["llava"],
        tiny_base["sam"],
        ModelOptions(semantic_fusion=True, depth_stream=True),
        torch.float32,
    )
    trainable = make_trainable(model, TrainableOptions(lora_r=4))
    scenes = SceneDataset(tiny_dataset, TINY_DS, "train", views=parse_views("4"), mode="val")
    raw = scenes[0]
    vqa = {**raw, "sentences": [], "masks": raw["masks"][:0], "ref_ids": [], "subsets": [], "no_target": []}
    vqa["turns"] = [("How many objects are there?", "There are three.")]

    class _One(torch.utils.data.Dataset):
        names = (TINY_DS,)

        def __init__(self, item: dict) -> None:
            self.item = item

        def __len__(self) -> int:
            return 1

        def group_of(self, index: int) -> int:
            return 0

        def __getitem__(self, index: int) -> dict:
            return self.item

    cfg = model.config
    spec = SampleSpec.from_model_config(cfg)
    tokens = TokenSpec.from_tokenizer(tokenizer, cfg.image_seq_length, 512)
    refer = {
        **raw,
        "sentences": raw["sentences"][:1],
        "masks": raw["masks"][:1],
        "subsets": raw["subsets"][:1],
    }
    grads = {}
    for task, item in (("refer_seg", refer), ("vqa", vqa)):
        mix = TaskMix([(task, _One(item))], [1.0], [[1.0]], parse_views("4"))
        sample = ReferSegDataset(mix, tokenizer, spec, tokens, train=True)[0]
        assert sample["task"] == task and sample["masks"].shape[0] == (task == "refer_seg")
        trainable.zero_grad(set_to_none=True)
        trainable(lf_batch=collate_batch([sample], tokenizer.pad_token_id))["loss"].backward()
        grads[task] = {n: p.grad.clone() for n, p in trainable.named_parameters() if p.grad is not None}
    # the same weights get a gradient, as data-parallel ranks reducing the two batches side by side need
    assert grads["vqa"].keys() == grads["refer_seg"].keys()
    head = [n for n in grads["vqa"] if "mask_decoder" in n or "fusion" in n or "depth_stream" in n]
    assert head and all(not grads["vqa"][n].any() for n in head)  # the mask head: present, exactly zero
    assert any(grads["refer_seg"][n].any() for n in head)
    assert any(
        g.any() for n, g in grads["vqa"].items() if "lora" in n
    )  # the answer trains the language model
