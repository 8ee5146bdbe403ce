"""The semantic fusion of the SAM route (``--semantic_fusion``, model/light_decoder.SemanticFusion): an untrained
fusion is the plain route, a trained one changes the masks through the LLM's image/depth-token states, it
trains, survives the merge, and runs through train_ds.py and --eval_only."""

from __future__ import annotations

import json

import torch

from model.build import build_lfllm, load_tokenizer
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMForCausalLM
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import TINY_DS, model_batch
from tests.test_merge import make_trained_export, merge
from tests.test_train import _args, run_train


def _masks(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m.clone() for m in model.forward_lf(batch)["pred_masks"]]


def test_untrained_fusion_is_the_plain_route_and_a_trained_one_reads_the_states(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(semantic_fusion=True))
    model.eval()
    fusion = model.semantic_fusion
    assert fusion is not None and fusion.out.weight.abs().sum() == 0  # zero output at the start
    batch = model_batch(model, tok, tiny_dataset, n=2)
    fused = _masks(model, batch)
    plain_states = model.conversation_states
    model.conversation_states = lambda hidden, ids: None  # the SAM route without the fusion
    plain = _masks(model, batch)
    model.conversation_states = plain_states
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    # (N, T, D): every conversation's image tokens, then its depth tokens
    hidden = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1], 8)
    states = model.conversation_states(hidden, batch["input_ids"])
    per_image = model.config.image_seq_length
    assert states.shape == (batch["input_ids"].shape[0], 2 * per_image, 8)
    row = batch["input_ids"][0]
    assert torch.equal(states[0, :per_image], hidden[0, row == model.config.image_token_id])
    with torch.no_grad():
        fusion.out.weight.normal_(0, 0.5)
    changed = _masks(model, batch)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(changed, plain))


def test_fusion_trains_with_the_heads(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(semantic_fusion=True))
    wrapped = make_trainable(model, TrainableOptions())
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad and "semantic_fusion" in n}
    assert any(n.endswith("out.weight") for n in trained) and any("states_in" in n for n in trained)
    batch = model_batch(model, tok, tiny_dataset, n=2)
    wrapped(lf_batch=batch)["loss"].backward()
    out = model.semantic_fusion.out
    assert out.weight.grad is not None and out.weight.grad.abs().sum() > 0
    # with a zero output layer nothing flows further back yet; one step later it does
    with torch.no_grad():
        out.weight.add_(0.1)
    model.zero_grad()
    wrapped(lf_batch=batch)["loss"].backward()
    assert model.semantic_fusion.states_in[1].weight.grad.abs().sum() > 0


def test_merged_fusion_model_gives_the_same_masks(tiny_base, tiny_dataset, tmp_path):
    wrapped, _, export = make_trained_export(
        tiny_base, tmp_path / "export", options=ModelOptions(semantic_fusion=True)
    )
    out = merge("--weight", export, "--save_path", tmp_path / "merged", "--precision", "fp32")
    assert json.loads((out / "config.json").read_text())["semantic_fusion"] is True
    merged = LFLLMForCausalLM.from_pretrained(out)
    assert merged.semantic_fusion is not None
    batch = model_batch(merged, load_tokenizer(out), tiny_dataset, split="val", n=2, train=False)
    for got, want in zip(
        teacher_forced_masks(merged, batch), teacher_forced_masks(wrapped, batch), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_train_ds_with_fusion_then_eval_only(tiny_base, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    args = _args(tiny_base, tiny_dataset, runs, "fused", "--semantic_fusion", "--epochs", "1",
                 "--steps_per_epoch", "2", "--no_eval")  # fmt: skip
    run_train(args)
    record = json.loads((runs / "fused" / "export" / "last" / "trainable.json").read_text())
    assert record["model_options"]["semantic_fusion"] is True
    merged = merge(
        "--weight", runs / "fused" / "export" / "last", "--save_path", tmp_path / "m", "--precision", "fp32"
    )
    out = run_train([
        "--eval_only", "--version", str(merged), "--dataset_dir", str(tiny_dataset),
        "--val_dataset", f"{TINY_DS}|syn|val", "--log_base_dir", str(runs), "--exp_name", "fused_eval",
        "--precision", "fp32", "--workers", "0",
    ])  # fmt: skip
    assert "gIoU" in out and (runs / "fused_eval" / "eval.json").is_file()
