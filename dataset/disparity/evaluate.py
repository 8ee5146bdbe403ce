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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset.disparity.config import DisparityConfig, DisparityFlags
from dataset.disparity.estimator import block_matching_baseline, estimate_disparity
from dataset.lightfield import DEFAULT_LAYOUT, LightFieldLayout, load_light_field, read_disparity
from utils.options import add_option_flags, option, options_from_args
from utils.views import parse_views, view_set_offsets

__all__ = [
    "EvalOptions",
    "GenerationFlags",
    "disparity_metrics",
    "evaluate",
    "evaluate_and_report",
    "main",
    "parse_args",
]


@dataclass(frozen=True)
class GenerationFlags:
    """``--generate``: the synthetic benchmark :func:`dataset.synthetic.write_dataset` writes when the
    light-field folder of ``--ds`` is missing (validation scenes only)."""

    generate: bool = option(False, "write the synthetic benchmark if it is missing")
    height: int = option(480, "view height (px)")
    width: int = option(640, "view width (px)")
    num_val: int = option(6, "val scenes to generate (no train scenes)")
    seed: int = option(0, "generator seed")


@dataclass(frozen=True)
class EvalOptions:
    """The command line of ``scripts/eval_disparity.py``.

    Attributes:
        dataset_dir: root holding ``lf/<ds>/`` (``--dataset_dir``, required).
        ds: dataset name (``--ds``, required).
        estimator: our estimator's flags (:class:`DisparityFlags`).
        generation: the ``--generate`` group (:class:`GenerationFlags`).
    """

    dataset_dir: Path
    ds: str
    estimator: DisparityFlags = dataclasses.field(default_factory=DisparityFlags)
    generation: GenerationFlags = dataclasses.field(default_factory=GenerationFlags)
    gt_name: str = option(DEFAULT_LAYOUT.disparity_name, "GT disparity file name")
    split: str = option("all", "'all' or a split/subset of refer_seg/<ds>/<ds>.json")
    max_scenes: int = option(0, "evaluate at most this many scenes (0 = all)")
    border: int = option(15, "pixels cropped on every side")
    threshold: float = option(0.07, "BadPix threshold (px)")
    bm_window: int = option(9, "baseline SAD window (odd)")
    bm_view: str = option("5_6", "the baseline's second view (<row>_<col>)")
    extra_names: tuple[str, ...] = option(
        (), "also score this precomputed map", flag="extra_name", repeat=True
    )
    device: str = option("cpu", "cpu, cuda or cuda:<i>")
    threads: int = option(0, "torch CPU threads (0 = torch default)")
    json_out: str | None = option(None, "write per-scene and mean results here", flag="json", parse=str)


def parse_args(argv: Sequence[str] | None = None) -> EvalOptions:
    """The command line as :class:`EvalOptions`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_dir", required=True, help="root holding lf/<ds>/ (and refer_seg/<ds>/)")
    parser.add_argument("--ds", required=True, help="dataset name, e.g. ref-urbanlf-syn")
    add_option_flags(parser, EvalOptions)
    # our estimator's --views/--d_min/--d_max/--num_planes/--set
    add_option_flags(parser.add_argument_group("estimator (DisparityConfig)"), DisparityFlags)
    add_option_flags(parser.add_argument_group("benchmark generation (--generate)"), GenerationFlags)
    args = parser.parse_args(argv)
    base = EvalOptions(
        dataset_dir=Path(args.dataset_dir),
        ds=args.ds,
        estimator=options_from_args(DisparityFlags, args),
        generation=options_from_args(GenerationFlags, args),
    )
    return options_from_args(EvalOptions, args, base)


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
    bm_window: int = EvalOptions.bm_window,
    bm_offset: tuple[int, int] = (0, 1),
    extra_names: Sequence[str] = (),
    border: int = EvalOptions.border,
    threshold: float = EvalOptions.threshold,
    device: str = EvalOptions.device,
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


def _generate(root: Path, ds: str, generation: GenerationFlags) -> None:
    """Write the synthetic benchmark of ``ds`` under ``root`` unless its light-field folder exists."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    if (root / "lf" / ds).is_dir():
        return
    cfg = SyntheticConfig(
        height=generation.height,
        width=generation.width,
        num_train=0,
        num_val=generation.num_val,
        seed=generation.seed,
        ds_name=ds,
    )
    write_dataset(root, cfg, workers=1)


def evaluate_and_report(options: EvalOptions) -> int:
    """Print the accuracy table (and write ``--json``); returns the exit code (2: bad settings or no
    scenes)."""
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    root, ds = options.dataset_dir, options.ds
    if options.generation.generate:
        _generate(root, ds, options.generation)
    try:
        config = options.estimator.config()
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        scenes = _scene_dirs(root, ds, options.split, options.gt_name)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.max_scenes > 0:
        scenes = scenes[: options.max_scenes]
    if not scenes:
        print(f"error: no scenes with {options.gt_name} under {root / 'lf' / ds}", file=sys.stderr)
        return 2
    layout = LightFieldLayout(disparity_name=options.gt_name)
    try:
        (bm_offset,) = parse_views(options.bm_view, layout)
    except ValueError as exc:
        print(f"error: --bm_view: {exc}", file=sys.stderr)
        return 2
    result = evaluate(
        scenes,
        config,
        layout=layout,
        bm_window=options.bm_window,
        bm_offset=bm_offset,
        extra_names=options.extra_names,
        border=options.border,
        threshold=options.threshold,
        device=options.device,
    )
    result["settings"] = {
        "dataset_dir": str(root),
        "ds": ds,
        "border": options.border,
        "threshold": options.threshold,
        "config": dataclasses.asdict(config),
        "bm_window": options.bm_window,
        "bm_view": options.bm_view,
        "device": options.device,
        "threads": torch.get_num_threads(),
    }
    print(
        f"\n{result['num_scenes']} scenes, {result['num_views']} views for ours, border {options.border} px, "
        f"BadPix threshold {options.threshold} px, torch threads {torch.get_num_threads()}"
    )
    print(f"{'method':<28} {'MSE x100':>9} {'BadPix':>8} {'s/scene':>8}")
    for name, m in result["mean"].items():
        secs = f"{m['seconds_per_scene']:8.2f}" if "seconds_per_scene" in m else f"{'-':>8}"
        print(f"{name:<28} {m['mse_x100']:9.3f} {m['badpix']:7.2f}% {secs}")
    if options.json_out:
        Path(options.json_out).write_text(json.dumps(result, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the accuracy table (and write ``--json``); returns the exit code."""
    return evaluate_and_report(parse_args(argv))
