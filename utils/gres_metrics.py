"""Generalised referring-segmentation metrics (GRES: several targets or none): gIoU, cIoU, N-acc, T-acc.

Per expression the model gives a decision (``rejected``: its slot was ``[REJ]``, "no such object") and a mask
(what the decoder drew for the slot; empty when it drew nothing). The ground truth is a mask (the union of the
targets) and a flag ``no_target``. Two published rules differ in what a rejected *target* scores:

* ``gsva`` (GSVA's and MLLMSeg's evaluation): a rejection empties the prediction of a no-target expression
  only; a target that was wrongly rejected still has its mask scored.
* ``rela`` (the dataset authors' ReLA evaluation): a rejection empties the prediction, so a wrongly rejected
  target scores IoU 0.

Under both rules, for the effective prediction ``P`` and ground truth ``G`` of expression i::

    I_i = |P ∩ G|, U_i = |P ∪ G|, IoU_i = I_i / U_i, and 1 when U_i = 0 (an empty answer to a no-target
    expression is exactly right);  gIoU = mean_i IoU_i;  cIoU = Σ I_i / Σ U_i (1 when Σ U_i = 0).
    N-acc = correctly rejected no-target expressions / no-target expressions;
    T-acc = target expressions not rejected / target expressions (None where a subset has none).

Only pixel counts are kept (``|P ∩ G|``, ``|P|``, ``|G|`` of the decoder's mask), so both rules and the
trivial baselines ("always ``[SEG]``", "always ``[REJ]``": the same masks with every decision overridden) are
computed from one pass. Sums use ``math.fsum``; a repeated expression id counts once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from utils.distributed import gather_objects
from utils.metrics import ALL, render_table, subset_tags

#: The subset tags of generated GRES expressions, in table order (``dataset.synthetic.gres`` writes them).
GRES_TAGS: tuple[str, ...] = ("multi", "no-target", "nt-absent", "nt-depth")
Rule = Literal["gsva", "rela"]
RULES: tuple[Rule, ...] = ("gsva", "rela")
#: Rows of :meth:`GresMetrics.table`, in order.
TABLE_ROWS: tuple[str, ...] = ("gIoU", "cIoU", "N-acc", "T-acc")


def mask_area_stats(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(|P ∩ G|, |P|, |G|)`` per mask, each ``(N,)`` float64 pixel counts.

    Args:
        pred: ``(N, H, W)`` logits (foreground ``> 0``) or bool masks.
        gt: ``(N, H, W)``, bool or numeric with foreground ``> 0`` (all zero for a no-target expression).
    """
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must both be (N, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}")
    p = pred if pred.dtype == torch.bool else pred > 0
    g = gt.to(pred.device)
    g = g if g.dtype == torch.bool else g > 0
    inter = (p & g).flatten(1).sum(1, dtype=torch.int64)
    return (
        inter.double(),
        p.flatten(1).sum(1, dtype=torch.int64).double(),
        g.flatten(1).sum(1, dtype=torch.int64).double(),
    )


@dataclass(frozen=True)
class _Row:
    inter: float
    pred_area: float
    gt_area: float
    rejected: bool
    no_target: bool
    tags: tuple[str, ...]


def effective_counts(row: _Row, rule: Rule) -> tuple[float, float]:
    """``(I, U)`` of one expression under ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    empties = row.rejected and (row.no_target or rule == "rela")
    if empties:  # the prediction is the empty mask
        return 0.0, row.gt_area
    return row.inter, row.pred_area + row.gt_area - row.inter


def _summarise(rows: Sequence[_Row], rule: Rule) -> dict[str, Any]:
    counts = [effective_counts(r, rule) for r in rows]
    ious = [1.0 if u == 0 else i / u for i, u in counts]
    sum_u = math.fsum(u for _, u in counts)
    negatives = [r for r in rows if r.no_target]
    targets = [r for r in rows if not r.no_target]
    return {
        "gIoU": math.fsum(ious) / len(rows),
        "cIoU": 1.0 if sum_u == 0 else math.fsum(i for i, _ in counts) / sum_u,
        "N-acc": sum(r.rejected for r in negatives) / len(negatives) if negatives else None,
        "T-acc": sum(not r.rejected for r in targets) / len(targets) if targets else None,
        "n": len(rows),
        "n_no_target": len(negatives),
    }


class GresMetrics:
    """Accumulates per-expression pixel counts, decisions and subset tags; computes the GRES metrics under
    both rules. Usage as :class:`utils.metrics.SegMetrics`: ``update`` per batch, ``reduce()`` once on every
    rank, then ``compute(rule)`` / ``table()`` / ``to_json()``."""

    def __init__(self) -> None:
        self._rows: list[_Row] = []
        self._ids: list[Hashable | None] = []
        self._reduced = False

    def __len__(self) -> int:
        return len(self.rows())

    def update(
        self,
        inter: Tensor | Sequence[float],
        pred_area: Tensor | Sequence[float],
        gt_area: Tensor | Sequence[float],
        rejected: Sequence[bool],
        no_target: Sequence[bool],
        tags_per_expr: Sequence[Sequence[str]] | None = None,
        expr_ids: Sequence[Hashable] | None = None,
    ) -> None:
        """Add N expressions: ``(N,)`` counts from :func:`mask_area_stats` of the decoder's masks, the N
        decisions (True: ``[REJ]``), the N ground-truth flags, optional tags and ids (a repeated id counts
        once). Raises ``ValueError`` on unequal lengths or counts that cannot be pixel counts."""
        if self._reduced:
            raise RuntimeError("GresMetrics.update after reduce(): reduce once, after all updates")
        cols = [_floats(inter), _floats(pred_area), _floats(gt_area)]
        n = len(cols[0])
        tags = [()] * n if tags_per_expr is None else [subset_tags(tuple(t)) for t in tags_per_expr]
        ids = [None] * n if expr_ids is None else list(expr_ids)
        lengths = [len(c) for c in cols] + [len(rejected), len(no_target), len(tags), len(ids)]
        if len(set(lengths)) != 1:
            raise ValueError(
                "update: expected equal lengths for inter, pred_area, gt_area, rejected, no_target, tags, ids; "
                f"got {lengths}"
            )
        for i, p, g, nt in zip(*cols, no_target):
            if not (0 <= i <= min(p, g)):
                raise ValueError(f"update: intersection {i} must lie in [0, min(pred_area {p}, gt_area {g})]")
            if nt and g:
                raise ValueError(f"update: a no-target expression has a ground-truth area of {g} pixels")
        self._rows += [
            _Row(i, p, g, bool(r), bool(nt), t) for i, p, g, r, nt, t in zip(*cols, rejected, no_target, tags)
        ]
        self._ids += ids

    def reduce(self, group: Any = None) -> None:
        """Gather every rank's expressions onto every rank (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("GresMetrics.reduce called twice: it would count every expression again")
        parts = gather_objects((self._rows, self._ids), group)
        self._rows = [r for part in parts for r in part[0]]
        self._ids = [i for part in parts for i in part[1]]
        self._reduced = True

    def rows(self) -> list[_Row]:
        """The expressions, a repeated non-None id kept once."""
        seen: set[Hashable] = set()
        out = []
        for row, expr_id in zip(self._rows, self._ids):
            if expr_id is not None:
                if expr_id in seen:
                    continue
                seen.add(expr_id)
            out.append(row)
        return out

    def overridden(self, rejected: bool) -> GresMetrics:
        """The same masks with every decision set to ``rejected``: the "always ``[REJ]``" (True) and
        "always ``[SEG]``" (False) baselines."""
        other = GresMetrics()
        other._rows = [replace(r, rejected=rejected) for r in self.rows()]
        other._ids = [None] * len(other._rows)
        other._reduced = self._reduced
        return other

    def subsets(self) -> list[str]:
        """``All`` then every tag present, in first-seen order."""
        names = [ALL]
        for row in self.rows():
            names += [t for t in row.tags if t not in names]
        return names

    def compute(self, rule: Rule) -> dict[str, dict[str, Any]]:
        """``{subset: {"gIoU", "cIoU", "N-acc", "T-acc", "n", "n_no_target"}}`` under ``rule``; values in
        [0, 1], an accuracy None where the subset has no expression of its kind. ``All`` is always present
        (NaN metrics and n 0 when empty)."""
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        rows = self.rows()
        if not rows:
            nan = dict.fromkeys(TABLE_ROWS, math.nan)
            return {ALL: {**nan, "n": 0, "n_no_target": 0}}
        out = {ALL: _summarise(rows, rule)}
        for name in self.subsets()[1:]:
            out[name] = _summarise([r for r in rows if name in r.tags], rule)
        return out

    def table(self, columns: Sequence[str] = (), title: str | None = None) -> str:
        """Plain text: one column per subset (``columns`` first, then every other present), rows gIoU and
        cIoU under each rule, N-acc, T-acc (×100, 2 decimals; ``-`` where undefined), n and n without a
        target."""
        results = {rule: self.compute(rule) for rule in RULES}
        names = [ALL, *(c for c in columns if c != ALL)]
        names += [s for s in results["gsva"] if s not in names]
        keys = [(f"{k} ({rule})", rule, k) for rule in RULES for k in ("gIoU", "cIoU")]
        keys += [("N-acc", "gsva", "N-acc"), ("T-acc", "gsva", "T-acc"), ("n", "gsva", "n")]
        keys += [("n no-target", "gsva", "n_no_target")]
        rows = [["", *names]]
        for label, rule, key in keys:
            row = [label]
            for name in names:
                value = results[rule].get(name, {}).get(key)
                if value is None:
                    row.append("-")
                elif key in ("n", "n_no_target"):
                    row.append(str(int(value)))
                else:
                    row.append("nan" if math.isnan(value) else f"{100.0 * value:.2f}")
            rows.append(row)
        return render_table(rows, title)

    def baselines_table(self) -> str:
        """The model's All row against "always ``[SEG]``" and "always ``[REJ]``" (its own masks, every
        decision overridden), under both rules."""
        lines = ["GRES baselines (the model's masks, every decision overridden):"]
        for name, metrics in (
            ("model", self),
            ("always [SEG]", self.overridden(False)),
            ("always [REJ]", self.overridden(True)),
        ):
            parts = []
            for rule in RULES:
                res = metrics.compute(rule)[ALL]
                parts.append(f"gIoU {_pct(res['gIoU'])} cIoU {_pct(res['cIoU'])} ({rule})")
            res = metrics.compute("gsva")[ALL]
            parts.append(f"N-acc {_pct(res['N-acc'])} T-acc {_pct(res['T-acc'])}")
            lines.append(f"  {name:>13}: " + "  ".join(parts))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Both rules' ``compute()`` (NaN -> None) and the two baselines' All rows."""

        def clean(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            return {
                name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
                for name, m in results.items()
            }

        return {
            "rules": {rule: clean(self.compute(rule)) for rule in RULES},
            "baselines": {
                name: {rule: clean(m.compute(rule))[ALL] for rule in RULES}
                for name, m in (("always_seg", self.overridden(False)), ("always_rej", self.overridden(True)))
            },
        }


def _pct(value: float | None) -> str:
    return "    -" if value is None else f"{100.0 * value:5.2f}"


def _floats(values: Tensor | Sequence[float]) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu().tolist()]
    return [float(v) for v in values]


__all__ = ["GRES_TAGS", "RULES", "GresMetrics", "effective_counts", "mask_area_stats"]
