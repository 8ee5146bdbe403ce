"""The step benchmark's head comparison (``--compare_light SIZE``): the light mask head's training step timed
against the model's own route, the two engines' steps interleaved so both see the same machine state."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from dataset.collate import move_batch
from model.options import ModelOptions
from training.config import RunConfig
from training.engine import build_engine
from training.experiments.bench_inputs import batch_shape, synthetic_batch
from training.experiments.bench_options import BenchOptions, step_config
from training.experiments.bench_report import Meter, median_row
from training.trainer import train_micro_step


def light_options(cfg: RunConfig, detail_size: int) -> ModelOptions:
    """The model's options with the light mask head instead of SAM (the SAM-route extras dropped)."""
    model = cfg.model
    return dataclasses.replace(
        model,
        mask_head="light",
        light_detail_size=detail_size,
        semantic_fusion=False,
        depth_stream=False,
        caam_target="clip" if model.caam_target == "sam" else model.caam_target,
    )


def run_head_pair(
    model: Any, light: Any, ids: Any, opts: BenchOptions, cfg: RunConfig, dist_info: Any, meter: Meter
) -> dict[str, Any]:
    """One training step of ``model`` (its route) then one of ``light`` (the light head), on two engines
    built by ``train_ds.py``'s :func:`build_engine`, timed pair by pair under the same machine state (as
    the cache benchmark interleaves); the row reports the light step and the median per-pair ratio."""
    train_cfg = step_config(opts, cfg)
    seed = train_cfg.loop.seed
    batches = [
        move_batch(
            synthetic_batch(
                m.config, ids, images=opts.images, expressions=opts.expressions, text_tokens=opts.text_tokens,
                original_hw=opts.original_hw, pack=cfg.loop.pack_conversations, seed=seed,
            ),
            dist_info.device,
        )
        for m in (model, light)
    ]  # fmt: skip
    meter.reset_peak()
    engines = [build_engine(m, train_cfg, on_cpu=dist_info.device.type == "cpu")[0] for m in (model, light)]
    route_times: list[float] = []
    losses: list[float] = []

    def pair(i: int) -> None:
        meter.sync()
        tic = time.perf_counter()
        train_micro_step(engines[0], batches[0], 2 * i, seed, dist_info)
        meter.sync()
        route_times.append(time.perf_counter() - tic)
        losses.append(float(train_micro_step(engines[1], batches[1], 2 * i + 1, seed, dist_info)[0]))

    pair_times = meter.times(pair, opts.warmup, opts.steps)
    route_times = route_times[opts.warmup :]
    times = [total - r for total, r in zip(pair_times, route_times, strict=True)]
    peak, kind = meter.peak()
    trainable = sum(p.numel() for p in engines[1].module.parameters() if p.requires_grad)
    return {
        "mode": "train",
        "desc": f"train step, light head at {opts.compare_light} px (interleaved with the {cfg.model.mask_head} route)",
        **median_row(times),
        "images_per_s": opts.images / statistics.median(times),
        "route_interleaved_s_median": statistics.median(route_times),
        "light_over_route": statistics.median(t / r for t, r in zip(times, route_times, strict=True)),
        "trainable_M": trainable / 1e6,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        "losses": losses,
        **batch_shape(batches[1], ids),
    }
