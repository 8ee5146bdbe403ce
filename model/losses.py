"""Mask losses (sigmoid BCE + dice, averaged per mask) and the LM cross-entropy on answer tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


def sigmoid_bce_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean sigmoid BCE. ``logits``, ``targets``: (N, H, W) -> (N,), float32."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(1)


def dice_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss ``1 - (2Σpt + ε) / (Σp + Σt + ε)``, every sum scaled by 1/1000 (the reference's
    scaling, which sets how much ε weighs on small masks).

    ``logits``, ``targets``: (N, H, W) -> (N,), float32.
    """
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    num = 2 * (p * t).sum(1) / DICE_SCALE + DICE_EPS
    den = (p.sum(1) + t.sum(1)) / DICE_SCALE + DICE_EPS
    return 1 - num / den


def mask_losses(
    pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and mean dice over every mask of the batch.

    ``pred_masks[i]``: (k_i, H_i, W_i) logits of image i; ``gt_masks[i]``: (k_i, H_i, W_i) {0, 1}.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted mask groups but {len(gt_masks)} ground-truth groups")
    bce, dice, n = [], [], 0
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise ValueError(f"predicted masks {tuple(pred.shape)} vs ground truth {tuple(gt.shape)}")
        bce.append(sigmoid_bce_per_mask(pred, gt).sum())
        dice.append(dice_per_mask(pred, gt).sum())
        n += pred.shape[0]
    if n == 0:  # no mask to train (e.g. every slot a [REJ]): a zero that stays in the graph, for every rank
        zero = sum((p.float().sum() for p in pred_masks), torch.zeros(())) * 0.0
        return zero, zero
    return torch.stack(bce).sum() / n, torch.stack(dice).sum() / n


def answer_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module
) -> torch.Tensor:
    """Next-token CE over answer tokens only; logits are computed only where a label exists.

    ``hidden``: (N, L, D) final hidden states; ``labels``: (N, L) with -100 outside the answers.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    if not bool(keep.any()):
        return hidden.new_zeros((), dtype=torch.float32)
    logits = lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])
