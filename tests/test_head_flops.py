"""The mask-head compute comparison (``training/experiments/head_flops.py``): counts on the meta device
against hand-computed values, their scaling with images and masks, parameter counts against the real
modules, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from model.depth import DepthStream
from model.light_decoder import LightDecoderConfig, LightMaskDecoder, SemanticFusion, parameter_count
from model.sam import build_sam, sam_config
from training.experiments.head_flops import count_flops, head_model, main, route_flops, sam_route

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def light_forward_flops(b: int, e: int, cfg: LightDecoderConfig) -> int:
    """The light decoder's forward FLOPs by hand (2 per multiply-add of its linear layers, convolutions and
    attention) for ``b`` images, ``e`` expressions each, one conversation and one ``[SEG]`` per expression."""
    m, c, r = b * e, cfg.dim, cfg.upscale
    p, ps, o = cfg.grid**2, cfg.llm_grid**2, max(cfg.dim // (r * r), 16)
    inputs = 2 * b * p * cfg.vision_dim * c + 2 * m * ps * cfg.llm_dim * c + 2 * m * cfg.llm_dim * c
    # P queries over P keys: q/k/v/out projections 8MPC², MLP (C -> 2C -> C) 8MPC², scores + mixing 4MP²C
    detail_enhance = mix = 16 * m * p * c * c + 4 * m * p * p * c
    query_update = 12 * m * c * c + 4 * m * p * c * c + 4 * m * p * c  # one query over P keys
    modulate = 4 * m * c * c
    head = 2 * m * p * c * o * r * r + 2 * m * p * r * r * o * o * 9  # 1x1 conv, then 3x3 on the fine grid
    query_out = 2 * m * c * c + 2 * m * c * o
    logits = 2 * m * p * r * r * o
    return inputs + detail_enhance + query_update + modulate + mix + head + query_out + logits


def test_light_decoder_forward_matches_the_hand_count():
    cfg = LightDecoderConfig(vision_dim=12, llm_dim=20, grid=4, semantic_grid=2, dim=16, heads=2, upscale=2)
    b, e = 2, 3
    with torch.device("meta"):
        decoder = LightMaskDecoder(cfg)
        conv = torch.arange(b * e)
        inputs = (torch.empty(b, 16, 12), torch.empty(b * e, 4, 20), torch.empty(b * e, 20), conv, conv // e)
    fwd, bwd, note = count_flops(lambda: decoder(*inputs), backward=True)
    assert fwd == light_forward_flops(b, e, cfg)
    assert note is None and fwd < bwd <= 2 * fwd  # backward counted on meta (no input grads needed here)
    # one part on its own: the detail projection, 2·B·P·Dv·C
    fwd, _, _ = count_flops(lambda: decoder.detail_in(inputs[0]), backward=False)
    assert fwd == 2 * b * 16 * 12 * 16


@pytest.fixture(scope="module")
def tiny_base() -> dict:
    """Both routes at the tiny base's shapes (computed once: each count takes a second or two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return route_flops("tiny-base", images=2, expressions=2, light_dim=32)
    finally:
        torch.set_num_threads(threads)


def test_light_route_counts_the_decoder_of_the_model_config(tiny_base):
    (part,) = tiny_base["routes"]["light"][
        "parts"
    ]  # the detail features are the LLM's own pass: no extra part
    cfg = LightDecoderConfig(**tiny_base["shapes"]["light_decoder"])
    assert (cfg.vision_dim, cfg.llm_dim, cfg.grid, cfg.semantic_grid, cfg.dim) == (64, 128, 8, 8, 32)
    assert part["fwd_flops"] == light_forward_flops(2, 2, cfg)
    assert part["trained"] and part["bwd_flops"] > part["fwd_flops"]
    assert part["params"] == part["trained_params"] == parameter_count(cfg)


def test_sam_encoder_scales_with_images_and_decoder_with_masks():
    model = head_model("tiny-base", "sam", fusion=True, depth_stream=True)

    def parts(images: int, expressions: int) -> dict[str, dict]:
        with torch.device("meta"):
            return {p["name"]: p for p in sam_route(model, images, expressions)}

    one, four, three = parts(1, 1), parts(2, 2), parts(1, 3)  # 1, 4 and 3 masks
    enc = "SAM image encoder"
    assert four[enc]["fwd_flops"] == 2 * one[enc]["fwd_flops"] > 0
    assert three[enc]["fwd_flops"] == one[enc]["fwd_flops"]  # expressions do not re-run the encoder
    assert one[enc]["bwd_flops"] == 0 and not one[enc]["trained"]  # frozen: forward only
    assert four["depth stream"]["fwd_bwd_flops"] == 2 * one["depth stream"]["fwd_bwd_flops"] > 0
    for name in ("[SEG] projector", "semantic fusion"):
        assert four[name]["fwd_bwd_flops"] == 4 * one[name]["fwd_bwd_flops"] > 0, name
        assert three[name]["fwd_bwd_flops"] == 3 * one[name]["fwd_bwd_flops"], name
    # the mask decoder runs per mask, SAM's dense positional encoding once per step: an affine count
    dec = "SAM prompt enc. + mask decoder"
    per_mask = four[dec]["fwd_bwd_flops"] - three[dec]["fwd_bwd_flops"]
    assert three[dec]["fwd_bwd_flops"] - one[dec]["fwd_bwd_flops"] == 2 * per_mask > 0
    assert 0 <= one[dec]["fwd_bwd_flops"] - per_mask < per_mask / 100


def test_parameter_counts_are_those_of_the_real_modules(tiny_base):
    sam = {p["name"]: p for p in tiny_base["routes"]["sam"]["parts"]}
    with torch.device("meta"):
        real = build_sam(sam_config("tiny160"))
        fusion, depth = (
            SemanticFusion(128, 32),
            DepthStream(32, 32 // 8),
        )  # the default route: with its detail branch

    def numel(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    assert sam["SAM image encoder"]["params"] == numel(real.image_encoder)
    assert sam["SAM image encoder"]["trained_params"] == 0
    dec = sam["SAM prompt enc. + mask decoder"]
    assert dec["params"] == numel(real.prompt_encoder, real.mask_decoder)
    assert dec["trained_params"] == numel(real.mask_decoder)  # the prompt encoder stays frozen
    assert sam["[SEG] projector"]["params"] == 128 * 128 + 128 + 128 * 32 + 32
    assert sam["semantic fusion"]["params"] == numel(fusion)
    assert sam["depth stream"]["params"] == numel(depth)
    total = tiny_base["routes"]["sam"]["total"]
    assert total["params"] == numel(real, fusion, depth) + sam["[SEG] projector"]["params"]
    assert total["trained_params"] == total["params"] - numel(real.image_encoder, real.prompt_encoder)
    light = tiny_base["routes"]["light"]["total"]
    assert light["params"] == light["trained_params"] == tiny_base["routes"]["light"]["parts"][0]["params"]


def test_cli_writes_both_routes(tmp_path, capsys):
    path = tmp_path / "flops.json"
    argv = ["--preset", "tiny-base", "--images", "1", "--expressions", "2", "--light_dim", "32"]
    assert main([*argv, "--detail_size", "224", "--no_depth_stream", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SAM route / light route" in out and "light mask decoder" in out
    result = json.loads(path.read_text())
    assert set(result["routes"]) == {"sam", "light"}
    assert result["masks"] == 2 and result["shapes"]["light_decoder"]["grid"] == 16  # 224 px / 14
    sam_names = [p["name"] for p in result["routes"]["sam"]["parts"]]
    assert "depth stream" not in sam_names and "semantic fusion" in sam_names
    clip, decoder = result["routes"]["light"]["parts"]  # the detail pass at 224 px is an extra CLIP pass
    assert clip["shared"] and not clip["trained"] and clip["fwd_flops"] > 0
    light = result["routes"]["light"]["total"]
    assert light["params"] == decoder["params"]  # the shared tower is not the head's
    assert light["step_flops"] == clip["fwd_flops"] + decoder["fwd_bwd_flops"]
    ratio = result["ratio_sam_over_light"]["step_flops"]
    assert ratio == pytest.approx(result["routes"]["sam"]["total"]["step_flops"] / light["step_flops"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "0"], "--images 0: must be >= 1"),
        (["--expressions", "-1"], "--expressions -1: must be >= 1"),
        (["--light_dim", "12"], "--light_dim 12: must be a multiple of 8"),
        (["--preset", "tiny-base", "--detail_size", "100"], "--detail_size 100: expected a multiple"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
