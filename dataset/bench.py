"""Benchmark the raw data loading layer: SceneDataset items/s through a DataLoader.

Each item is one scene: centre + neighbour PNGs decoded, centre disparity loaded, masks decoded at
original resolution (``mode="train"``, up to ``--num_classes_per_sample`` expressions). Rows report items/s
through a ``DataLoader`` (``batch_size=None``) for each ``num_workers`` of ``--workers``, steady state (the
first item, which pays for worker start-up, is timed separately).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_data.py --workers 0,1,2 --samples 200

Without ``--dataset_dir`` a synthetic dataset (``dataset/synthetic.py``) of ``--width``×``--height`` with
``--num_train`` + ``--num_val`` scenes is written under ``--cache_dir`` once and reused.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data
from tqdm import tqdm

from dataset.lightfield import read_disparity, read_rgb
from dataset.scenes import SceneDataset
from utils.options import add_option_flags, option, options_from_args


@dataclass(frozen=True)
class BenchOptions:
    """The command line of ``scripts/bench_data.py``: the data to read, the loader settings timed and the
    synthetic dataset generated when no ``dataset_dir`` is given."""

    dataset_dir: str | None = option(None, "existing dataset root (default: generate one)", parse=str)
    ds: str = option("ref-urbanlf-syn", "dataset name")
    split: str = option("train", "split read")
    views: str = option("4", "neighbourhood name or view list (parse_views)")
    workers: str = option("0,1,2", "comma-separated DataLoader worker counts")
    samples: int = option(200, "items timed per worker count (>= 2)")
    num_classes_per_sample: int = option(3, "expressions per item")
    width: int = option(640, "generated view width (px)")
    height: int = option(480, "generated view height (px)")
    num_train: int = option(8, "scenes generated for the train split")
    num_val: int = option(2, "scenes generated for the val split")
    cache_dir: str = option(
        str(Path(tempfile.gettempdir()) / "lfllm_bench"), "where a generated dataset is kept between runs"
    )
    seed: int = option(0, "generator, sampler and dataset seed")

    @property
    def worker_counts(self) -> list[int]:
        """``workers`` as integers (``"0,1,2"`` -> ``[0, 1, 2]``); ``ValueError`` when it is not."""
        return [int(x) for x in self.workers.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """The command line as :class:`BenchOptions`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_option_flags(parser, BenchOptions)
    options = options_from_args(BenchOptions, parser.parse_args(argv))
    if options.samples < 2:
        parser.error(f"--samples must be >= 2, got {options.samples}")
    try:
        options.worker_counts  # noqa: B018 - parsed here to refuse a bad list early
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {options.workers!r}")
    return options


def ensure_dataset(options: BenchOptions) -> Path:
    """Use ``options.dataset_dir`` or generate (once) a synthetic dataset under ``options.cache_dir``."""
    if options.dataset_dir:
        return Path(options.dataset_dir)
    from dataset.synthetic import SyntheticConfig, write_dataset

    size = f"{options.width}x{options.height}"
    root = Path(options.cache_dir) / f"data_{size}_{options.num_train}_{options.num_val}_s{options.seed}"
    if not (root / "refer_seg" / options.ds / f"{options.ds}.json").exists():  # write_dataset is atomic
        cfg = SyntheticConfig(
            height=options.height,
            width=options.width,
            num_train=options.num_train,
            num_val=options.num_val,
            seed=options.seed,
            ds_name=options.ds,
        )
        start = time.perf_counter()
        write_dataset(root, cfg, workers=2, overwrite=True)
        print(f"generated {root} in {time.perf_counter() - start:.1f} s")
    return root


def time_loader(data: SceneDataset, workers: int, samples: int, seed: int = 0) -> tuple[float, float]:
    """(steady items/s after the first item, seconds to the first item) over ``samples`` items.

    One loader iterator draws ``samples`` indices (random permutations of the scenes, repeated as needed),
    so worker start-up is paid once, in the first item, whatever the number of scenes.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (the first item is excluded from the rate), got {samples}")
    sampler = torch.utils.data.RandomSampler(
        data, num_samples=samples, generator=torch.Generator().manual_seed(seed)
    )
    # batch_size=None: items go through default_convert (arrays -> tensors, shared memory from workers).
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers)
    got = 0
    start = time.perf_counter()
    first_at = None
    with tqdm(total=samples, desc=f"workers={workers}", unit="item", leave=False) as bar:
        for _ in loader:
            got += 1
            bar.update()
            if first_at is None:
                first_at = time.perf_counter()
    elapsed = time.perf_counter() - first_at
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
            ann.ref_mask(ref)
        totals["masks"] += time.perf_counter() - t
    items = min(count, len(data))
    return {
        "view PNG decode (each)": 1e3 * totals["view PNG decode (each)"] / n_views,
        "disparity .npy": 1e3 * totals["disparity .npy"] / items,
        "masks (all refs of a scene)": 1e3 * totals["masks"] / items,
    }


def machine() -> str:
    """One line naming the CPU, the cores this process may use, the library versions and the 1-minute load
    average (other processes on a shared machine slow every row down)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import cv2

    return (
        f"{model}, {cores} cores available, Python {platform.python_version()}, torch {torch.__version__}, "
        f"OpenCV {cv2.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def run_bench(options: BenchOptions) -> list[dict]:
    """Run the benchmark and print its table; returns one row per worker count: ``workers``,
    ``items_per_s``, ``items_per_s_per_worker``, ``first_item_s``."""
    root = ensure_dataset(options)
    data = SceneDataset(
        root,
        options.ds,
        options.split,
        views=options.views,
        mode="train",
        num_classes_per_sample=options.num_classes_per_sample,
        seed=options.seed,
    )
    item = data[0]
    h, w = item["center"].shape[:2]
    print(f"machine: {machine()}")
    print(
        f"dataset {root} [{options.ds}/{options.split}]: {len(data)} scenes, {h}x{w}, "
        f"{len(data.offsets)} neighbours + disparity, torch threads {torch.get_num_threads()}"
    )
    for stage, ms in stage_times(data).items():
        print(f"  {stage:<28} {ms:7.2f} ms")
    rows = []
    for workers in options.worker_counts:
        rate, first = time_loader(data, workers, options.samples, options.seed)
        rows.append(
            {
                "workers": workers,
                "items_per_s": rate,
                "items_per_s_per_worker": rate / max(workers, 1),
                "first_item_s": first,
            }
        )
    print("\n| num_workers | items/s | items/s per worker | first item (s) |\n|---|---|---|---|")
    for row in rows:
        label = "0 (main process)" if row["workers"] == 0 else str(row["workers"])
        print(
            f"| {label} | {row['items_per_s']:.1f} | {row['items_per_s_per_worker']:.1f} "
            f"| {row['first_item_s']:.2f} |"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    mb = sum(np.asarray(v).nbytes for v in item.values() if isinstance(v, np.ndarray)) / 2**20
    print(f"one item ≈ {mb:.1f} MiB of arrays; {options.samples} items timed per row (first item excluded)")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Entry point; returns the rows of :func:`run_bench`."""
    return run_bench(parse_args(argv))
