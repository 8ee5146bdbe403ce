"""The new tokens learn on every base (MLLMSeg's issue #8: a frozen LM head never learned its new token).

For each shipped pretrained base and the random base of the tests, built as a GRES model: after
``make_trainable`` the rows of the new tokens (``[SEG]``, ``[REJ]``, the visual markers) in the embedding and in
the LM head receive gradient, and a few steps on the training loss raise the probability the model gives
``[SEG]`` where the answer has it (``tests/test_gres_answers.py``: the same for ``[REJ]``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.build import build_lfllm
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import model_batch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "pretrained").iterdir() if (p / "llava" / "config.json").is_file())


def _seg_log_prob(model, batch) -> float:
    """Mean log-probability of ``[SEG]`` at the positions whose next token is ``[SEG]``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    image_tokens, depth_tokens, _ = inner.encode_frozen(batch)
    ids = batch["input_ids"]
    embeds = inner.build_inputs_embeds(ids, batch["conv_image"], image_tokens, depth_tokens)
    hidden = inner.language_hidden(embeds, batch["attention_mask"])
    seg = inner.config.seg_token_id
    rows, cols = (ids[:, 1:] == seg).nonzero(as_tuple=True)
    logits = inner.lm_head(hidden[rows, cols]).float()
    return float(logits.log_softmax(-1)[:, seg].mean())


@pytest.mark.parametrize("base", [*SHIPPED, "random"])
def test_new_token_rows_and_the_head_learn_on_every_base(base, tiny_base, tiny_dataset):
    assert SHIPPED, "no shipped base found under pretrained/"
    if base == "random":
        llava, sam = tiny_base["llava"], tiny_base["sam"]
    else:
        llava, sam = ROOT / "pretrained" / base / "llava", ROOT / "pretrained" / base / "sam_tiny.pth"
    torch.manual_seed(0)
    model, tokenizer = build_lfllm(llava, sam, ModelOptions(gres=True), torch.float32)
    assert model.config.seg_token_id in model.config.new_token_ids
    assert model.config.rej_token_id in model.config.new_token_ids  # [REJ]: a new, trainable row too
    wrapped = make_trainable(model, TrainableOptions(lora_r=0))  # the token rows alone, no LoRA
    batch = model_batch(model, tokenizer, tiny_dataset, n=2)
    deltas = {n: p for n, p in wrapped.named_parameters() if "trainable_tokens_delta" in n}
    assert {"embed_tokens", "lm_head"} <= {k for n in deltas for k in ("embed_tokens", "lm_head") if k in n}
    assert all(p.requires_grad for p in deltas.values())
    before = _seg_log_prob(wrapped, batch)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        out = wrapped(lf_batch=batch)
        opt.zero_grad()
        out["loss"].backward()  # the training loss, as the engine steps it
        if step == 0:
            for name, p in deltas.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    after = _seg_log_prob(wrapped, batch)
    assert after > before + 0.1, (before, after)
