"""Mask losses (sigmoid BCE + dice, averaged per mask) and the LM cross-entropy on answer tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.metrics import IGNORE_LABEL

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


def _valid(targets: torch.Tensor) -> torch.Tensor | None:
    """(N, H*W) float 1 where a target pixel counts, 0 where it is :data:`IGNORE_LABEL`; None when every
    pixel counts (the common case keeps the plain reductions)."""
    ignored = targets.flatten(1) == IGNORE_LABEL
    return None if not bool(ignored.any()) else (~ignored).float()


def sigmoid_bce_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean sigmoid BCE over the pixels that count (target :data:`IGNORE_LABEL` is left out).
    ``logits``, ``targets``: (N, H, W) -> (N,), float32."""
    valid = _valid(targets)
    if valid is None:
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        return loss.flatten(1).mean(1)
    t = targets.float().flatten(1) * valid
    loss = F.binary_cross_entropy_with_logits(logits.float().flatten(1), t, reduction="none") * valid
    return loss.sum(1) / valid.sum(1).clamp_min(1.0)


def dice_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss ``1 - (2Σpt + ε) / (Σp + Σt + ε)``, every sum scaled by 1/1000 (the reference's
    scaling, which sets how much ε weighs on small masks), over the pixels that count.

    ``logits``, ``targets``: (N, H, W) -> (N,), float32.
    """
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    valid = _valid(targets)
    if valid is not None:
        p, t = p * valid, t * valid
    num = 2 * (p * t).sum(1) / DICE_SCALE + DICE_EPS
    den = (p.sum(1) + t.sum(1)) / DICE_SCALE + DICE_EPS
    return 1 - num / den


def mask_losses(
    pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE and mean dice over every mask of the batch.

    ``pred_masks[i]``: (k_i, H_i, W_i) logits of image i; ``gt_masks[i]``: (k_i, H_i, W_i) {0, 1, 255}
    (255: :data:`IGNORE_LABEL`, left out).
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


#: What :func:`task_loss_sums` reports per task, in column order.
TASK_STAT_FIELDS: tuple[str, ...] = ("ce_sum", "ce_tokens", "bce_sum", "dice_sum", "masks")


@torch.no_grad()
def task_loss_sums(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    conv_image: torch.Tensor,
    pred_masks: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    image_tasks: list[str],
    task_names: list[str],
) -> torch.Tensor:
    """Each task's share of the step's losses, as sums that add up over micro-steps and ranks (detached).

    ``hidden`` (N, L, D), ``labels`` (N, L), ``conv_image`` (N,) the image of each conversation;
    ``pred_masks`` / ``gt_masks`` per image (k_i, H_i, W_i) (the masks the mask losses train);
    ``image_tasks`` (B,) each image's task. Returns (T, 5) float32 rows in ``task_names`` order:
    :data:`TASK_STAT_FIELDS` (the CE summed over answer tokens and their count, the BCE and dice summed over
    masks and their count); a task the batch lacks has a row of zeros.
    """
    out = torch.zeros((len(task_names), len(TASK_STAT_FIELDS)), dtype=torch.float32)
    row_of = {t: k for k, t in enumerate(task_names)}
    targets = labels[:, 1:]
    keep = targets != -100
    if bool(keep.any()):
        tokens = F.cross_entropy(lm_head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none").cpu()
        conv = keep.nonzero(as_tuple=True)[0].cpu()
        image = conv_image.cpu()[conv]
        for i, task in enumerate(image_tasks):
            sel = image == i
            out[row_of[task], 0] += tokens[sel].sum()
            out[row_of[task], 1] += sel.sum()
    for pred, gt, task in zip(pred_masks, gt_masks, image_tasks):
        if len(pred):
            out[row_of[task], 2] += sigmoid_bce_per_mask(pred, gt).sum().cpu()
            out[row_of[task], 3] += dice_per_mask(pred, gt).sum().cpu()
            out[row_of[task], 4] += len(pred)
    return out
