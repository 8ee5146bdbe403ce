"""Full-size shapes and configuration: SAM ViT-H, LFLLM at the LLaVA-1.5-7B shapes, the 7b/13b presets.

Opt-in (marked ``slow``; ``tests/conftest.py`` skips it unless ``LFLLM_SLOW=1``), no GPU, no download::

    LFLLM_SLOW=1 .venv/bin/python -m pytest tests/test_fullsize.py

(76 s and 5.7 GiB peak RSS on the 2-core development machine.) How the sizes are afforded on a 2-core CPU with a few GiB:

* SAM ViT-H is built for real once (random init, 2.6 GB in float32), saved in segment_anything's
  state-dict format and loaded back through ``model.sam.load_sam`` (the ``--vision_pretrained`` path).
  Its forward is checked on the meta device: a real 1024×1024 forward of the image encoder takes
  157 s and peaks at 6.4 GiB on this machine, and tells nothing more about shapes.
* LLaVA is built on the meta device through ``model.build.build_lfllm`` itself: the directory has
  llava-1.5-*-hf's layout (config, a 32000-piece LLaMA tokenizer with ``<image>`` = 32000 and
  ``<pad>`` = 32001, the CLIP image processor); only the weight read (``_load_llava_weights``) is
  replaced by construction on the meta device, so tokens, config, embedding resize, SAM, dtype casting
  and peft run as in training.
* The 7B model is ``llava-1.5-7b-hf``'s shape: the ``7b`` preset with CLIP ViT-L/14 at 336 px (the
  preset itself keeps 224 px, the size of LISA's benchmark yardstick; both are checked).

Every expected number below is worked out by hand in its comment.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from segment_anything import sam_model_registry
from transformers import CLIPImageProcessor, LlamaTokenizer

from dataset.collate import move_batch
from model import build as build_module
from model.build import build_lfllm
from model.lfllm import LFLLMForCausalLM, seg_predictor_positions
from model.losses import mask_losses
from model.options import ModelOptions
from model.presets import Preset, get_preset, llava_config
from model.sam import build_sam, load_sam, sam_config
from model.trainable import TrainableOptions, lora_target_regex, make_trainable
from tests.conftest import model_batch
from utils.tokens import DEPTH_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")

# ---------------------------------------------------------------------------------------------- SAM ViT-H
# Image encoder (width 1280, 32 blocks, 16 heads -> head dim 80, MLP 5120, 1024 px / 16 = 64×64 tokens):
#   patch conv 3·16·16·1280 + 1280 = 984,320; absolute positions 64·64·1280 = 5,242,880
#   block: LN 2,560 + qkv 1280·3840+3840 = 4,919,040 + proj 1280²+1280 = 1,639,680 + LN 2,560
#          + lin1 1280·5120+5120 = 6,558,720 + lin2 5120·1280+1280 = 6,554,880 = 19,677,440; ×32 = 629,678,080
#   relative positions (h and w tables of 80 channels): 28 windowed blocks (2·14−1 = 27 rows) 28·2·27·80
#          = 120,960; 4 global blocks (2·64−1 = 127 rows) 4·2·127·80 = 81,280
#   neck: 1×1 conv 1280·256 = 327,680 + LN 512 + 3×3 conv 256·256·9 = 589,824 + LN 512 = 918,528
#   = 637,026,048
SAM_H_ENCODER = 637_026_048
# Prompt encoder (256 wide): 4 point embeddings 1,024 + not-a-point 256 + no-mask 256 + mask downscaling
#   conv 1·4·2·2+4 = 20, LN 8, conv 4·16·2·2+16 = 272, LN 32, conv 16·256+256 = 4,352 = 6,220
SAM_H_PROMPT = 6_220
# Mask decoder (256 wide): iou token 256 + 4 mask tokens 1,024
#   two-way transformer: block = self-attn 4·(256²+256) = 263,168 + two cross-attns (internal 128)
#     2·(3·(256·128+128) + 128·256+256) = 263,424 + MLP 256·2048+2048 + 2048·256+256 = 1,050,880 + 4 LN 2,048
#     = 1,579,520; ×2 = 3,159,040; final attn 131,712 + LN 512 -> 3,291,264
#   upscaling: convT 256·64·4+64 = 65,600 + LN 128 + convT 64·32·4+32 = 8,224 = 73,952
#   4 hypernetwork MLPs (256, 256, 32): 4·(2·65,792 + 8,224) = 559,232
#   IoU head (256, 256, 4): 2·65,792 + 1,028 = 132,612
#   = 4,058,340
SAM_H_DECODER = 4_058_340
SAM_H = SAM_H_ENCODER + SAM_H_PROMPT + SAM_H_DECODER  # 641,090,608

# ---------------------------------------------------------------------------------------------- LLaVA-1.5
V = 32064  # llava-1.5-*-hf's embedding rows: 32000 LLaMA pieces + <image>, <pad>, padded to 64
# LLaMA-7B (4096 wide, 32 layers, MLP 11008): embed V·4096 = 131,334,144 (lm_head the same, untied)
#   layer: q,k,v,o 4·4096² = 67,108,864 + gate,up,down 3·4096·11008 = 135,266,304 + 2 RMSNorm 8,192
#   = 202,383,360; ×32 = 6,476,267,520; final norm 4,096
LM_7B = 131_334_144 + 6_476_267_520 + 4_096  # language_model (no head) = 6,607,605,760
HEAD_7B = V * 4096  # 131,334,144
# CLIP ViT-L/14 (1024 wide, 24 layers, MLP 4096): patch conv 3·14·14·1024 = 602,112 + class 1,024
#   + positions (1 + (S/14)²)·1024 + pre-LN 2,048 + post-LN 2,048
#   layer: q,k,v,o 4·(1024²+1024) = 4,198,400 + fc1 4,198,400 + fc2 4,195,328 + 2 LN 4,096 = 12,596,224;
#   ×24 = 302,309,376.  336 px: 577 positions = 590,848 -> 303,507,456;  224 px: 257 -> 303,179,776
CLIP_336 = 303_507_456
CLIP_224 = 303_179_776
# projector 1024 -> D -> D (GELU between)
PROJ_7B = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20,979,712
LLAVA15_7B = LM_7B + HEAD_7B + CLIP_336 + PROJ_7B  # 7,063,427,072 (llava-1.5-7b-hf's count)
# [SEG] projector 4096 -> 4096 -> 256: 16,781,312 + 1,048,832
SEG_7B = 17_830_144
LFLLM_7B = LLAVA15_7B + SAM_H + SEG_7B  # 7,722,347,824
# Trainable by default: LoRA r=8 on q,v of 32 layers: 32·2·8·(4096+4096) = 4,194,304; the 4 new token rows
# of embed_tokens and lm_head: 4·4096·2 = 32,768; the [SEG] projector; SAM's mask decoder.
LORA_7B = 32 * 2 * 8 * (4096 + 4096)
TRAINABLE_7B = LORA_7B + 4 * 4096 * 2 + SEG_7B + SAM_H_DECODER  # 26,115,556

# LLaMA-13B (5120 wide, 40 layers, MLP 13824): embed V·5120 = 164,167,680 (×2 with lm_head)
#   layer: 4·5120² = 104,857,600 + 3·5120·13824 = 212,336,640 + 10,240 = 317,204,480; ×40 = 12,688,179,200
#   + final norm 5,120;  projector 1024·5120+5120 + 5120²+5120 = 31,467,520
#   [SEG] projector 5120 -> 5120 -> 256: 26,219,520 + 1,310,976 = 27,530,496
LLAVA_13B_224 = 2 * 164_167_680 + 12_688_179_200 + 5_120 + CLIP_224 + 31_467_520  # 13,351,166,976
LFLLM_13B_224 = LLAVA_13B_224 + SAM_H + 27_530_496  # 14,019,788,080
TRAINABLE_13B = 40 * 2 * 8 * (5120 + 5120) + 4 * 5120 * 2 + 27_530_496 + SAM_H_DECODER  # 38,183,396
LFLLM_7B_224 = LFLLM_7B - (577 - 257) * 1024  # the 7b preset as it is (CLIP at 224 px): 7,722,020,144

NEW_TOKENS = [SEG_TOKEN, DEPTH_TOKEN, IM_START_TOKEN, IM_END_TOKEN]


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def digest(t: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    """(dtype, shape, blake2b of the bytes): equality means bit-identical tensors."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return str(t.dtype), tuple(t.shape), hashlib.blake2b(data).hexdigest()


# ---------------------------------------------------------------------------------------------- builders
def llama_tokenizer_32k() -> LlamaTokenizer:
    """A LLaMA-layout tokenizer with llava-1.5-*-hf's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, 256 byte
    pieces, placeholder pieces up to 32000, then ``<image>`` = 32000 and ``<pad>`` = 32001."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({f"▁piece{i}": i for i in range(len(vocab), 32000)})
    tok = LlamaTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert (len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id) == (32002, 32000, 32001)
    return tok


def write_llava_dir(path: Path, preset: Preset, rows: int = V) -> Path:
    """An llava-1.5-*-hf-layout directory without weights (config, tokenizer, image processor)."""
    llava_config(preset, vocab_size=rows, image_token_id=32000, pad_token_id=32001).save_pretrained(path)
    llama_tokenizer_32k().save_pretrained(path)
    size = preset.vision["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(path)
    return path


def _construct_on_meta(version, config, dtype=torch.float32) -> LFLLMForCausalLM:
    with torch.device(META):
        return LFLLMForCausalLM(config)


def _meta_sam(path):
    cfg = sam_config("vit_h")
    with torch.device(META):
        return build_sam(cfg), cfg


def build_on_meta(version: Path, sam_path: Path | None = None, options: ModelOptions | None = None):
    """``build_lfllm(version, sam_path, options, bf16)`` with LLaVA constructed on the meta device instead
    of read from safetensors. ``sam_path=None``: SAM ViT-H is built on the meta device too (its file path is
    checked by the tests that pass the real checkpoint)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module, "_load_llava_weights", _construct_on_meta)
        if sam_path is None:
            mp.setattr(build_module, "load_sam", _meta_sam)
        return build_lfllm(version, sam_path or "sam_vit_h.pth", options or ModelOptions(), torch.bfloat16)


def _preset_336(name: str) -> Preset:
    base = get_preset(name)
    return replace(base, vision={**base.vision, "image_size": 336})


@pytest.fixture(scope="module")
def vit_h_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A random-init SAM ViT-H saved as segment_anything's state dict, and the digest of every tensor."""
    torch.manual_seed(0)
    sam = build_sam(sam_config("vit_h"))
    state = sam.state_dict()
    digests = {k: digest(v) for k, v in state.items()}
    path = tmp_path_factory.mktemp("sam") / "sam_vit_h_random.pth"
    torch.save(state, path)
    del sam, state
    gc.collect()
    return path, digests


@pytest.fixture(scope="module")
def llava15_7b_dir(tmp_path_factory) -> Path:
    return write_llava_dir(tmp_path_factory.mktemp("llava-1.5-7b-hf"), _preset_336("7b"))


@pytest.fixture(scope="module")
def model_7b(llava15_7b_dir, vit_h_checkpoint):
    """LFLLM-7B (bf16, meta device) built through build_lfllm with the real ViT-H checkpoint file (whose
    values cannot land in meta parameters: torch warns once per tensor, silenced here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        model, tok = build_on_meta(llava15_7b_dir, vit_h_checkpoint[0])
    gc.collect()
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------- SAM
def test_sam_vit_h_is_segment_anythings_vit_h():
    """Our ``vit_h`` dict builds exactly Meta's ``sam_model_registry["vit_h"]``, with the known parameter
    count, and maps a 1024² image to a (1, 256, 64, 64) embedding and a prompt to 256² low-res masks."""
    with torch.device(META):
        ours = build_sam(sam_config("vit_h"))
        ref = sam_model_registry["vit_h"]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert repr(ours) == repr(ref)  # layer norms' eps, activations, kernel sizes

    def blocks(sam):
        return [(b.attn.num_heads, b.window_size, b.attn.use_rel_pos) for b in sam.image_encoder.blocks]

    assert blocks(ours) == blocks(ref)
    assert [i for i, b in enumerate(ours.image_encoder.blocks) if b.window_size == 0] == [7, 15, 23, 31]
    assert count(ours.image_encoder) == SAM_H_ENCODER
    assert count(ours.prompt_encoder) == SAM_H_PROMPT
    assert count(ours.mask_decoder) == SAM_H_DECODER
    assert count(ours) == SAM_H == 641_090_608

    with torch.no_grad():
        emb = ours.image_encoder(torch.empty(1, 3, 1024, 1024, device=META))
        assert emb.shape == (1, 256, 64, 64)
        pe = ours.prompt_encoder.get_dense_pe()
        assert pe.shape == (1, 256, 64, 64)
        low_res, iou = ours.mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=torch.empty(2, 1, 256, device=META),
            dense_prompt_embeddings=ours.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand(
                2, -1, 64, 64
            ),
            multimask_output=False,
        )
        assert low_res.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
        # a 480×640 image is resized to 768×1024 (longest side 1024), then padded
        masks = ours.postprocess_masks(low_res, (768, 1024), (480, 640))
        assert masks.shape == (2, 1, 480, 640)


def test_sam_vit_h_checkpoint_round_trips_through_load_sam(vit_h_checkpoint):
    """A ViT-H state dict in segment_anything's format (as ``sam_vit_h_4b8939.pth``) loads through the
    ``--vision_pretrained`` loader: variant inferred, every tensor bit-identical."""
    path, digests = vit_h_checkpoint
    assert len(digests) == 594  # 593 parameters + the prompt encoder's random Fourier matrix
    sam, cfg = load_sam(path)
    try:
        assert cfg == sam_config("vit_h")
        assert cfg["embed_dim"] == 1280 and cfg["depth"] == 32 and cfg["img_size"] == 1024
        assert count(sam) == SAM_H
        assert {k: digest(v) for k, v in sam.state_dict().items()} == digests
        assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    finally:
        del sam
        gc.collect()


# ---------------------------------------------------------------------------------------------- LFLLM-7B
def test_llava15_7b_builds_with_sam_vit_h(model_7b):
    """Parameter counts, new tokens and embedding rows, [SEG] projector, CAAM/depth modules, dtypes."""
    model, tok = model_7b
    cfg = model.config
    assert count(model.model.language_model) == LM_7B == 6_607_605_760
    assert count(model.lm_head) == HEAD_7B
    assert count(model.model.vision_tower) == CLIP_336
    assert count(model.model.multi_modal_projector) == PROJ_7B
    assert count(model.sam) == SAM_H
    assert count(model.seg_projector) == SEG_7B
    llava = count(model) - count(model.sam) - count(model.seg_projector) - count(model.caam)
    assert llava == LLAVA15_7B == 7_063_427_072
    assert count(model) == LFLLM_7B == 7_722_347_824

    # tokens: llava-1.5's <image> 32000 and <pad> 32001 kept, ours appended; the 32064 padded rows hold
    # them, so nothing is resized (and never shrunk to len(tokenizer) = 32006)
    assert tok.convert_tokens_to_ids([IMAGE_TOKEN, "<pad>"]) == [32000, 32001]
    assert tok.convert_tokens_to_ids(NEW_TOKENS) == [32002, 32003, 32004, 32005]
    assert len(tok) == 32006
    assert (cfg.image_token_id, cfg.seg_token_id, cfg.depth_token_id) == (32000, 32002, 32003)
    assert cfg.new_token_ids == [32002, 32003, 32004, 32005]
    assert model.get_input_embeddings().weight.shape == (32064, 4096)
    assert model.lm_head.weight.shape == (32064, 4096)
    assert cfg.text_config.vocab_size == 32064

    # CLIP ViT-L/14-336: 24×24 = 576 patch tokens (+ CLS in the position table)
    assert cfg.image_seq_length == 576
    positions = model.get_parameter("model.vision_tower.embeddings.position_embedding.weight")
    assert positions.shape == (577, 1024)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.sam_config == sam_config("vit_h") and cfg.out_dim == 256

    linear1, act, linear2 = model.seg_projector
    assert isinstance(act, torch.nn.ReLU)
    assert linear1.weight.shape == (4096, 4096) and linear1.bias.shape == (4096,)
    assert linear2.weight.shape == (256, 4096) and linear2.bias.shape == (256,)
    assert model.sam.mask_decoder.transformer_dim == 256  # the [SEG] state is SAM's sparse prompt

    # paper defaults: fixed CAAM over the 4 neighbours (no parameters), depth through the shared projector
    assert model.caam is not None and model.caam.mode == "fixed" and model.caam.num_views == 4
    assert model.caam.view_weights().tolist() == pytest.approx([0.6, 0.1, 0.1, 0.1, 0.1])
    assert count(model.caam) == 0
    assert model.depth_projector is None

    # training precision: everything bf16 but SAM's prompt encoder (float32 Fourier features)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n, d in dtypes.items() if d != torch.bfloat16} == {
        n for n in dtypes if n.startswith("sam.prompt_encoder.")
    }
    assert all(dtypes[n] == torch.float32 for n in dtypes if n.startswith("sam.prompt_encoder."))
    assert model.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32


def test_lora_targets_and_trainable_count_at_7b(llava15_7b_dir):
    """The LoRA regex picks q_proj/v_proj of the 32 LLaMA layers only: CLIP (24 layers) and SAM's mask
    decoder (7 attentions) have layers of the same names. Trainable count = LoRA + new rows + heads."""
    model, _ = build_on_meta(llava15_7b_dir)
    names = [n for n, _ in model.named_modules()]
    expected = {
        f"model.language_model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("q_proj", "v_proj")
    }
    same_name = [n for n in names if n.endswith((".q_proj", ".v_proj"))]
    assert len(same_name) == 64 + 24 * 2 + 7 * 2
    assert {n for n in names if re.fullmatch(lora_target_regex("q_proj,v_proj"), n)} == expected

    wrapped = make_trainable(model, TrainableOptions())
    prefix = "base_model.model."
    lora = {n.removeprefix(prefix) for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
    assert lora == expected
    q0 = model.model.language_model.layers[0].self_attn.q_proj
    assert q0.lora_A["default"].weight.shape == (8, 4096)
    assert q0.lora_B["default"].weight.shape == (4096, 8)
    assert q0.scaling["default"] == 16 / 8

    trainable = {n.removeprefix(prefix): p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}

    def total(pred) -> int:
        return sum(v for n, v in trainable.items() if pred(n))

    assert total(lambda n: ".lora_" in n) == LORA_7B == 4_194_304
    assert total(lambda n: "trainable_tokens_delta" in n) == 4 * 4096 * 2
    assert total(lambda n: n.startswith("seg_projector.")) == SEG_7B
    assert total(lambda n: n.startswith("sam.mask_decoder.")) == SAM_H_DECODER
    frozen = (
        "model.vision_tower.",
        "model.multi_modal_projector.",
        "sam.image_encoder.",
        "sam.prompt_encoder.",
    )
    assert total(lambda n: n.startswith(frozen)) == 0
    assert sum(trainable.values()) == TRAINABLE_7B == 26_115_556


def test_module_variants_at_7b(llava15_7b_dir, tmp_path):
    """Option-dependent modules at 7B width, and the embedding resize for an unpadded vocabulary."""
    opts = ModelOptions(depth_projector="separate", caam_mode="learned", caam_views="8")
    model, _ = build_on_meta(llava15_7b_dir, options=opts)
    proj = model.depth_projector
    assert proj.linear_1.weight.shape == (4096, 1024) and proj.linear_2.weight.shape == (4096, 4096)
    assert count(proj) == PROJ_7B
    assert model.caam.num_views == 8 and model.caam.logits.shape == (9,)
    weights = model.caam.view_weights().tolist()
    assert weights[0] == pytest.approx(0.6, abs=5e-3) and weights[1:] == pytest.approx([0.05] * 8, abs=5e-3)
    assert count(model) == LFLLM_7B + PROJ_7B + 9

    model, _ = build_on_meta(llava15_7b_dir, options=ModelOptions(caam_mode="occlusion"))
    assert model.caam.mode == "occlusion" and count(model.caam) == 0

    model, _ = build_on_meta(llava15_7b_dir, options=ModelOptions(use_caam=False, use_depth=False))
    assert model.caam is None and model.depth_projector is None and count(model) == LFLLM_7B

    # an unpadded base (32002 rows: LLaMA + <image> + <pad>) grows by exactly our 4 tokens
    unpadded = write_llava_dir(tmp_path / "unpadded", _preset_336("7b"), rows=32002)
    model, tok = build_on_meta(unpadded)
    assert model.get_input_embeddings().weight.shape == (32006, 4096)
    assert model.lm_head.weight.shape == (32006, 4096)
    assert model.config.text_config.vocab_size == 32006 == len(tok)
    assert count(model) == LFLLM_7B - 2 * (32064 - 32006) * 4096


def test_forward_stages_at_7b_on_meta(model_7b, tiny_dataset):
    """One batch of the real data path (2 scenes × 3 expressions) at 7B geometry, through every stage.

    ``forward_lf`` itself cannot run on meta tensors: it reads data where it must (``bool()`` on the
    placeholder-count check in ``build_inputs_embeds``, ``nonzero`` for the [SEG] positions and per-image
    [SEG] counts, and transformers' causal-mask builder checks the 2-D padding mask's values). So the
    integer bookkeeping is done here on the CPU batch, and every tensor stage is the model's own method
    on the meta device: ``encode_clip``, ``encode_sam``, ``language_hidden`` (with a 4-D mask, which
    transformers takes as is), ``seg_projector``, ``decode_masks``, ``mask_losses``, ``lm_head``.
    """
    model, tok = model_7b
    cfg = model.config
    batch = model_batch(model, tok, tiny_dataset, model_max_length=4096)
    ids = batch["input_ids"]
    n, length = ids.shape
    assert n == 6
    assert batch["clip_center"].shape == (2, 3, 336, 336)
    assert batch["clip_views"].shape == (2, 4, 3, 336, 336)
    assert batch["clip_disparity"].shape == (2, 336, 336)
    assert batch["sam_center"].shape == (2, 3, 1024, 1024)
    assert batch["sam_views"].shape == (2, 4, 3, 1024, 1024)
    assert batch["sam_disparity"].shape == (2, 1024, 1024)
    assert batch["sam_resized_hw"].tolist() == [[683, 1024]] * 2  # 64×96 scaled by 1024/96
    # placeholders expanded to the real token counts: what build_inputs_embeds will check
    assert (ids == cfg.image_token_id).sum(1).tolist() == [576] * n
    assert (ids == cfg.depth_token_id).sum(1).tolist() == [576] * n
    assert (ids == cfg.seg_token_id).sum(1).tolist() == [1] * n

    meta = move_batch(batch, META)
    with torch.no_grad():
        image_tokens, depth_tokens = model.encode_clip(meta)
        assert image_tokens.shape == depth_tokens.shape == (2, 576, 4096)
        assert image_tokens.dtype == torch.bfloat16
        sam_embeddings = model.encode_sam(meta)
        assert sam_embeddings.shape == (2, 256, 64, 64) and sam_embeddings.dtype == torch.bfloat16

        embeds = model.get_input_embeddings()(meta["input_ids"])
        assert embeds.shape == (n, length, 4096)
        mask = torch.empty(n, 1, length, length, dtype=torch.bool, device=META)
        hidden = model.language_hidden(embeds, mask)
        assert hidden.shape == (n, length, 4096) and hidden.dtype == torch.bfloat16

        rows, cols = seg_predictor_positions(ids, cfg.seg_token_id)
        assert rows.tolist() == list(range(n))
        seg = model.seg_projector(hidden[rows.to(META), cols.to(META)])
        assert seg.shape == (n, 256)
        masks = model.decode_masks(
            seg, batch["conv_image"][rows], sam_embeddings, batch["sam_resized_hw"], batch["original_hw"]
        )
        assert [tuple(m.shape) for m in masks] == [(3, 64, 96)] * 2
        assert all(m.dtype == torch.float32 for m in masks)
        bce, dice = mask_losses(masks, meta["gt_masks"])
        assert bce.shape == dice.shape == ()

        answer = (batch["labels"][:, 1:] != -100).nonzero(as_tuple=True)
        logits = model.lm_head(hidden[:, :-1][answer[0].to(META), answer[1].to(META)])
        assert logits.shape == (len(answer[0]), 32064)


@pytest.mark.parametrize("cli", ["train_ds", "chat"])
def test_default_model_max_length_fits_a_full_size_prompt(cli, model_7b, tiny_dataset):
    if cli == "chat":
        import chat

        parser = chat.build_parser()
    else:
        from training.config import build_parser

        parser = build_parser()
    """The reference's default (512, <image>/<depth> counted once) takes a llava-1.5 prompt whole: the
    expanded rows are the prompt plus 2 x 575 visual tokens each, and every [SEG] is kept."""
    model, tok = model_7b
    default = parser.get_default("model_max_length")
    assert default == 512  # the reference's default
    batch = model_batch(model, tok, tiny_dataset, model_max_length=default)
    ids = batch["input_ids"]
    n_visual = model.config.image_seq_length  # 576 at 336 px
    for row, mask in zip(ids, batch["attention_mask"]):
        row = row[mask.bool()]
        assert int((row == model.config.image_token_id).sum()) == n_visual
        counted_once = len(row) - 2 * (n_visual - 1)
        assert counted_once <= default
        assert int((row == model.config.seg_token_id).sum()) >= 1


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    ("name", "total", "trainable"),
    [("7b", LFLLM_7B_224, TRAINABLE_7B), ("13b", LFLLM_13B_224, TRAINABLE_13B)],
)
def test_bench_presets_build_on_meta_as_build_lfllm_would(name, total, trainable, tmp_path):
    """The benchmark's ``7b`` / ``13b`` presets (CLIP at 224 px) build on the meta device, and the config
    the benchmark makes (``random_config``) is the one build_lfllm makes from such an HF directory."""
    bench_inputs = importlib.import_module("training.experiments.bench_inputs")
    preset = get_preset(name)
    assert preset.vision["image_size"] == 224 and preset.sam_variant == "vit_h"
    model, _ = build_on_meta(write_llava_dir(tmp_path / name, preset))
    config, ids = bench_inputs.random_config(name, ModelOptions())
    ours, theirs = model.config.to_dict(), config.to_dict()
    ours.pop("_name_or_path", None)
    theirs.pop("_name_or_path", None)
    assert ours == theirs
    assert (ids.image, ids.pad, ids.seg, ids.depth) == (32000, 32001, 32002, 32003)
    assert config.image_seq_length == 256
    assert count(model) == total
    direct = bench_inputs.build_direct(config, torch.bfloat16, META)
    assert count(direct) == total
    del direct
    wrapped = make_trainable(model, TrainableOptions())
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == trainable
