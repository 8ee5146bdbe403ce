"""Validation loop: per-expression IoU statistics over a rank's shard, reduced once at the end.

Protocols: ``teacher_forced`` (LISA: the answer with ``[SEG]`` is in the prompt; comparable with
published numbers) and ``generated`` (the model must emit ``[SEG]``; no ``[SEG]`` counts IoU 0).

A GRES model (``[REJ]``) decides every slot: teacher-forced, by whether its LM head prefers ``[REJ]`` to
``[SEG]`` at the slot; generated, by the token it wrote (an answer without a slot is a rejection). The main
table scores a rejection as an empty mask (the ReLA rule); the GRES table (:mod:`utils.gres_metrics`) adds
the GSVA rule, N-acc and T-acc and the always-``[SEG]`` / always-``[REJ]`` baselines.

Every expression is kept with its sentence and mask scores (``utils.mask_scores``), so the metrics'
``to_json()`` (``eval.json``) lists them one by one. With ``vis_dir``, each expression gets an overlay
(``<ds>_<image_id>_<k>.png``: view ≥ 512 px, expression, legend with ground truth / prediction / IoU /
score, the disparity beside it when the batch has one) and the run one ``summary_sheet.png`` (best and
worst expressions of every subset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset.collate import move_batch
from model.inference import generate_masks, teacher_forced_scored
from model.lfllm import LFLLMForCausalLM
from utils.batch import Batch
from utils.gres_metrics import GresMetrics, mask_area_stats
from utils.mask_scores import DEFAULT_SCORE, scores_of_one
from utils.metrics import IGNORE_LABEL, SegMetrics, mask_iou_stats, subset_tags
from utils.visualize import (
    annotated_overlay,
    colorize_disparity,
    overlay,
    side_by_side,
    summary_sheet,
    write_png,
)

__all__ = ["evaluate", "overlay", "write_summary_sheet"]  # overlay: the blend, for callers

#: (mask logits (H, W) or None, SAM IoU or None, rejected: the slot is [REJ] / the model chose it)
Prediction = tuple[torch.Tensor | None, float | None, bool]


def overlay_name(ds: str, image_id: Any, k: int) -> str:
    """File name of the overlay of expression ``k`` of scene ``image_id`` of ``ds``."""
    return f"{ds}_{image_id}_{k}.png"


def scene_disparity(batch: Batch, i: int) -> np.ndarray | None:
    """Scene ``i``'s disparity (H_i, W_i) px at original size, from its SAM-geometry copy (None if absent)."""
    disparity = batch.get("sam_disparity")
    if disparity is None:
        return None
    h, w = (int(v) for v in batch["sam_resized_hw"][i])
    height, width = batch["original_hw"][i]
    crop = disparity[i, :h, :w].float().cpu().numpy()
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_NEAREST)


def _save_overlays(
    vis_dir: Path, batch: Batch, preds: list[list[Prediction]], records: list[list[dict[str, Any]]]
) -> None:
    for i, masks in enumerate(preds):
        center = cv2.imread(batch["center_path"][i], cv2.IMREAD_COLOR)
        if center is None:
            continue
        rgb = cv2.cvtColor(center, cv2.COLOR_BGR2RGB)
        disparity = scene_disparity(batch, i)
        side = None if disparity is None else colorize_disparity(disparity)
        for k, (logits, _, rejected) in enumerate(masks):
            record = records[i][k]
            image = annotated_overlay(
                rgb,
                None if logits is None or rejected else (logits > 0).cpu().numpy(),
                expression=batch["sentences"][i][k],
                gt_mask=batch["gt_masks"][i][k].cpu().numpy() > 0.5,
                iou=record["iou"],
                score=record.get("score"),
            )
            write_png(vis_dir / record["overlay"], image if side is None else side_by_side([image, side]))


def _records(
    batch: Batch, preds: list[list[Prediction]], metrics: SegMetrics, gres: GresMetrics | None = None
) -> list[list[dict[str, Any]]]:
    """Update ``metrics`` (and ``gres``) with the batch; returns per image, per expression, its JSON record.
    A rejected slot counts as an empty mask in ``metrics``; with ``gres``, an answer without a slot is a
    rejection (the model named nothing), not a missing mask."""
    out = []
    for i, masks in enumerate(preds):
        gt = batch["gt_masks"][i]
        ids = [(batch["ds"][i], batch["image_id"][i], k) for k in range(len(masks))]
        tags = [subset_tags(t) for t in batch["subsets"][i]]
        if gres is not None:
            drawn = torch.stack([torch.zeros_like(gt[0]) if m is None else m.float() for m, _, _ in masks])
            inter_d, pred_d, gt_d = mask_area_stats(drawn, gt > 0.5)
            rejected = [r or m is None for m, _, r in masks]
            no_target = list(batch["no_target"][i])
            gres.update(inter_d, pred_d, gt_d, rejected, no_target, tags, expr_ids=ids)
            masks = [(m, s, r or m is None) for m, s, r in masks]
        missing = [m is None and gres is None for m, _, _ in masks]
        stacked = torch.stack([torch.zeros_like(gt[0]) if m is None or r else m.float() for m, _, r in masks])
        inter, union = mask_iou_stats(stacked, gt)  # gt: 1 foreground, IGNORE_LABEL left out
        gt_area = ((gt > 0) & (gt != IGNORE_LABEL)).flatten(1).sum(1).double()
        union = torch.where(torch.tensor(missing, device=union.device), gt_area, union)
        ds, image_id = batch["ds"][i], batch["image_id"][i]
        records = []
        for k, (logits, sam_iou, rejected) in enumerate(masks):
            scores = scores_of_one(logits, sam_iou)
            iou = 0.0 if missing[k] else (1.0 if union[k] == 0 else float(inter[k] / union[k]))
            records.append(
                {
                    "sentence": batch["sentences"][i][k],
                    "score": None if scores is None else scores[DEFAULT_SCORE],
                    "scores": scores,
                    "overlay": overlay_name(ds, image_id, k),
                    "iou": iou,
                    **({"rejected": bool(rejected)} if gres is not None else {}),
                }
            )
        extra = [{key: v for key, v in r.items() if key != "iou"} for r in records]
        metrics.update(inter, union, tags, expr_ids=ids, missing=missing, records=extra)
        out.append(records)
    return out


def write_summary_sheet(
    metrics: SegMetrics, vis_dir: Path, *, per_side: int = 3, title: str = ""
) -> Path | None:
    """``vis_dir/summary_sheet.png``: for All and every subset, the ``per_side`` best and worst expressions
    by IoU (their overlays, read back from ``vis_dir``). Returns the path, or None without overlays."""
    expressions = [e for e in metrics.expressions() if (vis_dir / e.get("overlay", "")).is_file()]
    if not expressions:
        return None
    groups = {"All": expressions}
    for e in expressions:
        for tag in e["subsets"]:
            groups.setdefault(tag, []).append(e)

    def tile(e: dict[str, Any]) -> tuple[np.ndarray, str]:
        image = cv2.cvtColor(cv2.imread(str(vis_dir / e["overlay"])), cv2.COLOR_BGR2RGB)
        score = "-" if e.get("score") is None else f"{e['score']:.2f}"
        return image, f'IoU {e["iou"]:.2f}  score {score}  "{e.get("sentence", "")}"'

    rows = []
    for name, group in groups.items():
        ranked = sorted(group, key=lambda e: (-e["iou"], str(e["id"])))
        best = ranked[:per_side]
        worst = [e for e in ranked[::-1][:per_side] if e not in best]
        rows.append((f"{name} (n={len(group)})", [tile(e) for e in best], [tile(e) for e in worst]))
    path = vis_dir / "summary_sheet.png"
    write_png(path, summary_sheet(rows, title=title))
    return path


def check_protocol(config: Any, protocol: str) -> None:
    """``ValueError`` unless ``protocol`` is one ``evaluate`` runs and suits a model of ``config``: an
    ``answer_box`` model states the target's box before ``[SEG]``, so a teacher-forced answer would hand
    it the true box; it is scored with ``generated``."""
    if protocol not in ("teacher_forced", "generated"):
        raise ValueError(f"unknown eval protocol {protocol!r}")
    if protocol == "teacher_forced" and bool(getattr(config, "answer_box", False)):
        raise ValueError(
            "--eval_protocol teacher_forced: this model's answers state the target's box (answer_box), so a "
            "teacher-forced answer would give it the true box; use --eval_protocol generated"
        )


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    gres: GresMetrics | None = None,
) -> SegMetrics:
    """Evaluate over ``loader`` (this rank's shard) and reduce across ranks once. Returns the metrics
    (with every expression's record, see the module docstring); with ``vis_dir``, writes the overlays
    and, on rank 0, the summary sheet. ``gres`` (for a model with ``[REJ]``) is filled and reduced too."""
    check_protocol(getattr(model, "config", None), protocol)
    was_training = model.training
    model.eval()
    metrics = SegMetrics()
    vis = Path(vis_dir) if vis_dir else None
    if vis is not None:
        vis.mkdir(parents=True, exist_ok=True)
    for batch in tqdm(loader, desc=f"eval ({protocol})", disable=not show_progress, dynamic_ncols=True):
        batch = move_batch(batch, device)
        if protocol == "teacher_forced":
            masks, ious, rejected = teacher_forced_scored(model, batch)
            preds = [list(zip(m, i.tolist(), r.tolist())) for m, i, r in zip(masks, ious, rejected)]
        else:
            generated = generate_masks(model, batch, tokenizer, max_new_tokens)
            preds = [[(g.mask_logits, g.sam_iou, g.rejected) for g in per_image] for per_image in generated]
        records = _records(batch, preds, metrics, gres)
        if vis is not None:
            _save_overlays(vis, batch, preds, records)
    metrics.reduce()
    if gres is not None:
        gres.reduce()
    metrics.gres = gres
    if vis is not None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's overlays are on disk before the sheet reads them back
        if _is_main():
            write_summary_sheet(metrics, vis, title=f"validation ({protocol})")
    model.train(was_training)
    return metrics
