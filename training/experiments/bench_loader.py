"""Benchmark the training data path with and without the feature cache: scenes/s of one loader worker.

Writes a small synthetic benchmark at the UrbanLF size (640×480, 9×9 views) to a temporary folder, builds
the tiny model (``training.pretrain.tiny_base``), fills a feature cache for it, then iterates the training loader
(``training.loaders.build_train_loader``, one worker process, the real collate) uncached and cached and
reports scenes/s of each, the cache's size per scene, and the time to fill it::

    .venv/bin/python scripts/bench_feature_cache.py --scenes 16 --json out/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataset.synthetic import SyntheticConfig, write_dataset
from model.build import build_lfllm
from training.config import RunConfig
from training.features import prepare_feature_cache
from training.loaders import build_train_loader
from training.pretrain.tiny_base import write_tiny_base
from utils.distributed import DistInfo
from utils.options import add_option_flags, at_least, option, options_from_args, problems


@dataclass(frozen=True)
class LoaderBenchOptions:
    """The data generated and how long each loader variant is timed."""

    scenes: int = option(16, "training scenes generated", check=at_least(1))
    height: int = option(480, "generated view height (px)", check=at_least(1))
    width: int = option(640, "generated view width (px)", check=at_least(1))
    batches: int = option(
        12, "batches of 2 scenes timed per variant (the first 2 untimed)", check=at_least(3)
    )
    json_path: str | None = option(None, "write the results here", flag="json", parse=str)

    def __post_init__(self) -> None:
        lines = problems(self)
        if lines:
            raise ValueError("; ".join(lines))


def parse_args(argv: Sequence[str] | None = None) -> LoaderBenchOptions:
    """The command line as :class:`LoaderBenchOptions` (``SystemExit`` with a message on a bad value)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_option_flags(p, LoaderBenchOptions)
    try:
        return options_from_args(LoaderBenchOptions, p.parse_args(argv))
    except ValueError as exc:
        p.error(str(exc).split("; ")[0])


def loader_config(data_dir: Path, ds_name: str, version: Path, cache: Path, batches: int) -> RunConfig:
    """``train_ds.py``'s configuration of the timed loaders: ``batches`` batches of 2 scenes from one worker,
    fp32, the feature cache in ``cache``."""
    return RunConfig().replace(
        run={"version": str(version), "precision": "fp32", "feature_cache": str(cache)},
        datasets={"dataset_dir": str(data_dir), "refer_seg_data": ds_name},
        loop={"batch_size": 2, "grad_accumulation_steps": 1, "steps_per_epoch": batches, "workers": 1},
        eval={"no_eval": True},
    )


def _rate(loader: Any, scenes_per_batch: int, warmup: int = 2) -> float:
    """Scenes per second over the batches after ``warmup`` (worker start-up excluded)."""
    times = []
    tic = time.perf_counter()
    for i, _ in enumerate(loader):
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - tic)
        tic = now
    return scenes_per_batch / statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: generate the data and the tiny model, fill the cache, time both loaders; returns the result
    (written to ``--json`` too)."""
    opts = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="lfllm_loader_") as tmp:
        root = Path(tmp)
        data = SyntheticConfig(height=opts.height, width=opts.width, num_train=opts.scenes, num_val=0, seed=0)
        write_dataset(root / "data", data, workers=2)
        refs = json.loads((root / "data" / "refer_seg" / data.ds_name / f"{data.ds_name}.json").read_text())
        paths = write_tiny_base(root / "base", [s["sent"] for r in refs for s in r["sentences"]], seed=0)
        model, tok = build_lfllm(paths["llava"], paths["sam"])
        cfg = loader_config(root / "data", data.ds_name, paths["llava"], root / "cache", opts.batches)
        cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        tic = time.perf_counter()
        store = prepare_feature_cache(cfg, model, tok, cpu, train=True, val=False)
        fill_s = time.perf_counter() - tic
        entries = list(store.folder.rglob("*.safetensors"))
        plain = _rate(build_train_loader(cfg, model.config, tok, 0)[0], 2)
        cached = _rate(build_train_loader(cfg, model.config, tok, 0, store=store)[0], 2)
        result = {
            "size": [opts.height, opts.width],
            "scenes": opts.scenes,
            "uncached_scenes_per_s": plain,
            "cached_scenes_per_s": cached,
            "speedup": cached / plain,
            "fill_s": fill_s,
            "entry_bytes_mean": sum(e.stat().st_size for e in entries) / len(entries),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg": list(os.getloadavg()),
        }
    print(json.dumps(result, indent=1))
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(result, indent=1))
    return result
