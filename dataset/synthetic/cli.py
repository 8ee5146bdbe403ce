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
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from dataset.synthetic import SyntheticConfig, write_dataset
from utils.options import add_option_flags, option, options_from_args

_DEFAULTS = {f.name: f.default for f in fields(SyntheticConfig)}


@dataclass(frozen=True)
class GenerateOptions:
    """The command line of ``scripts/make_synthetic_data.py``: where to write, every generator knob of
    :class:`SyntheticConfig` (its defaults) and how to run.

    Attributes:
        dataset_dir: root receiving ``refer_seg/<ds>`` and ``lf/<ds>`` (``--dataset_dir``, required).
    """

    dataset_dir: Path
    height: int = option(_DEFAULTS["height"], "view height (px)")
    width: int = option(_DEFAULTS["width"], "view width (px)")
    angular: int = option(_DEFAULTS["angular"], "views per angular axis (odd; centre in the middle)")
    num_train: int = option(_DEFAULTS["num_train"], "train scenes")
    num_val: int = option(_DEFAULTS["num_val"], "val scenes")
    min_objects: int = option(_DEFAULTS["min_objects"], "objects per scene, min")
    max_objects: int = option(_DEFAULTS["max_objects"], "objects per scene, max")
    same_looking_prob: float = option(
        _DEFAULTS["same_looking_prob"], "share of scenes with two same-looking objects at different depths"
    )
    gres: bool = option(
        _DEFAULTS["gres"],
        "also write generalised expressions: several targets ('the red vehicles') or none ('the blue bridge', "
        "a false depth relation), tagged multi / no-target / nt-absent / nt-depth (give it its own --ds_name)",
    )
    tasks: bool = option(
        _DEFAULTS["tasks"],
        "also write LISA's other tasks for the same scenes: VQA conversations (llava_dataset/<ds>.json, "
        "<ds>_val.json) and reasoning segmentation (reason_seg/<ds>/: train, val, val_explicit, explanatory)",
    )
    perspective: float = option(
        _DEFAULTS["perspective"],
        "how far an object's ground row and size follow its disparity: 1 = nearer objects stand lower and are "
        "larger (the default scenes); 0 = placement drawn independently of the disparity, so only the light "
        "field (and occlusion) tells depth (a cue-conflict training set)",
    )
    seed: int = option(_DEFAULTS["seed"], "dataset seed (output is a function of it)")
    ds_name: str = option(_DEFAULTS["ds_name"], "dataset name <ds>")
    disparity_name: str = option(_DEFAULTS["disparity_name"], "centre disparity file name in each scene")
    workers: int = option(1, "processes rendering scenes in parallel")
    overwrite: bool = option(False, "replace an existing <ds> under dataset_dir")
    summary_json: str | None = option(None, "also write the summary to this JSON file", parse=str)

    def config(self) -> SyntheticConfig:
        """The :class:`SyntheticConfig` the options describe (raises ``ValueError`` on bad values)."""
        return SyntheticConfig(**{f.name: getattr(self, f.name) for f in fields(SyntheticConfig)})


def parse_args(argv: Sequence[str] | None = None) -> GenerateOptions:
    """The command line as :class:`GenerateOptions`; every generator knob of :class:`SyntheticConfig` has
    a flag."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_dir", required=True, help="root receiving refer_seg/<ds> and lf/<ds>")
    add_option_flags(parser, GenerateOptions)
    args = parser.parse_args(argv)
    options = options_from_args(GenerateOptions, args, GenerateOptions(dataset_dir=Path(args.dataset_dir)))
    if options.workers < 1:
        parser.error(f"--workers must be >= 1, got {options.workers}")
    if options.num_train + options.num_val < 1:
        parser.error("--num_train + --num_val must be >= 1")
    return options


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
    if "gres" in summary:
        lines.append(
            f"  GRES: {100 * summary['gres']['no_target_share']:.1f} % of the expressions have no target "
            f"(gRefCOCO 11.6 %), {100 * summary['gres']['multi_target_share']:.1f} % several"
        )
    if "tasks" in summary:
        t = summary["tasks"]
        lines.append(
            f"  VQA: {t['vqa']['train']['records']} + {t['vqa']['val']['records']} conversations, "
            f"reasoning targets: train {t['reason_seg']['train']}, val {t['reason_seg']['val']}"
        )
    return "\n".join(lines)


def generate(options: GenerateOptions) -> dict:
    """Write the dataset ``options`` describe and print its summary; returns the summary of
    :func:`write_dataset`. Bad settings or an existing dataset (without ``overwrite``) exit with a message."""
    try:
        cfg = options.config()
    except ValueError as exc:
        raise SystemExit(f"make_synthetic_data.py: error: {exc}") from None
    start = time.perf_counter()
    try:
        summary = write_dataset(
            options.dataset_dir, cfg, workers=options.workers, overwrite=options.overwrite
        )
    except FileExistsError as exc:
        raise SystemExit(f"make_synthetic_data.py: error: {exc}") from None
    print(format_summary(summary))
    print(f"  written in {time.perf_counter() - start:.1f} s")
    if options.summary_json:
        Path(options.summary_json).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the CLI; returns the summary of :func:`write_dataset`."""
    return generate(parse_args(argv))
