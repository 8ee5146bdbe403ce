"""Validation loop: per-expression IoU statistics over a rank's shard, reduced once at the end.

Protocols: ``teacher_forced`` (LISA: the answer with ``[SEG]`` is in the prompt; comparable with
published numbers) and ``generated`` (the model must emit ``[SEG]``; no ``[SEG]`` counts IoU 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataset.collate import move_batch
from model.inference import generate_masks, teacher_forced_masks
from model.lfllm import LFLLMForCausalLM
from utils.batch import Batch
from utils.metrics import SegMetrics, mask_iou_stats, subset_tags

OVERLAY_COLOUR = np.array([255, 64, 64], np.float32)


def overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a red mask over an (H, W, 3) uint8 RGB image; returns uint8 RGB."""
    out = image_rgb.astype(np.float32)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * OVERLAY_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def _save_overlays(vis_dir: Path, batch: Batch, preds: list[list[torch.Tensor | None]]) -> None:
    for i, masks in enumerate(preds):
        center = cv2.imread(batch["center_path"][i], cv2.IMREAD_COLOR)
        if center is None:
            continue
        rgb = cv2.cvtColor(center, cv2.COLOR_BGR2RGB)
        for k, logits in enumerate(masks):
            mask = np.zeros(rgb.shape[:2], bool) if logits is None else (logits > 0).cpu().numpy()
            name = f"{batch['ds'][i]}_{batch['image_id'][i]}_{k}.png"
            img = overlay(rgb, mask)
            cv2.putText(
                img, batch["sentences"][i][k][:60], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1
            )
            cv2.imwrite(str(vis_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _update(metrics: SegMetrics, batch: Batch, preds: list[list[torch.Tensor | None]]) -> None:
    for i, masks in enumerate(preds):
        gt = batch["gt_masks"][i]
        missing = [m is None for m in masks]
        stacked = torch.stack([torch.zeros_like(gt[0]) if m is None else m.float() for m in masks])
        inter, union = mask_iou_stats(stacked, gt > 0.5)
        union = torch.where(torch.tensor(missing, device=union.device), gt.flatten(1).sum(1).double(), union)
        ids = [(batch["ds"][i], batch["image_id"][i], k) for k in range(len(masks))]
        tags = [subset_tags(t) for t in batch["subsets"][i]]
        metrics.update(inter, union, tags, expr_ids=ids, missing=missing)


@torch.no_grad()
def evaluate(
    model: LFLLMForCausalLM,
    loader: Any,
    device: torch.device,
    *,
    protocol: str = "teacher_forced",
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    vis_dir: str | Path | None = None,
    show_progress: bool = True,
) -> SegMetrics:
    """Evaluate over ``loader`` (this rank's shard) and reduce across ranks once. Returns the metrics."""
    if protocol not in ("teacher_forced", "generated"):
        raise ValueError(f"unknown eval protocol {protocol!r}")
    was_training = model.training
    model.eval()
    metrics = SegMetrics()
    vis = Path(vis_dir) if vis_dir else None
    if vis is not None:
        vis.mkdir(parents=True, exist_ok=True)
    for batch in tqdm(loader, desc=f"eval ({protocol})", disable=not show_progress, dynamic_ncols=True):
        batch = move_batch(batch, device)
        if protocol == "teacher_forced":
            preds = [list(m) for m in teacher_forced_masks(model, batch)]
        else:
            generated = generate_masks(model, batch, tokenizer, max_new_tokens)
            preds = [[g.mask_logits for g in per_image] for per_image in generated]
        _update(metrics, batch, preds)
        if vis is not None:
            _save_overlays(vis, batch, preds)
    metrics.reduce()
    model.train(was_training)
    return metrics
