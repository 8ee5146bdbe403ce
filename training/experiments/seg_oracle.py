"""The ``[SEG]`` ceiling: what LFLLM's mask head scores when ``[SEG]`` carries a perfect location.

The language model is bypassed. Every ``[SEG]`` gets, in place of its hidden state, an *oracle* computed
from its ground-truth mask, and only what LFLLM trains behind ``[SEG]`` is trained: the ``[SEG]``
projector and SAM's mask decoder, with ``train_ds.py``'s mask losses (BCE + dice, their weights from the
model config), AdamW and a linear warm-up / decay schedule (``--lr``, ``--beta1/2``, ``--warmup_steps``,
``--epochs × --steps_per_epoch``). Validation is the same teacher-forced evaluation as ``--eval_only``
(:func:`training.evaluate.evaluate`), on the same scenes. Modes:

* ``point`` — SAM's own prompt for the mask's interior point (the maximum of its distance transform),
  no projector: the SAM's ceiling.
* ``code`` — a fixed random linear code of that point, (D,) with D the LM width, through the ``[SEG]``
  projector: what a ``[SEG]`` state that encodes the target's location linearly would score.
* ``cell:N`` — the code of the point snapped to its cell centre on an N × N grid over the image (the
  location an LM can give when it only knows which of N × N tokens the object is in).
* ``box:N`` — a code of the mask's box on a 1/N grid, grown outwards (the pretraining's REC box format,
  ``utils.boxes.grid_box``), through the projector.

``scripts/seg_oracle.py`` is the command line; ``docs/RESULTS.md`` has the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dataset.collate import move_batch
from model.build import DTYPES, build_lfllm
from model.lfllm import LFLLMForCausalLM, seg_predictor_positions
from model.losses import mask_losses
from training.config import RunConfig, parse_config
from training.ds_config import total_steps
from training.evaluate import evaluate
from training.features import prepare_feature_cache
from training.loaders import build_train_loader, build_val_loader
from utils.batch import Batch
from utils.boxes import grid_box, interior_point, mask_box
from utils.distributed import DistInfo
from utils.options import add_option_flags, at_least, option, options_from_args, problems


def parse_mode(mode: str) -> tuple[str, int]:
    """``point`` / ``code`` / ``cell:N`` / ``box:N`` -> (kind, N) (N = 0 without a grid); ``ValueError``."""
    kind, _, n = mode.partition(":")
    if kind in ("point", "code") and not n:
        return kind, 0
    if kind in ("cell", "box") and n.isdigit() and 1 <= int(n) <= 1000:
        return kind, int(n)
    raise ValueError(f"--mode {mode!r}: expected point, code, cell:N or box:N (N an integer in 1..1000)")


def oracle_targets(masks: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    """What the oracle knows of each (k, H, W) ground-truth mask, in image-normalised units:
    ``point`` / ``code``: (k, 2) centre of the interior pixel, ``cell:N``: (k, 2) centre of its cell on the
    N × N grid, ``box:N``: (k, 4) xyxy box on the 1/N grid, grown outwards."""
    h, w = masks.shape[-2:]
    rows = []
    for m in masks.detach().cpu().numpy() > 0:
        if kind == "box":
            rows.append(grid_box(mask_box(m), h, w, 1.0 / n))
            continue
        x, y = interior_point(m)
        u, v = x / w, y / h
        if kind == "cell":
            u, v = ((min(int(t * n), n - 1) + 0.5) / n for t in (u, v))
        rows.append((u, v))
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 4 if kind == "box" else 2)


class SegOracle(nn.Module):
    """``model`` with each ``[SEG]`` state replaced by the oracle of ``mode``; ``forward_lf`` has the
    interface of :meth:`LFLLMForCausalLM.forward_lf`, so :func:`training.evaluate.evaluate` runs it."""

    def __init__(self, model: LFLLMForCausalLM, mode: str, seed: int = 0) -> None:
        super().__init__()
        self.kind, self.n = parse_mode(mode)
        self.model = model
        width = model.config.text_config.hidden_size
        g = torch.Generator().manual_seed(seed)
        # Fixed, unit-variance random code of the (centred) location: not trained, like an LM's state.
        self.register_buffer("code", torch.randn(width, 4 if self.kind == "box" else 2, generator=g))

    def prompts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, C) sparse prompt embeddings for the batch's ``[SEG]`` tokens and (M,) their image index."""
        model = self.model
        rows, _ = seg_predictor_positions(batch["input_ids"], model.config.seg_token_id)
        seg_image = batch["conv_image"][rows]
        targets = torch.zeros(len(rows), self.code.shape[1])
        for i, gts in enumerate(batch["gt_masks"]):
            sel = (seg_image == i).nonzero(as_tuple=True)[0].cpu()
            if len(sel) != len(gts):
                raise ValueError(f"image {i}: {len(sel)} [SEG] tokens but {len(gts)} masks")
            targets[sel] = oracle_targets(gts, self.kind, self.n)
        targets = targets.to(self.code.device)
        if self.kind != "point":
            code = (targets * 2 - 1) @ self.code.T
            return model.seg_projector(code.to(model.seg_projector[0].weight.dtype)), seg_image
        prompt = model.sam.prompt_encoder
        size = prompt.input_image_size  # SAM's square input; the image fills its top-left corner
        scale = torch.stack([batch["sam_resized_hw"][i] for i in seg_image.tolist()]).to(targets)
        xy = targets * scale.flip(-1)  # (M, 2) pixels of SAM's input
        pe = prompt.pe_layer.forward_with_coords(xy.unsqueeze(1), size)[:, 0]
        return pe + prompt.point_embeddings[1].weight, seg_image

    def forward_lf(self, batch: Batch) -> dict[str, Any]:
        """Masks, SAM's IoU and the mask losses of ``batch`` with oracle prompts (no text loss)."""
        model = self.model
        _, _, image_embeddings = model.encode_frozen(batch)
        sparse, seg_image = self.prompts(batch)
        pred, ious = model.decode_masks_scored(
            sparse, seg_image, image_embeddings, batch["sam_resized_hw"], batch["original_hw"]
        )
        bce, dice = mask_losses(pred, batch["gt_masks"])
        cfg = model.config
        return {
            "pred_masks": pred,
            "pred_ious": [i.detach() for i in ious],
            "loss": cfg.bce_loss_weight * bce + cfg.dice_loss_weight * dice,
            "bce_loss": bce.detach(),
            "dice_loss": dice.detach(),
        }

    def trainable(self) -> list[nn.Parameter]:
        """What LFLLM trains behind ``[SEG]``: the mask decoder, and the projector unless ``point``."""
        params = list(self.model.sam.mask_decoder.parameters())
        if self.kind != "point":
            params += list(self.model.seg_projector.parameters())
        return params


def _gious(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    m = evaluate(model, loader, device, show_progress=False).compute()["All"]
    return {"gIoU": m["gIoU"], "cIoU": m["cIoU"]}


def run_oracle(cfg: RunConfig, modes: Sequence[str], eval_every: int, dist_info: DistInfo) -> dict[str, Any]:
    """Train and validate one fresh projector + mask decoder per mode (same seed, data and schedule).

    Returns ``{"modes": {mode: {"steps": [...], "gIoU": [...], "cIoU": [...], "dice": [...], "wall_s"}}}``
    with the scores before training (step 0) and every ``eval_every`` steps.
    """
    steps = total_steps(cfg.loop)
    optim, loop = cfg.optim, cfg.loop
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    out: dict[str, Any] = {"steps": steps, "modes": {}}
    for mode in modes:
        torch.manual_seed(loop.seed)
        model, tokenizer = build_lfllm(
            cfg.run.version, cfg.run.vision_pretrained, cfg.model, DTYPES[cfg.run.precision]
        )
        model.to(dist_info.device)
        oracle = SegOracle(model, mode, loop.seed).to(dist_info.device)
        store = prepare_feature_cache(cfg, model, tokenizer, dist_info, train=True, val=True)
        loader, sampler = build_train_loader(cfg, model.config, tokenizer, 0, store=store)
        val_loader = build_val_loader(cfg, model.config, tokenizer, 0, 1, False, store=store)
        model.requires_grad_(False)
        params = oracle.trainable()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * max(0.0, 1.0 - s / max(steps, 1))
        )
        rec: dict[str, Any] = {
            "steps": [0],
            "dice": [float("nan")],
            **{k: [v] for k, v in _gious(oracle, val_loader, dist_info.device).items()},
        }
        start, step, dice = time.perf_counter(), 0, []
        oracle.train()
        for epoch in range(loop.epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                if step >= (epoch + 1) * loop.steps_per_epoch:
                    break
                result = oracle.forward_lf(move_batch(batch, dist_info.device))
                opt.zero_grad(set_to_none=True)
                result["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                dice.append(float(result["dice_loss"]))
                if step % eval_every == 0 or step == steps:
                    scores = _gious(oracle, val_loader, dist_info.device)
                    rec["steps"].append(step)
                    rec["dice"].append(float(np.mean(dice[-eval_every:])))
                    for k, v in scores.items():
                        rec[k].append(v)
                    print(
                        f"[seg_oracle] {mode} step {step}/{steps}: train dice {rec['dice'][-1]:.3f}, val gIoU "
                        f"{scores['gIoU']:.4f}, cIoU {scores['cIoU']:.4f}",
                        flush=True,
                    )
                    oracle.train()
        rec["wall_s"] = round(time.perf_counter() - start, 1)
        out["modes"][mode] = rec
    return out


#: ``train_ds.py`` flags that would not act here: refused rather than ignored.
NOT_USED = (
    "auto_resume", "ce_loss_weight", "depth_source", "eval_only", "eval_protocol", "exp_name",
    "grad_accumulation_steps", "gradient_checkpointing", "local_rank", "log_base_dir", "lora_alpha",
    "lora_dropout", "lora_r", "lora_target_modules", "max_new_tokens", "max_steps", "no_eval",
    "print_freq", "resume", "resume_with_changes", "save_steps", "start_epoch", "torch_adam",
    "train_mask_decoder", "vis_save_path", "zero_stage",
)  # fmt: skip


#: The modes run when no ``--mode`` is given.
DEFAULT_MODES: tuple[str, ...] = ("point", "code", "cell:8", "box:10")


@dataclass(frozen=True)
class OracleOptions:
    """The probe's own options (``train_ds.py``'s come as a :class:`RunConfig`)."""

    mode: tuple[str, ...] = option(
        (),
        "point, code, cell:N or box:N (repeat for several; default: point, code, cell:8, box:10)",
        repeat=True,
    )
    eval_every: int = option(250, "validate every N optimiser steps", check=at_least(1))
    out: str = option("runs/seg_oracle.json", "JSON report")

    def __post_init__(self) -> None:
        for mode in self.mode:
            parse_mode(mode)
        if problems(self):  # the one range check, --eval_every
            raise ValueError(f"--eval_every must be >= 1, got {self.eval_every}")

    @property
    def modes(self) -> tuple[str, ...]:
        """``--mode``, else :data:`DEFAULT_MODES`."""
        return self.mode or DEFAULT_MODES


def parse_args(argv: Sequence[str] | None = None) -> tuple[OracleOptions, RunConfig]:
    """The command line as the probe's options and ``train_ds.py``'s configuration (``SystemExit`` with a
    message on a bad value or a ``train_ds.py`` flag that would not act here)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    add_option_flags(parser.add_argument_group("oracle probe"), OracleOptions)
    known, rest = parser.parse_known_args(argv)
    try:
        opts = options_from_args(OracleOptions, known)
    except ValueError as exc:
        parser.error(str(exc))
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nand train_ds.py's flags:\n")
    cfg = parse_config(rest)
    unused = sorted(cfg.given & set(NOT_USED))
    if unused:
        parser.error(
            f"{', '.join('--' + d for d in unused)}: not used by the oracle probe (one process, no language "
            "model: it trains only the [SEG] projector and SAM's mask decoder, and scores teacher-forced)"
        )
    return opts, cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``--mode`` (repeatable), ``--eval_every``, ``--out`` plus ``train_ds.py``'s training flags
    (model, data, schedule); single process. Prints a table of the final scores; writes ``--out``."""
    opts, cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run_oracle(cfg, opts.modes, opts.eval_every, DistInfo(0, 1, 0, device))
    val_dataset = cfg.eval.val_dataset
    result.update(
        version=cfg.run.version, vision_pretrained=cfg.run.vision_pretrained, val_dataset=val_dataset
    )
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{'[SEG] replaced by':<20} {'gIoU':>7} {'cIoU':>7}  (val {val_dataset}, after {result['steps']} steps)"
    )
    for mode, rec in result["modes"].items():
        print(f"{mode:<20} {100 * rec['gIoU'][-1]:7.2f} {100 * rec['cIoU'][-1]:7.2f}")
    print(f"report: {out}")
    return result
