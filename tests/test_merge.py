"""Merging trained weights: export / DeepSpeed / zero_to_fp32 inputs, strict loading, merged == unmerged."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_lora_weights_and_save_hf_model as merge_script
from model.build import build_lfllm, load_tokenizer
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMConfig, LFLLMForCausalLM
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable
from tests.conftest import model_batch
from tests.test_trust import _Payload
from training.checkpoint import TRAINABLE_FILE, export_trainable, load_checkpoint, save_checkpoint
from training.config import RunOptions
from training.trainer import resume_source
from training.weights import WeightSource, open_weights, select_trainable
from utils.safe_load import UnsafeCheckpointError, deepspeed_records, verify_torch_file

PREFIX = "base_model.model."


def make_trained_export(
    tiny_base: dict[str, Path], out_dir: Path, seed: int = 1, options: ModelOptions | None = None
):
    """Tiny base + make_trainable with every trainable tensor perturbed (LoRA B non-zero, new token rows,
    [SEG] head and SAM decoder changed), exported as training writes it. Returns (wrapped model, tokenizer,
    export dir)."""
    torch.manual_seed(0)
    options, train_options = options or ModelOptions(), TrainableOptions()
    sam = None if options.mask_head == "light" else tiny_base["sam"]
    model, tokenizer = build_lfllm(tiny_base["llava"], sam, options)
    wrapped = make_trainable(model, train_options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    wrapped.eval()
    meta = {
        "version": str(tiny_base["llava"]),
        "vision_pretrained": None if sam is None else str(sam),
        "model_options": dataclasses.asdict(options),
        "trainable_options": dataclasses.asdict(train_options),
        "global_step": 7,
        "epoch": 1,
    }
    export_trainable(wrapped, out_dir, json.loads(json.dumps(meta)))
    return wrapped, tokenizer, out_dir


def merge(*argv: str | Path) -> Path:
    return merge_script.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    return make_trained_export(tiny_base, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def merged_dir(trained, tmp_path_factory) -> Path:
    # no --version / --vision_pretrained / options: all of it comes from trainable.json
    out = tmp_path_factory.mktemp("merged")
    return merge(
        "--weight", trained[2], "--save_path", out, "--precision", "fp32", "--max_shard_size", "500KB"
    )


def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def test_merged_masks_equal_unmerged(trained, merged_dir, tiny_dataset, tiny_base):
    wrapped, _, _ = trained
    merged = LFLLMForCausalLM.from_pretrained(merged_dir)  # nothing but the directory
    tokenizer = load_tokenizer(merged_dir)
    batch = model_batch(merged, tokenizer, tiny_dataset, split="val", n=3, train=False)
    got = teacher_forced_masks(merged, batch)
    want = teacher_forced_masks(wrapped, batch)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-5, rtol=0), (g - w).abs().max()
        assert torch.equal(g > 0, w > 0)
    # the trained weights matter: the untouched base gives other masks
    base, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"])
    base_masks = teacher_forced_masks(base.eval(), batch)
    assert not all(torch.allclose(b, w, atol=1e-3) for b, w in zip(base_masks, want))
    # new token rows folded into the embeddings and the LM head
    rows = torch.tensor(merged.config.new_token_ids)
    inner = wrapped.base_model.model
    h = torch.randn(4, merged.config.text_config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(merged.lm_head(h), inner.lm_head(h), atol=1e-5)
        assert torch.equal(merged.get_input_embeddings()(rows), inner.model.language_model.embed_tokens(rows))


def test_merged_dir_is_standalone_hf_model(merged_dir):
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["model_type"] == "lfllm"
    lfllm_fields = set(LFLLMConfig.__dataclass_fields__) - set(LFLLMConfig.__mro__[1].__dataclass_fields__)
    assert lfllm_fields and lfllm_fields <= set(config), lfllm_fields - set(config)
    assert config["sam_config"]["variant"] == "tiny"
    files = {p.name for p in merged_dir.iterdir()}
    assert {"tokenizer.json", "preprocessor_config.json"} <= files
    assert "model.safetensors.index.json" in files  # sharded
    assert len([n for n in files if n.endswith(".safetensors")]) > 1
    assert not any(name.endswith(".bin") for name in files)
    info = json.loads((merged_dir / "merge_info.json").read_text())
    assert info["source_kind"] == "export" and info["trained"]["global_step"] == 7


def test_build_from_merged_keeps_trained_heads(trained, merged_dir):
    exported = load_file(trained[2] / TRAINABLE_FILE)
    model, tokenizer = build_lfllm(merged_dir)
    own = model.state_dict()
    heads = [k for k in exported if k.startswith((PREFIX + "sam.mask_decoder.", PREFIX + "seg_projector."))]
    assert any("seg_projector" in k for k in heads) and any("mask_decoder" in k for k in heads)
    for key in heads:
        assert torch.equal(own[key[len(PREFIX) :]], exported[key]), key
    direct = LFLLMForCausalLM.from_pretrained(merged_dir).state_dict()
    assert own.keys() == direct.keys()
    assert all(torch.equal(own[k], direct[k]) for k in own)
    assert tokenizer.convert_tokens_to_ids("[SEG]") == model.config.seg_token_id


def test_merged_loads_directly_in_bf16_with_exact_fp32_prompt_encoder(merged_dir):
    full, _ = build_lfllm(merged_dir)
    half, _ = build_lfllm(merged_dir, dtype=torch.bfloat16)
    want, got = full.state_dict(), half.state_dict()
    assert want.keys() == got.keys()
    for key, value in got.items():
        if key.startswith("sam.prompt_encoder."):
            assert value.dtype == torch.float32 and torch.equal(value, want[key]), key
        elif value.is_floating_point():
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, want[key].to(torch.bfloat16)), key
    assert half.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32


@pytest.fixture()
def single_process_group(monkeypatch):
    """torch.distributed (gloo) with one CPU rank, as the deepspeed launcher would set it up."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for key, value in {**env, "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    # DeepSpeed JIT-compiles a shared-memory all-reduce op at init (~2 min on 2 cores); one rank never uses it
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
    # DeepSpeed caches a clone of the world group per process: a group created anew needs it cleared
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_WORLD_GROUP"):
        monkeypatch.setattr(groups, "_WORLD_GROUP", None)
    deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    torch.distributed.destroy_process_group()


def _zero2_engine(deepspeed, wrapped):
    """A one-rank ZeRO-2 engine over the trainable parameters (the training format of checkpoints)."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    params = [p for p in wrapped.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=params, config=config)
    return engine


def test_deepspeed_checkpoint_and_zero_to_fp32_inputs(trained, merged_dir, tmp_path, single_process_group):
    deepspeed = single_process_group
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    wrapped = trained[0]
    engine = _zero2_engine(deepspeed, wrapped)
    ckpt = tmp_path / "run" / "ckpt_model"
    save_checkpoint(engine, ckpt, "best", {})  # the training format: trainable parameters only
    convert_zero_checkpoint_to_fp32_state_dict(
        str(ckpt), str(tmp_path / "fp32"), tag="best", exclude_frozen_parameters=True
    )
    assert (tmp_path / "fp32" / "pytorch_model.bin").is_file()
    reference = _state(LFLLMForCausalLM.from_pretrained(merged_dir))
    assert (ckpt / "latest").read_text() == "best"
    inputs = {
        "ds_dir": ckpt,  # tag from 'latest'
        "bin": tmp_path / "fp32" / "pytorch_model.bin",  # trainable parameters only
        "full_bin": tmp_path / "full.bin",  # a full state dict: frozen keys are allowed
    }
    torch.save(wrapped.state_dict(), inputs["full_bin"])
    # the run layout of train_ds.py: the options of ckpt_model/<tag> are in export/<tag>/trainable.json
    (tmp_path / "run" / "export" / "best").mkdir(parents=True)
    shutil.copy(trained[2] / "trainable.json", tmp_path / "run" / "export" / "best")
    for name, weight in inputs.items():
        if name == "ds_dir":
            out = merge("--weight", weight, "--save_path", tmp_path / f"m_{name}", "--precision", "fp32")
        else:
            out = _merge_with_meta(weight, tmp_path / f"m_{name}", trained[2])
        state = _state(LFLLMForCausalLM.from_pretrained(out))
        assert state.keys() == reference.keys()
        diff = [k for k in state if not torch.equal(state[k], reference[k])]
        assert not diff, (name, diff[:3])
    # the other spellings of the same inputs resolve to the same tensors
    for same, other in ((ckpt, ckpt / "best"), (inputs["bin"], tmp_path / "fp32")):
        a, b = open_weights(same), open_weights(other)
        assert a.kind == b.kind and a.names() == b.names()
        assert all(torch.equal(a.tensor(k), b.tensor(k)) for k in a.names())
    assert json.loads((tmp_path / "m_ds_dir" / "merge_info.json").read_text())["source_kind"] == "deepspeed"
    assert json.loads((tmp_path / "m_bin" / "merge_info.json").read_text())["source_kind"] == "state_dict"


def _merge_with_meta(weight: Path, out: Path, export_dir: Path) -> Path:
    meta = json.loads((export_dir / "trainable.json").read_text())
    return merge(
        "--weight",
        weight,
        "--save_path",
        out,
        "--precision",
        "fp32",
        "--version",
        meta["version"],
        "--vision_pretrained",
        meta["vision_pretrained"],
    )


def _write_variant(tmp_path: Path, export_dir: Path, edit) -> Path:
    state = load_file(export_dir / TRAINABLE_FILE)
    edit(state)
    out = tmp_path / "variant"
    out.mkdir()
    save_file(state, str(out / TRAINABLE_FILE))
    (out / "trainable.json").write_text((export_dir / "trainable.json").read_text())
    return out


def test_missing_trainable_key_is_named(trained, tmp_path):
    key = PREFIX + "seg_projector.0.weight"
    weight = _write_variant(tmp_path, trained[2], lambda s: s.pop(key))
    with pytest.raises(KeyError, match=rf"missing trainable key '{key}'") as err:
        merge("--weight", weight, "--save_path", tmp_path / "out", "--precision", "fp32")
    assert str(weight / TRAINABLE_FILE) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unexpected_and_frozen_keys_in_export_are_named(trained, tmp_path):
    bogus = PREFIX + "sam.bogus_head.weight"
    weight = _write_variant(tmp_path, trained[2], lambda s: s.update({bogus: torch.zeros(2)}))
    with pytest.raises(KeyError, match=rf"unexpected key '{bogus}'"):
        merge("--weight", weight, "--save_path", tmp_path / "out", "--precision", "fp32")
    # an export holds exactly the trainable set: a frozen parameter in it means other training options
    wrapped = trained[0]
    frozen = PREFIX + "sam.image_encoder.patch_embed.proj.weight"
    source = WeightSource(Path("w.safetensors"), "export")
    source.getters = {n: (lambda p=p: p.detach()) for n, p in wrapped.named_parameters() if p.requires_grad}
    source.getters[frozen] = lambda: torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected key .*patch_embed.*a frozen parameter"):
        list(select_trainable(source, wrapped))
    # a full state dict may hold frozen names (values unused), but only the base's names
    source.kind = "state_dict"
    assert len(list(select_trainable(source, wrapped))) == len(source.getters) - 1


def test_non_finite_trained_tensor_is_named(trained, tmp_path):
    key = PREFIX + "sam.mask_decoder.iou_token.weight"
    weight = _write_variant(tmp_path, trained[2], lambda s: s[key].view(-1)[0].fill_(float("nan")))
    with pytest.raises(ValueError, match=rf"key '{key}' holds NaN or infinite values"):
        merge("--weight", weight, "--save_path", tmp_path / "out", "--precision", "fp32")


def test_other_lora_rank_fails_with_shape_named(trained, tmp_path):
    with pytest.raises(
        ValueError, match=r"key '.*lora_A.*' has shape \(8, 64\), the rebuilt model expects \(4, 64\)"
    ):
        merge("--weight", trained[2], "--save_path", tmp_path / "out", "--precision", "fp32", "--lora_r", "4")


def test_weight_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weight not found"):
        open_weights(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no trainable\.safetensors, no DeepSpeed checkpoint"):
        open_weights(tmp_path)
    (tmp_path / "latest").write_text("gone")
    with pytest.raises(FileNotFoundError, match="names tag 'gone'"):
        open_weights(tmp_path)
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"x.bin: cannot read as a PyTorch state dict"):
        open_weights(bad)


def test_pickle_payloads_are_refused_in_every_weight_form(trained, tiny_base, tmp_path, single_process_group):
    """A payload in a DeepSpeed checkpoint (merge --weight, --resume / auto-resume), a SAM .pth, a state-dict
    .bin (merge, converter): refused with the file named, and the payload never runs."""
    deepspeed = single_process_group
    marker = tmp_path / "PWNED"
    wrapped = trained[0]
    engine = _zero2_engine(deepspeed, wrapped)
    ckpt = tmp_path / "run" / "ckpt_model"
    save_checkpoint(engine, ckpt, "last", {"global_step": 3})
    optim = next((ckpt / "last").glob("*optim_states.pt"))
    clean = shutil.copy(optim, tmp_path / "clean.pt")  # read memory-mapped: rewrite another file than it
    state = verify_torch_file(clean, deepspeed_records())  # passes the gate: a clean checkpoint
    state["payload"] = _Payload(marker)
    torch.save(state, optim)
    with pytest.raises(
        UnsafeCheckpointError, match=rf"{optim.name}: refused to load: it asks for posix\.system"
    ):
        open_weights(ckpt)  # merge --weight <ckpt_model>
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(engine, ckpt, "last")  # --resume and auto-resume both end here
    args = RunOptions(resume="", auto_resume=True)
    assert resume_source(args, ckpt) == (ckpt, "last")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(engine, *resume_source(args, ckpt))
    evil_sam = tmp_path / "sam.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "x": _Payload(marker)}, evil_sam)
    with pytest.raises(ValueError, match=r"sam\.pth: cannot read SAM checkpoint: refused to load") as err:
        build_lfllm(tiny_base["llava"], evil_sam)
    assert "weights_only" not in str(err.value), "never torch's advice to load the payload"
    evil_bin = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, evil_bin)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: cannot read as a PyTorch state dict"):
        open_weights(evil_bin)  # merge --weight x.bin, and the converter's inputs
    assert not marker.exists()
