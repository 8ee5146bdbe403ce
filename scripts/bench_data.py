"""Benchmark the raw data loading layer: SceneDataset items/s through a DataLoader.

Each item is one scene: centre + neighbour PNGs decoded, centre disparity loaded, masks decoded at
original resolution (``mode="train"``, up to ``--num_classes_per_sample`` expressions).

    .venv/bin/python scripts/bench_data.py --workers 0,1,2 --samples 200

Without ``--dataset_dir`` a synthetic dataset (``dataset/synthetic.py``) of ``--width``×``--height`` is
written under ``.bench/`` once and reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch.utils.data
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.lightfield import read_disparity, read_rgb
from dataset.scenes import SceneDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_dir", default=None, help="existing dataset root (default: generate one)")
    parser.add_argument("--ds", default="ref-urbanlf-syn")
    parser.add_argument("--split", default="train")
    parser.add_argument("--views", default="4", help="neighbourhood name or view list (parse_views)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--samples", type=int, default=200, help="items timed per worker count")
    parser.add_argument("--num_classes_per_sample", type=int, default=3)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--num_train", type=int, default=24, help="scenes generated for the train split")
    parser.add_argument("--num_val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def ensure_dataset(args: argparse.Namespace) -> Path:
    """Use ``--dataset_dir`` or generate (once) a synthetic dataset under ``.bench/``."""
    if args.dataset_dir:
        return Path(args.dataset_dir)
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = (
        Path(__file__).resolve().parents[1]
        / ".bench"
        / (f"data_{args.width}x{args.height}_{args.num_train}_{args.num_val}_s{args.seed}")
    )
    if not (root / "refer_seg" / args.ds / f"{args.ds}.json").exists():  # write_dataset is atomic
        cfg = SyntheticConfig(
            height=args.height,
            width=args.width,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            ds_name=args.ds,
        )
        start = time.perf_counter()
        write_dataset(root, cfg, workers=2, overwrite=True)
        print(f"generated {root} in {time.perf_counter() - start:.1f} s")
    return root


def time_loader(data: SceneDataset, workers: int, samples: int) -> tuple[float, float]:
    """(steady items/s after the first item, seconds to the first item) over ``samples`` items."""
    # batch_size=None: items go through default_convert (arrays -> tensors, shared memory from workers).
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=True, num_workers=workers)
    got, epoch = 0, 0
    start = time.perf_counter()
    first_at = steady_from = None
    with tqdm(total=samples, desc=f"workers={workers}", unit="item", leave=False) as bar:
        while got < samples:
            data.set_epoch(epoch)
            for _ in loader:
                got += 1
                bar.update()
                if first_at is None:
                    first_at = steady_from = time.perf_counter()
                if got >= samples:
                    break
            epoch += 1
    elapsed = time.perf_counter() - steady_from
    return (got - 1) / elapsed, first_at - start


def stage_times(data: SceneDataset, count: int = 10) -> dict[str, float]:
    """Mean milliseconds per item of each stage, measured in this process on ``count`` items."""
    totals = {"view PNG decode (each)": 0.0, "disparity .npy": 0.0, "masks": 0.0}
    n_views = 0
    for index in range(min(count, len(data))):
        scene = data.scene_path(index)
        for offset in ((0, 0), *data.offsets):
            t = time.perf_counter()
            read_rgb(scene / data.layout.view_name(offset))
            totals["view PNG decode (each)"] += time.perf_counter() - t
            n_views += 1
        t = time.perf_counter()
        read_disparity(scene / data.layout.disparity_name)
        totals["disparity .npy"] += time.perf_counter() - t
        t = time.perf_counter()
        ann = data.annotations[data.scenes[index].ds_index]
        for ref in data.scenes[index].refs:
            ann.mask(ref.ann_id)
        totals["masks"] += time.perf_counter() - t
    items = min(count, len(data))
    return {
        "view PNG decode (each)": 1e3 * totals["view PNG decode (each)"] / n_views,
        "disparity .npy": 1e3 * totals["disparity .npy"] / items,
        "masks (all refs of a scene)": 1e3 * totals["masks"] / items,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = ensure_dataset(args)
    data = SceneDataset(
        root,
        args.ds,
        args.split,
        views=args.views,
        mode="train",
        num_classes_per_sample=args.num_classes_per_sample,
        seed=args.seed,
    )
    item = data[0]
    h, w = item["center"].shape[:2]
    print(
        f"dataset {root} [{args.ds}/{args.split}]: {len(data)} scenes, {h}x{w}, "
        f"{len(data.offsets)} neighbours + disparity, torch threads {torch.get_num_threads()}"
    )
    for stage, ms in stage_times(data).items():
        print(f"  {stage:<28} {ms:7.2f} ms")
    rows = []
    for workers in (int(x) for x in args.workers.split(",")):
        rate, first = time_loader(data, workers, args.samples)
        rows.append((workers, rate, rate / max(workers, 1), first))
    print("\n| workers | items/s | items/s per worker | first item (s) |\n|---|---|---|---|")
    for workers, rate, per_worker, first in rows:
        label = "0 (main process)" if workers == 0 else str(workers)
        print(f"| {label} | {rate:.1f} | {per_worker:.1f} | {first:.2f} |")
    mb = sum(np.asarray(v).nbytes for v in item.values() if isinstance(v, np.ndarray)) / 2**20
    print(f"\none item ≈ {mb:.1f} MiB of arrays; {args.samples} items timed per row (first item excluded)")


if __name__ == "__main__":
    main()
