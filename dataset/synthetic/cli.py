"""Generate the synthetic light-field referring-segmentation benchmark (Ref-UrbanLF layout).

Writes ``<dataset_dir>/refer_seg/<ds_name>/{<ds_name>.json,instances.json}`` and
``<dataset_dir>/lf/<ds_name>/Image<id>/{<row>_<col>.png,<disparity_name>}`` with
:func:`dataset.synthetic.write_dataset` (deterministic per ``--seed``; see ``docs/DATA.md``), then prints a
summary: scenes, refs and sentences per split, and subset-tag counts per split.

    .venv/bin/python scripts/make_synthetic_data.py --dataset_dir ./dataset --workers 2

Defaults give the UrbanLF geometry: 9x9 views of 640x480, 172 train and 40 val scenes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from dataset.synthetic import SyntheticConfig, write_dataset

_DEFAULTS = {f.name: f.default for f in fields(SyntheticConfig)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every generator knob of :class:`SyntheticConfig` has a flag."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_dir", required=True, help="root receiving refer_seg/<ds> and lf/<ds>")
    parser.add_argument("--height", type=int, default=_DEFAULTS["height"], help="view height (px)")
    parser.add_argument("--width", type=int, default=_DEFAULTS["width"], help="view width (px)")
    parser.add_argument(
        "--angular",
        type=int,
        default=_DEFAULTS["angular"],
        help="views per angular axis (odd; centre in the middle)",
    )
    parser.add_argument("--num_train", type=int, default=_DEFAULTS["num_train"], help="train scenes")
    parser.add_argument("--num_val", type=int, default=_DEFAULTS["num_val"], help="val scenes")
    parser.add_argument(
        "--min_objects", type=int, default=_DEFAULTS["min_objects"], help="objects per scene, min"
    )
    parser.add_argument(
        "--max_objects", type=int, default=_DEFAULTS["max_objects"], help="objects per scene, max"
    )
    parser.add_argument(
        "--same_looking_prob",
        type=float,
        default=_DEFAULTS["same_looking_prob"],
        help="share of scenes with two same-looking objects at different depths",
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS["seed"], help="dataset seed (output is a function of it)"
    )
    parser.add_argument("--ds_name", default=_DEFAULTS["ds_name"], help="dataset name <ds>")
    parser.add_argument(
        "--disparity_name",
        default=_DEFAULTS["disparity_name"],
        help="centre disparity file name in each scene",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes rendering scenes in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <ds> under dataset_dir")
    parser.add_argument("--summary_json", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.num_train + args.num_val < 1:
        parser.error("--num_train + --num_val must be >= 1")
    return args


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """The :class:`SyntheticConfig` the options describe (raises ``ValueError`` on bad values)."""
    return SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})


def format_summary(summary: dict) -> str:
    """Human-readable summary: scenes, annotations, refs/sentences per split, subset-tag counts per split."""
    lines = [
        f"dataset {summary['ds_name']} in {summary['dataset_dir']}",
        f"  scenes       train {summary['scenes']['train']:>6}   val {summary['scenes']['val']:>6}",
        f"  refs         train {summary['refs']['train']:>6}   val {summary['refs']['val']:>6}",
        f"  sentences    train {summary['sentences']['train']:>6}   val {summary['sentences']['val']:>6}",
        f"  annotations  {summary['annotations']}   scenes with a same-looking pair "
        f"{summary['scenes_with_same_looking_pair']}",
        "  subset tags (refs):",
    ]
    tags = sorted(set(summary["subsets"]["train"]) | set(summary["subsets"]["val"]))
    for tag in tags:
        lines.append(
            f"    {tag:<9} train {summary['subsets']['train'].get(tag, 0):>6}   "
            f"val {summary['subsets']['val'].get(tag, 0):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns the summary of :func:`write_dataset`."""
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"make_synthetic_data.py: error: {exc}") from None
    start = time.perf_counter()
    try:
        summary = write_dataset(args.dataset_dir, cfg, workers=args.workers, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise SystemExit(f"make_synthetic_data.py: error: {exc}") from None
    print(format_summary(summary))
    print(f"  written in {time.perf_counter() - start:.1f} s")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return summary
