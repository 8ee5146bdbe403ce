"""Referring-segmentation metrics (LISA protocol): gIoU, cIoU, precision@k, per-subset tables.

Definitions (per expression i, foreground of the binarised prediction vs. GT at original resolution):
    IoU_i  = I_i / U_i, and 1.0 when U_i = 0 (empty prediction and empty GT agree perfectly);
             0.0 for an expression flagged ``missing`` (generated protocol: no ``[SEG]`` emitted).
    gIoU   = mean_i IoU_i.
    cIoU   = sum_i I_i / sum_i U_i, and 1.0 when sum_i U_i = 0 (same reasoning as above).
    P@t    = fraction of expressions with IoU_i >= t, t in {0.5, 0.6, 0.7, 0.8, 0.9}
             (compared with a 1e-12 tolerance, so IoU = 3/5 counts for t = 0.6).
Each metric is reported for ``All`` and for every subset tag seen (``o-1``, ``closest``, ...). A subset
with no expressions is absent from :meth:`SegMetrics.compute` and shown as ``-`` in the table. Sums use
``math.fsum``, so results do not depend on the order of expressions (or on how ranks split them).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from utils.distributed import gather_objects
from utils.splits import SPLIT_NAMES

THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: A ground-truth pixel of this value is left out of the IoU and of the mask losses (ReasonSeg's "ignore"
#: regions); every other value > 0 is foreground.
IGNORE_LABEL = 255
PAPER_COLUMNS: tuple[str, ...] = ("All", "o-1", "o-2", "o-3", "distance", "closest", "behind", "front")
ALL = "All"
_THRESHOLD_TOL = 1e-12


def subset_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """The subset tags of an expression, without split names (``train``/``val``/``test``...)."""
    return tuple(t for t in tags if t not in SPLIT_NAMES)


def _precision_key(threshold: float) -> str:
    return f"P@{threshold:g}"


def mask_iou_stats(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground intersection and union per mask.

    Args:
        pred: ``(N, H, W)`` (or ``(H, W)``) logits (foreground where ``> 0``; logit 0 is background) or
            bool masks.
        gt: same shape; bool, or numeric with foreground where ``> 0`` and :data:`IGNORE_LABEL` where the
            pixel counts for neither (it is left out of the prediction too).

    Returns:
        ``(intersection, union)``, each ``(N,)`` float64 pixel counts (on ``pred.device``).
    """
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {tuple(pred.shape)} vs {tuple(gt.shape)}"
        )
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    if pred.ndim != 3:
        raise ValueError(f"pred: expected shape (N, H, W) or (H, W), got {tuple(pred.shape)}")
    pred_fg = pred if pred.dtype == torch.bool else pred > 0
    gt_fg = gt.to(pred.device)
    if gt_fg.dtype != torch.bool:
        valid = gt_fg != IGNORE_LABEL
        gt_fg = (gt_fg > 0) & valid
        pred_fg = pred_fg & valid
    inter = (pred_fg & gt_fg).flatten(1).sum(dim=1, dtype=torch.int64)
    union = (pred_fg | gt_fg).flatten(1).sum(dim=1, dtype=torch.int64)
    return inter.to(torch.float64), union.to(torch.float64)


def _to_floats(values: Tensor | Sequence[float]) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu().tolist()]
    return [float(v) for v in values]


def _summarise(inters: list[float], unions: list[float], missing: list[bool]) -> dict[str, float]:
    """Metrics of one subset (non-empty lists)."""
    ious = [0.0 if m else (1.0 if u == 0 else i / u) for i, u, m in zip(inters, unions, missing)]
    n = len(ious)
    sum_u = math.fsum(unions)
    out: dict[str, float] = {
        "gIoU": math.fsum(ious) / n,
        "cIoU": 1.0 if sum_u == 0 else math.fsum(inters) / sum_u,
    }
    for t in THRESHOLDS:
        out[_precision_key(t)] = sum(1 for v in ious if v >= t - _THRESHOLD_TOL) / n
    out["n"] = n
    return out


class SegMetrics:
    """Accumulates per-expression (intersection, union, subset tags) and computes the metrics.

    Usage: ``update`` per batch, ``reduce()`` once after the loop on every rank, then
    ``compute()`` / ``table()`` / ``to_json()`` (identical on every rank).
    """

    def __init__(self) -> None:
        self.inters: list[float] = []
        self.unions: list[float] = []
        self.tags: list[tuple[str, ...]] = []
        self.ids: list[Hashable | None] = []
        self.missing: list[bool] = []
        self.records: list[dict[str, Any] | None] = []
        self._reduced = False
        #: the GRES metrics of the same evaluation (``utils.gres_metrics.GresMetrics``) for a model with
        #: ``[REJ]``; set by ``training.evaluate.evaluate``, None otherwise
        self.gres: Any = None

    def __len__(self) -> int:
        return len(self.inters)

    def update(
        self,
        inter: Tensor | Sequence[float],
        union: Tensor | Sequence[float],
        tags_per_expr: Sequence[Sequence[str] | str] | None = None,
        expr_ids: Sequence[Hashable] | None = None,
        missing: Sequence[bool] | None = None,
        records: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        """Add N expressions.

        Args:
            inter, union: ``(N,)`` pixel counts, e.g. from :func:`mask_iou_stats`.
            tags_per_expr: N subset-tag tuples (a bare string is one tag); None = no tags.
            expr_ids: optional N ids; an id seen again (e.g. ``DistributedSampler`` pads the last batch
                with repeated samples) is counted only the first time.
            missing: optional N flags, True where the model produced no mask (generated protocol, no
                ``[SEG]``): IoU counts 0 even for an empty GT; pass ``inter=0, union=GT area``.
            records: optional N JSON-serialisable dicts (sentence, scores, ...) kept with each expression
                and listed by :meth:`expressions`.
        """
        if self._reduced:
            raise RuntimeError("SegMetrics.update after reduce(): reduce once, after all updates")
        inters, unions = _to_floats(inter), _to_floats(union)
        n = len(inters)
        tags = (
            [()] * n
            if tags_per_expr is None
            else [(t,) if isinstance(t, str) else tuple(t) for t in tags_per_expr]
        )
        ids = [None] * n if expr_ids is None else list(expr_ids)
        miss = [False] * n if missing is None else [bool(m) for m in missing]
        recs = [None] * n if records is None else list(records)
        if not len(unions) == len(tags) == len(ids) == len(miss) == len(recs) == n:
            raise ValueError(
                f"update: expected equal lengths, got inter={n}, union={len(unions)}, "
                f"tags_per_expr={len(tags)}, expr_ids={len(ids)}, missing={len(miss)}, records={len(recs)}"
            )
        if any(i < 0 or i > u for i, u in zip(inters, unions)):
            raise ValueError("update: expected 0 <= intersection <= union for every expression")
        self.inters += inters
        self.unions += unions
        self.tags += [tuple(str(x) for x in t if x != ALL) for t in tags]
        self.ids += ids
        self.missing += miss
        self.records += recs

    def reduce(self, group: Any = None) -> None:
        """Gather every rank's expressions onto every rank (call once, after all updates).

        No-op when ``torch.distributed`` is unavailable or not initialised. With NCCL,
        ``torch.cuda.set_device`` must have been called (``all_gather_object`` uses the current device).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("SegMetrics.reduce called twice: it would count every expression again")
        parts = gather_objects(
            (self.inters, self.unions, self.tags, self.ids, self.missing, self.records), group
        )
        self.inters = [v for part in parts for v in part[0]]
        self.unions = [v for part in parts for v in part[1]]
        self.tags = [v for part in parts for v in part[2]]
        self.ids = [v for part in parts for v in part[3]]
        self.missing = [v for part in parts for v in part[4]]
        self.records = [v for part in parts for v in part[5]]
        self._reduced = True

    def _rows(self) -> list[tuple[float, float, tuple[str, ...], bool]]:
        """(inter, union, tags, missing) per expression; a repeated non-None id is kept only once."""
        seen: set[Hashable] = set()
        rows = []
        for inter, union, tags, expr_id, miss in zip(
            self.inters, self.unions, self.tags, self.ids, self.missing
        ):
            if expr_id is not None:
                if expr_id in seen:
                    continue
                seen.add(expr_id)
            rows.append((inter, union, tags, miss))
        return rows

    def expressions(self) -> list[dict[str, Any]]:
        """One dict per (de-duplicated) expression: ``id``, ``iou``, ``missing``, ``subsets`` and the keys of
        its ``records`` entry; sorted by id (so one rank and several give the same list)."""
        seen: set[Hashable] = set()
        out = []
        for inter, union, tags, expr_id, miss, record in zip(
            self.inters, self.unions, self.tags, self.ids, self.missing, self.records
        ):
            if expr_id is not None:
                if expr_id in seen:
                    continue
                seen.add(expr_id)
            iou = 0.0 if miss else (1.0 if union == 0 else inter / union)
            jid = list(expr_id) if isinstance(expr_id, tuple) else expr_id
            out.append({"id": jid, "iou": iou, "missing": miss, "subsets": list(tags), **(record or {})})
        return sorted(out, key=lambda e: str(e["id"]))

    def subsets(self) -> list[str]:
        """``All`` then every tag present, in first-seen order."""
        names = [ALL]
        for tags in self.tags:
            names += [t for t in tags if t not in names]
        return names

    def compute(self) -> dict[str, dict[str, float]]:
        """``{subset: {"gIoU", "cIoU", "P@0.5", ..., "P@0.9", "n"}}``, values in [0, 1].

        ``All`` is always present; with no expressions its metrics are NaN and ``n`` is 0.
        """
        rows = self._rows()
        if not rows:
            return {ALL: {**dict.fromkeys(_metric_keys(), math.nan), "n": 0}}
        out = {ALL: _summarise(*_columns(rows))}
        for name in self.subsets()[1:]:
            subset = [r for r in rows if name in r[2]]
            if subset:
                out[name] = _summarise(*_columns(subset))
        return out

    def table(
        self,
        columns: Sequence[str] = PAPER_COLUMNS,
        *,
        include_other: bool = True,
        title: str | None = None,
    ) -> str:
        """Plain-text table: one column per subset (``columns`` in order, then other present tags
        if ``include_other``), rows gIoU, cIoU, P@0.5..0.9 (×100, 2 decimals) and n; ``-`` if absent."""
        results = self.compute()
        names = list(columns)
        if include_other:
            names += [s for s in results if s not in names]
        rows = [["", *names]]
        for key in [*_metric_keys(), "n"]:
            row = [key]
            for name in names:
                value = results.get(name, {}).get(key)
                if value is None or (key == "n" and name not in results):
                    row.append("-")
                elif key == "n":
                    row.append(str(int(value)))
                else:
                    row.append("nan" if math.isnan(value) else f"{100.0 * value:.2f}")
            rows.append(row)
        return render_table(rows, title)

    def to_json(self, with_expressions: bool = True) -> dict[str, Any]:
        """JSON-serialisable ``compute()`` (NaN -> None), the thresholds used and, with
        ``with_expressions``, the per-expression list of :meth:`expressions` under ``"expressions"``."""
        results = {
            name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
            for name, metrics in self.compute().items()
        }
        out: dict[str, Any] = {"subsets": results, "thresholds": list(THRESHOLDS)}
        if with_expressions:
            out["expressions"] = self.expressions()
        return out


def render_table(rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Plain-text table of string cells: the first row a header, the first column left-aligned, the others
    right-aligned, a rule under the header, ``title`` above (the metrics' tables share it)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(([title] if title else []) + lines)


def _metric_keys() -> list[str]:
    return ["gIoU", "cIoU", *(_precision_key(t) for t in THRESHOLDS)]


def _columns(rows: list[tuple[float, float, tuple[str, ...], bool]]) -> tuple[list, list, list]:
    return [r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows]
