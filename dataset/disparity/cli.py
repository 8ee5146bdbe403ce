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
import re
import sys
import time
from collections.abc import Sequence

import torch

from dataset.disparity.cache import estimate_scenes, find_scenes, scenes_to_estimate, write_npy_atomic
from dataset.disparity.config import add_config_arguments, config_from_arguments
from dataset.disparity.estimator import disparity_for_scene
from dataset.errors import DataError
from dataset.lightfield import LightFieldLayout
from dataset.options import DEFAULT_ESTIMATED_NAME, check_cache_name

__all__ = ["disparity_for_scene", "find_scenes", "main", "parse_args", "write_npy_atomic"]

DEFAULT_OUT_NAME = DEFAULT_ESTIMATED_NAME


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; estimator defaults come from :class:`DisparityConfig`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lf_root", required=True, help="folder holding the scene folders (Image<id>/)")
    parser.add_argument("--out_name", default=DEFAULT_OUT_NAME, help="file written into each scene folder")
    parser.add_argument("--view_pattern", default="{row}_{col}.png", help="view file names, str.format")
    parser.add_argument("--center", default="5_5", help="centre view <row>_<col> (1-based)")
    parser.add_argument("--scene_glob", default="Image*", help="scene folder names under --lf_root")
    add_config_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--overwrite", action="store_true", help="recompute scenes that have --out_name")
    return parser.parse_args(argv)


def _parse_center(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)_(\d+)\s*", text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"--center must look like '5_5' (1-based <row>_<col>), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the estimator over every scene; returns the process exit code (0 = all scenes done)."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        layout = LightFieldLayout(view_pattern=args.view_pattern, center=_parse_center(args.center))
        config = config_from_arguments(args)
        check_cache_name(args.out_name)
        scenes = find_scenes(args.lf_root, args.scene_glob)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not scenes:
        print(f"error: no scene folders matching {args.scene_glob!r} under {args.lf_root}", file=sys.stderr)
        return 2
    todo = scenes_to_estimate(scenes, args.out_name, overwrite=args.overwrite)
    skipped = len(scenes) - len(todo)
    start = time.perf_counter()
    try:
        # the module-level name, so a stand-in estimator can be patched in here
        estimate_scenes(
            todo,
            args.out_name,
            layout,
            config,
            device=args.device,
            estimator=disparity_for_scene,
            progress=True,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    rate = f", {len(todo) / elapsed:.3f} scenes/s" if todo and elapsed > 0 else ""
    print(f"wrote {len(todo)} {args.out_name} file(s), skipped {skipped} already done{rate}")
    return 0
