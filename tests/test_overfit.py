"""The whole training path can fit: one synthetic batch (prompt -> LLaVA -> [SEG] -> CAAM/depth -> SAM
decoder -> CE + BCE + dice -> the real trainable set) is overfit on CPU to mask IoU > 0.9 within a bounded
number of steps, in fp32 and in bf16.

bf16 runs the model in bf16 and keeps fp32 master weights for the optimizer, as DeepSpeed's bf16 mode does
(Adam updates of ~1e-3 vanish in bf16 parameters otherwise).
"""

from __future__ import annotations

import pytest
import torch

from model.build import build_lfllm
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import model_batch
from utils.metrics import mask_iou_stats

MAX_STEPS = 300  # fp32 passes at step 150, bf16 at 160 (2 CPU threads: ~20 s and ~35 s)
CHECK_EVERY = 10
TARGET_IOU = 0.9


def batch_mask_iou(model, batch: dict) -> float:
    """Mean foreground IoU of the eval-mode predictions against the batch's GT masks."""
    model.eval()
    with torch.no_grad():
        preds = model.forward_lf(batch)["pred_masks"]
    model.train()
    ious = []
    for pred, gt in zip(preds, batch["gt_masks"]):
        inter, union = mask_iou_stats(pred.float(), gt)
        ious += (inter / union.clamp(min=1)).tolist()
    return sum(ious) / len(ious)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overfit_one_batch(tiny_base, tiny_dataset, dtype):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], dtype=dtype)
    wrapped = make_trainable(model, TrainableOptions(lora_dropout=0.0))
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    assert params and dtype in {p.dtype for p in params}  # (SAM's prompt encoder stays fp32 by design)
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    batch = model_batch(model, tok, tiny_dataset, n=1)
    assert batch["gt_masks"][0].shape[0] >= 1

    start = batch_mask_iou(model, batch)
    history = []
    iou = start
    for step in range(1, MAX_STEPS + 1):
        out = wrapped(lf_batch=batch)
        loss = out["loss"]
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        for p in params:
            p.grad = None
        loss.backward()
        for p, m in zip(params, master):
            m.grad = None if p.grad is None else p.grad.float()
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        history.append(float(loss))
        if step % CHECK_EVERY == 0:
            iou = batch_mask_iou(model, batch)
            if iou > TARGET_IOU:
                break
    assert iou > TARGET_IOU, f"{dtype}: mask IoU {iou:.3f} after {step} steps (start {start:.3f})"
    assert start < 0.5, f"untrained model already fits the batch (IoU {start:.3f}): the test proves nothing"
    assert sum(history[-5:]) / 5 < history[0] / 2, f"loss did not fall: {history[0]:.3f} -> {history[-5:]}"
