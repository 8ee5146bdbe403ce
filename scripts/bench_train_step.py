"""Benchmark one LFLLM training step (the DeepSpeed step of ``train_ds.py``), validation and chat latency.

The model is built at a size preset with random init and nothing downloaded:

* ``tiny``: a tiny HF LLaVA + SAM is written to a temporary folder (``model.presets.write_tiny_base``) and
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

The timed training step is ``utils.trainer.Trainer._micro_step`` itself (``engine(lf_batch=batch)``,
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
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.collate import IGNORE_INDEX, collate_batch, move_batch
from dataset.lightfield import parse_views
from dataset.prompts import IM_END_TOKEN, IM_START_TOKEN
from dataset.refer_seg import SampleSpec
from dataset.transforms import longest_side_shape
from model.build import DTYPES, ModelOptions, build_lfllm, cast_model
from model.inference import generate_masks, teacher_forced_masks
from model.lfllm import LFLLMConfig, LFLLMForCausalLM
from model.presets import PRESETS, get_preset, llava_config, write_tiny_base
from model.sam import reset_sam_buffers, sam_config
from model.trainable import TrainableOptions, make_trainable, unwrap

GiB = 2**30


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


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TokenIds:
    """Token ids the synthetic conversations use; plain text is drawn from ``[text_low, text_high)``."""

    bos: int
    eos: int
    pad: int
    image: int
    depth: int
    seg: int
    im_start: int
    im_end: int
    text_low: int
    text_high: int


def random_config(preset_name: str, options: ModelOptions) -> tuple[LFLLMConfig, TokenIds]:
    """The LFLLM config ``build_lfllm`` would make from a ``llava-1.5-*-hf`` directory of this preset:
    ``<image>`` and ``<pad>`` right after the base vocabulary, then ``[SEG]``, ``<depth>``, ``<im_start>``,
    ``<im_end>``, rows padded to a multiple of 64."""
    preset = get_preset(preset_name)
    v = preset.vocab_size
    ids = TokenIds(
        bos=1,
        eos=2,
        image=v,
        pad=v + 1,
        seg=v + 2,
        depth=v + 3,
        im_start=v + 4,
        im_end=v + 5,
        text_low=3,
        text_high=v,
    )
    rows = -(-(v + 6) // 64) * 64
    base = llava_config(preset, vocab_size=rows, image_token_id=ids.image, pad_token_id=ids.pad).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "image_token_id"):
        base.pop(key, None)
    base["image_token_index"] = ids.image
    sam_cfg = sam_config(preset.sam_variant)
    fields = dict(vars(options))
    fields.pop("caam_views")
    fields["depth_range"] = list(options.depth_range)
    fields["out_dim"] = sam_cfg["prompt_embed_dim"]
    config = LFLLMConfig(
        **base,
        **fields,
        seg_token_id=ids.seg,
        depth_token_id=ids.depth,
        new_token_ids=[ids.seg, ids.depth, ids.im_start, ids.im_end],
        sam_config=sam_cfg,
        caam_offsets=[list(o) for o in parse_views(options.caam_views)],
    )
    config._attn_implementation = "sdpa"
    return config, ids


def build_direct(config: LFLLMConfig, dtype: torch.dtype, device: torch.device) -> LFLLMForCausalLM:
    """Random-init LFLLM built in place on ``device`` in ``dtype`` (no float32 copy, no files)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LFLLMForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device)  # CAAM keeps small tensors on the CPU by construction
    reset_sam_buffers(model.sam)
    return cast_model(model, dtype)


def token_ids_from_tokenizer(tokenizer: Any, config: LFLLMConfig) -> TokenIds:
    im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    special = [config.image_token_id, config.depth_token_id, config.seg_token_id, tokenizer.pad_token_id]
    special += list(config.new_token_ids or [])
    return TokenIds(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        image=config.image_token_id,
        depth=config.depth_token_id,
        seg=config.seg_token_id,
        im_start=im_start,
        im_end=im_end,
        text_low=3,
        text_high=min(special),
    )


TINY_CORPUS = (
    "the red car parked on the left",
    "a person walking next to the tall tree",
    "the blue bicycle in front of the building",
    "the nearest street lamp",
)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(model on ``device`` in eval mode, tokenizer or None, token ids, seconds)."""
    tic = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = None
    if args.build == "direct":
        config, ids = random_config(args.preset, ModelOptions())
        model = build_direct(config, dtype, device)
    else:
        if args.version:
            model, tokenizer = build_lfllm(args.version, args.vision_pretrained, ModelOptions(), dtype)
        else:
            if args.preset != "tiny":
                raise SystemExit(f"--preset {args.preset}: --build files writes only the tiny base")
            with tempfile.TemporaryDirectory(prefix="lfllm_bench_") as tmp:
                paths = write_tiny_base(tmp, TINY_CORPUS, seed=args.seed)
                model, tokenizer = build_lfllm(paths["llava"], paths["sam"], ModelOptions(), dtype)
        model.to(device)
        ids = token_ids_from_tokenizer(tokenizer, model.config)
    return model.eval(), tokenizer, ids, time.perf_counter() - tic


# ---------------------------------------------------------------------------------------------- inputs
ANSWER_TOKENS = 8  # "Sure, it is [SEG].</s>"
TURN_TOKENS = 40  # "USER:" question "ASSISTANT:" + the answer (the first turn's "USER:" is in the head)


def conversation(
    config: LFLLMConfig, ids: TokenIds, gen: torch.Generator, turns: int, text_tokens: int, with_answer: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one synthetic conversation with ``turns`` question/answer turns.

    ``text_tokens`` counts everything but the expanded visual runs for one turn; each extra turn adds
    ``TURN_TOKENS``. Without answers the prompt ends after the first question (a chat query)."""

    def text(n: int) -> list[int]:
        return torch.randint(ids.text_low, ids.text_high, (n,), generator=gen).tolist()

    newline = ids.text_low
    visual: list[int] = []
    runs = ([ids.depth] if config.use_depth else []) + [ids.image]
    for tok in runs:
        run = [tok] * config.image_seq_length
        visual += ([ids.im_start, *run, ids.im_end] if config.use_mm_start_end else run) + [newline]
    head = text_tokens - (len(visual) - len(runs) * config.image_seq_length) - TURN_TOKENS
    if head < 1:
        raise ValueError(f"--text_tokens {text_tokens} is too short for the prompt layout")
    input_ids = [ids.bos, *text(head - 1), *visual]
    labels = [IGNORE_INDEX] * len(input_ids)
    for _ in range(turns):
        question = text(TURN_TOKENS - ANSWER_TOKENS)
        input_ids += question
        labels += [IGNORE_INDEX] * len(question)
        if not with_answer:
            break
        answer = [*text(ANSWER_TOKENS - 3), ids.seg, *text(1), ids.eos]
        input_ids += answer
        labels += answer
    return input_ids, labels


def synthetic_sample(
    config: LFLLMConfig,
    ids: TokenIds,
    gen: torch.Generator,
    expressions: int,
    text_tokens: int,
    original_hw: tuple[int, int],
    pack: bool,
    with_answer: bool = True,
) -> dict[str, Any]:
    """One scene in the format of ``dataset.refer_seg.ReferSegDataset`` items (uint8 views at CLIP and SAM
    geometry, disparity, conversations, masks at the original size)."""
    spec = SampleSpec.from_model_config(config)
    s, t = spec.clip_size, spec.sam_size
    h, w = original_hw
    views = len(config.caam_offsets or [])

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)

    def disparity(size: int) -> torch.Tensor:
        return torch.rand(size, size, generator=gen) * 2 - 1

    nh, nw = longest_side_shape(h, w, t)
    sam_center, sam_views = pixels(3, t, t), pixels(views, 3, t, t) if spec.caam_sam else None
    for x in (sam_center, sam_views):
        if x is not None:  # SAM's input is padded with zeros below/right of the resized image
            x[..., nh:, :] = 0
            x[..., nw:] = 0
    clip_w = max(s, round(w * s / min(h, w)))
    if pack:
        convs = [conversation(config, ids, gen, expressions, text_tokens, with_answer)]
    else:
        convs = [conversation(config, ids, gen, 1, text_tokens, with_answer) for _ in range(expressions)]
    masks = (torch.rand(expressions, h, w, generator=gen) > 0.5).to(torch.uint8) if with_answer else None
    return {
        "clip_center": pixels(3, s, s),
        "clip_views": pixels(views, 3, s, s) if spec.caam_clip else None,
        "clip_disparity": disparity(s) if spec.needs_disparity else None,
        "clip_scale": clip_w / w,
        "sam_center": sam_center,
        "sam_views": sam_views,
        "sam_disparity": disparity(t) if spec.caam_sam else None,
        "sam_scale": nw / w,
        "sam_resized_hw": (nh, nw),
        "original_hw": (h, w),
        "conversations": convs,
        "masks": masks,
        "image_id": 0,
        "ds": "synthetic",
        "sentences": [f"expression {k}" for k in range(expressions)],
        "subsets": [],
        "scene_dir": "synthetic",
        "center_path": "synthetic",
    }


def synthetic_batch(
    config: LFLLMConfig,
    ids: TokenIds,
    *,
    images: int,
    expressions: int,
    text_tokens: int = 80,
    original_hw: tuple[int, int] = (480, 640),
    pack: bool = False,
    with_answer: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """A collated batch (``collate_batch``) of ``images`` synthetic scenes × ``expressions``."""
    gen = torch.Generator().manual_seed(seed)
    samples = [
        synthetic_sample(config, ids, gen, expressions, text_tokens, original_hw, pack, with_answer)
        for _ in range(images)
    ]
    return collate_batch(samples, ids.pad)


def batch_shape(batch: dict[str, Any], ids: TokenIds) -> dict[str, Any]:
    """Sizes of a collated batch: scenes, conversations (rows), padded length, real tokens, [SEG]s."""
    return {
        "images": len(batch["original_hw"]),
        "conversations": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "lm_tokens": int(batch["attention_mask"].sum()),
        "seg_tokens": int((batch["input_ids"] == ids.seg).sum()),
    }


# ---------------------------------------------------------------------------------------------- timing
class Meter:
    """Synchronised wall-clock timing and peak memory on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[float, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GiB, "cuda max_memory_allocated"
        # ru_maxrss is in KiB on Linux; it never goes down, so it includes the build and earlier phases
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (getrusage)"

    def times(self, fn: Callable[[int], Any], warmup: int, steps: int) -> list[float]:
        out = []
        for i in range(warmup + steps):
            self.sync()
            tic = time.perf_counter()
            fn(i)
            self.sync()
            if i >= warmup:
                out.append(time.perf_counter() - tic)
        return out


def count_flops(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Total FLOPs of ``fn()`` and their split by top-level module class (``Global`` minus the rest is
    ``other``: the work done outside any module, e.g. the losses and mask upsampling).

    The split is only exact for forward passes: FlopCounterMode attributes backward ops to modules
    loosely, so :func:`run_train` splits a separate forward and counts the whole step as one total."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    total = float(counter.get_total_flops())
    parts = {
        name: float(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if "." not in name and name != "Global"
    }
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return total, parts


def median_row(times: list[float]) -> dict[str, float]:
    return {"time_s_median": statistics.median(times), "time_s_min": min(times), "samples": len(times)}


# ---------------------------------------------------------------------------------------------- phases
def run_eval(model, ids, args, device, meter: Meter) -> dict[str, Any]:
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
    meter.reset_peak()
    with torch.no_grad():
        times = meter.times(lambda _: teacher_forced_masks(model, batch), args.warmup, args.steps)
    med = statistics.median(times)
    peak, kind = meter.peak()
    return {
        "mode": "eval",
        "desc": f"eval, teacher-forced, 1 image × {args.expressions} expressions",
        **median_row(times),
        "images_per_s": 1 / med,
        "expressions_per_s": args.expressions / med,
        "peak_memory_GiB": peak,
        "peak_memory_kind": kind,
        **batch_shape(batch, ids),
    }


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
    from utils.config import parse_args as parse_train_args

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


def run_train(model, ids, args, precision: str, dist_info, meter: Meter) -> tuple[dict[str, Any], Any]:
    """Wrap the model exactly as ``train_ds.run_training`` does and time ``Trainer._micro_step``."""
    import deepspeed

    from utils.ds_config import deepspeed_config
    from utils.trainer import Trainer

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
    batch = move_batch(batch, device)  # _micro_step moves it again: a no-op for tensors already there
    meter.sync()
    to_device_s = time.perf_counter() - tic

    meter.reset_peak()
    model.config.use_cache = False
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = make_trainable(model, TrainableOptions())
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped,
        model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
        config=deepspeed_config(
            train_args,
            on_cpu=device.type == "cpu",
            trainable_numel=sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
        ),
    )
    unwrap(engine.module).sam.prompt_encoder.float()
    # Train mode, as a training step must run: HF's gradient checkpointing and LoRA dropout act only when
    # ``module.training`` (from_pretrained returns eval mode; train_ds.py calls engine.train() too).
    engine.train()
    trainer_view = SimpleNamespace(args=train_args, engine=engine, dist=dist_info)
    losses: list[float] = []

    def step(i: int) -> None:
        losses.append(float(Trainer._micro_step(trainer_view, batch, i)[0]))

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
        flops, _ = count_flops(lambda: Trainer._micro_step(trainer_view, batch, n))
        inner = unwrap(engine.module)
        with torch.no_grad():
            forward, parts = count_flops(lambda: inner.forward_lf(batch))
        row.update(
            step_TFLOP=flops / 1e12,
            achieved_TFLOPs=flops / 1e12 / med,
            forward_TFLOP=forward / 1e12,
            forward_TFLOP_by_module={k: v / 1e12 for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        )
    return row, engine


def setup_single_process(on_cpu: bool):
    """One-rank process group through ``utils.distributed.init_distributed`` (as a plain ``python``
    ``train_ds.py`` run). On CPU the shared-memory comm op DeepSpeed JIT-builds at init is skipped: one
    rank never uses it. Returns (DistInfo, whether this call created the group)."""
    import torch.distributed as dist

    if not ("RANK" in os.environ and "MASTER_PORT" in os.environ):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op is replaced)

    if on_cpu:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from utils.distributed import init_distributed

    created = not dist.is_initialized()
    if created:
        _forget_deepspeed_world_group()
    return init_distributed(), created


def _forget_deepspeed_world_group() -> None:
    """DeepSpeed caches a clone of the world group for the first engine of a process; when a group is
    created anew in the same process (``main`` called twice, e.g. from the tests) the cached clone is
    stale and ``deepspeed.initialize`` fails with "Group ... is not registered"."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_WORLD_GROUP"):
        groups._WORLD_GROUP = None


# ---------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
    }
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [
                ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln
            ]
            env["cpu"] = names[0] if names else platform.processor()
    return env


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table (the yardstick's columns)."""
    cfg = result["config"]
    lines = [
        "| preset | mode | gradient checkpointing | time | images/s | peak memory | counted work | achieved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ckpt = ("on" if cfg["gradient_checkpointing"] else "off") if row["mode"] == "train" else "–"
        memory = f"{row['peak_memory_GiB']:.2f} GiB" + ("" if "cuda" in row["peak_memory_kind"] else " RSS")
        unit = "s/query" if row["mode"] == "chat" else "s"
        lines.append(
            f"| {cfg['preset']} | {row['desc']} | {ckpt} | {row['time_s_median']:.4f} {unit} | "
            f"{_fmt(row.get('images_per_s'), '.2f')} | {memory} | "
            f"{_fmt(row.get('step_TFLOP'), '.4g')}{' TFLOP' if 'step_TFLOP' in row else ''} | "
            f"{_fmt(row.get('achieved_TFLOPs'), '.3g')}{' TFLOP/s' if 'achieved_TFLOPs' in row else ''} |"
        )
    return "\n".join(lines)


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
            rows.append(run_eval(model, ids, args, device, meter))
            print(json.dumps(rows[-1]), flush=True)
        if args.chat:
            rows.append(run_chat(model, tokenizer, ids, args, device, meter))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_train:
            row, engine = run_train(model, ids, args, precision, dist_info, meter)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engine
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
            _forget_deepspeed_world_group()
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


if __name__ == "__main__":
    main()
