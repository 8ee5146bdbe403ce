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
from pathlib import Path
from typing import Any

import torch

from dataset.synthetic import SyntheticConfig, write_dataset
from model.build import build_lfllm
from training.config import parse_args as parse_train_args
from training.features import prepare_feature_cache
from training.loaders import build_train_loader
from training.pretrain.tiny_base import write_tiny_base
from utils.distributed import DistInfo


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=16, help="training scenes generated")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--batches", type=int, default=12, help="batches of 2 scenes timed per variant")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="lfllm_loader_") as tmp:
        root = Path(tmp)
        cfg = SyntheticConfig(height=args.height, width=args.width, num_train=args.scenes, num_val=0, seed=0)
        write_dataset(root / "data", cfg, workers=2)
        refs = json.loads((root / "data" / "refer_seg" / cfg.ds_name / f"{cfg.ds_name}.json").read_text())
        paths = write_tiny_base(root / "base", [s["sent"] for r in refs for s in r["sentences"]], seed=0)
        model, tok = build_lfllm(paths["llava"], paths["sam"])
        steps = max(1, args.batches * 2 // 2)
        train_args = parse_train_args(
            ["--version", str(paths["llava"]), "--dataset_dir", str(root / "data"), "--refer_seg_data", cfg.ds_name,
             "--batch_size", "2", "--grad_accumulation_steps", "1", "--steps_per_epoch", str(steps), "--workers",
             "1", "--no_eval", "--precision", "fp32", "--feature_cache", str(root / "cache")]
        )  # fmt: skip
        cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        tic = time.perf_counter()
        store = prepare_feature_cache(train_args, model, tok, cpu, train=True, val=False)
        fill_s = time.perf_counter() - tic
        entries = list(store.folder.rglob("*.safetensors"))
        plain = _rate(build_train_loader(train_args, model.config, tok, 0)[0], 2)
        cached = _rate(build_train_loader(train_args, model.config, tok, 0, store=store)[0], 2)
        result = {
            "size": [args.height, args.width],
            "scenes": args.scenes,
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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result
