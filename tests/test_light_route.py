"""The light mask head as a route (``--mask_head light``, MLLMSeg's design): no SAM anywhere, the detail
pass at a finer grid, every path (train_ds.py, the feature cache, the merge, --eval_only, chat), and it
learns (overfits a few scenes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import app
import chat
from model.build import OptionMismatchError, build_lfllm, load_tokenizer
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMForCausalLM, seg_predictor_positions
from model.light_decoder import LIGHT_FILE, read_light_decoder, save_light_decoder
from model.losses import mask_losses
from model.options import ModelOptions
from tests.conftest import TINY_DS, model_batch
from tests.test_chat import _scene
from tests.test_merge import make_trained_export, merge
from tests.test_train import _args, run_train
from training.config import parse_config
from training.serve.demo import Demo, load_examples
from training.serve.predict import Segmenter, parse_serve

ROOT = Path(__file__).resolve().parents[1]

LIGHT = ModelOptions(mask_head="light", light_detail_size=224)


def test_light_model_has_no_sam_and_its_masks_cover_the_image(tiny_base, tiny_dataset):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], None, LIGHT)
    assert model.sam is None and model.seg_projector is None and model.light_decoder is not None
    cfg = model.light_decoder.cfg
    assert (cfg.grid, cfg.semantic_grid) == (16, 4)  # 224 / 14 detail, 56 / 14 for the LLM
    batch = model_batch(model, tok, tiny_dataset, n=2)
    assert not any(k.startswith("sam_") for k in batch)
    assert batch["clip_center"].shape[-1] == 224
    out = model.forward_lf(batch)
    for masks, gt in zip(out["pred_masks"], batch["gt_masks"], strict=True):
        assert masks.shape == gt.shape
    out["loss"].backward()
    assert model.light_decoder.head[0].weight.grad.abs().sum() > 0


def test_every_light_parameter_is_initialised(tiny_base):
    """transformers initialises the weights a LLaVA checkpoint lacks; a bare Parameter it does not know
    would keep whatever memory it got (the light decoder's positions did)."""
    for seed in range(3):
        torch.manual_seed(seed)
        model, _ = build_lfllm(tiny_base["llava"], None, LIGHT)
        for name, p in model.light_decoder.named_parameters():
            assert torch.isfinite(p).all() and p.abs().max() < 10, name
        assert 0.005 < model.light_decoder.pos.std() < 0.05


@pytest.fixture(scope="module")
def light_merged(tiny_base, tmp_path_factory):
    """(the trained light model before the merge, its merged fp32 folder)."""
    wrapped, _, export = make_trained_export(tiny_base, tmp_path_factory.mktemp("export"), options=LIGHT)
    out = merge("--weight", export, "--save_path", tmp_path_factory.mktemp("merged"), "--precision", "fp32")
    return wrapped, out


def test_merged_light_model_loads_alone_and_gives_the_same_masks(light_merged, tiny_dataset):
    wrapped, out = light_merged
    config = json.loads((out / "config.json").read_text())
    assert config["mask_head"] == "light" and config["sam_config"] is None
    names = load_file(next(out.glob("*.safetensors"))).keys()
    assert not any(n.startswith(("sam.", "seg_projector.")) for n in names)
    assert any(n.startswith("light_decoder.") for n in names)
    merged = LFLLMForCausalLM.from_pretrained(out)
    batch = model_batch(merged, load_tokenizer(out), tiny_dataset, split="val", n=2, train=False)
    for got, want in zip(
        teacher_forced_masks(merged, batch), teacher_forced_masks(wrapped, batch), strict=True
    ):
        # logits of magnitude ~30: merging LoRA into the weights reorders float sums (~1e-5 of the scale)
        error, scale = (got - want).abs().max(), want.abs().max()
        assert error <= 1e-4 * scale, (error, scale)
        sure = want.abs() > 1e-3 * scale
        assert torch.equal((got > 0)[sure], (want > 0)[sure])


def test_sam_flags_are_refused_for_a_light_model():
    base = ["--version", "v", "--dataset_dir", "d", "--mask_head", "light"]
    for extra, flag in (
        (["--vision_pretrained", "sam.pth"], "--vision_pretrained"),
        (["--no_train_mask_decoder"], "--train_mask_decoder"),
        (["--semantic_fusion"], "--semantic_fusion"),
        (["--depth_stream"], "--depth_stream"),
        (["--caam_target", "sam"], "--caam_target sam"),
    ):
        with pytest.raises((ValueError, SystemExit)) as err:
            parse_config([*base, *extra])
        text = str(err.value) if err.type is ValueError else ""
        assert not text or flag in text, text
    with pytest.raises(ValueError, match="--light_detail_size is an option of the light head"):
        ModelOptions(light_detail_size=112)
    assert parse_config(base).sam_checkpoint is None  # the default SAM path is not read
    assert parse_config(base[:4]).sam_checkpoint == "./tiny_base/sam_tiny.pth"


def test_light_route_trains_on_two_ranks_with_the_cache_merges_and_evaluates(
    tiny_base, tiny_dataset, tmp_path, capsys
):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    light = ["--mask_head", "light", "--light_detail_size", "112", "--feature_cache", str(cache)]
    args = [a for a in _args(tiny_base, tiny_dataset, runs, "light", *light, "--epochs", "1",
                             "--steps_per_epoch", "2") if a != str(tiny_base["sam"])]  # fmt: skip
    args.remove("--vision_pretrained")
    run_train(args, ranks=2)
    run = runs / "light"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"], summary
    assert (run / "eval.json").is_file()
    entries = list(cache.rglob("*.safetensors"))
    assert (
        entries
        and "vision_features" in load_file(entries[0])
        and "sam_embeddings" not in load_file(entries[0])
    )
    merged = merge("--weight", run / "export" / "last", "--save_path", tmp_path / "m", "--precision", "fp32")
    # the decoder alone, exported beside the trainable weights, is the merged model's decoder
    decoder_file = run / "export" / "last" / LIGHT_FILE
    tensors, shapes, record = read_light_decoder(decoder_file)
    assert shapes["grid"] == 8 and record["global_step"] == 2
    merged_decoder = LFLLMForCausalLM.from_pretrained(merged).light_decoder.state_dict()
    assert tensors.keys() == merged_decoder.keys()
    assert all(torch.equal(tensors[k], merged_decoder[k]) for k in tensors)
    for protocol in ("teacher_forced", "generated"):
        out = run_train([
            "--eval_only", "--version", str(merged), "--dataset_dir", str(tiny_dataset),
            "--val_dataset", f"{TINY_DS}|syn|val", "--log_base_dir", str(runs), "--exp_name", protocol,
            "--precision", "fp32", "--workers", "0", "--eval_protocol", protocol, "--max_new_tokens", "4",
        ])  # fmt: skip
        assert "gIoU" in out and (runs / protocol / "eval.json").is_file()
    argv = [
        "--version",
        merged,
        "--lf_dir",
        _scene(tiny_dataset),
        "--prompt",
        "the closest vehicle",
        "--out",
        tmp_path / "chat",
    ]
    assert chat.main([str(a) for a in argv] + ["--max_new_tokens", "4"]) == 0
    assert list((tmp_path / "chat").glob("*_overlay.png"))


def test_the_light_head_overfits_a_few_scenes(tiny_base, tmp_path):
    """A square scene (the centre crop is the whole image): the light head alone reaches IoU > 0.9 on every
    mask of a scene, so its geometry (detail grid -> sub-pixel head -> the image) is right."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path / "square"
    write_dataset(root, SyntheticConfig(height=64, width=64, num_train=2, num_val=1, seed=5))
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], None, ModelOptions(mask_head="light", light_detail_size=224,
                                                                    light_dim=64))  # fmt: skip
    batch = model_batch(model, tok, root, n=1, train=False)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.light_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    with torch.no_grad():  # the frozen front end and LM once; only the head trains
        image_tokens, depth_tokens, detail = model.encode_frozen(batch)
        embeds = model.build_inputs_embeds(
            batch["input_ids"], batch["conv_image"], image_tokens, depth_tokens
        )
        hidden = model.language_hidden(embeds, batch["attention_mask"])
    rows, cols = seg_predictor_positions(batch["input_ids"], model.config.seg_token_id)
    gt = batch["gt_masks"]
    for _ in range(200):  # IoU 1.0 on all six masks from about step 150
        masks, _ = model.predict_masks(
            hidden, batch["input_ids"], rows, cols, batch["conv_image"], detail, batch
        )
        bce, dice = mask_losses(masks, gt)
        optimiser.zero_grad()
        (2 * bce + 0.5 * dice).backward()
        optimiser.step()
    with torch.no_grad():
        masks, scores = model.predict_masks(
            hidden, batch["input_ids"], rows, cols, batch["conv_image"], detail, batch
        )
    ious = [
        float(((m > 0) & (g > 0)).sum() / ((m > 0) | (g > 0)).sum())
        for pred, want in zip(masks, gt, strict=True)
        for m, g in zip(pred, want, strict=True)
    ]
    assert len(ious) >= 3 and min(ious) > 0.9, ious
    assert all(((s > 0.5) & (s <= 1)).all() for s in scores)  # mean probability inside a confident mask


def test_the_demo_answers_with_a_light_model(light_merged, tmp_path):
    parser = app.build_parser(str(light_merged[1]), str(ROOT / "examples"))
    args, serve = parse_serve(parser, ["--max_new_tokens", "3"])
    demo = Demo(Segmenter(serve), load_examples(args.examples), tmp_path)
    result = demo.run("Image1", None, "the rider")
    assert result.message == "" and max(result.overlay.shape[:2]) >= 512
    assert result.score.startswith("score ") == (result.scores is not None)


def test_a_sam_checkpoint_given_with_a_merged_light_model_is_refused(light_merged, tiny_base):
    with pytest.raises(OptionMismatchError, match=r"has the light mask head .* which has no SAM"):
        build_lfllm(light_merged[1], tiny_base["sam"], given={"vision_pretrained"})
    with pytest.raises(
        ValueError, match="--light_detail_size 100: expected a multiple of the vision tower's"
    ):
        build_lfllm(tiny_base["llava"], None, ModelOptions(mask_head="light", light_detail_size=100))


def test_a_light_decoder_file_starts_another_model_and_bad_ones_are_refused(
    tiny_base, light_merged, tmp_path, capsys
):
    torch.manual_seed(0)
    model, _ = build_lfllm(tiny_base["llava"], None, LIGHT)
    with torch.no_grad():
        for p in model.light_decoder.parameters():
            p.add_(0.5)  # away from any fresh init
    good = save_light_decoder(
        model.light_decoder.state_dict(), model.light_decoder.cfg, tmp_path / "d.safetensors", {"note": "x"}
    )
    torch.manual_seed(1)
    started, _ = build_lfllm(tiny_base["llava"], None, LIGHT, light_pretrained=good)
    want, got = model.light_decoder.state_dict(), started.light_decoder.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert read_light_decoder(good)[2] == {"note": "x"}
    half = save_light_decoder(
        model.light_decoder.state_dict(),
        model.light_decoder.cfg,
        tmp_path / "h.safetensors",
        dtype=torch.float16,
    )
    assert half.stat().st_size < 0.55 * good.stat().st_size  # the shipped form: half the bytes
    from_half, _ = build_lfllm(tiny_base["llava"], None, LIGHT, light_pretrained=half)
    got = from_half.light_decoder.state_dict()
    assert all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k].half().to(want[k].dtype)) for k in want
    )
    assert any(not torch.equal(got[k], want[k]) for k in want)  # really rounded, not a float32 copy
    with pytest.raises(ValueError, match=r"float32, float16 or bfloat16, not torch\.int8"):
        save_light_decoder(want, model.light_decoder.cfg, tmp_path / "i.safetensors", dtype=torch.int8)
    narrow = ModelOptions(mask_head="light", light_detail_size=224, light_dim=64)
    with pytest.raises(ValueError, match=r"--light_pretrained .*dim 256 in the file, 64 here.*--light_dim"):
        build_lfllm(tiny_base["llava"], None, narrow, light_pretrained=good)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "torn.safetensors").write_bytes(good.read_bytes()[:100])
    bad = {k: v.clone() for k, v in want.items()}
    bad["pos"][0, 0, 0] = float("nan")
    save_light_decoder(bad, model.light_decoder.cfg, tmp_path / "nan.safetensors")
    fewer = {k: v for k, v in want.items() if k != "pos"}
    save_light_decoder(fewer, model.light_decoder.cfg, tmp_path / "fewer.safetensors")
    for name, error, message in (
        ("absent.safetensors", FileNotFoundError, "no such file"),
        ("plain.safetensors", ValueError, "not a light-decoder file"),
        ("torn.safetensors", ValueError, "not a readable .safetensors file"),
        ("nan.safetensors", ValueError, "pos holds NaN"),
        ("fewer.safetensors", ValueError, r"missing tensors \['pos'\]"),
    ):
        with pytest.raises(error, match=message) as err:
            build_lfllm(tiny_base["llava"], None, LIGHT, light_pretrained=tmp_path / name)
        assert f"--light_pretrained {tmp_path / name}" in str(err.value)
    with pytest.raises(OptionMismatchError, match="holds its own light decoder"):
        build_lfllm(light_merged[1], light_pretrained=good)
    sam_route = ["--version", "v", "--dataset_dir", "d", "--light_pretrained", str(good)]
    with pytest.raises(SystemExit):
        parse_config(sam_route)
    said = capsys.readouterr().err
    assert "--light_pretrained" in said and "the SAM route (--mask_head sam) has no light decoder" in said
    assert parse_config([*sam_route, "--mask_head", "light"]).light_checkpoint == str(good)
