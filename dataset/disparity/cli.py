"""Estimate the centre-view disparity of every light-field scene with the built-in estimator.

For every scene folder ``Image*`` under ``--lf_root`` (e.g. ``<dataset_dir>/lf/ref-urbanlf-syn``) this
writes ``<scene>/<out_name>`` (float32 (H, W), px between adjacent views, larger = nearer; the UrbanLF
convention of ``5_5_disparity.npy``) with :func:`dataset.disparity.estimator.disparity_for_scene`. Files are written
atomically (temporary file + ``os.replace``), and scenes that already have ``<out_name>`` are skipped unless
``--overwrite``, so an interrupted run resumes where it stopped. See ``docs/DISPARITY.md``.

    .venv/bin/python scripts/estimate_disparity.py --lf_root ./dataset_cache/lf/ref-urbanlf-syn

Use the result for training or chat with ``--disparity_name 5_5_disparity_est.npy``;
``train_ds.py --depth_source estimate`` runs the same code (``dataset/disparity_cache.py``) itself for the
scenes of its splits and reads these files.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.disparity.cache import estimate_scenes, find_scenes, scenes_to_estimate, write_npy_atomic
from dataset.disparity.config import DisparityFlags
from dataset.disparity.estimator import disparity_for_scene
from dataset.errors import DataError
from dataset.lightfield import LightFieldLayout
from dataset.options import DEFAULT_DATA_OPTIONS, DEFAULT_ESTIMATED_NAME, check_cache_name
from utils.options import add_option_flags, option, options_from_args

__all__ = [
    "EstimateOptions",
    "disparity_for_scene",
    "estimate_all",
    "find_scenes",
    "main",
    "parse_args",
    "write_npy_atomic",
]

DEFAULT_OUT_NAME = DEFAULT_ESTIMATED_NAME


@dataclass(frozen=True)
class EstimateOptions:
    """The command line of ``scripts/estimate_disparity.py``.

    Attributes:
        lf_root: folder holding the scene folders (``--lf_root``, required).
        estimator: the estimator's flags (:class:`DisparityFlags`).
    """

    lf_root: Path
    estimator: DisparityFlags = dataclasses.field(default_factory=DisparityFlags)
    out_name: str = option(DEFAULT_OUT_NAME, "file written into each scene folder")
    view_pattern: str = option(DEFAULT_DATA_OPTIONS.view_pattern, "view file names, str.format")
    center: str = option("5_5", "centre view <row>_<col> (1-based)")
    scene_glob: str = option("Image*", "scene folder names under --lf_root")
    device: str = option("cpu", "cpu, cuda or cuda:<i>")
    threads: int = option(0, "torch CPU threads (0 = torch default)")
    overwrite: bool = option(False, "recompute scenes that have --out_name")


def parse_args(argv: Sequence[str] | None = None) -> EstimateOptions:
    """The command line as :class:`EstimateOptions`; estimator defaults come from :class:`DisparityConfig`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lf_root", required=True, help="folder holding the scene folders (Image<id>/)")
    add_option_flags(parser, EstimateOptions)
    add_option_flags(parser.add_argument_group("estimator (DisparityConfig)"), DisparityFlags)
    args = parser.parse_args(argv)
    base = EstimateOptions(lf_root=Path(args.lf_root), estimator=options_from_args(DisparityFlags, args))
    return options_from_args(EstimateOptions, args, base)


def _parse_center(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)_(\d+)\s*", text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"--center must look like '5_5' (1-based <row>_<col>), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def estimate_all(options: EstimateOptions) -> int:
    """Run the estimator over every scene under ``options.lf_root``; returns the process exit code (0 = all
    scenes done, 1 = a scene could not be read, 2 = bad settings or no scenes)."""
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    try:
        layout = LightFieldLayout(view_pattern=options.view_pattern, center=_parse_center(options.center))
        config = options.estimator.config()
        check_cache_name(options.out_name)
        scenes = find_scenes(options.lf_root, options.scene_glob)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not scenes:
        print(
            f"error: no scene folders matching {options.scene_glob!r} under {options.lf_root}",
            file=sys.stderr,
        )
        return 2
    todo = scenes_to_estimate(scenes, options.out_name, overwrite=options.overwrite)
    skipped = len(scenes) - len(todo)
    start = time.perf_counter()
    try:
        # the module-level name, so a stand-in estimator can be patched in here
        estimate_scenes(
            todo,
            options.out_name,
            layout,
            config,
            device=options.device,
            estimator=disparity_for_scene,
            progress=True,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    rate = f", {len(todo) / elapsed:.3f} scenes/s" if todo and elapsed > 0 else ""
    print(f"wrote {len(todo)} {options.out_name} file(s), skipped {skipped} already done{rate}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the estimator over every scene; returns the process exit code (0 = all scenes done)."""
    return estimate_all(parse_args(argv))
