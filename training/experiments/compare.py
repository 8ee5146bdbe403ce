"""Side-by-side tables and a bar plot of evaluated models: rows of ``eval.json`` files (one per seed), each
row's mean ± std over its seeds per subset, in the paper's column order — the comparison of mask routes
(issue 34) and of what a model reads under ``--eval_input`` probes.

``scripts/compare_evals.py --row "LABEL=a/eval.json,b/eval.json" … --out DIR`` writes ``DIR/compare.md``
(gIoU and cIoU tables, and with ``--baseline_row`` the change of every other row against it, seed by seed),
``DIR/compare.json`` and ``DIR/compare.png`` (the ablation's bar plot: one bar per row, std error bars).
Every row must come from one val set (the same ``n`` per subset). ``--gres`` compares GRES models instead
(``eval.json``'s ``gres`` part): N-acc, T-acc and gIoU under the ReLA and the GSVA rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.checkpoint import atomic_write_text
from training.experiments.ablation import (
    METRICS,
    REPORTED,
    AblationError,
    bar_plot,
    cell_text,
    change_table,
    mean_std,
)
from utils.metrics import ALL
from utils.visualize import write_png


def parse_row(text: str) -> tuple[str, list[Path]]:
    """``"LABEL=a.json,b.json"`` -> (label, [paths]); raises ``ValueError`` naming the text when malformed."""
    label, sep, files = text.partition("=")
    paths = [Path(f) for f in files.split(",") if f.strip()]
    if not sep or not label.strip() or not paths:
        raise ValueError(f"--row {text!r}: expected LABEL=eval.json[,eval.json…]")
    return label.strip(), paths


def load_rows(rows: Sequence[tuple[str, Sequence[Path]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Read every row's ``eval.json`` files; refuse a missing file and files of another val set."""
    out, ref = [], None
    for label, paths in rows:
        evals = []
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"row {label!r}: {path} not found")
            data = json.loads(path.read_text())
            if "subsets" not in data:
                raise ValueError(f"row {label!r}: {path} is not an eval.json (no 'subsets')")
            n = {s: int(data["subsets"].get(s, {}).get("n") or 0) for s in (ALL, *REPORTED)}
            if ref is None:
                ref = (path, n)
            elif n != ref[1]:
                raise AblationError(f"row {label!r}: {path} counts {n}, {ref[0]} {ref[1]}: not one val set")
            evals.append(data)
        out.append((label, evals))
    return out


#: The metrics of ``--gres``: a name, and where ``eval.json["gres"]["rules"]`` holds it (rule, key).
GRES_METRICS: dict[str, tuple[str, str]] = {
    "N-acc": ("gsva", "N-acc"),
    "T-acc": ("gsva", "T-acc"),
    "gIoU (rela)": ("rela", "gIoU"),
    "gIoU (gsva)": ("gsva", "gIoU"),
}


def metric_value(data: Mapping[str, Any], subset: str, metric: str) -> float | None:
    """``metric`` of ``subset`` in one ``eval.json`` (a :data:`GRES_METRICS` name reads its GRES part), or
    None where the subset lacks it (an accuracy of a subset with no expression of its kind)."""
    if metric in GRES_METRICS:
        rule, key = GRES_METRICS[metric]
        cells = data.get("gres", {}).get("rules", {}).get(rule)
        if cells is None:
            raise ValueError(
                f"{metric}: the eval.json has no GRES metrics (evaluate a model built with --gres)"
            )
        return cells.get(subset, {}).get(key)
    return data["subsets"].get(subset, {}).get(metric)


def summarise(
    rows: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    subsets: Sequence[str],
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """The ablation report's summary structure (``variants`` with per-metric cells: values ×100 over the
    row's files, mean, std), so that :func:`training.experiments.ablation.bar_plot` draws it."""
    variants = []
    for label, evals in rows:
        row: dict[str, Any] = {"label": label, "files": len(evals)}
        for metric in metrics:
            cells = {}
            for subset in subsets:
                found = [metric_value(e, subset, metric) for e in evals]
                values = [100.0 * v for v in found if v is not None]
                mean, std = mean_std(values) if len(values) == len(evals) else (None, None)
                cells[subset] = {"mean": mean, "std": std, "values": values}
            row[metric] = cells
        variants.append(row)
    first = rows[0][1][0]
    seeds = max(len(evals) for _, evals in rows)
    return {
        "subsets": list(subsets),
        "n": {s: int(first["subsets"].get(s, {}).get("n") or 0) for s in subsets},
        "val_dataset": first.get("val_dataset"),
        "seeds": list(range(seeds)),
        "variants": variants,
        "metrics": list(metrics),
    }


def table(summary: Mapping[str, Any], metric: str) -> str:
    """Rows × subsets, mean ± std, the best mean of each column in bold, n in the last row."""
    subsets = summary["subsets"]
    lines = ["| model | " + " | ".join(subsets) + " |", "|---|" + "---:|" * len(subsets)]
    best = {}
    for s in subsets:
        means = [
            round(v[metric][s]["mean"], 2) for v in summary["variants"] if v[metric][s]["mean"] is not None
        ]
        best[s] = max(means) if means else None
    for v in summary["variants"]:
        cells = []
        for s in subsets:
            text, mean = cell_text(v[metric][s]), v[metric][s]["mean"]
            top = mean is not None and round(mean, 2) == best[s] and len(summary["variants"]) > 1
            cells.append(f"**{text}**" if top else text)
        lines.append(f"| {v['label']} ({v['files']}) | " + " | ".join(cells) + " |")
    lines.append("| n (expressions) | " + " | ".join(str(summary["n"][s]) for s in subsets) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/compare_evals.py``; a user error prints one ``error:`` line, status 2."""
    p = argparse.ArgumentParser(description="Tables and a bar plot of evaluated models, mean ± std per row.")
    p.add_argument(
        "--row", action="append", required=True, help="LABEL=eval.json[,eval.json…] (one per seed)"
    )
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, compare.png")
    p.add_argument("--title", default="Comparison", help="the plot's title")
    p.add_argument("--subsets", default=" ".join((ALL, *REPORTED)), help="space-separated subset columns")
    p.add_argument("--baseline_row", default="", help="also tabulate every row's change against this one")
    p.add_argument(
        "--gres", action="store_true", help="GRES models: N-acc, T-acc, gIoU under the ReLA and GSVA rules"
    )
    args = p.parse_args(argv)
    try:
        rows = load_rows([parse_row(r) for r in args.row])
        metrics = tuple(GRES_METRICS) if args.gres else METRICS
        summary = summarise(rows, args.subsets.split(), metrics)
        text = "".join(f"{summary['val_dataset']}, {m}\n\n{table(summary, m)}\n\n" for m in metrics)
        if args.baseline_row:
            text += f"\n{metrics[0]} change\n\n{change_table(summary, args.baseline_row, metrics[0])}\n"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", text)
        atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
        write_png(out / "compare.png", bar_plot(summary, name=args.title, metrics=metrics))
    except (AblationError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {out / 'compare.md'}, compare.json, compare.png")
    return 0
