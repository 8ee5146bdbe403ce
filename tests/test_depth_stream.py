"""The depth stream of the SAM route (``--depth_stream``, model/depth.DepthStream): its input against a
hand-computed pooling, bad inputs refused, an untrained stream is the plain route, a trained one makes the
masks depend on the disparity, the feature cache serves the same input, and it runs through train_ds.py,
the merge and --eval_only; its detail branch (``--depth_detail``) into SAM's upscaled mask embedding likewise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.build import build_lfllm, load_tokenizer
from model.depth import DepthStream, depth_grid
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMForCausalLM
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import TINY_DS, model_batch
from tests.test_merge import merge
from tests.test_semantic_fusion import _masks
from tests.test_train import _args, run_train
from training.features import cached_batch


def test_depth_grid_pools_valid_pixels_as_computed_by_hand():
    # T = 8, grid 1 -> a 4 x 4 output, each cell a 2 x 2 block; the image fills 6 rows x 5 columns.
    disp = torch.zeros(1, 8, 8)
    disp[0, :6, :5] = torch.arange(30, dtype=torch.float32).view(6, 5) / 10  # 0.0 .. 2.9 px
    disp[0, 0, 0] = float("nan")
    out = depth_grid(disp, torch.tensor([[6, 5]]), grid=1, disp_range=(-1.0, 1.0))
    assert out.shape == (1, 2, 4, 4)
    valid = torch.tensor([[3, 4, 2, 0], [4, 4, 2, 0], [4, 4, 2, 0], [0, 0, 0, 0]]) / 4
    assert torch.allclose(out[0, 1], valid)

    def mapped(*vals):  # (d - lo) / (hi - lo), not clipped, averaged over the valid pixels
        return sum((v + 1.0) / 2.0 for v in vals) / len(vals)

    assert out[0, 0, 0, 0].item() == pytest.approx(mapped(0.1, 0.5, 0.6))  # the NaN pixel left out
    assert out[0, 0, 0, 2].item() == pytest.approx(mapped(0.4, 0.9))  # column 5 is padding
    assert out[0, 0, 2, 1].item() == pytest.approx(mapped(2.2, 2.3, 2.7, 2.8))  # above hi: kept apart
    assert out[0, 0, 3].abs().sum() == 0 and out[0, 0, :, 3].abs().sum() == 0  # padding reads 0


@pytest.mark.parametrize(
    ("shape", "grid", "rng", "message"),
    [
        ((1, 8, 8), 1, (1.0, 1.0), "lo < hi"),
        ((1, 8, 6), 1, (-1.0, 1.0), "(B, T, T)"),
        ((1, 8, 8), 3, (-1.0, 1.0), "not a multiple of 12"),
    ],
)
def test_depth_grid_refuses_bad_input(shape, grid, rng, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        depth_grid(torch.zeros(shape), torch.tensor([[8, 8]]), grid, rng)


def test_untrained_stream_is_the_plain_route_and_a_trained_one_reads_the_disparity(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(depth_stream=True))
    model.eval()
    stream = model.depth_stream
    assert isinstance(stream, DepthStream) and stream.out.weight.abs().sum() == 0
    batch = model_batch(model, tok, tiny_dataset, n=2)
    grid = model.sam.prompt_encoder.image_embedding_size[0]
    assert batch["sam_disparity"].shape[-1] == model.config.sam_config["img_size"]
    assert model.sam_depth(batch).shape == (2, 2, 4 * grid, 4 * grid)
    streamed = _masks(model, batch)
    model.depth_stream = None  # the SAM route without the stream
    plain = _masks(model, batch)
    model.depth_stream = stream
    assert all(torch.equal(a, b) for a, b in zip(streamed, plain))
    with torch.no_grad():
        stream.out.weight.normal_(0, 0.5)
    trained = _masks(model, batch)
    swapped = dict(batch, sam_disparity=batch["sam_disparity"].flip(0))  # each scene gets the other's
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(_masks(model, swapped), trained))
    del batch["sam_disparity"]
    with pytest.raises(ValueError, match="--depth_stream needs the scene's disparity"):
        model.sam_depth(batch)


def test_stream_trains_and_the_feature_cache_serves_the_same_input(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    options = ModelOptions(depth_stream=True, semantic_fusion=True)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], options)
    wrapped = make_trainable(model, TrainableOptions())
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad and "depth_stream" in n}
    assert any(n.endswith("out.weight") for n in trained) and any(".net." in n for n in trained)
    batch = model_batch(model, tok, tiny_dataset, n=2)
    with torch.no_grad():
        model.depth_stream.out.weight.add_(0.05)
    wrapped(lf_batch=batch)["loss"].backward()
    assert model.depth_stream.net[0].weight.grad.abs().sum() > 0
    model.eval()
    cached = cached_batch(model, batch)
    assert "sam_disparity" not in cached and cached["sam_depth"].shape[1] == 2
    for a, b in zip(teacher_forced_masks(model, cached), teacher_forced_masks(model, batch), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_train_ds_with_stream_merge_and_eval_only(tiny_base, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    args = _args(tiny_base, tiny_dataset, runs, "streamed", "--depth_stream", "--depth_detail", "--semantic_fusion",
                 "--epochs", "1", "--steps_per_epoch", "2", "--no_eval",
                 "--feature_cache", str(tmp_path / "cache"))  # fmt: skip
    run_train(args)
    record = json.loads((runs / "streamed" / "export" / "last" / "trainable.json").read_text())
    assert record["model_options"]["depth_stream"] is True and record["model_options"]["depth_detail"] is True
    merged = merge(
        "--weight",
        runs / "streamed" / "export" / "last",
        "--save_path",
        tmp_path / "m",
        "--precision",
        "fp32",
    )
    assert json.loads((merged / "config.json").read_text())["depth_stream"] is True
    loaded = LFLLMForCausalLM.from_pretrained(merged)
    assert loaded.depth_stream.detail_net is not None
    export = load_file(runs / "streamed" / "export" / "last" / "trainable.safetensors")
    for name, tensor in loaded.depth_stream.state_dict().items():  # the trained stream, not a fresh one
        assert torch.equal(tensor, export[f"base_model.model.depth_stream.{name}"]), name
    batch = model_batch(loaded, load_tokenizer(merged), tiny_dataset, split="val", n=1, train=False)
    assert teacher_forced_masks(loaded, batch)[0].shape[-2:] == batch["gt_masks"][0].shape[-2:]
    out = run_train([
        "--eval_only", "--version", str(merged), "--dataset_dir", str(tiny_dataset),
        "--val_dataset", f"{TINY_DS}|syn|val", "--log_base_dir", str(runs), "--exp_name", "streamed_eval",
        "--precision", "fp32", "--workers", "0",
    ])  # fmt: skip
    assert "gIoU" in out and (runs / "streamed_eval" / "eval.json").is_file()


def test_depth_detail_starts_inert_then_reads_the_disparity_and_leaves_sam_alone(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    options = ModelOptions(depth_stream=True, depth_detail=True)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], options)
    model.eval()
    stream = model.depth_stream
    upscaled = model.sam.mask_decoder.transformer_dim // 8
    assert stream.detail_out.out_channels == upscaled and stream.detail_out.weight.abs().sum() == 0
    batch = model_batch(model, tok, tiny_dataset, n=2)
    grid = model.sam.prompt_encoder.image_embedding_size[0]
    assert stream.detail(model.sam_depth(batch)).shape == (2, upscaled, 4 * grid, 4 * grid)
    with torch.no_grad():
        stream.out.weight.normal_(
            0, 0.5
        )  # the dense term on, so both models differ only by the detail branch
    inert = _masks(model, batch)
    plain, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(depth_stream=True))
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.eval()
    assert all(torch.equal(a, b) for a, b in zip(inert, _masks(plain, batch)))
    with torch.no_grad():
        stream.detail_out.weight.normal_(0, 0.5)
    detailed = _masks(model, batch)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(detailed, inert))
    swapped = dict(batch, sam_disparity=batch["sam_disparity"].flip(0))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(_masks(model, swapped), detailed))
    # outside a decode the hook adds nothing: SAM's decoder called directly gives the plain model's output
    assert model._upscale_term is None
    emb = torch.randn(1, model.sam.mask_decoder.transformer_dim, grid, grid)
    pe = model.sam.prompt_encoder.get_dense_pe()
    sparse = torch.randn(1, 1, emb.shape[1])
    dense = torch.zeros(1, emb.shape[1], grid, grid)
    with torch.no_grad():
        ours = model.sam.mask_decoder(emb, pe, sparse, dense, multimask_output=False)[0]
        theirs = plain.sam.mask_decoder(emb, pe, sparse, dense, multimask_output=False)[0]
    assert torch.equal(ours, theirs)


def test_depth_detail_trains_and_is_refused_without_the_stream(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    model, tok = build_lfllm(
        tiny_base["llava"], tiny_base["sam"], ModelOptions(depth_stream=True, depth_detail=True)
    )
    wrapped = make_trainable(model, TrainableOptions())
    assert any("detail_net" in n and p.requires_grad for n, p in wrapped.named_parameters())
    with torch.no_grad():
        model.depth_stream.detail_out.weight.add_(0.05)
    wrapped(lf_batch=model_batch(model, tok, tiny_dataset, n=2))["loss"].backward()
    assert model.depth_stream.detail_net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--depth_detail is a branch of the depth stream"):
        ModelOptions(depth_detail=True)
    with pytest.raises(ValueError, match="--depth_detail belongs to the SAM route"):
        ModelOptions(mask_head="light", depth_detail=True, use_caam=False)
