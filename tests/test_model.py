"""LFLLM model: loading through the real paths, token bookkeeping, encode-once, trainable set, gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dataset.collate import TokenSpec, encode_conversation
from dataset.prompts import build_turns
from model.build import build_lfllm
from model.lfllm import seg_predictor_positions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import model_batch
from utils.conversation import render_segments
from utils.tokens import DEPTH_TOKEN, IMAGE_TOKEN, SEG_TOKEN


def test_loads_llava_dir_and_sam_checkpoint_exactly(tiny_base, tiny_model):
    model, tok = tiny_model
    llava = load_file(tiny_base["llava"] / "model.safetensors")
    own = model.state_dict()
    # saved in the legacy LLaVA key layout; the LLaVA key mapping must put every tensor in place
    assert torch.equal(
        own["model.vision_tower.embeddings.patch_embedding.weight"],
        llava["vision_tower.embeddings.patch_embedding.weight"],
    )
    layer0_q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(own["model.language_model.layers.0.self_attn.q_proj.weight"], llava[layer0_q])
    sam = torch.load(tiny_base["sam"], weights_only=True)
    for key in (
        "image_encoder.patch_embed.proj.weight",
        "mask_decoder.iou_token.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ):
        assert torch.equal(own["sam." + key], sam[key])
    assert torch.allclose(model.sam.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    for token in (SEG_TOKEN, DEPTH_TOKEN, IMAGE_TOKEN):
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
    assert model.config.seg_token_id == tok.convert_tokens_to_ids(SEG_TOKEN)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.new_token_ids and min(model.config.new_token_ids) >= len(tok) - 5


def test_sam_checkpoint_errors(tmp_path, tiny_base):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_lfllm(tiny_base["llava"], tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        build_lfllm(tiny_base["llava"], bad)


def test_seg_predictor_positions_golden():
    ids = torch.tensor([[5, 9, 7, 1, 0], [9, 5, 5, 9, 2]])
    rows, cols = seg_predictor_positions(ids, seg_token_id=9)
    # the state that predicts [SEG] sits one position before it; a [SEG] at position 0 has none
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 2]


def test_placeholders_expand_and_labels_cover_answer_only(tiny_model):
    _, tok = tiny_model
    spec = TokenSpec.from_tokenizer(tok, num_visual_tokens=16, model_max_length=512)
    conv = build_turns(["the red vehicle"], use_depth=True, use_mm_start_end=False, pack=False)[0]
    ids, labels = encode_conversation(tok, render_segments("llava_v1", conv), spec)
    assert ids.count(spec.image_id) == 16 and ids.count(spec.depth_id) == 16
    assert ids.index(spec.depth_id) < ids.index(spec.image_id)  # depth before image
    assert ids.count(spec.seg_id) == 1
    supervised = [t for t in labels if t != -100]
    assert spec.seg_id in supervised and spec.image_id not in supervised
    assert tok.decode(supervised).replace(" ", "").startswith("Sure,[SEG]")
    assert supervised[-1] == tok.eos_token_id


def test_model_max_length_counts_placeholders_once_and_refuses_cut_past_seg(tiny_model):
    """As in the reference, --model_max_length bounds the prompt with <image>/<depth> counted as one token
    each: a limit equal to that length keeps everything (expanded length = limit + 2 x (16 - 1)); a limit
    that would cut the answer's [SEG] off is refused; one that keeps it cuts the rest."""
    _, tok = tiny_model
    conv = build_turns(["the red vehicle"], use_depth=True, use_mm_start_end=False, pack=False)[0]
    segments = render_segments("llava_v1", conv)
    full, _ = encode_conversation(tok, segments, TokenSpec.from_tokenizer(tok, 16, 100_000))
    text_len = len(full) - 2 * 15
    ids, labels = encode_conversation(tok, segments, TokenSpec.from_tokenizer(tok, 16, text_len))
    assert ids == full and len(labels) == len(ids)
    last_seg = max(i for i, t in enumerate(full) if t == tok.convert_tokens_to_ids("[SEG]")) - 2 * 15
    with pytest.raises(ValueError, match=r"truncated past \[SEG\]"):
        encode_conversation(tok, segments, TokenSpec.from_tokenizer(tok, 16, last_seg))
    # a cut after the [SEG] (dropping only the closing tokens) is allowed and keeps [SEG]'s label
    cut, cut_labels = encode_conversation(tok, segments, TokenSpec.from_tokenizer(tok, 16, last_seg + 1))
    assert len(cut) == last_seg + 1 + 2 * 15 and cut[-1] == full[last_seg + 2 * 15]
    assert cut_labels[-1] == cut[-1]


def test_encoders_run_once_per_image(tiny_model, tiny_dataset):
    model, tok = tiny_model
    batch = model_batch(model, tok, tiny_dataset, n=2)
    assert len(batch["input_ids"]) > 2  # several conversations per image
    calls = {"clip": [], "sam": []}
    h1 = model.model.vision_tower.register_forward_hook(lambda m, i, o: calls["clip"].append(i[0].shape[0]))
    h2 = model.sam.image_encoder.register_forward_hook(lambda m, i, o: calls["sam"].append(i[0].shape[0]))
    model(lf_batch=batch)
    h1.remove(), h2.remove()
    assert calls["clip"] == [4]  # one tower call: 2 images + 2 depth images
    assert calls["sam"] == [2]


def test_placeholder_count_mismatch_is_an_error(tiny_model, tiny_dataset):
    model, tok = tiny_model
    batch = model_batch(model, tok, tiny_dataset, n=1)
    ids = batch["input_ids"]
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = tok.pad_token_id
    with pytest.raises(ValueError, match="placeholder token"):
        model(lf_batch=batch)


def _trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_trainable_set_matches_specification(tiny_model, tiny_base):
    model, _ = tiny_model
    peft_model = make_trainable(model, TrainableOptions())
    names = _trainable_names(peft_model)
    allowed = ("lora_A", "lora_B", "trainable_tokens_delta", "seg_projector.", "sam.mask_decoder.")
    assert names and all(any(a in n for a in allowed) for n in names), names
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert any("embed_tokens" in n and "trainable_tokens_delta" in n for n in names)
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in names)
    assert any("seg_projector" in n for n in names) and any("sam.mask_decoder" in n for n in names)
    for frozen in ("vision_tower", "multi_modal_projector", "sam.image_encoder", "sam.prompt_encoder"):
        assert not any(frozen in n for n in names), frozen
    fresh, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"])
    no_decoder = make_trainable(fresh, TrainableOptions(train_mask_decoder=False))
    assert not any("mask_decoder" in n for n in _trainable_names(no_decoder))


def test_gradient_reaches_seg_hidden_state(tiny_model, tiny_dataset):
    model, tok = tiny_model
    batch = model_batch(model, tok, tiny_dataset, n=1)
    kept = {}
    original = model.language_hidden

    def spy(embeds, attention_mask):
        hidden = original(embeds, attention_mask)
        hidden.retain_grad()
        kept["h"] = hidden
        return hidden

    model.language_hidden = spy
    out = model(lf_batch=batch)
    mask_loss = sum(m.sigmoid().mean() for m in out["pred_masks"])
    mask_loss.backward()
    grad = kept["h"].grad
    rows, cols = seg_predictor_positions(batch["input_ids"], model.config.seg_token_id)
    assert grad[rows, cols].abs().sum(-1).min() > 0  # every [SEG] state receives mask gradient
    others = torch.ones_like(grad[..., 0], dtype=torch.bool)
    others[rows, cols] = False
    assert grad[others].abs().max() == 0  # and nothing else does (masks depend on [SEG] states only)
