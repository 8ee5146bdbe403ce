"""The training-step benchmark runs (so it cannot rot), and our optimised paths give the results of the
straightforward ones: encode once per image vs per conversation, logits only on answer tokens vs the full
vocabulary everywhere, new token rows vs full embedding training, gradient checkpointing on vs off."""

from __future__ import annotations

import copy
import importlib
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.build import build_lfllm
from model.losses import dice_per_mask
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import model_batch

ROOT = Path(__file__).resolve().parents[1]
PER_IMAGE_KEYS = (
    "clip_center",
    "clip_views",
    "clip_disparity",
    "clip_scale",
    "sam_center",
    "sam_views",
    "sam_disparity",
    "sam_scale",
    "sam_resized_hw",
)


bench = importlib.import_module("training.experiments.bench_step")
bench_inputs = importlib.import_module("training.experiments.bench_inputs")


@pytest.fixture()
def one_rank(monkeypatch):
    """Environment of a one-rank CPU job; DeepSpeed's shared-memory op build (unused by one rank) skipped."""
    import deepspeed.comm.torch  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in {**env, "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
    yield
    assert not torch.distributed.is_initialized(), "the benchmark must tear down the group it created"


# ---------------------------------------------------------------------------------------------- script
def test_bench_train_eval_chat_tiny(tmp_path, one_rank, capsys):
    out = tmp_path / "out" / "bench.json"
    argv = ["--preset", "tiny", "--steps", "1", "--warmup", "0", "--eval", "--chat", "--chat_queries", "1"]
    result = bench.main([*argv, "--max_new_tokens", "4", "--json", str(out)])  # tiny base written, loaded
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["eval", "chat", "train"]
    train = rows["train"]
    assert (train["images"], train["conversations"], train["seg_tokens"]) == (2, 6, 6)
    assert train["time_s_median"] > 0 and train["images_per_s"] > 0 and train["peak_memory_GiB"] > 0
    assert all(torch.isfinite(torch.tensor(train["losses"])))
    assert 0 < train["forward_TFLOP"] < train["step_TFLOP"] and train["achieved_TFLOPs"] > 0
    assert {"LlamaModel", "CLIPVisionModel", "ImageEncoderViT", "MaskDecoder"} <= set(
        train["forward_TFLOP_by_module"]
    )
    assert rows["eval"]["conversations"] == 3 and rows["eval"]["images_per_s"] > 0
    assert rows["chat"]["new_tokens"] == 4 and rows["chat"]["mask_decoded"]
    assert result["environment"]["device"] == "cpu" and result["config"]["build"] == "files"
    lines = capsys.readouterr().out.strip().splitlines()
    table = lines[[n for n, line in enumerate(lines) if line.startswith("| preset | mode |")][-1] :]
    assert len(table) == 5 and table[-1].startswith("| tiny | train step | off |")


def test_bench_times_the_light_route(one_rank):
    argv = ["--preset", "tiny", "--mask_head", "light", "--light_detail_size", "112", "--steps", "1"]
    result = bench.main(
        [*argv, "--warmup", "0", "--eval", "--chat", "--chat_queries", "1", "--max_new_tokens", "2"]
    )
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["eval", "chat", "train"] and rows["chat"]["mask_decoded"]
    by_module = set(rows["train"]["forward_TFLOP_by_module"])
    assert "LightMaskDecoder" in by_module and not {"ImageEncoderViT", "MaskDecoder"} & by_module
    assert all(torch.isfinite(torch.tensor(rows["train"]["losses"])))


def test_bench_interleaves_the_light_head_with_the_sam_route(one_rank):
    argv = ["--preset", "tiny", "--steps", "2", "--warmup", "0", "--no_flops", "--compare_light", "112"]
    result = bench.main([*argv, "--semantic_fusion"])
    sam, light = result["rows"]
    assert "light head at 112 px (interleaved with the sam route)" in light["desc"]
    assert light["light_over_route"] > 0 and light["route_interleaved_s_median"] > 0
    assert len(light["losses"]) == 2 and all(torch.isfinite(torch.tensor(light["losses"])))
    assert light["trainable_M"] != sam["trainable_M"]


def test_bench_packed_direct_build_with_checkpointing(one_rank):
    argv = ["--preset", "tiny", "--build", "direct", "--pack_conversations", "--gradient_checkpointing"]
    result = bench.main([*argv, "--steps", "1", "--warmup", "0"])
    (train,) = result["rows"]
    assert (train["conversations"], train["seg_tokens"]) == (2, 6)  # one conversation per image
    assert result["config"]["gradient_checkpointing"] and result["config"]["build"] == "direct"
    assert all(torch.isfinite(torch.tensor(train["losses"])))


def test_bench_eval_only_from_a_base_dir(tiny_base):
    argv = ["--version", str(tiny_base["llava"]), "--vision_pretrained", str(tiny_base["sam"])]
    result = bench.main([*argv, "--no_train", "--eval", "--steps", "1", "--warmup", "0"])
    assert [row["mode"] for row in result["rows"]] == ["eval"]
    assert not torch.distributed.is_initialized()


def test_bench_needs_a_gpu_for_full_size():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--preset", "7b"])


def test_full_size_inputs_have_the_real_shapes():
    """What the GPU run will feed the 7b model, checked without building it."""
    config, ids = bench_inputs.random_config("7b", ModelOptions())
    assert config.image_seq_length == 256 and config.text_config.vocab_size == 32064
    assert config.sam_config["img_size"] == 1024 and len(config.caam_offsets) == 4
    assert (ids.image, ids.pad, ids.seg) == (32000, 32001, 32002)
    plain = bench_inputs.synthetic_batch(config, ids, images=2, expressions=3)
    packed = bench_inputs.synthetic_batch(config, ids, images=2, expressions=3, pack=True)
    assert plain["input_ids"].shape == (6, 80 + 2 * 256)
    assert packed["input_ids"].shape == (2, 80 + 2 * 256 + 2 * bench_inputs.TURN_TOKENS)
    for batch in (plain, packed):
        assert int((batch["input_ids"] == ids.seg).sum()) == 6
        assert int((batch["labels"] != -100).sum()) == 6 * bench_inputs.ANSWER_TOKENS
        assert int((batch["input_ids"] == ids.image).sum(1)[0]) == 256
        assert batch["sam_views"].shape == (2, 4, 3, 1024, 1024) and batch["clip_views"].shape[-1] == 224
        assert batch["sam_resized_hw"].tolist() == [[768, 1024]] * 2
        assert [tuple(m.shape) for m in batch["gt_masks"]] == [(3, 480, 640)] * 2


# ---------------------------------------------------------------------------------------------- equivalence
def reference_loss(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss computed the straightforward way: every conversation encodes its own image (CLIP, depth
    through CLIP, SAM), features are written at the placeholder positions one by one, the LM head runs
    over the whole vocabulary at every position with HF's shifted cross-entropy, and SAM is prompted
    through its own prompt encoder (no points/boxes/masks) plus the projected [SEG] state.
    Returns (loss, mask logits in conversation order)."""
    cfg = model.config
    ids_all, labels = batch["input_ids"], batch["labels"]
    embeds, sam_embeddings = [], []
    for n in range(ids_all.shape[0]):
        i = int(batch["conv_image"][n])
        one = {k: batch[k][i : i + 1] for k in PER_IMAGE_KEYS if k in batch}
        image_tokens, depth_tokens = model.encode_clip(one)
        sam_embeddings.append(model.encode_sam(one))
        ids = ids_all[n]
        e = model.get_input_embeddings()(ids)
        for token, feats in ((cfg.image_token_id, image_tokens), (cfg.depth_token_id, depth_tokens)):
            positions = (ids == token).nonzero(as_tuple=True)[0]
            e = e.index_put((positions,), feats[0].to(e.dtype))
        embeds.append(e)
    hidden = model.model.language_model(
        inputs_embeds=torch.stack(embeds), attention_mask=batch["attention_mask"]
    ).last_hidden_state
    logits = model.lm_head(hidden).float()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    prompt = model.sam.prompt_encoder
    bce, dice, masks = [], [], []
    taken = [0] * len(batch["gt_masks"])
    for n in range(ids_all.shape[0]):
        i = int(batch["conv_image"][n])
        emb = sam_embeddings[n]
        for p in (ids_all[n, 1:] == cfg.seg_token_id).nonzero(as_tuple=True)[0].tolist():
            sparse, dense = prompt(points=None, boxes=None, masks=None)
            seg = model.seg_projector(hidden[n, p]).view(1, 1, -1)
            low, _ = model.sam.mask_decoder(
                image_embeddings=emb,
                image_pe=prompt.get_dense_pe().to(emb.dtype),
                sparse_prompt_embeddings=torch.cat([sparse, seg.float()], 1).to(emb.dtype),
                dense_prompt_embeddings=dense.to(emb.dtype),
                multimask_output=False,
            )
            hw = tuple(int(v) for v in batch["sam_resized_hw"][i])
            mask = model.sam.postprocess_masks(low.float(), hw, tuple(batch["original_hw"][i]))[0, 0]
            gt = batch["gt_masks"][i][taken[i]]
            taken[i] += 1
            bce.append(F.binary_cross_entropy_with_logits(mask, gt))
            dice.append(dice_per_mask(mask[None], gt[None])[0])
            masks.append(mask)
    assert taken == [len(m) for m in batch["gt_masks"]]
    loss = (
        cfg.ce_loss_weight * ce
        + cfg.bce_loss_weight * torch.stack(bce).mean()
        + cfg.dice_loss_weight * torch.stack(dice).mean()
    )
    return loss, masks


def _grads(model, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


GRAD_CHECKED = [
    "seg_projector.0.weight",
    "sam.mask_decoder.output_upscaling.0.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.multi_modal_projector.linear_1.weight",
    "lm_head.weight",
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encode_once_matches_per_conversation_reference(tiny_base, tiny_dataset, precision):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    model, tokenizer = build_lfllm(tiny_base["llava"], tiny_base["sam"], dtype=dtype)
    batch = model_batch(model, tokenizer, tiny_dataset, n=2)
    assert batch["input_ids"].shape[0] > len(batch["original_hw"])  # several conversations per image
    out = model.forward_lf(batch)
    out["loss"].backward()
    ours = _grads(model, GRAD_CHECKED)
    model.zero_grad(set_to_none=True)
    ref_loss, ref_masks = reference_loss(model, batch)
    ref_loss.backward()
    ref = _grads(model, GRAD_CHECKED)
    got_masks = [m for per_image in out["pred_masks"] for m in per_image]
    if precision == "fp32":
        assert abs(out["loss"].item() - ref_loss.item()) < 1e-5, (out["loss"].item(), ref_loss.item())
        for g, r in zip(got_masks, ref_masks, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-4)
        for name in GRAD_CHECKED:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    else:  # bf16: the same computation at other batch shapes may round differently; only noise is allowed
        assert abs(out["loss"].item() - ref_loss.item()) < 1e-3 * ref_loss.abs().item()
        for g, r in zip(got_masks, ref_masks, strict=True):
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
        for name in GRAD_CHECKED:
            a, b = ours[name].float(), ref[name].float()
            assert (a - b).norm() <= 2e-2 * b.norm(), (name, ((a - b).norm() / b.norm()).item())


def test_new_token_rows_match_full_embedding_training(tiny_model, tiny_dataset):
    """At the first step, training only the new rows (peft trainable tokens) has the loss and the
    new-row gradients of training the whole embedding and LM head (the yardstick's way)."""
    model, tokenizer = tiny_model
    batch = model_batch(model, tokenizer, tiny_dataset, n=2)
    full = copy.deepcopy(model).eval()
    wrapped = make_trainable(model, TrainableOptions()).eval()
    loss_rows = wrapped(lf_batch=batch)["loss"]  # as the DeepSpeed engine calls it
    loss_rows.backward()
    for p in full.parameters():
        p.requires_grad_(False)
    embed, head = full.get_input_embeddings().weight, full.lm_head.weight
    embed.requires_grad_(True)
    head.requires_grad_(True)
    loss_full = full.forward_lf(batch)["loss"]
    loss_full.backward()
    assert abs(loss_rows.item() - loss_full.item()) < 1e-6
    rows = torch.tensor(model.config.new_token_ids)
    deltas = {n: p for n, p in wrapped.named_parameters() if "trainable_tokens_delta" in n}
    (embed_delta,) = [p for n, p in deltas.items() if "embed_tokens" in n]
    (head_delta,) = [p for n, p in deltas.items() if "lm_head" in n]
    torch.testing.assert_close(embed_delta.grad, embed.grad[rows], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(head_delta.grad, head.grad[rows], rtol=1e-5, atol=1e-8)
    assert head_delta.grad.abs().sum() > 0 and embed_delta.grad.abs().sum() > 0
    # what the full path would also train (and we keep frozen by design): the other rows
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[rows] = False
    assert head.grad[others].abs().sum() > 0


def test_gradient_checkpointing_changes_nothing_and_needs_train_mode(tiny_model, tiny_dataset):
    model, tokenizer = tiny_model
    batch = model_batch(model, tokenizer, tiny_dataset, n=2)
    layer = model.model.language_model.layers[0]
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early

    def run() -> tuple[float, dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = model.forward_lf(batch)["loss"]
        loss.backward()
        return loss.item(), _grads(model, GRAD_CHECKED), len(calls)

    model.train()
    loss_a, grads_a, calls_a = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_b, grads_b, calls_b = run()
    assert (calls_a, calls_b) == (1, 2)  # the layer is recomputed in backward
    assert abs(loss_a - loss_b) < 1e-6
    for name in GRAD_CHECKED:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    # HF checkpoints only in train mode: a model left in eval mode (as from_pretrained returns it)
    # silently trains without checkpointing
    model.eval()
    assert run()[2] == 1
