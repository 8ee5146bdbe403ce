"""Stage "sam" of the tiny-base pretraining: promptable segmentation on generated 2D scenes (SA-1B in miniature).

Every step draws ``images_per_step`` fresh pretraining scenes (:mod:`dataset.synthetic.pretrain`; never a
benchmark scene), prompts up to ``max_objects`` objects of each with either one foreground point (uniform
inside the mask) or a jittered box, as SAM's training does, and trains the whole SAM (image encoder,
prompt encoder, mask decoder) on sigmoid BCE + dice of the single-mask output at the image's own
resolution, plus SAM's IoU-prediction MSE. Held-out score: mask IoU from one interior point (the maximum of
the distance transform) and from the exact box, on held-out scenes; the best weights are kept and the
stage stops early when the point IoU has not improved for ``patience`` evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.pretrain import HELD_OUT_START, pretrain_scene
from dataset.transforms import sam_geometry
from model.losses import mask_losses
from model.sam import normalise_sam_pixels
from training.pretrain.state import StageRun, cosine_lr
from utils.boxes import interior_point
from utils.metrics import mask_iou_stats


@dataclass(frozen=True)
class SamStageOptions:
    """Settings of the SAM stage (see the module docstring)."""

    steps: int = 3000
    images_per_step: int = 4
    max_objects: int = 4
    lr: float = 3e-3
    warmup: int = 50
    box_prob: float = 0.5
    eval_every: int = 250
    held_out: int = 48
    patience: int = 4
    ckpt_every: int = 50


@dataclass(frozen=True)
class Prompted:
    """One image ready for SAM: ``x`` (3, T, T) normalised, ``masks`` (K, H, W) float, SAM-frame prompts
    ``points`` (K, 1, 2) or ``boxes`` (K, 4), and the resized (h, w)."""

    x: torch.Tensor
    masks: torch.Tensor
    points: torch.Tensor | None
    boxes: torch.Tensor | None
    size: tuple[int, int]


def sam_input(image: np.ndarray, target: int) -> tuple[torch.Tensor, tuple[int, int], float]:
    """One (H, W, 3) uint8 image as SAM's input: longest side to ``target`` (``dataset.transforms
    .sam_geometry``), normalised and zero-padded (``model.sam.normalise_sam_pixels``), as the model does.

    Returns (x (3, T, T) float32, resized (h, w), SAM pixels per original pixel)."""
    views, _, (h, w), scale = sam_geometry(image[None], None, target)
    x = torch.from_numpy(views[0]).permute(2, 0, 1).float()
    return normalise_sam_pixels(x[None], torch.tensor([[h, w]]))[0], (h, w), scale


def training_image(
    image_id: int, cfg: SyntheticConfig, opts: SamStageOptions, target: int, rng: np.random.Generator
) -> Prompted | None:
    """Scene ``image_id`` with up to ``max_objects`` random objects prompted by a point or a jittered box."""
    scene = pretrain_scene(image_id, cfg)
    if not len(scene.masks):
        return None
    x, size, scale = sam_input(scene.image, target)
    pick = rng.permutation(len(scene.masks))[: opts.max_objects]
    masks = scene.masks[pick]
    if rng.random() < opts.box_prob:
        boxes = scene.boxes[pick].copy()
        side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(2, 1)
        boxes += rng.normal(0.0, 0.1, boxes.shape) * np.minimum(side, 20.0)  # SAM: 10 % of the side, capped
        return Prompted(
            x, torch.from_numpy(masks).float(), None, torch.from_numpy(boxes * scale).float(), size
        )
    pts = []
    for m in masks:
        ys, xs = np.nonzero(m)
        k = int(rng.integers(len(ys)))
        pts.append([(xs[k] + 0.5) * scale, (ys[k] + 0.5) * scale])
    points = torch.tensor(pts, dtype=torch.float32).view(-1, 1, 2)
    return Prompted(x, torch.from_numpy(masks).float(), points, None, size)


def predict(sam: Sam, embedding: torch.Tensor, item: Prompted) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits (K, H, W) at the image's resolution and predicted IoUs (K,) for ``item``."""
    pe = sam.prompt_encoder
    points = None
    if item.points is not None:
        points = (item.points, torch.ones(len(item.points), 1, dtype=torch.int))
    sparse, dense = pe(points=points, boxes=item.boxes, masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding[None],
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return sam.postprocess_masks(low_res, item.size, tuple(item.masks.shape[-2:]))[:, 0], iou[:, 0]


def sam_loss(sam: Sam, items: list[Prompted], iou_weight: float = 1.0) -> tuple[torch.Tensor, float]:
    """BCE + dice (+ ``iou_weight`` × the IoU head's MSE, SAM's objective) over ``items``; also returns the
    batch's mean mask IoU."""
    embeddings = sam.image_encoder(torch.stack([it.x for it in items]))
    preds, gts, ious, true_ious = [], [], [], []
    for emb, it in zip(embeddings, items):
        logits, iou = predict(sam, emb, it)
        inter, union = mask_iou_stats(logits.detach(), it.masks)
        preds.append(logits)
        gts.append(it.masks)
        ious.append(iou)
        true_ious.append(inter / union.clamp(min=1))
    bce, dice = mask_losses(preds, gts)
    true = torch.cat(true_ious)
    if not iou_weight:
        return bce + dice, float(true.mean())
    mse = torch.nn.functional.mse_loss(torch.cat(ious), true)
    return bce + dice + iou_weight * mse, float(true.mean())


def train_sam(
    sam: Sam,
    opt: torch.optim.Optimizer,
    *,
    start: int,
    steps: int,
    items_at: Callable[[int], list[Prompted]],
    lr_at: Callable[[int], float],
    iou_weight: float = 1.0,
    after_step: Callable[[int, float, float], bool] | None = None,
    desc: str = "pretrain SAM",
    progress: bool = True,
    stop_at: int | None = None,
) -> list[tuple[float, float]]:
    """The SAM pretraining loop (both the tiny base's SAM stage and the random base's quick point-prompt
    pretraining run it): for each step from ``start`` to ``steps``, set the learning rate ``lr_at(step)``,
    draw ``items_at(step)``, take one AdamW step on :func:`sam_loss`; ``after_step(step + 1, loss, iou)``
    (evaluation, checkpoints) returns True to stop early. ``stop_at`` ends before that step as a kill would.

    Returns the (loss, mask IoU) of every step run."""
    sam.train()
    log: list[tuple[float, float]] = []
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress or start >= steps)
    step = start
    while step < steps and step != stop_at:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, iou = sam_loss(sam, items_at(step), iou_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append((loss.item(), iou))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{log[-1][0]:.3f}", iou=f"{iou:.3f}")
        if after_step is not None and after_step(step, log[-1][0], iou):
            break
    bar.close()
    return log


@torch.no_grad()
def held_out_scores(sam: Sam, cfg: SyntheticConfig, count: int) -> dict[str, float]:
    """Mean mask IoU on ``count`` held-out scenes, every object prompted by its deepest interior point
    (``point_iou``) and by its exact box (``box_iou``)."""
    sam.eval()
    target = sam.image_encoder.img_size
    point_ious, box_ious = [], []
    for i in range(count):
        scene = pretrain_scene(HELD_OUT_START + i, cfg)
        if not len(scene.masks):
            continue
        x, size, scale = sam_input(scene.image, target)
        masks = torch.from_numpy(scene.masks).float()
        emb = sam.image_encoder(x[None])[0]
        pts = torch.tensor([interior_point(m) for m in scene.masks], dtype=torch.float32).view(-1, 1, 2)
        boxes = torch.from_numpy(scene.boxes).float()
        for points, box, out in ((pts * scale, None, point_ious), (None, boxes * scale, box_ious)):
            logits, _ = predict(sam, emb, Prompted(x, masks, points, box, size))
            inter, union = mask_iou_stats(logits, masks)
            out.append(inter / union.clamp(min=1))
    sam.train()
    return {"point_iou": float(torch.cat(point_ious).mean()), "box_iou": float(torch.cat(box_ious).mean())}


def run_sam_stage(
    sam: Sam,
    cfg: SyntheticConfig,
    opts: SamStageOptions,
    work: Path,
    seed: int,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``sam`` in place (resuming from ``work/sam.pt``); leaves the best held-out weights in ``sam``.

    ``stop_at`` ends the call at that step as a kill would (after the last checkpoint), for resume tests.

    Returns the stage record: options, steps run, wall time, first/last train loss and IoU, held-out
    history and the best held-out scores.
    """
    ckpt = work / "sam.pt"
    target = sam.image_encoder.img_size
    opt = torch.optim.AdamW(sam.parameters(), lr=opts.lr, weight_decay=0.0)
    run = StageRun(ckpt, {"model": sam}, opt)

    def items_at(step: int) -> list[Prompted]:
        items = []
        for j in range(opts.images_per_step):
            rng = np.random.default_rng([seed, 1, step, j])
            item = training_image(step * opts.images_per_step + j + 1, cfg, opts, target, rng)
            if item is not None:
                items.append(item)
        return items

    def after_step(step: int, loss: float, iou: float) -> bool:
        run.log.append([loss, iou])
        run.step = step
        if run.step % opts.eval_every == 0 or run.step == opts.steps:
            scores = held_out_scores(sam, cfg, opts.held_out)
            run.history.append({"step": run.step, **scores})
            run.keep_if_best(scores["point_iou"])
            best_at = max(range(len(run.history)), key=lambda i: run.history[i]["point_iou"])
            run.done = len(run.history) - 1 - best_at >= opts.patience  # no gain in `patience` evaluations
        if run.step % opts.ckpt_every == 0 or run.done or run.step == opts.steps:
            run.save(finished=run.done or run.step == opts.steps)
        return run.done

    if not run.done:
        train_sam(
            sam, opt, start=run.step, steps=opts.steps, items_at=items_at,
            lr_at=lambda step: cosine_lr(step, opts.steps, opts.lr, opts.warmup),
            after_step=after_step, progress=progress, stop_at=stop_at,
        )  # fmt: skip
    if run.best_state is not None:
        sam.load_state_dict(run.best_state)
    sam.eval()
    log, history, best = run.log, run.history, run.best
    n = max(1, len(log) // 10)
    head, tail = log[:n], log[-n:]
    return {
        "options": asdict(opts),
        "steps_run": run.step,
        "wall_s": round(run.wall, 1),
        "first_loss": float(np.mean([v[0] for v in head])) if head else float("nan"),
        "last_loss": float(np.mean([v[0] for v in tail])) if tail else float("nan"),
        "first_train_iou": float(np.mean([v[1] for v in head])) if head else float("nan"),
        "last_train_iou": float(np.mean([v[1] for v in tail])) if tail else float("nan"),
        "held_out": history,
        "best_point_iou": best,
        "best_box_iou": max((h["box_iou"] for h in history if h["point_iou"] == best), default=float("nan")),
    }
