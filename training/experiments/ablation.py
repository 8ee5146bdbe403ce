"""The LISA-vs-LFLLM ablation (issue 16): its runs, a check that its val set can report every subset, and
its report (mean ± std over seeds per variant and subset, in the paper's layout, and a bar plot).

``scripts/ablate.sh`` runs the loop; this is its library, behind ``scripts/ablation_report.py``: ``plan``
(one line per run: ``name|label|train_ds.py flags|feature cache 1 or 0``), ``count`` (expressions per
subset, as the evaluation's ``n`` row; fails naming each subset of :data:`REPORTED` below ``--min``),
``record`` (``KEY=VALUE`` into a JSON: a run's ``run.json``; with ``--frozen`` the ablation's
``settings.json``, which refuses a changed value: one base, one schedule, one data set) and ``report``
(``<out>/results/<run>/{eval.json, run.json}`` -> ``<out>/ablation.{md,json,png}``).

Rows, on the default route (the quickstart's recipe, ``scripts/ablate.sh`` runs ``scripts/quickstart.sh`` per
run): LISA (``--no_caam --no_depth``), +depth (``--no_caam``), +CAAM (``--no_depth``), LFLLM, with the default
``--caam_mode`` (fixed); every row has the semantic fusion, and the depth stream (which reads the disparity) comes
with the depth module (:attr:`Variant.route`). ``--caam_modes`` adds an LFLLM row per other mode, ``--estimate``
an LFLLM row on estimated disparity. Values ×100; std is the sample standard deviation over seeds (n − 1), absent
with one seed. What each variant reads: its merged models evaluated again under ``--eval_input`` probes
(:data:`PROBES`, ``<results>/<run>-<probe>/eval.json``), tabulated as the change seed by seed
(:func:`probe_report`).

Length: about 575 lines, one job in five parts (plan, val-set check, aggregation with its tables, the probes'
change tables, plot) over one summary structure; the plot's drawing (``_panel``, ``bar_plot``) could join
``utils/visualize.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dataset.refer import ReferAnnotations
from model.options import CAAM_MODES, ModelOptions
from training.checkpoint import atomic_write_text
from utils.metrics import ALL, PAPER_COLUMNS, subset_tags
from utils.visualize import FONT, write_png

#: The subsets a reported table shows besides All; each needs ``--min`` expressions in the val set.
REPORTED: tuple[str, ...] = PAPER_COLUMNS[1:]
METRICS: tuple[str, ...] = ("gIoU", "cIoU")
#: Seconds a run.json records (``scripts/ablate.sh``: training, LoRA merge, evaluation).
RUN_TIMES: tuple[str, ...] = ("train_s", "merge_s", "eval_s")
DEFAULT_CAAM_MODE = ModelOptions().caam_mode
#: Bar colours (RGB, Okabe-Ito), one per row in plan order.
COLOURS = ((140, 140, 140), (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (213, 94, 0))


class AblationError(ValueError):
    """Something the user fixes: a missing run, a val set too small, settings that changed."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: which light-field modules the model has, and the flags that say so."""

    key: str
    label: str
    caam: bool
    depth: bool
    caam_mode: str = DEFAULT_CAAM_MODE
    #: trained and evaluated on the built-in estimator's disparity (``--depth_source estimate``)
    estimate: bool = False

    @property
    def flags(self) -> tuple[str, ...]:
        out = () if self.caam else ("--no_caam",)
        out += () if self.depth else ("--no_depth",)
        out += ("--depth_source", "estimate") if self.estimate else ()
        return out + (("--caam_mode", self.caam_mode) if self.caam_mode != DEFAULT_CAAM_MODE else ())

    @property
    def route(self) -> tuple[str, ...]:
        """The SAM route's extras (the quickstart's ``SAM_ROUTE_FLAGS``): the semantic fusion always; the
        depth stream and its detail branch, which read the disparity, only with the depth module."""
        depth = ("--depth_stream", "--depth_detail") if self.depth else ()
        return ("--semantic_fusion", *depth)

    @property
    def cacheable(self) -> bool:
        """Whether ``--feature_cache`` serves it (a trained CAAM is not a frozen front end)."""
        return not self.caam or self.caam_mode == "fixed"


def variants(caam_modes: Sequence[str] = (), estimate: bool = False) -> list[Variant]:
    """LISA, +depth, +CAAM, LFLLM, then one LFLLM row per extra CAAM mode (the default mode is LFLLM), then
    with ``estimate`` LFLLM on estimated disparity (LISA reads no disparity: its row would not change)."""
    rows = [
        Variant("lisa", "LISA", caam=False, depth=False),
        Variant("depth", "+depth", caam=False, depth=True),
        Variant("caam", "+CAAM", caam=True, depth=False),
        Variant("lfllm", "LFLLM", caam=True, depth=True),
    ]
    for mode in dict.fromkeys(caam_modes):
        if mode not in CAAM_MODES:
            raise AblationError(f"CAAM mode {mode!r}: expected one of {', '.join(CAAM_MODES)}")
        if mode != DEFAULT_CAAM_MODE:
            rows.append(Variant(f"lfllm-{mode}", f"LFLLM ({mode})", caam=True, depth=True, caam_mode=mode))
    if estimate:
        rows.append(
            Variant("lfllm-estimate", "LFLLM (estimated disparity)", caam=True, depth=True, estimate=True)
        )
    return rows


def run_name(variant: Variant, seed: int) -> str:
    return f"{variant.key}_seed{seed}"


def plan(
    seeds: Sequence[int], caam_modes: Sequence[str] = (), estimate: bool = False
) -> list[tuple[str, Variant, int]]:
    """Every run, ``(name, variant, seed)``, variant by variant."""
    if not seeds:
        raise AblationError("no seeds: set SEEDS, e.g. SEEDS='0 1 2'")
    return [(run_name(v, s), v, s) for v in variants(caam_modes, estimate) for s in seeds]


# ---------------------------------------------------------------------------------------------- val set
def expression_counts(dataset_dir: str | Path, ds: str, split: str = "val") -> tuple[dict[str, int], int]:
    """Expressions (ref × sentence, as the evaluation counts them) of ``split``, ``All`` and per subset tag,
    and the number of scenes they come from."""
    counts = {ALL: 0}
    refs = ReferAnnotations.load(dataset_dir, ds).refs_for(split)
    for ref in refs:
        counts[ALL] += len(ref.sentences)
        for tag in subset_tags(ref.tags):
            counts[tag] = counts.get(tag, 0) + len(ref.sentences)
    return counts, len({ref.image_id for ref in refs})


def check_counts(
    counts: Mapping[str, int], minimum: int, *, what: str = "the val set", scenes: int = 0
) -> None:
    """Raise :class:`AblationError` naming every subset of :data:`REPORTED` with fewer than ``minimum``."""
    short = [(s, counts.get(s, 0)) for s in REPORTED if counts.get(s, 0) < minimum]
    if not short:
        return
    listed = ", ".join(f"{s} has {n}" for s, n in short)
    hint = ""
    if scenes and min(n for _, n in short) > 0:
        need = math.ceil(1.1 * scenes * minimum / min(n for _, n in short))
        hint = f"; about NUM_VAL={need} scenes would give {minimum} (10 % margin)"
    raise AblationError(
        f"{what} is too small for the ablation: subset {listed} expressions, fewer than {minimum} "
        f"(MIN_SUBSET){hint}"
    )


# ---------------------------------------------------------------------------------------------- results
def collect(results_dir: str | Path, runs: Sequence[tuple[str, Variant, int]]) -> dict[str, dict[str, Any]]:
    """``{run: {"eval": eval.json, "run": run.json or {}}}`` for every planned run; raises naming the runs
    without ``eval.json`` and any run evaluated on another val set (different ``n``) or schedule."""
    root = Path(results_dir)
    missing = [name for name, _, _ in runs if not (root / name / "eval.json").is_file()]
    if missing:
        raise AblationError(
            f"{len(missing)} of {len(runs)} runs have no eval.json under {root}: {', '.join(missing)} "
            "(run scripts/ablate.sh again with the same settings: it resumes where it stopped)"
        )
    out = {}
    for name, _, _ in runs:
        run_json = root / name / "run.json"
        out[name] = {
            "eval": json.loads((root / name / "eval.json").read_text()),
            "run": json.loads(run_json.read_text()) if run_json.is_file() else {},
        }
    first, ref = runs[0][0], out[runs[0][0]]
    for name, data in out.items():
        for subset in (ALL, *REPORTED):
            if _n(ref["eval"], subset) != _n(data["eval"], subset):
                n = (_n(data["eval"], subset), _n(ref["eval"], subset))
                raise AblationError(
                    f"run {name} has {n[0]} {subset} expressions, {first} {n[1]}: not one val set"
                )
        steps = (ref["run"].get("total_steps"), data["run"].get("total_steps"))
        if None not in steps and steps[0] != steps[1]:
            raise AblationError(f"run {name} trained {steps[1]} steps, {first} {steps[0]}: not one schedule")
    return out


def _n(eval_json: Mapping[str, Any], subset: str) -> int:
    return int(eval_json["subsets"].get(subset, {}).get("n") or 0)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1; None for a single value)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(
    collected: Mapping[str, Mapping[str, Any]], runs: Sequence[tuple[str, Variant, int]]
) -> dict[str, Any]:
    """Per variant, metric and subset (All + :data:`REPORTED`): the values over seeds (×100), their mean and
    std; a subset absent from a run's eval.json is absent from the cell (``mean`` None)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, variant, seed in runs:
        blank = {**dataclasses.asdict(variant), "flags": " ".join(variant.flags), "seeds": [], "runs": []}
        row = rows.setdefault(variant.key, blank)
        row["seeds"].append(seed)
        row["runs"].append(name)
    subsets = (ALL, *REPORTED)
    for row in rows.values():
        for metric in METRICS:
            cells = {}
            for subset in subsets:
                values = []
                for name in row["runs"]:
                    value = collected[name]["eval"]["subsets"].get(subset, {}).get(metric)
                    if value is not None:
                        values.append(100.0 * value)
                mean, std = mean_std(values) if len(values) == len(row["runs"]) else (None, None)
                cells[subset] = {"mean": mean, "std": std, "values": values}
            row[metric] = cells
    first = collected[runs[0][0]]["eval"]
    timing = {}
    for name, data in collected.items():
        parts = {k: float(data["run"][k]) for k in RUN_TIMES if data["run"].get(k) is not None}
        timing[name] = {**parts, "total_s": math.fsum(parts.values())}
    return {
        "subsets": list(subsets),
        "n": {s: _n(first, s) for s in subsets},
        "val_dataset": first.get("val_dataset"),
        "protocol": first.get("protocol"),
        "seeds": sorted({seed for _, _, seed in runs}),
        "variants": list(rows.values()),
        "timing": {"runs": timing, "runs_total_s": math.fsum(t["total_s"] for t in timing.values())},
    }


# ---------------------------------------------------------------------------------------------- tables
def cell_text(cell: Mapping[str, Any]) -> str:
    """``"12.34 ± 0.56"``; the mean alone with one seed; ``"-"`` when the subset is absent."""
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.2f}" if cell["std"] is None else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def markdown_table(summary: Mapping[str, Any], metric: str) -> str:
    """One metric: rows = variants (with CAAM / depth marks), columns = All and :data:`REPORTED`, cells
    mean ± std, the best mean of each column in bold, and a last row with the expressions per subset."""
    subsets = summary["subsets"]
    lines = [
        "| method | CAAM | depth | " + " | ".join(subsets) + " |",
        "|---|:-:|:-:|" + "---:|" * len(subsets),
    ]
    best = {}  # compared as shown (2 decimals), so that equal cells are equally bold
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
        marks = ["✓" if v["caam"] else "", "✓" if v["depth"] else ""]
        lines.append("| " + " | ".join([v["label"], *marks, *cells]) + " |")
    lines.append("| n (expressions) | | | " + " | ".join(str(summary["n"][s]) for s in subsets) + " |")
    return "\n".join(lines)


DEPTH_KINDS: tuple[str, ...] = ("distance", "closest", "behind", "front")


def change_rows(
    pairs: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]],
    subsets: Sequence[str],
    metric: str = "gIoU",
) -> list[str]:
    """Markdown rows ``| label | change per subset … | depth kinds (mean) |``: for each ``(label, row, base)``
    the change ``row − base`` run by run (both rows hold one value per seed, in the same seed order), mean ±
    sample std per subset; the last cell is the mean change over :data:`DEPTH_KINDS` (those present)."""
    depth = [s for s in DEPTH_KINDS if s in subsets]
    lines = []
    for label, row, base in pairs:
        if len(row[metric][subsets[0]]["values"]) != len(base[metric][subsets[0]]["values"]):
            raise ValueError(
                f"row {label!r}: another number of runs than the row it is compared with: not paired"
            )
        cells = []
        for s in subsets:
            diffs = [a - b for a, b in zip(row[metric][s]["values"], base[metric][s]["values"])]
            mean, std = mean_std(diffs) if diffs else (math.nan, None)
            cells.append(f"{mean:+.2f}" if std is None else f"{mean:+.2f} ± {std:.2f}")
        if depth:
            runs = len(base[metric][depth[0]]["values"])
            per_run = [
                math.fsum(row[metric][s]["values"][i] - base[metric][s]["values"][i] for s in depth)
                / len(depth)
                for i in range(runs)
            ]
            mean, std = mean_std(per_run)
            cells.append(f"**{mean:+.2f}**" if std is None else f"**{mean:+.2f} ± {std:.2f}**")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def change_table(summary: Mapping[str, Any], baseline: str, metric: str = "gIoU") -> str:
    """Each row of ``summary`` but ``baseline`` minus the ``baseline`` row (:func:`change_rows`)."""
    rows = {v["label"]: v for v in summary["variants"]}
    if baseline not in rows:
        raise ValueError(f"--baseline_row {baseline!r}: no such row (rows: {', '.join(rows)})")
    subsets = summary["subsets"]
    depth = any(s in subsets for s in DEPTH_KINDS)
    head = f"| change vs {baseline} | " + " | ".join(subsets) + (" | depth kinds (mean) |" if depth else " |")
    pairs = [(v["label"], v, rows[baseline]) for v in summary["variants"] if v["label"] != baseline]
    return "\n".join([head, "|---|" + "---:|" * (len(subsets) + depth), *change_rows(pairs, subsets, metric)])


#: What each probe of ``scripts/ablate.sh`` replaces (``--eval_input``), and how its results are named.
PROBES: tuple[str, ...] = ("swapped_disparity", "centre_views")


def probe_report(results_dir: str | Path, summary: Mapping[str, Any], probe: str) -> str | None:
    """The change of every variant when its merged models are evaluated with ``--eval_input probe``
    (``<results>/<run>-<probe>/eval.json``), against the same models on exact inputs; None when a run of a
    variant has no probe result yet."""
    root, subsets, rows = Path(results_dir), summary["subsets"], []
    for v in summary["variants"]:
        files = [root / f"{run}-{probe}" / "eval.json" for run in v["runs"]]
        if not all(f.is_file() for f in files):
            return None
        probed: dict[str, Any] = {"gIoU": {}}
        evals = [json.loads(f.read_text()) for f in files]
        for s in subsets:
            values = [100.0 * e["subsets"][s]["gIoU"] for e in evals if s in e["subsets"]]
            probed["gIoU"][s] = {"values": values}
        rows.append((v["label"], probed, v))
    head = f"| gIoU change, {probe} | " + " | ".join(subsets) + " | depth kinds (mean) |"
    return "\n".join([head, "|---|" + "---:|" * (len(subsets) + 1), *change_rows(rows, subsets)])


def report_markdown(summary: Mapping[str, Any]) -> str:
    """``ablation.md``: what was run (settings, command, wall time), then the gIoU and cIoU tables."""
    settings, seeds = summary.get("settings", {}), summary["seeds"]
    steps = settings.get("total_steps")
    schedule = (
        f"{steps} steps ({settings.get('epochs')} × {settings.get('steps_per_epoch')})"
        if steps
        else "same steps"
    )
    lines = [
        "# LISA vs LFLLM ablation",
        "",
        f"{len(seeds)} seed(s) per variant ({', '.join(map(str, seeds))}), {schedule} each, from the base "
        f"`{settings.get('base', '?')}`; val set `{summary['val_dataset']}` ({summary['n'][ALL]} expressions, "
        f"{summary['protocol']}); CAAM mode `{DEFAULT_CAAM_MODE}` unless the row says otherwise. Cells: mean ± "
        "sample std over seeds, ×100; the best mean of each column in bold.",
        "",
    ]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    wall, timing = "", summary["timing"]
    if timing.get("wall_s") is not None:
        wall = f"; the last invocation of the script took {_minutes(timing['wall_s'])}"
    lines += [
        f"Wall time: {_minutes(timing['runs_total_s'])} of runs (train + merge + eval, summed){wall}.",
        "",
    ]
    for metric in METRICS:
        lines += [f"### {metric}", "", markdown_table(summary, metric), ""]
    for probe, table in summary.get("probes", {}).items():
        what = {
            "swapped_disparity": "each val scene given another val scene's disparity",
            "centre_views": "every neighbour view replaced by the centre view",
        }.get(probe, probe)
        lines += [f"### What each variant reads: {what} (`--eval_input {probe}`)", "", table, ""]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


# ---------------------------------------------------------------------------------------------- plot
INK, GRID, PAPER = (25, 25, 25), (225, 225, 225), (255, 255, 255)


def _text(image: np.ndarray, text: str, org: tuple, scale: float, thick=1, colour=INK, anchor="left") -> None:
    """Anti-aliased text with its baseline at ``org``, left-aligned, centred or right-aligned on it."""
    (w, _), _ = cv2.getTextSize(text, FONT, scale, thick)
    x = {"left": org[0], "centre": org[0] - w // 2, "right": org[0] - w}[anchor]
    cv2.putText(image, text, (int(x), int(org[1])), FONT, scale, colour, thick, cv2.LINE_AA)


def nice_ticks(top: float) -> list[float]:
    """0, step, …, ≥ ``top`` with a 1/2/2.5/5 × 10^k step giving 4–8 intervals (``top`` > 0)."""
    top = max(top, 1e-6)
    raw = top / 5
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _panel(summary: Mapping[str, Any], metric: str, width: int, height: int) -> np.ndarray:
    image = np.full((height, width, 3), PAPER, np.uint8)
    left, right, top, bottom = 96, 24, 44, 96
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    rows, subsets = summary["variants"], summary["subsets"]
    peak = max([(c["mean"] or 0.0) + (c["std"] or 0.0) for v in rows for c in v[metric].values()] + [1.0])
    ticks = nice_ticks(peak * 1.05)

    def y_of(value: float) -> int:
        return round(y1 - (y1 - y0) * value / ticks[-1])

    for t in ticks:
        cv2.line(image, (x0, y_of(t)), (x1, y_of(t)), GRID, 1)
        _text(image, f"{t:g}", (x0 - 14, y_of(t) + 7), 0.62, anchor="right")
    cv2.line(image, (x0, y0), (x0, y1), INK, 2)
    cv2.line(image, (x0, y1), (x1, y1), INK, 2)
    group = (x1 - x0) / len(subsets)
    bar = 0.8 * group / len(rows)
    for g, subset in enumerate(subsets):
        centre = x0 + (g + 0.5) * group
        for r, v in enumerate(rows):
            cell = v[metric][subset]
            if cell["mean"] is None:
                continue
            bx = centre - 0.4 * group + r * bar
            colour = COLOURS[r % len(COLOURS)]
            cv2.rectangle(image, (round(bx + 1), y_of(cell["mean"])), (round(bx + bar - 1), y1), colour, -1)
            if cell["std"] is not None:
                mid, cap = round(bx + bar / 2), max(3, round(bar / 4))
                lo, hi = y_of(max(cell["mean"] - cell["std"], 0.0)), y_of(cell["mean"] + cell["std"])
                cv2.line(image, (mid, lo), (mid, hi), INK, 2, cv2.LINE_AA)
                for y in (lo, hi):
                    cv2.line(image, (mid - cap, y), (mid + cap, y), INK, 2, cv2.LINE_AA)
        _text(image, subset, (round(centre), y1 + 30), 0.72, thick=2, anchor="centre")
        n_text = f"n={summary['n'][subset]}"
        _text(image, n_text, (round(centre), y1 + 56), 0.56, colour=(90, 90, 90), anchor="centre")
    x_label = "evaluation subset (n = expressions in the val set)"
    _text(image, x_label, ((x0 + x1) // 2, height - 10), 0.62, anchor="centre")
    _text(image, metric, (x0, top - 14), 0.8, thick=2)
    label = np.full((30, y1 - y0, 3), PAPER, np.uint8)
    _text(label, f"{metric} (%)", ((y1 - y0) // 2, 22), 0.66, anchor="centre")
    image[y0:y1, 8:38] = np.rot90(label)
    return image


def bar_plot(
    summary: Mapping[str, Any],
    *,
    width: int = 1400,
    panel_height: int = 540,
    name: str = "LISA vs LFLLM ablation",
    metrics: Sequence[str] = METRICS,
) -> np.ndarray:
    """Grouped bars per subset (All first), one bar per variant, error bars = std over seeds, one panel
    per metric (gIoU above cIoU), a title (``name``, seeds and steps), a legend, n under every subset name.
    Returns (H, W, 3) uint8 RGB."""
    steps = summary.get("settings", {}).get("total_steps")
    seeds = len(summary["seeds"])
    spread = f"mean +/- std over {seeds} seeds" if seeds > 1 else "1 seed (no error bars)"
    title = f"{name}: {spread}"
    title += f", {steps} training steps each" if steps else ""
    # the title shrinks to fit the width; the legend wraps onto as many rows as it needs
    scale = min(0.95, 0.95 * (width - 40) / max(cv2.getTextSize(title, FONT, 0.95, 2)[0][0], 1))
    entries = [(COLOURS[i % len(COLOURS)], v["label"]) for i, v in enumerate(summary["variants"])]
    widths = [44 + cv2.getTextSize(label, FONT, 0.7, 2)[0][0] + 36 for _, label in entries]
    rows: list[list[int]] = [[]]
    for i, w in enumerate(widths):
        if rows[-1] and sum(widths[j] for j in rows[-1]) + w > width - 40:
            rows.append([])
        rows[-1].append(i)
    head = np.full((60 + 36 * len(rows), width, 3), PAPER, np.uint8)
    _text(head, title, (width // 2, 38), scale, thick=2, anchor="centre")
    for r, row in enumerate(rows):
        x, y = (width - sum(widths[i] for i in row)) // 2, 60 + 36 * r
        for i in row:
            colour, label = entries[i]
            cv2.rectangle(head, (x, y), (x + 30, y + 24), colour, -1)
            _text(head, label, (x + 40, y + 21), 0.7, thick=2)
            x += widths[i]
    panels = [_panel(summary, metric, width, panel_height) for metric in metrics]
    return np.concatenate([head, *panels], axis=0)


# ---------------------------------------------------------------------------------------------- CLI
def build_report(
    out: str | Path,
    seeds: Sequence[int],
    caam_modes: Sequence[str] = (),
    *,
    wall_s: float | None = None,
    command: str = "",
    estimate: bool = False,
) -> dict[str, Any]:
    """Collect ``<out>/results``, write ``<out>/ablation.{md,json,png}``; returns the summary."""
    out = Path(out)
    runs = plan(seeds, caam_modes, estimate)
    summary = aggregate(collect(out / "results", runs), runs)
    probes = {p: probe_report(out / "results", summary, p) for p in PROBES}
    summary["probes"] = {p: t for p, t in probes.items() if t is not None}
    settings_path = out / "settings.json"
    summary["settings"] = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    summary["caam_mode"], summary["units"] = DEFAULT_CAAM_MODE, "gIoU and cIoU x 100 (percent)"
    summary["command"] = command
    summary["timing"]["wall_s"] = wall_s
    atomic_write_text(out / "ablation.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "ablation.md", report_markdown(summary))
    write_png(out / "ablation.png", bar_plot(summary))
    return summary


def update_record(path: str | Path, pairs: Sequence[str], *, frozen: bool = False) -> dict[str, Any]:
    """Merge ``KEY=VALUE`` pairs (numbers parsed) into the JSON at ``path``; with ``frozen``, a key already
    there with another value raises (the ablation's settings may not change between invocations)."""
    path = Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise AblationError(f"expected KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if frozen and key in record and record[key] != value:
            raise AblationError(
                f"{path.parent} holds an ablation made with {key}={record[key]}, this one asks {key}={value}: "
                "use another OUT, or delete it to start again"
            )
        record[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The LISA-vs-LFLLM ablation: plan, val-set check, report.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "report"):
        s = sub.add_parser(name)
        s.add_argument("--seeds", default="0 1 2", help="space-separated seeds")
        s.add_argument("--caam_modes", default="", help="extra LFLLM rows, one per CAAM mode")
        s.add_argument("--estimate", action="store_true", help="an LFLLM row on estimated disparity")
    report = sub.choices["report"]
    report.add_argument("--out", required=True, help="the ablation folder (results/, settings.json)")
    report.add_argument("--wall_s", type=float, default=None, help="wall time of this invocation")
    report.add_argument("--command_line", default="", help="the command, for the record")
    count = sub.add_parser("count")
    for flag, default in (("--dataset_dir", None), ("--ds", None), ("--split", "val")):
        count.add_argument(flag, default=default, required=default is None)
    count.add_argument("--min", type=int, default=100, help="expressions each reported subset needs")
    record = sub.add_parser("record")
    record.add_argument("--file", required=True)
    record.add_argument("--frozen", action="store_true", help="refuse a key that changes value")
    record.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/ablation_report.py``; a user error prints one ``error:`` line, status 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command in ("plan", "report"):
            seeds, modes = [int(s) for s in args.seeds.split()], args.caam_modes.split()
        if args.command == "plan":
            for name, variant, _ in plan(seeds, modes, args.estimate):
                fields = (name, variant.label, " ".join(variant.flags), str(int(variant.cacheable)))
                print("|".join((*fields, " ".join(variant.route))))
        elif args.command == "count":
            counts, scenes = expression_counts(args.dataset_dir, args.ds, args.split)
            print(f"{args.ds} {args.split}: {scenes} scenes; expressions per subset:")
            print("  " + "  ".join(f"{s} {counts.get(s, 0)}" for s in (ALL, *REPORTED)))
            check_counts(counts, args.min, what=f"val set {args.ds} ({args.dataset_dir})", scenes=scenes)
        elif args.command == "record":
            update_record(args.file, args.pairs, frozen=args.frozen)
        else:
            summary = build_report(
                args.out, seeds, modes, wall_s=args.wall_s, command=args.command_line, estimate=args.estimate
            )
            print(report_markdown(summary))
            print(f"written: {Path(args.out) / 'ablation.md'}, ablation.json, ablation.png")
    except (AblationError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
