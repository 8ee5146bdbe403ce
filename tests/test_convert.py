"""scripts/convert_llava_to_hf.py: an original-format LLaVA checkpoint (written here from the tiny base)
converts to an HF LLaVA directory with the same logits, which build_lfllm accepts."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from model.build import build_lfllm

convert = importlib.import_module("training.serve.convert_llava")

TO_ORIGINAL = (
    ("model.language_model.", "model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("lm_head.", "lm_head."),
)


def original_state(base: LlavaForConditionalGeneration, with_vision: bool, rows: int | None = None) -> dict:
    """The base's weights under liuhaotian/LLaVA's names (optionally without the CLIP tower, and with the
    vocabulary cut to ``rows``), plus a stale rotary buffer as old checkpoints have."""
    out = {}
    for key, value in base.state_dict().items():
        if key.startswith("model.vision_tower.") and not with_vision:
            continue
        old, new = next((o, n) for o, n in TO_ORIGINAL if key.startswith(o))
        if rows is not None and key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            value = value[:rows]
        out[new + key[len(old) :]] = value.clone().contiguous()
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    return out


def original_config(base: LlavaForConditionalGeneration, vocab: int, tower: str) -> dict:
    text = base.config.text_config
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    keys += ("max_position_embeddings", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id")
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **{k: getattr(text, k) for k in keys},
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "mm_vision_tower": tower,
        "mm_hidden_size": base.config.vision_config.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
    }


@pytest.fixture(scope="module")
def base(tiny_base) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny_base["llava"]).eval()


@pytest.fixture(scope="module")
def clip_dir(base, tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip")
    base.model.vision_tower.save_pretrained(out)
    shutil.copy(tiny_base["llava"] / "preprocessor_config.json", out)
    return out


def _logits(model: LlavaForConditionalGeneration, image_id: int, text_vocab: int) -> torch.Tensor:
    """Logits of a fixed random prompt whose text ids lie below ``text_vocab`` (the trained vocabulary,
    without the <pad>/<image> tokens added after it, which sit in different orders in the two models)."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, text_vocab, (2, 12), generator=gen)
    image = torch.full((2, model.config.image_seq_length), image_id)
    ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    pixels = torch.randn(2, 3, 56, 56, generator=gen)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_sharded_bin_with_separate_clip_dir(base, clip_dir, tiny_base, tmp_path):
    src = tmp_path / "llava-v1.5-tiny"
    src.mkdir()
    state = original_state(base, with_vision=False)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, src / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vocab = base.config.text_config.vocab_size
    (src / "config.json").write_text(
        json.dumps(original_config(base, vocab, "openai/clip-vit-large-patch14-336"))
    )
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base["llava"] / file, src)

    dst = convert.main(["--src", str(src), "--dst", str(tmp_path / "hf"), "--vision_tower", str(clip_dir)])
    converted = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert converted.config.image_token_id == base.config.image_token_id
    assert converted.config.text_config.vocab_size == vocab  # tokens present: no resize
    assert torch.equal(
        _logits(converted, converted.config.image_token_id, vocab - 2),
        _logits(base, base.config.image_token_id, vocab - 2),
    )
    model, tok = build_lfllm(dst, tiny_base["sam"])  # the LFLLM builder accepts the result
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")


def test_tuned_tower_in_checkpoint_and_tokens_added(base, clip_dir, tiny_base, tmp_path):
    """Vision weights inside the checkpoint win over the CLIP folder (found through mm_vision_tower);
    <image>/<pad> are added to an original tokenizer and the vocabulary padded to 64."""
    stale_clip = tmp_path / "clip"
    shutil.copytree(clip_dir, stale_clip)
    tower = type(base.model.vision_tower)(base.config.vision_config)  # random weights
    tower.save_pretrained(stale_clip)
    src = tmp_path / "llava-v1.5-tiny"
    src.mkdir()
    tok = json.loads((tiny_base["llava"] / "tokenizer.json").read_text())
    extra = {"<pad>", "<image>"}
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in extra]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    tok_cfg = json.loads((tiny_base["llava"] / "tokenizer_config.json").read_text())
    tok_cfg.pop("extra_special_tokens", None)
    tok_cfg["pad_token"] = "<unk>"  # what LLaVA's training saves
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    rows = len(AutoTokenizer.from_pretrained(src))
    assert rows == base.config.text_config.vocab_size - 2
    save_file(original_state(base, with_vision=True, rows=rows), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(original_config(base, rows, str(stale_clip))))

    dst = convert.main(["--src", str(src), "--dst", str(tmp_path / "hf")])
    converted = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    new_tok = AutoTokenizer.from_pretrained(dst)
    image_id = new_tok.convert_tokens_to_ids("<image>")
    assert image_id == rows and new_tok.pad_token == "<pad>" and new_tok.pad_token_id == rows + 1
    assert converted.config.image_token_id == image_id
    assert converted.get_input_embeddings().weight.shape[0] == 64 * -(-(rows + 2) // 64)
    got = _logits(converted, image_id, rows)[..., :rows]
    want = _logits(base, base.config.image_token_id, rows)[..., :rows]
    assert torch.equal(got, want)


def test_unsupported_projector_and_unknown_keys_are_named(base, clip_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = original_config(base, 10, str(clip_dir))
    (src / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match=r"config\.json: mm_projector_type 'linear'"):
        convert.main(["--src", str(src), "--dst", str(tmp_path / "o")])
    (src / "config.json").write_text(json.dumps(cfg))
    save_file({"model.something_else.weight": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.safetensors: unexpected key 'model\.something_else\.weight'"):
        convert.main(["--src", str(src), "--dst", str(tmp_path / "o")])


def test_make_tiny_base_cli_from_dataset_dir(tiny_dataset, tiny_base, tmp_path, capsys):
    make = importlib.import_module("training.pretrain.tiny_base")
    out = tmp_path / "tiny_base"
    paths = make.main(["--out", str(out), "--dataset_dir", str(tiny_dataset), "--ds", "ref-urbanlf-syn"])
    assert paths == {"llava": out / "llava", "sam": out / "sam_tiny.pth"}
    assert f"--version {out / 'llava'} --vision_pretrained {out / 'sam_tiny.pth'}" in capsys.readouterr().out
    # same corpus as the session's tiny base (all sentences of the dataset JSON): same tokenizer
    made = AutoTokenizer.from_pretrained(out / "llava")
    assert made.get_vocab() == AutoTokenizer.from_pretrained(tiny_base["llava"]).get_vocab()
    model, tok = build_lfllm(out / "llava", out / "sam_tiny.pth")
    assert model.config.seg_token_id == tok.convert_tokens_to_ids("[SEG]")


def test_make_tiny_base_names_missing_json(tmp_path):
    make = importlib.import_module("training.pretrain.tiny_base")
    with pytest.raises(
        FileNotFoundError, match=r"refer_seg/nope/nope\.json: referring-expression JSON not found"
    ):
        make.main(["--out", str(tmp_path / "o"), "--dataset_dir", str(tmp_path), "--ds", "nope"])
