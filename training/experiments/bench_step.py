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
``engine.backward(loss)``, ``engine.step()``) on the engine ``train_ds.py`` builds (``make_trainable``,
``deepspeed_config`` with ``--grad_accumulation_steps 1`` so every step is an optimiser step,
``deepspeed.initialize``), in train mode (``engine.train()``, as ``train_ds.py`` does). Reported: median step time after ``--warmup`` steps, images/s, peak memory
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

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dataset.collate import move_batch
from model.build import DTYPES
from model.inference import generate_masks, teacher_forced_masks
from model.options import ModelOptions
from model.presets import PRESETS
from model.trainable import TrainableOptions, unwrap
from training.config import add_option_flags
from training.config import parse_args as parse_train_args
from training.engine import build_engine, forget_deepspeed_world_group, setup_single_process
from training.experiments.bench_inputs import batch_shape, build_model, synthetic_batch
from training.experiments.bench_report import Meter, count_flops, environment, median_row, table
from training.features import cached_batch
from training.trainer import train_micro_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--gradient_checkpointing", action="store_true", help="as train_ds.py's switch")
    p.add_argument("--pack_conversations", action="store_true", help="one multi-turn conversation per scene")
    p.add_argument(
        "--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU"
    )
    p.add_argument("--eval", action="store_true", help="add the teacher-forced validation row")
    p.add_argument("--chat", action="store_true", help="add the chat latency row")
    p.add_argument("--no_train", action="store_true", help="skip the training rows (with --eval/--chat)")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP-counted step")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--images", type=int, default=2, help="scenes per training micro-batch")
    p.add_argument("--expressions", type=int, default=3, help="expressions per scene")
    p.add_argument("--text_tokens", type=int, default=80, help="text tokens of a one-expression conversation")
    p.add_argument("--original_hw", default="480,640", help="original image size H,W (UrbanLF: 480,640)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="chat: tokens generated per query")
    p.add_argument("--chat_queries", type=int, default=5, help="chat: timed queries (after --warmup)")
    p.add_argument(
        "--torch_adam", action="store_true", help="plain torch AdamW on a GPU (no FusedAdam build)"
    )
    p.add_argument(
        "--build",
        default="auto",
        choices=["auto", "files", "direct"],
        help="files: write/load through build_lfllm; direct: random init in memory (auto: files for tiny)",
    )
    p.add_argument("--version", default=None, help="load this LLaVA dir (with --vision_pretrained) instead")
    p.add_argument("--vision_pretrained", default=None, help="SAM checkpoint for --version")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2], help="as train_ds.py's")
    p.add_argument(
        "--feature_cache",
        action="store_true",
        help="also time each train/eval step on cached front-end features (training.features)",
    )
    add_option_flags(p.add_argument_group("model options (train_ds.py's)"), ModelOptions)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.no_train and not (args.eval or args.chat):
        p.error("--no_train leaves nothing to measure: add --eval and/or --chat")
    try:
        args.original_hw = tuple(int(v) for v in args.original_hw.split(","))
        assert len(args.original_hw) == 2
    except (ValueError, AssertionError):
        p.error(f"--original_hw {args.original_hw!r}: expected H,W")
    if args.build == "auto":
        args.build = "files" if (args.preset == "tiny" or args.version) else "direct"
    if args.build == "direct" and args.version:
        p.error("--version loads files: it cannot be combined with --build direct")
    return args


# ---------------------------------------------------------------------------------------------- phases
def run_eval(model, ids, args, device, meter: Meter) -> list[dict[str, Any]]:
    batch = move_batch(
        synthetic_batch(
            model.config,
            ids,
            images=1,
            expressions=args.expressions,
            text_tokens=args.text_tokens,
            original_hw=args.original_hw,
            seed=args.seed + 1,
        ),
        device,
    )
    model.eval()
    rows = []
    variants = [("", batch)]
    if args.feature_cache:
        variants.append((" (feature cache)", cached_batch(model, batch)))
    for suffix, data in variants:
        meter.reset_peak()
        with torch.no_grad():
            times = meter.times(lambda _, d=data: teacher_forced_masks(model, d), args.warmup, args.steps)
        med = statistics.median(times)
        peak, kind = meter.peak()
        rows.append(
            {
                "mode": "eval",
                "desc": f"eval, teacher-forced, 1 image × {args.expressions} expressions{suffix}",
                **median_row(times),
                "images_per_s": 1 / med,
                "expressions_per_s": args.expressions / med,
                "peak_memory_GiB": peak,
                "peak_memory_kind": kind,
                **batch_shape(batch, ids),
            }
        )
    return rows


def run_chat(model, tokenizer, ids, args, device, meter: Meter) -> dict[str, Any]:
    batch = move_batch(
        synthetic_batch(
            model.config,
            ids,
            images=1,
            expressions=1,
            text_tokens=args.text_tokens,
            original_hw=args.original_hw,
            with_answer=False,
            seed=args.seed + 2,
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
    meter.reset_peak()
    try:
        times = meter.times(
            lambda _: generated.append(generate_masks(model, batch, tok, args.max_new_tokens)[0][0]),
            args.warmup,
            args.chat_queries,
        )
    finally:
        gen_config.sequence_bias = saved
    last = generated[-1]
    med = statistics.median(times)
    peak, kind = meter.peak()
    return {
        "mode": "chat",
        "desc": f"chat query (1 image, 1 expression, {args.max_new_tokens} new tokens, KV cache)",
        **median_row(times),
        "latency_s_per_query": med,
        "new_tokens": len(last.token_ids),
        "mask_decoded": last.mask_logits is not None,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        **batch_shape(batch, ids),
    }


def deepspeed_args(args: argparse.Namespace, precision: str) -> argparse.Namespace:
    """``train_ds.py``'s options for this benchmark: its defaults, one image batch per optimiser step."""
    argv = [
        "--precision",
        precision,
        "--batch_size",
        str(args.images),
        "--grad_accumulation_steps",
        "1",
        "--epochs",
        "1",
        "--steps_per_epoch",
        str(args.warmup + args.steps + 1),
        "--seed",
        str(args.seed),
        "--zero_stage",
        str(args.zero_stage),
    ]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    else:
        argv.append("--no_gradient_checkpointing")
    if args.torch_adam:
        argv.append("--torch_adam")
    if args.pack_conversations:
        argv.append("--pack_conversations")
    return parse_train_args(argv)


def run_train(model, ids, args, precision: str, dist_info, meter: Meter) -> tuple[list[dict[str, Any]], Any]:
    """Wrap the model with ``train_ds.py``'s own :func:`training.engine.build_engine` and time
    :func:`training.trainer.train_micro_step`."""
    train_args = deepspeed_args(args, precision)
    device = dist_info.device
    batch = synthetic_batch(
        model.config,
        ids,
        images=args.images,
        expressions=args.expressions,
        text_tokens=args.text_tokens,
        original_hw=args.original_hw,
        pack=args.pack_conversations,
        seed=args.seed,
    )
    meter.sync()
    tic = time.perf_counter()
    batch = move_batch(batch, device)  # train_micro_step moves it again: a no-op for tensors already there
    meter.sync()
    to_device_s = time.perf_counter() - tic

    meter.reset_peak()
    engine, _ = build_engine(model, train_args, TrainableOptions(), on_cpu=device.type == "cpu")
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    losses: list[float] = []

    def step(i: int) -> None:
        losses.append(float(train_micro_step(engine, batch, i, train_args.seed, dist_info)[0]))

    times = meter.times(step, args.warmup, args.steps)
    med = statistics.median(times)
    peak, kind = meter.peak()
    row: dict[str, Any] = {
        "mode": "train",
        "desc": "train step" + (" (packed conversations)" if args.pack_conversations else ""),
        **median_row(times),
        "images_per_s": args.images / med,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        "trainable_M": trainable / 1e6,
        "batch_to_device_s": to_device_s,
        "losses": losses,
        **batch_shape(batch, ids),
    }
    if not args.no_flops:
        n = args.warmup + args.steps
        flops, _ = count_flops(lambda: train_micro_step(engine, batch, n, train_args.seed, dist_info))
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
    if args.feature_cache:
        cached = cached_batch(unwrap(engine.module), batch)
        first = args.warmup + args.steps + 1
        cached_losses: list[float] = []

        # Interleaved with uncached steps on the same engine: the two are timed under the same machine
        # state (on a shared VM the step time drifts by tens of percent between phases run one after
        # the other), and the ratio is the median of the per-pair ratios.
        plain_times: list[float] = []

        def pair(i: int) -> None:
            meter.sync()
            tic = time.perf_counter()
            train_micro_step(engine, batch, first + 2 * i, train_args.seed, dist_info)
            meter.sync()
            plain_times.append(time.perf_counter() - tic)
            out = train_micro_step(engine, cached, first + 2 * i + 1, train_args.seed, dist_info)
            cached_losses.append(float(out[0]))

        meter.reset_peak()
        pair_times = meter.times(pair, args.warmup, args.steps)
        plain_times = plain_times[args.warmup :]
        times = [total - p for total, p in zip(pair_times, plain_times)]
        med_c = statistics.median(times)
        ratio = statistics.median(p / c for p, c in zip(plain_times, times))
        peak, kind = meter.peak()
        rows.append(
            {
                "mode": "train",
                "desc": row["desc"] + " (feature cache)",
                **median_row(times),
                "images_per_s": args.images / med_c,
                "speedup_vs_uncached": ratio,
                "uncached_interleaved_s_median": statistics.median(plain_times),
                "peak_memory_GiB": peak,
                "peak_memory_kind": kind,
                "losses": cached_losses,
                **batch_shape(batch, ids),
            }
        )
    return rows, engine


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if args.preset != "tiny" and not args.version:
            raise SystemExit(
                f"--preset {args.preset} needs a GPU (none is visible); use --preset tiny on CPU"
            )
    precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = DTYPES[precision]
    dist_info, created = None, False
    if not args.no_train:
        dist_info, created = setup_single_process(on_cpu=not cuda)
    device = dist_info.device if dist_info else torch.device("cuda" if cuda else "cpu")
    meter = Meter(device)
    env_before = environment(device)
    model, tokenizer, ids, build_s = build_model(args, device, dtype)
    print(f"built {args.preset} ({args.build}, {precision}) in {build_s:.1f} s on {device}", flush=True)
    rows = []
    try:
        if args.eval:
            for row in run_eval(model, ids, args, device, meter):
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.chat:
            rows.append(run_chat(model, tokenizer, ids, args, device, meter))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_train:
            train_rows, engine = run_train(model, ids, args, precision, dist_info, meter)
            for row in train_rows:
                rows.append(row)
                print(json.dumps(row), flush=True)
            del engine
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
            forget_deepspeed_world_group()
    result = {
        "config": {
            "preset": args.preset,
            "build": args.build,
            "precision": precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "pack_conversations": args.pack_conversations,
            "images": args.images,
            "expressions": args.expressions,
            "text_tokens": args.text_tokens,
            "original_hw": list(args.original_hw),
            "steps": args.steps,
            "warmup": args.warmup,
            "build_s": build_s,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "environment": {**env_before, "load_avg_after": list(os.getloadavg())},
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(table(result), flush=True)
    return result
