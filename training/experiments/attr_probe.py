"""Linear read-out of attributes from hidden states, and the figures of AttrEval (LIRA) built on it.

Pure tensor code, no model: a multinomial logistic-regression probe (standardised features, L2, full-batch
L-BFGS, deterministic), the majority-class baseline, and how "attributes read out correctly" tracks IoU
(Spearman with average ranks, ``utils.mask_scores.spearman``). ``attr_eval.py`` feeds it ``[SEG]`` states.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from utils.mask_scores import spearman


@dataclass
class LinearProbe:
    """A fitted probe: ``classes[argmax((x - mean) / std @ weight.T + bias)]``.

    Shapes: ``mean`` / ``std`` (D,), ``weight`` (C, D), ``bias`` (C,); ``classes`` the C labels."""

    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) logits."""
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> list[str]:
        """(N, D) features -> N predicted labels."""
        if len(x) == 0:
            return []
        return [self.classes[i] for i in self.logits(x).argmax(1).tolist()]


def fit_probe(
    x: torch.Tensor,
    labels: Sequence[str],
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
    seed: int = 0,
) -> LinearProbe:
    """Fit a multinomial logistic regression on (N, D) features ``x`` and N string ``labels``.

    Features are standardised with the training mean / std (constant features get std 1); the loss is the
    mean cross-entropy plus ``l2 * ||W||²`` (the bias is not penalised), minimised by full-batch L-BFGS
    (strong-Wolfe line search) from zero weights, so the fit is deterministic; ``seed`` fixes torch's RNG
    for anything else. One class only: a probe that always answers it.
    """
    if len(x) != len(labels) or len(x) == 0:
        raise ValueError(f"fit_probe: {len(x)} feature rows for {len(labels)} labels (need >= 1, equal)")
    torch.manual_seed(seed)
    classes = sorted(set(labels))
    x = x.detach().float().cpu()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    z = (x - mean) / std
    y = torch.tensor([classes.index(v) for v in labels])
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    if len(classes) > 1:
        opt = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LinearProbe(classes, mean, std, weight.detach(), bias.detach())


def majority_class(labels: Sequence[str]) -> str:
    """The most frequent label (ties: the smallest, so the choice is deterministic)."""
    counts = Counter(labels)
    return min(counts, key=lambda v: (-counts[v], v))


def accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Share of equal pairs; NaN for no pair."""
    if len(predicted) != len(truth):
        raise ValueError(f"accuracy: {len(predicted)} predictions for {len(truth)} labels")
    return float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else float("nan")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def probe_attributes(
    train_x: torch.Tensor,
    train_labels: dict[str, list[str]],
    val_x: torch.Tensor,
    val_labels: dict[str, list[str]],
    *,
    l2: float = 1e-3,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[bool]]]:
    """One probe per attribute, fitted on (N_train, D) ``train_x``, scored on (N_val, D) ``val_x``.

    Returns per attribute ``{probe_acc, majority_acc, majority, classes, n_train, n_val}`` and, per
    attribute, whether each val row was read out correctly (N_val bools)."""
    figures, right = {}, {}
    for name, labels in train_labels.items():
        probe = fit_probe(train_x, labels, l2=l2, seed=seed)
        truth = val_labels[name]
        predicted = probe.predict(val_x)
        majority = majority_class(labels)
        right[name] = [p == t for p, t in zip(predicted, truth)]
        figures[name] = {
            "probe_acc": accuracy(predicted, truth),
            "probe_train_acc": accuracy(probe.predict(train_x), labels),
            "majority_acc": accuracy([majority] * len(truth), truth),
            "majority": majority,
            "classes": sorted(set(labels) | set(truth)),
            "n_train": len(labels),
            "n_val": len(truth),
        }
    return figures, right


def iou_by_readout(right: dict[str, list[bool]], ious: Sequence[float]) -> dict[str, Any]:
    """How the number of attributes read out correctly (0..A per expression) tracks its IoU.

    ``right``: per attribute, N bools; ``ious``: N floats. Returns the Spearman rank correlation of the count
    with IoU (average ranks for ties; NaN when either is constant), the mean IoU with every attribute right
    vs not, the mean IoU and count per number right, and per attribute the mean IoU when right / wrong."""
    names = list(right)
    counts = [sum(right[a][i] for a in names) for i in range(len(ious))]
    everything = [i for i, c in enumerate(counts) if c == len(names)]
    rest = [i for i, c in enumerate(counts) if c < len(names)]
    return {
        "spearman_right_vs_iou": spearman(counts, ious) if len(ious) > 1 else float("nan"),
        "mean_iou_all_right": _mean([ious[i] for i in everything]),
        "mean_iou_not_all_right": _mean([ious[i] for i in rest]),
        "n_all_right": len(everything),
        "by_number_right": {
            str(k): {
                "n": sum(c == k for c in counts),
                "mean_iou": _mean([u for u, c in zip(ious, counts) if c == k]),
            }
            for k in range(len(names) + 1)
        },
        "per_attribute": {
            a: {
                "mean_iou_right": _mean([u for u, r in zip(ious, right[a]) if r]),
                "mean_iou_wrong": _mean([u for u, r in zip(ious, right[a]) if not r]),
            }
            for a in names
        },
        "number_right": counts,
    }
