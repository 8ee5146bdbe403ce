"""Benchmark one LFLLM training step (the DeepSpeed step of ``train_ds.py``), validation and chat latency.

The model is built at a size preset with random init and nothing downloaded:

* ``tiny``: a tiny HF LLaVA + SAM is written to a temporary folder (``training.pretrain.tiny_base.write_tiny_base``) and
  loaded with ``model.build.build_lfllm``, the loading path of real weights (``--build direct`` skips it).
* ``7b`` / ``13b``: built directly on the GPU in the training precision (``torch.device("cuda")`` with the
  default dtype set), no checkpoint written; the vocabulary is ``llava-1.5-7b-hf``'s (32000 tokens +
  ``<image>``, ``<pad>``, padded to 32064 rows) plus our ``[SEG]``, ``<depth>``, ``<im_start>``, ``<im_end>``.

Inputs are synthetic but of the real shapes: ``--images`` scenes (2) × ``--expressions`` (3), UrbanLF
640×480 originals, depth + CAAM on (4 neighbour views + disparity at CLIP and SAM geometry), and
conversations of ``--text_tokens`` (80) text tokens besides the expanded ``<depth>``/``<image>`` runs
(llava_v1 layout: BOS + system + ``USER:``, the visual block, question + ``ASSISTANT:`` + an answer of 8
labelled tokens holding one ``[SEG]``). ``--pack_conversations`` puts all expressions of a scene in one
multi-turn conversation (visual block once, one ``[SEG]`` per turn). Batches go through
``dataset.collate.collate_batch``.

The timed training step is ``training.trainer.train_micro_step`` itself (``engine(lf_batch=batch)``,
``engine.backward(loss)``, ``engine.step()``) on the engine ``train_ds.py`` builds
(``training.engine.build_engine``: ``make_trainable``, ``deepspeed_config`` with
``--grad_accumulation_steps 1`` so every step is an optimiser step, ``deepspeed.initialize``), in train
mode (``engine.train()``, as ``train_ds.py`` does). ``train_ds.py``'s flags the benchmark takes (model
options, ``--gradient_checkpointing``, ``--seed``, ``--zero_stage``, ...) are those of its option
dataclasses (``training/experiments/bench_options.py``). Reported: median step time after ``--warmup``
steps, images/s, peak memory
(``torch.cuda.max_memory_allocated`` since the model was built; on CPU the process's peak RSS from
``getrusage``, which includes the build), FLOPs counted with ``FlopCounterMode`` over one whole step
(forward, backward, optimiser; recomputation included with gradient checkpointing) and the achieved rate.
``--eval``: teacher-forced validation (``model.inference.teacher_forced_masks``, 1 scene × 3 expressions).
``--chat``: latency of one query (1 scene, 1 expression) through ``model.inference.generate_masks`` (the
``chat.py`` path, KV cache), with ``[SEG]`` favoured in greedy decoding so that every query generates
exactly ``--max_new_tokens`` tokens and takes the mask path (random weights would stop at random lengths).
Eval and chat run on the plain model (as after merging), before it is wrapped for training.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train_step.py --preset tiny --eval --chat
    python scripts/bench_train_step.py --preset 7b --eval --chat --torch_adam --json out/7b.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dataset.collate import move_batch
from model.build import DTYPES
from model.inference import generate_masks, teacher_forced_masks
from model.trainable import unwrap
from training.config import RunConfig
from training.engine import build_engine, forget_deepspeed_world_group, setup_single_process
from training.experiments.bench_heads import light_options, run_head_pair
from training.experiments.bench_inputs import batch_shape, build_model, synthetic_batch
from training.experiments.bench_options import BenchOptions, base_dir, step_config
from training.experiments.bench_options import parse_args as parse_bench_args
from training.experiments.bench_report import Meter, count_flops, environment, median_row, table
from training.features import cached_batch
from training.trainer import train_micro_step


# ---------------------------------------------------------------------------------------------- phases
def run_eval(
    model: Any, ids: Any, opts: BenchOptions, cfg: RunConfig, device: torch.device, meter: Meter
) -> list[dict[str, Any]]:
    """Rows of teacher-forced validation (1 scene × ``--expressions``), plain and with ``--feature_cache``."""
    batch = move_batch(
        synthetic_batch(
            model.config,
            ids,
            images=1,
            expressions=opts.expressions,
            text_tokens=opts.text_tokens,
            original_hw=opts.original_hw,
            seed=cfg.loop.seed + 1,
        ),
        device,
    )
    model.eval()
    rows = []
    variants = [("", batch)]
    if opts.feature_cache:
        variants.append((" (feature cache)", cached_batch(model, batch)))
    for suffix, data in variants:
        meter.reset_peak()
        with torch.no_grad():
            times = meter.times(lambda _, d=data: teacher_forced_masks(model, d), opts.warmup, opts.steps)
        med = statistics.median(times)
        peak, kind = meter.peak()
        rows.append(
            {
                "mode": "eval",
                "desc": f"eval, teacher-forced, 1 image × {opts.expressions} expressions{suffix}",
                **median_row(times),
                "images_per_s": 1 / med,
                "expressions_per_s": opts.expressions / med,
                "peak_memory_GiB": peak,
                "peak_memory_kind": kind,
                **batch_shape(batch, ids),
            }
        )
    return rows


def run_chat(
    model: Any,
    tokenizer: Any,
    ids: Any,
    opts: BenchOptions,
    cfg: RunConfig,
    device: torch.device,
    meter: Meter,
) -> dict[str, Any]:
    """The row of one chat query's latency (1 scene, 1 expression, ``--max_new_tokens`` generated)."""
    batch = move_batch(
        synthetic_batch(
            model.config,
            ids,
            images=1,
            expressions=1,
            text_tokens=opts.text_tokens,
            original_hw=opts.original_hw,
            with_answer=False,
            seed=cfg.loop.seed + 2,
        ),
        device,
    )
    tok = tokenizer or SimpleNamespace(
        eos_token_id=ids.eos, pad_token_id=ids.pad, decode=lambda t, **_: " ".join(map(str, t))
    )
    model.eval()
    gen_config = model.generation_config
    saved = gen_config.sequence_bias
    gen_config.sequence_bias = {(ids.seg,): 1e4}  # greedy: always [SEG], never EOS (see the module doc)
    generated: list[Any] = []
    new_tokens = cfg.generation.max_new_tokens
    meter.reset_peak()
    try:
        times = meter.times(
            lambda _: generated.append(generate_masks(model, batch, tok, new_tokens)[0][0]),
            opts.warmup,
            opts.chat_queries,
        )
    finally:
        gen_config.sequence_bias = saved
    last = generated[-1]
    med = statistics.median(times)
    peak, kind = meter.peak()
    return {
        "mode": "chat",
        "desc": f"chat query (1 image, 1 expression, {new_tokens} new tokens, KV cache)",
        **median_row(times),
        "latency_s_per_query": med,
        "new_tokens": len(last.token_ids),
        "mask_decoded": last.mask_logits is not None,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        **batch_shape(batch, ids),
    }


def run_train(
    model: Any, ids: Any, opts: BenchOptions, cfg: RunConfig, dist_info: Any, meter: Meter
) -> tuple[list[dict[str, Any]], Any]:
    """Wrap the model with ``train_ds.py``'s own :func:`training.engine.build_engine` and time
    :func:`training.trainer.train_micro_step`."""
    train_cfg = step_config(opts, cfg)
    device, seed = dist_info.device, train_cfg.loop.seed
    batch = synthetic_batch(
        model.config,
        ids,
        images=opts.images,
        expressions=opts.expressions,
        text_tokens=opts.text_tokens,
        original_hw=opts.original_hw,
        pack=cfg.loop.pack_conversations,
        seed=cfg.loop.seed,
    )
    meter.sync()
    tic = time.perf_counter()
    batch = move_batch(batch, device)  # train_micro_step moves it again: a no-op for tensors already there
    meter.sync()
    to_device_s = time.perf_counter() - tic

    meter.reset_peak()
    engine, _ = build_engine(model, train_cfg, on_cpu=device.type == "cpu")
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    losses: list[float] = []

    def step(i: int) -> None:
        losses.append(float(train_micro_step(engine, batch, i, seed, dist_info)[0]))

    times = meter.times(step, opts.warmup, opts.steps)
    med = statistics.median(times)
    peak, kind = meter.peak()
    row: dict[str, Any] = {
        "mode": "train",
        "desc": "train step" + (" (packed conversations)" if cfg.loop.pack_conversations else ""),
        **median_row(times),
        "images_per_s": opts.images / med,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        "trainable_M": trainable / 1e6,
        "batch_to_device_s": to_device_s,
        "losses": losses,
        **batch_shape(batch, ids),
    }
    if opts.flops:
        n = opts.warmup + opts.steps
        flops, _ = count_flops(lambda: train_micro_step(engine, batch, n, seed, dist_info))
        inner = unwrap(engine.module)
        with torch.no_grad():
            forward, parts = count_flops(lambda: inner.forward_lf(batch))
        row.update(
            step_TFLOP=flops / 1e12,
            achieved_TFLOPs=flops / 1e12 / med,
            forward_TFLOP=forward / 1e12,
            forward_TFLOP_by_module={k: v / 1e12 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        )
    rows = [row]
    if opts.feature_cache:
        cached = cached_batch(unwrap(engine.module), batch)
        first = opts.warmup + opts.steps + 1
        cached_losses: list[float] = []

        # Interleaved with uncached steps on the same engine: the two are timed under the same machine
        # state (on a shared VM the step time drifts by tens of percent between phases run one after
        # the other), and the ratio is the median of the per-pair ratios.
        plain_times: list[float] = []

        def pair(i: int) -> None:
            meter.sync()
            tic = time.perf_counter()
            train_micro_step(engine, batch, first + 2 * i, seed, dist_info)
            meter.sync()
            plain_times.append(time.perf_counter() - tic)
            out = train_micro_step(engine, cached, first + 2 * i + 1, seed, dist_info)
            cached_losses.append(float(out[0]))

        meter.reset_peak()
        pair_times = meter.times(pair, opts.warmup, opts.steps)
        plain_times = plain_times[opts.warmup :]
        times = [total - p for total, p in zip(pair_times, plain_times)]
        med_c = statistics.median(times)
        ratio = statistics.median(p / c for p, c in zip(plain_times, times))
        peak, kind = meter.peak()
        rows.append(
            {
                "mode": "train",
                "desc": row["desc"] + " (feature cache)",
                **median_row(times),
                "images_per_s": opts.images / med_c,
                "speedup_vs_uncached": ratio,
                "uncached_interleaved_s_median": statistics.median(plain_times),
                "peak_memory_GiB": peak,
                "peak_memory_kind": kind,
                "losses": cached_losses,
                **batch_shape(batch, ids),
            }
        )
    return rows, engine


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: build the model, run the phases asked for, print each row and the table; returns the result
    (written to ``--json`` too)."""
    opts, cfg = parse_args(argv)
    version, vision_pretrained = base_dir(cfg)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if opts.preset != "tiny" and not version:
            raise SystemExit(
                f"--preset {opts.preset} needs a GPU (none is visible); use --preset tiny on CPU"
            )
    cfg = cfg.replace(run={"precision": opts.precision or ("bf16" if cuda else "fp32")})
    precision = cfg.run.precision
    dist_info, created = None, False
    if opts.train:
        dist_info, created = setup_single_process(on_cpu=not cuda)
    device = dist_info.device if dist_info else torch.device("cuda" if cuda else "cpu")
    meter = Meter(device)
    env_before = environment(device)
    model, tokenizer, ids, build_s = build_model(
        opts.preset, opts.build, cfg.model, device, DTYPES[precision], seed=cfg.loop.seed, version=version,
        vision_pretrained=vision_pretrained,
    )  # fmt: skip
    print(f"built {opts.preset} ({opts.build}, {precision}) in {build_s:.1f} s on {device}", flush=True)
    rows = []
    try:
        if opts.eval:
            for row in run_eval(model, ids, opts, cfg, device, meter):
                rows.append(row)
                print(json.dumps(row), flush=True)
        if opts.chat:
            rows.append(run_chat(model, tokenizer, ids, opts, cfg, device, meter))
            print(json.dumps(rows[-1]), flush=True)
        if opts.train:
            train_rows, engine = run_train(model, ids, opts, cfg, dist_info, meter)
            for row in train_rows:
                rows.append(row)
                print(json.dumps(row), flush=True)
            del engine
        if opts.train and opts.compare_light:
            light, _, light_ids, _ = build_model(
                opts.preset, opts.build, light_options(cfg, opts.compare_light), device, DTYPES[precision],
                seed=cfg.loop.seed, version=version,
            )  # fmt: skip
            # a fresh copy of the model's route: the first one's weights moved on in its own timed steps
            fresh, _, _, _ = build_model(
                opts.preset,
                opts.build,
                cfg.model,
                device,
                DTYPES[precision],
                seed=cfg.loop.seed,
                version=version,
                vision_pretrained=vision_pretrained,
            )  # fmt: skip
            if light_ids != ids:
                raise SystemExit("--compare_light: the two builds disagree on the token ids")
            rows.append(run_head_pair(fresh, light, ids, opts, cfg, dist_info, meter))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
            forget_deepspeed_world_group()
    result = {
        "config": {
            "preset": opts.preset,
            "build": opts.build,
            "precision": precision,
            "gradient_checkpointing": cfg.loop.gradient_checkpointing,
            "pack_conversations": cfg.loop.pack_conversations,
            "images": opts.images,
            "expressions": opts.expressions,
            "text_tokens": opts.text_tokens,
            "original_hw": list(opts.original_hw),
            "steps": opts.steps,
            "warmup": opts.warmup,
            "build_s": build_s,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "environment": {**env_before, "load_avg_after": list(os.getloadavg())},
        "rows": rows,
    }
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(result, indent=1))
    print(table(result), flush=True)
    return result


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchOptions, RunConfig]:
    """The command line (this module's doc is its ``--help``): :func:`bench_options.parse_args`."""
    return parse_bench_args(argv, description=__doc__)
