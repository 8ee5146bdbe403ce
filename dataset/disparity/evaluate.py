"""Accuracy of the built-in disparity estimator against ground truth (UrbanLF depth-benchmark conventions).

For every scene of ``<dataset_dir>/lf/<ds>/`` with a GT ``5_5_disparity.npy`` this runs

* **ours**: :func:`dataset.disparity.estimator.estimate_disparity` (default config, ``--views`` view set), and
* **baseline**: naive two-view block matching (centre vs ``5_6`` only (``--bm_view``), SAD over a
  ``--bm_window`` box, winner-takes-all over the same planes; :func:`dataset.disparity.estimator.block_matching_baseline`),

and scores them on the centre view with a ``--border`` px border cropped: ``MSE x 100`` (mean squared error
in px², times 100) and ``BadPix(t)`` (percentage of pixels with ``|error| > t``, ``t = 0.07``), averaged over
scenes; time per scene excludes file reading. Extra precomputed maps (e.g. an OAVC result or the output of
``scripts/estimate_disparity.py``) can be scored too with ``--extra_name``.

One command reproduces the table of ``docs/DISPARITY.md`` (``--generate`` writes the synthetic benchmark with
:func:`dataset.synthetic.write_dataset` first when it is not there yet):

    .venv/bin/python scripts/eval_disparity.py --dataset_dir /tmp/lfllm_disp_bench --ds ref-urbanlf-syn \\
        --generate --num_val 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset.disparity.config import DisparityConfig, add_config_arguments, config_from_arguments
from dataset.disparity.estimator import block_matching_baseline, estimate_disparity
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, load_light_field, read_disparity
from utils.views import parse_views, view_set_offsets

__all__ = ["disparity_metrics", "evaluate", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_dir", required=True, help="root holding lf/<ds>/ (and refer_seg/<ds>/)")
    parser.add_argument("--ds", required=True, help="dataset name, e.g. ref-urbanlf-syn")
    parser.add_argument("--gt_name", default=DEFAULT_LAYOUT.disparity_name, help="GT disparity file name")
    parser.add_argument("--split", default="all", help="'all' or a split/subset of refer_seg/<ds>/<ds>.json")
    parser.add_argument(
        "--max_scenes", type=int, default=0, help="evaluate at most this many scenes (0 = all)"
    )
    parser.add_argument("--border", type=int, default=15, help="pixels cropped on every side")
    parser.add_argument("--threshold", type=float, default=0.07, help="BadPix threshold (px)")
    add_config_arguments(parser)  # our estimator's --views/--d_min/--d_max/--num_planes/--set
    parser.add_argument("--bm_window", type=int, default=9, help="baseline SAD window (odd)")
    parser.add_argument("--bm_view", default="5_6", help="the baseline's second view (<row>_<col>)")
    parser.add_argument("--extra_name", action="append", default=[], help="also score this precomputed map")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", default=None, help="write per-scene and mean results here")
    gen = parser.add_argument_group("benchmark generation (--generate)")
    gen.add_argument("--generate", action="store_true", help="write the synthetic benchmark if it is missing")
    gen.add_argument("--height", type=int, default=480)
    gen.add_argument("--width", type=int, default=640)
    gen.add_argument("--num_val", type=int, default=6, help="val scenes to generate (no train scenes)")
    gen.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def disparity_metrics(
    estimate: np.ndarray, gt: np.ndarray, border: int = 15, threshold: float = 0.07
) -> dict[str, float]:
    """UrbanLF/HCI-style scores of one ``(H, W)`` map against GT ``(H, W)``, ``border`` px cropped.

    Returns ``{"mse_x100": 100 * mean(err^2), "badpix": 100 * mean(|err| > threshold)}``.
    """
    if estimate.shape != gt.shape:
        raise ValueError(f"estimate shape {estimate.shape} differs from GT shape {gt.shape}")
    h, w = gt.shape
    if 2 * border >= min(h, w):
        raise ValueError(f"border {border} leaves nothing of a {h}x{w} map")
    crop = (slice(border, h - border), slice(border, w - border))
    err = estimate[crop].astype(np.float64) - gt[crop].astype(np.float64)
    return {
        "mse_x100": float(100.0 * np.mean(err**2)),
        "badpix": float(100.0 * np.mean(np.abs(err) > threshold)),
    }


def _scene_dirs(dataset_dir: Path, ds: str, split: str, gt_name: str) -> list[Path]:
    lf_root = dataset_dir / "lf" / ds
    if not lf_root.is_dir():
        raise FileNotFoundError(f"{lf_root}: no light-field folder (use --generate to write the benchmark)")
    scenes = [p for p in lf_root.glob("Image*") if (p / gt_name).is_file()]
    if split != "all":
        refs_path = dataset_dir / "refer_seg" / ds / f"{ds}.json"
        refs = json.loads(refs_path.read_text())
        ids = {r["image_id"] for r in refs if r.get("split") == split or split in r.get("subsets", ())}
        scenes = [
            p for p in scenes if p.name[len("Image") :].isdigit() and int(p.name[len("Image") :]) in ids
        ]
    return sorted(scenes, key=lambda p: int(p.name[len("Image") :]) if p.name[5:].isdigit() else 0)


def _tensor(image: np.ndarray, device: str) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255.0


def evaluate(
    scenes: Sequence[Path],
    config: DisparityConfig,
    *,
    layout: LightFieldLayout = DEFAULT_LAYOUT,
    bm_window: int = 9,
    bm_offset: tuple[int, int] = (0, 1),
    extra_names: Sequence[str] = (),
    border: int = 15,
    threshold: float = 0.07,
    device: str = "cpu",
) -> dict:
    """Score ours, the baseline and any extra maps on ``scenes``; returns per-scene and mean results."""
    offsets = view_set_offsets(config.views, layout.center)
    all_offsets = torch.tensor([(0, 0), *offsets])
    per_scene: list[dict] = []
    timings: dict[str, list[float]] = {"ours": [], "baseline": []}
    for scene in tqdm(scenes, desc="eval disparity", unit="scene"):
        sample = load_light_field(scene, offsets, layout)
        gt = sample.disparity
        stack = np.concatenate([sample.center[None], sample.views])  # (N, H, W, 3) uint8, centre first
        views = torch.from_numpy(stack).to(device).permute(0, 3, 1, 2)[None].float() / 255.0
        center = views[:, 0]
        if bm_offset in offsets:
            base_view = views[:, 1 + list(offsets).index(bm_offset)]
        else:
            extra = load_light_field(scene, [bm_offset], layout, with_disparity=False)
            base_view = _tensor(extra.views[0], device)
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "ours": lambda views=views: estimate_disparity(views, all_offsets, 0, config)[0],
            "baseline": lambda center=center, base_view=base_view: block_matching_baseline(
                center, base_view, bm_offset, config.d_min, config.d_max, config.num_planes, bm_window
            )[0],
        }
        row: dict = {"scene": scene.name}
        for name, run in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            est = run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - t0)
            row[name] = disparity_metrics(est.cpu().numpy(), gt, border, threshold)
        for name in extra_names:
            row[name] = disparity_metrics(read_disparity(scene / name, gt.shape), gt, border, threshold)
        per_scene.append(row)
    methods = ["ours", "baseline", *extra_names]
    mean = {
        m: {k: float(np.mean([r[m][k] for r in per_scene])) for k in ("mse_x100", "badpix")} for m in methods
    }
    for m, times in timings.items():
        mean[m]["seconds_per_scene"] = float(np.mean(times))
    return {"scenes": per_scene, "mean": mean, "num_scenes": len(per_scene), "num_views": len(offsets) + 1}


def _generate(args: argparse.Namespace, root: Path) -> None:
    from dataset.synthetic import SyntheticConfig, write_dataset

    if (root / "lf" / args.ds).is_dir():
        return
    cfg = SyntheticConfig(
        height=args.height,
        width=args.width,
        num_train=0,
        num_val=args.num_val,
        seed=args.seed,
        ds_name=args.ds,
    )
    write_dataset(root, cfg, workers=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the accuracy table (and write ``--json``); returns the exit code."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    root = Path(args.dataset_dir)
    if args.generate:
        _generate(args, root)
    try:
        config = config_from_arguments(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        scenes = _scene_dirs(root, args.ds, args.split, args.gt_name)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_scenes > 0:
        scenes = scenes[: args.max_scenes]
    if not scenes:
        print(f"error: no scenes with {args.gt_name} under {root / 'lf' / args.ds}", file=sys.stderr)
        return 2
    layout = LightFieldLayout(disparity_name=args.gt_name)
    try:
        (bm_offset,) = parse_views(args.bm_view, layout)
    except ValueError as exc:
        print(f"error: --bm_view: {exc}", file=sys.stderr)
        return 2
    result = evaluate(
        scenes,
        config,
        layout=layout,
        bm_window=args.bm_window,
        bm_offset=bm_offset,
        extra_names=args.extra_name,
        border=args.border,
        threshold=args.threshold,
        device=args.device,
    )
    result["settings"] = {
        "dataset_dir": str(root),
        "ds": args.ds,
        "border": args.border,
        "threshold": args.threshold,
        "config": dataclasses.asdict(config),
        "bm_window": args.bm_window,
        "bm_view": args.bm_view,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    print(
        f"\n{result['num_scenes']} scenes, {result['num_views']} views for ours, border {args.border} px, "
        f"BadPix threshold {args.threshold} px, torch threads {torch.get_num_threads()}"
    )
    print(f"{'method':<28} {'MSE x100':>9} {'BadPix':>8} {'s/scene':>8}")
    for name, m in result["mean"].items():
        secs = f"{m['seconds_per_scene']:8.2f}" if "seconds_per_scene" in m else f"{'-':>8}"
        print(f"{name:<28} {m['mse_x100']:9.3f} {m['badpix']:7.2f}% {secs}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
