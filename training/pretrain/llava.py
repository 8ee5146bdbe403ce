"""Stages "vision", "caption" and "instruct" of the tiny-base pretraining: CLIP and LLaVA's two stages in
miniature.

* ``vision`` (standing in for CLIP's own pretraining): the vision tower alone, with a linear head on the
  layer LLaVA reads (``vision_feature_layer``), learns the dense (category, colour) content of every
  patch (soft targets: the label histogram of the patch) and the patch's own position. The head is
  dropped afterwards.
* ``caption`` (LLaVA's feature alignment): image -> a caption naming every object left to right.
* ``instruct`` (LLaVA-1.5's instruction tuning with its REC/REG data): "Please give the bounding box of
  the red car behind the tree." -> ``[0.12, 0.40, 0.30, 0.75]``; "What is the object at [box]?" -> "the
  red vehicle."; "Which objects are in the image, from left to right?" -> the list.

The last two train the HF ``LlavaForConditionalGeneration`` on the answer tokens only (the project's own
conversation template and placeholder expansion, as fine-tuning uses them). In miniature there is no
contrastive CLIP and no text-pretrained LM to start from, so in the shipped recipe the vision tower and
the LM train in both LLaVA stages (LLaVA freezes CLIP and, in stage 1, the LM). The options of
:class:`LlavaStageOptions` give the recipe that grounds better (docs/RESULTS.md): a position term in the
vision stage, CLIP frozen afterwards, the expression before the image, coarse boxes. Samples come from a
pool of pretraining scenes rendered once; batches are a function of ``(seed, stage, step)`` so a resumed stage continues exactly.
Held-out score: greedy-decoded REC boxes on held-out scenes, accuracy at box IoU >= 0.5 and mean IoU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from dataset.collate import TokenSpec, encode_conversation
from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.pretrain import (
    HELD_OUT_START,
    NUM_PATCH_CLASSES,
    REC_QUESTIONS,
    PretrainScene,
    caption_pair,
    grounding_pair,
    label_map,
    pretrain_scene,
)
from dataset.transforms import clip_geometry
from training.pretrain.state import StageRun, cosine_lr
from utils.boxes import parse_box
from utils.conversation import render_segments
from utils.tokens import IGNORE_INDEX, IMAGE_TOKEN

STAGES = ("vision", "caption", "instruct")


@dataclass(frozen=True)
class LlavaStageOptions:
    """Settings of one LLaVA stage."""

    steps: int
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 500
    held_out: int = 64
    ckpt_every: int = 50
    position_weight: float = 0.0
    """Vision stage: weight of the patch-position term of :func:`patch_loss`. 0 (content only) is the
    recipe of the shipped base; 1 makes every token's x position decodable (docs/RESULTS.md) but did not,
    on its own, make the tiny LM ground within the shipped schedule."""
    train_vision: bool = True
    """Caption / instruct: train the vision tower with the LM (the shipped recipe). False freezes it, as
    LLaVA does; that keeps the position the vision stage taught (docs/RESULTS.md, the REC probes)."""
    image_first: bool = True
    """Caption / instruct: ``<image>`` before the question (LLaVA's order); False puts it after."""
    box_step: float = 0.01
    """Instruct: grid of the box coordinates (0.01: LLaVA-1.5's 2 decimals; 0.1: 11 values, grown outwards)."""


@dataclass
class ScenePool:
    """Pretraining scenes rendered once: CLIP crops ``pixels`` (N, 3, S, S) float normalised, dense patch
    targets ``targets`` (N, P, C) (label histogram of each of the P CLIP patches over
    :data:`NUM_PATCH_CLASSES` classes), and the scenes' metadata (images dropped to keep memory low)."""

    pixels: torch.Tensor
    targets: torch.Tensor
    scenes: list[PretrainScene]

    @classmethod
    def render(
        cls, ids: range, cfg: SyntheticConfig, size: int, patch: int, progress: bool = True
    ) -> ScenePool:
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
        pixels, targets, scenes = [], [], []
        grid, onehot = size // patch, np.eye(NUM_PATCH_CLASSES, dtype=np.float32)
        for i in tqdm(ids, desc="render pretraining scenes", unit="scene", disable=not progress):
            s = pretrain_scene(i, cfg)
            crop, labels, _ = clip_geometry(s.image[None], label_map(s).astype(np.float32), size)
            hist = onehot[labels.astype(np.int64)[: grid * patch, : grid * patch]]
            hist = hist.reshape(grid, patch, grid, patch, -1).mean((1, 3)).reshape(grid * grid, -1)
            targets.append(torch.from_numpy(hist).half())
            pixels.append(((torch.from_numpy(crop[0]).permute(2, 0, 1).float() / 255 - mean) / std).half())
            h, w = s.image.shape[:2]  # keep the image's size, drop its pixels and masks
            scenes.append(replace(s, image=np.empty((h, w, 0), np.uint8), masks=np.empty((0, 0, 0), bool)))
        return cls(torch.stack(pixels), torch.stack(targets), scenes)


def token_spec(tokenizer: PreTrainedTokenizerBase, num_image_tokens: int) -> TokenSpec:
    """The placeholder expansion of fine-tuning, for a base without ``[SEG]`` / ``<depth>`` yet."""
    return TokenSpec(
        bos_id=tokenizer.bos_token_id,
        pad_id=tokenizer.pad_token_id,
        image_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        depth_id=-1,
        seg_id=-1,
        num_image_tokens=num_image_tokens,
        num_depth_tokens=0,
        model_max_length=1024,
    )


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    spec: TokenSpec,
    pairs: list[tuple[str, str | None]],
    image_first: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (B, L) for (question, answer) pairs
    (``answer=None``: a generation prompt, no labels); the image placeholder goes before the question
    (``image_first``, LLaVA's order) or after it."""
    turns = [(f"{IMAGE_TOKEN}\n{q}" if image_first else f"{q}\n{IMAGE_TOKEN}", a) for q, a in pairs]
    rows = [encode_conversation(tokenizer, render_segments("llava_v1", [t]), spec) for t in turns]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), spec.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def rec_scores(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SyntheticConfig,
    count: int,
    max_new_tokens: int = 24,
    image_first: bool = True,
) -> dict[str, float]:
    """Greedy REC on ``count`` held-out scenes (one expression each), asked in the prompt order the model
    was trained with: ``rec_acc`` (box IoU >= 0.5), ``rec_iou`` (mean box IoU; 0 when no box could be
    parsed) and ``parsed`` (share of parseable answers)."""
    model.eval()
    size = model.config.vision_config.image_size
    spec = token_spec(tokenizer, model.config.image_seq_length)
    patch = model.config.vision_config.patch_size
    pool = ScenePool.render(range(HELD_OUT_START, HELD_OUT_START + count), cfg, size, patch, progress=False)
    ious, parsed = [], 0
    for k, scene in enumerate(pool.scenes):
        if not scene.expressions:
            continue
        obj, sent = scene.expressions[k % len(scene.expressions)]
        enc = encode_batch(tokenizer, spec, [(REC_QUESTIONS[0].format(expr=sent), None)], image_first)
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=pool.pixels[k : k + 1].float(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        box = parse_box(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        h, w = scene.image.shape[:2]
        gt = scene.boxes[obj] / np.array([w, h, w, h], np.float32)
        valid = box is not None and box[2] > box[0] and box[3] > box[1]
        ious.append(float(box_iou(torch.tensor([box]), torch.from_numpy(gt)[None])[0, 0]) if valid else 0.0)
        parsed += box is not None
    model.train()
    n = max(1, len(ious))
    return {
        "rec_acc": float(np.mean(np.asarray(ious) >= 0.5)),
        "rec_iou": float(np.mean(ious)),
        "parsed": parsed / n,
    }


@lru_cache(maxsize=8)
def patch_positions(grid: int) -> torch.Tensor:
    """(grid * grid, 2) centre (x, y) of every CLIP patch in row-major order, in [-1, 1] (built once per
    grid; read-only)."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def clip_tokens(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """(B, P, D) patch features LLaVA reads (``vision_feature_layer``, CLS dropped) of ``pixels`` (B, 3, S, S)."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


@torch.no_grad()
def position_r2(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> dict[str, float]:
    """How well a linear read-out of the tokens LLaVA reads gives their own patch centre: least squares
    fitted on the first half of ``pixels`` (N, 3, S, S), R^2 of x and y on the second half (1: exact,
    <= 0: no better than the mean). A pretrained CLIP's tokens know where they are; a rotary-position LM
    can only ground through this, since its positions never reach the values it reads."""
    feats = clip_tokens(model, pixels.float())
    n, p, _ = feats.shape
    pos = patch_positions(round(p**0.5)).expand(n, p, 2)
    a = torch.cat([feats, torch.ones(n, p, 1)], -1)
    half = max(1, n // 2)
    coef = torch.linalg.lstsq(a[:half].reshape(-1, a.shape[-1]), pos[:half].reshape(-1, 2)).solution
    pred, true = a[half:].reshape(-1, a.shape[-1]) @ coef, pos[half:].reshape(-1, 2)
    r2 = 1 - (pred - true).pow(2).sum(0) / (true - true.mean(0)).pow(2).sum(0)
    return {"position_r2_x": float(r2[0]), "position_r2_y": float(r2[1])}


def patch_loss(
    model: LlavaForConditionalGeneration,
    head: torch.nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    position_weight: float = 0.0,
) -> torch.Tensor:
    """The vision stage's loss on the patch features LLaVA reads (``vision_feature_layer``, CLS dropped):
    soft-target cross-entropy of the (category, colour) content, plus ``position_weight`` x the MSE of each
    patch's own centre (x, y) in [-1, 1], read out by the same linear ``head`` (two outputs after the C
    class logits; only needed when ``position_weight > 0``).
    ``pixels`` (B, 3, S, S), ``targets`` (B, P, C) label histograms.

    The position term is what a pretrained CLIP's tokens have and a content-only objective erases: with
    content alone the tokens' x position was not linearly decodable at all (R^2 -0.04), and an LM whose
    positions are rotary (they rotate queries and keys, never values) cannot read where the token it
    attends to is, so it cannot ground.
    """
    feats = clip_tokens(model, pixels)
    logits, classes = head(feats), targets.shape[-1]
    content = -(targets * logits[..., :classes].log_softmax(-1)).sum(-1).mean()
    if position_weight == 0:
        return content
    if logits.shape[-1] != classes + 2:
        raise ValueError(f"the position term needs a head with {classes} + 2 outputs, got {logits.shape[-1]}")
    grid = round(feats.shape[1] ** 0.5)
    where = torch.nn.functional.mse_loss(
        logits[..., classes:], patch_positions(grid).expand_as(logits[..., classes:])
    )
    return content + position_weight * where


@contextmanager
def _trainable(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """``module``'s parameters require grad as ``enabled`` says inside the block, and again after it."""
    module.requires_grad_(enabled)
    try:
        yield
    finally:
        module.requires_grad_(True)


def run_llava_stage(
    stage: str,
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    pool: ScenePool,
    cfg: SyntheticConfig,
    opts: LlavaStageOptions,
    work: Path,
    seed: int,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for one stage (resuming from ``work/<stage>.pt``).

    The instruct stage keeps the weights of its best held-out mean REC box IoU. ``stop_at`` ends the call at
    that step as a kill would (after the last checkpoint), for resume tests. Returns the stage record.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown LLaVA stage {stage!r}; choose one of {STAGES}")
    ckpt = work / f"{stage}.pt"
    spec = token_spec(tokenizer, model.config.image_seq_length)
    torch.manual_seed(seed)
    outputs = NUM_PATCH_CLASSES + (2 if opts.position_weight > 0 else 0)  # classes (+ the patch's x, y)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, outputs)  # vision stage only
    params = (
        [*model.model.vision_tower.parameters(), *head.parameters()]
        if stage == "vision"
        else model.parameters()
    )
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    run = StageRun(ckpt, {"model": model, "head": head}, opt)
    model.train()
    frozen = stage != "vision" and not opts.train_vision  # frozen: no gradient, AdamW skips it
    with _trainable(model.model.vision_tower, not frozen):
        make_pair = caption_pair if stage == "caption" else partial(grounding_pair, box_step=opts.box_step)
        stage_id = STAGES.index(stage) + 2 if stage != "vision" else 5

        bar = tqdm(
            total=opts.steps,
            initial=run.step,
            desc=f"pretrain LLaVA ({stage})",
            unit="step",
            disable=not progress,
        )
        while run.step < opts.steps and run.step != stop_at:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(run.step, opts.steps, opts.lr, opts.warmup)
            rng = np.random.default_rng([seed, stage_id, run.step])
            idx = rng.choice(len(pool.scenes), size=opts.batch_size, replace=False)
            if stage == "vision":
                loss = patch_loss(
                    model, head, pool.pixels[idx].float(), pool.targets[idx].float(), opts.position_weight
                )
            else:
                pairs = [make_pair(pool.scenes[i], rng) for i in idx]
                enc = encode_batch(tokenizer, spec, pairs, opts.image_first)
                loss = model(pixel_values=pool.pixels[idx].float(), **enc).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.log.append(loss.item())
            run.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run.log[-1]:.3f}", best=f"{run.best:.3f}")
            if stage == "instruct" and (run.step % opts.eval_every == 0 or run.step == opts.steps):
                scores = rec_scores(model, tokenizer, cfg, opts.held_out, image_first=opts.image_first)
                run.history.append({"step": run.step, **scores})
                run.keep_if_best(scores["rec_iou"])  # mean box IoU: steadier than accuracy on few expressions
            if run.step % opts.ckpt_every == 0 or run.step == opts.steps:
                run.save(finished=run.step == opts.steps)
        bar.close()
        if stage == "vision":  # held-out: do the tokens still know where they are?
            held = ScenePool.render(
                range(HELD_OUT_START, HELD_OUT_START + opts.held_out),
                cfg,
                pool.pixels.shape[-1],
                model.config.vision_config.patch_size,
                progress=False,
            )
            run.history = [{"step": run.step, **position_r2(model, held.pixels)}]
        if run.best_state is not None and stage == "instruct":
            model.load_state_dict(run.best_state)
        n = max(1, len(run.log) // 10)
        return {
            "options": asdict(opts),
            "steps_run": run.step,
            "wall_s": round(run.wall, 1),
            "first_loss": float(np.mean(run.log[:n])) if run.log else float("nan"),
            "last_loss": float(np.mean(run.log[-n:])) if run.log else float("nan"),
            "held_out": run.history,
            **({"best_rec_iou": run.best} if stage == "instruct" else {}),
        }
