"""What the centre image alone tells of depth in a generated benchmark (:mod:`dataset.synthetic.cues`).

``scripts/depth_cues.py --dataset_dir D --ds NAME [--split val] [--json FILE]`` prints, per depth kind, the
share of sentences whose description alone names the target (``unique``), that the ground-row rule answers
(``row``), either of them, that the disparity answers, the chance of a guess among the matching objects, and
``n``. A depth-swap check cannot cost more than the image leaves open: ``1 - row_or_unique``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass

from dataset.synthetic.cues import cue_table
from utils.options import add_option_flags, option, options_from_args

COLUMNS: tuple[str, ...] = ("unique", "row", "row_or_unique", "disparity", "chance")


@dataclass(frozen=True)
class CueOptions:
    """Which generated dataset to read."""

    dataset_dir: str = option("", "root holding refer_seg/<ds> (a generated dataset)", parse=str)
    ds: str = option("ref-urbanlf-syn", "the dataset name <ds>", parse=str)
    split: str = option("val", "the split whose sentences are counted", parse=str)
    json_path: str = option("", "also write the table here", flag="json")


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The table as aligned text, shares in percent."""
    lines = [f"{'kind':<12}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'n':>7}"]
    for kind, row in table.items():
        lines.append(f"{kind:<12}" + "".join(f"{100 * row[c]:>15.1f}" for c in COLUMNS) + f"{row['n']:>7d}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/depth_cues.py``: the cue table of ``--ds`` under ``--dataset_dir``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_flags(p, CueOptions)
    opts = options_from_args(CueOptions, p.parse_args(argv))
    if not opts.dataset_dir:
        p.error("--dataset_dir is required")
    try:
        table = cue_table(opts.dataset_dir, opts.ds, opts.split)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    if not table:
        p.error(f"{opts.dataset_dir}: no depth-referring sentence of {opts.ds} in split {opts.split!r}")
    print(f"{opts.ds} ({opts.split}): share of depth-referring sentences each reading answers, %")
    print(format_table(table))
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(table, f, indent=1)
    return 0
