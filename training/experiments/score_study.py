"""Which mask score tracks the true IoU: Spearman rank correlation of every candidate of
``utils.mask_scores`` with the per-expression IoU of a validation run, and a scatter plot of each.

    python scripts/mask_score_study.py --version MERGED_DIR --dataset_dir DATASET \\
        --val_dataset "ref-urbanlf-syn|syn|val" --out runs/mask_scores

writes ``OUT/mask_scores.json`` (figures + every expression's IoU and scores) and ``OUT/mask_scores.png``
(one scatter panel per candidate). The model runs exactly as in ``train_ds.py --eval_only``
(:func:`training.evaluate.evaluate`, either protocol).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.build import DTYPES, build_lfllm
from training.config import RunConfig, parse_config
from training.evaluate import evaluate
from training.loaders import build_val_loader
from utils.mask_scores import DEFAULT_SCORE, SCORE_NAMES, spearman
from utils.options import add_option_flags, option, options_from_args
from utils.visualize import scatter_panel, side_by_side, write_png


def bootstrap_interval(
    scores: Sequence[float],
    ious: Sequence[float],
    other: Sequence[float] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval (expressions resampled) of the Spearman correlation of
    ``scores`` with ``ious`` or, given ``other``, of its difference to ``other``'s (paired)."""
    x, y = np.asarray(scores), np.asarray(ious)
    z = None if other is None else np.asarray(other)
    rng = np.random.default_rng(seed)
    values = []
    for i in rng.integers(0, len(x), (resamples, len(x))):
        value = spearman(x[i], y[i]) - (0.0 if z is None else spearman(z[i], y[i]))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return round(float(lo), 4), round(float(hi), 4)


def correlations(expressions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Spearman rank correlation of each candidate score with the true IoU over the expressions that have
    a mask (a generated answer without ``[SEG]`` has no score), its bootstrap interval, and the best
    candidate named."""
    scored = [e for e in expressions if e.get("scores")]
    ious = [e["iou"] for e in scored]
    columns = {name: [e["scores"][name] for e in scored] for name in SCORE_NAMES}
    rho = {name: spearman(columns[name], ious) for name in SCORE_NAMES}
    finite = {k: v for k, v in rho.items() if np.isfinite(v)}
    best = max(finite, key=finite.get) if finite else None
    versus = {}
    if best is not None and len(scored) > 2:
        versus = {
            f"{best} - {name}": bootstrap_interval(columns[best], ious, columns[name])
            for name in SCORE_NAMES
            if name != best
        }
    return {
        "spearman": rho,
        "spearman_95": {name: bootstrap_interval(columns[name], ious) for name in SCORE_NAMES}
        if len(scored) > 2
        else {},
        "best": best,
        "best_minus_other_95": versus,
        "n": len(scored),
        "n_without_mask": len(expressions) - len(scored),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "reported_score": DEFAULT_SCORE,
    }


def scatter_plot(expressions: Sequence[dict[str, Any]], figures: dict[str, Any]) -> np.ndarray:
    """One panel per candidate: score (x) against true IoU (y), its Spearman rho in the title."""
    scored = [e for e in expressions if e.get("scores")]
    panels = [
        scatter_panel(
            [e["scores"][name] for e in scored],
            [e["iou"] for e in scored],
            title=f"{name}: Spearman {figures['spearman'][name]:+.3f} (n={len(scored)})",
            x_label=f"{name} score",
            y_label="true IoU",
        )
        for name in SCORE_NAMES
    ]
    return side_by_side(panels, gap=0)


def run_study(cfg: RunConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``--version`` on ``--val_dataset`` as ``train_ds.py --eval_only`` does (``cfg``; single
    process) and return the figures of :func:`correlations` and every expression's record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.loop.seed)
    model, tokenizer = build_lfllm(
        cfg.run.version, cfg.run.vision_pretrained, cfg.model, DTYPES[cfg.run.precision]
    )
    model.to(device)
    protocol = cfg.eval.eval_protocol
    loader = build_val_loader(cfg, model.config, tokenizer, 0, 1, generated=protocol == "generated")
    metrics = evaluate(
        model,
        loader,
        device,
        protocol=protocol,
        tokenizer=tokenizer,
        max_new_tokens=cfg.generation.max_new_tokens,
    )
    expressions = metrics.expressions()
    figures = correlations(expressions) | {
        "val_dataset": cfg.eval.val_dataset,
        "protocol": protocol,
        "version": cfg.run.version,
        "gIoU": metrics.compute()["All"]["gIoU"],
    }
    return figures, expressions


@dataclass(frozen=True)
class StudyOptions:
    """The study's own option (``train_ds.py --eval_only``'s come as a :class:`RunConfig`)."""

    out: str = option("runs/mask_scores", "folder for mask_scores.{json,png}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[StudyOptions, RunConfig]:
    """The command line as the study's options and ``train_ds.py --eval_only``'s configuration
    (``SystemExit`` with a message on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    add_option_flags(parser.add_argument_group("score study"), StudyOptions)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nand train_ds.py --eval_only's flags:\n")
    return options_from_args(StudyOptions, known), parse_config(["--eval_only", *rest])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``--out DIR`` plus ``train_ds.py --eval_only`` flags; prints and returns the figures."""
    opts, cfg = parse_args(argv)
    figures, expressions = run_study(cfg)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mask_scores.json").write_text(json.dumps({**figures, "expressions": expressions}, indent=2))
    write_png(out / "mask_scores.png", scatter_plot(expressions, figures))
    for name, rho in figures["spearman"].items():
        lo, hi = figures["spearman_95"].get(name, (float("nan"), float("nan")))
        print(f"{name:>10}: Spearman {rho:+.3f}  (95 % bootstrap {lo:+.3f} .. {hi:+.3f})")
    for pair, (lo, hi) in figures["best_minus_other_95"].items():
        print(f"{pair}: 95 % paired bootstrap {lo:+.3f} .. {hi:+.3f}")
    print(f"n={figures['n']} (without mask: {figures['n_without_mask']}), best: {figures['best']}")
    return figures
