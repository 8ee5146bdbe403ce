"""The compute of the two mask heads at a preset's shapes, counted on the ``meta`` device: no GPU, no memory
(``scripts/head_flops.py``).

The language model is the same in both routes, so only the head side of a training step is counted:

* **sam** (``--mask_head sam``): SAM's image encoder on each image (frozen: forward only), then per mask the
  ``[SEG]`` projector, SAM's prompt encoder (its dense positional encoding, frozen) and mask decoder
  (trained), and optionally the semantic fusion and the depth stream (trained);
* **light** (``--mask_head light``): the light mask decoder per mask (trained). Its detail features come from
  the CLIP pass the LLM already makes, unless the detail pass runs at a larger size: that extra (frozen)
  tower pass is then counted too.

The modules are the model's own: :class:`model.lfllm.LFLLMForCausalLM` built on the meta device from the
preset's config, its trainable set as :func:`model.trainable.make_trainable` makes it (LoRA aside). Every part
is called as :meth:`LFLLMForCausalLM.predict_masks` / :meth:`~LFLLMForCausalLM.decode_masks_scored` call it,
at their shapes, and counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of
matmuls, convolutions and attention; norms, activations, interpolation and the losses count 0). A trained
part's backward is counted by ``out.sum().backward()`` on meta; the LLM-side inputs of a part (the ``[SEG]``
and conversation states) require grad as under LoRA, so its backward includes the gradient it sends back
into the LLM, and the frozen SAM / CLIP features do not.

Shapes: B images, E expressions per image (one conversation each, train_ds.py's default), M = B·E masks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.build import option_fields
from model.lfllm import LFLLMConfig, LFLLMForCausalLM
from model.options import ModelOptions
from model.presets import PRESETS, get_preset, llava_config
from model.sam import sam_config
from model.trainable import ALWAYS_TRAINED
from utils.options import add_option_flags, at_least, option, options_from_args, problems

#: The CLIP input size of a preset's tower when it differs from the preset's vision dict: LLaVA-1.5's tower is
#: CLIP ViT-L/14-336 (``llava-1.5-7b-hf``; ``tests/test_fullsize.py`` builds the same shape).
CLIP_SIZES: dict[str, int] = {"7b": 336, "13b": 336}
#: What the training step trains besides ``ALWAYS_TRAINED`` (``TrainableOptions.train_mask_decoder``).
TRAINED_SAM = "sam.mask_decoder."


def _light_dim(value: int) -> str | None:
    return None if value >= 8 and value % 8 == 0 else "must be a multiple of 8 (its attention heads)"


@dataclass(frozen=True)
class FlopsOptions:
    """What the head comparison counts."""

    preset: str = option("7b", "model size preset (model.presets)", choices=sorted(PRESETS))
    images: int = option(2, "scenes per training step (B)", check=at_least(1))
    expressions: int = option(
        3, "expressions (masks) per scene, one conversation each (E)", check=at_least(1)
    )
    light_dim: int = option(256, "light decoder width (--light_dim)", check=_light_dim)
    detail_size: int = option(
        0, "light head: detail-pass size in px (--light_detail_size); 0: the tower's own", check=at_least(0)
    )
    fusion: bool = option(True, "count the SAM route's semantic fusion (--semantic_fusion)")
    depth_stream: bool = option(True, "count the SAM route's depth stream (--depth_stream)")
    json_path: str = option("", "also write the results here", flag="json")

    def __post_init__(self) -> None:
        lines = problems(self)
        if lines:
            raise ValueError("; ".join(lines))


# --------------------------------------------------------------------------------------------- model
def head_model(
    preset: str,
    mask_head: str,
    light_dim: int = 256,
    detail_size: int = 0,
    fusion: bool = False,
    depth_stream: bool = False,
) -> LFLLMForCausalLM:
    """The whole LFLLM of ``preset`` with ``mask_head`` built on the meta device (no memory), its heads'
    trainable set as the training step's (``requires_grad``) and in training mode. Raises ``ValueError``
    naming ``--detail_size`` when it is not a multiple of the tower's size."""
    p = get_preset(preset)
    size = CLIP_SIZES.get(preset, int(p.vision["image_size"]))
    if detail_size and detail_size % size:
        raise ValueError(
            f"--detail_size {detail_size}: expected a multiple of the vision tower's input size {size}"
        )
    p = dataclasses.replace(p, vision={**p.vision, "image_size": size})
    light = mask_head == "light"
    opts = ModelOptions(
        use_caam=False,  # CAAM works on pixels before either head: the same in both routes
        mask_head=mask_head,
        light_dim=light_dim,
        light_detail_size=detail_size if light else 0,
        semantic_fusion=fusion and not light,
        depth_stream=depth_stream and not light,
        depth_detail=depth_stream and not light,  # the default route's stream has its detail branch
    )
    sam_cfg = None if light else sam_config(p.sam_variant)
    ids = {name: p.vocab_size + k for k, name in enumerate(("image", "seg", "depth"))}
    base = llava_config(p, p.vocab_size + 3, ids["image"], 0).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    cfg = LFLLMConfig(
        **base, **option_fields(opts, sam_cfg), sam_config=sam_cfg, seg_token_id=ids["seg"],
        depth_token_id=ids["depth"],
    )  # fmt: skip
    with torch.device("meta"):
        model = LFLLMForCausalLM(cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith((*ALWAYS_TRAINED, TRAINED_SAM)))
    return model.train()


# ------------------------------------------------------------------------------------------ counting
def count_flops(fn: Callable[[], Any], backward: bool) -> tuple[int, int, str | None]:
    """(forward FLOPs, backward FLOPs, note) of ``fn()`` (a tensor or a list of them); the backward of the
    outputs' sum when ``backward``. A backward that fails on meta is taken as 2x the forward (the note)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    fwd = int(counter.get_total_flops())
    if not backward:
        return fwd, 0, None
    outs = out if isinstance(out, list | tuple) else [out]
    try:
        with FlopCounterMode(display=False) as counter:
            torch.stack([o.float().sum() for o in outs]).sum().backward()
    except (RuntimeError, NotImplementedError) as exc:
        return fwd, 2 * fwd, f"backward not countable on meta ({type(exc).__name__}): taken as 2x forward"
    return fwd, int(counter.get_total_flops()), None


def _params(*modules: nn.Module | None) -> tuple[int, int]:
    """(all, trained) parameters of ``modules``."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _part(
    name: str,
    modules: Sequence[nn.Module | None],
    fn: Callable[[], Any],
    trained: bool,
    per: str,
    shared: bool = False,
) -> dict[str, Any]:
    """One row: the part's parameters and its FLOPs (forward; + backward when ``trained``). ``shared``: its
    parameters are another part's (not added to the route's totals)."""
    total, trained_params = _params(*modules)
    fwd, bwd, note = count_flops(fn, backward=trained)
    return dict(
        name=name, trained=trained, per=per, shared=shared, params=total, trained_params=trained_params,
        fwd_flops=fwd, bwd_flops=bwd, fwd_bwd_flops=fwd + bwd, note=note,
    )  # fmt: skip


def _leaf(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", requires_grad=grad)


def sam_route(model: LFLLMForCausalLM, images: int, expressions: int) -> list[dict[str, Any]]:
    """The SAM route's parts (see the module docstring), in the order of a step."""
    sam, cfg = model.sam, model.config
    size, dim, llm = sam.image_encoder.img_size, cfg.out_dim, cfg.text_config.hidden_size
    g = int(sam.prompt_encoder.image_embedding_size[0])
    b, e = images, expressions
    tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 * (2 if cfg.use_depth else 1)
    embedding = _leaf(b, dim, g, g)  # (B, C, g, g) frozen encoder output: no grad
    fusion, depth = model.semantic_fusion, model.depth_stream
    with torch.no_grad():  # the decoder part counts it: decode_masks_scored computes it once per step
        pe = sam.prompt_encoder.get_dense_pe()

    def encoder() -> torch.Tensor:  # (B, 3, T, T) -> (B, C, g, g)
        with torch.no_grad():
            return sam.image_encoder(_leaf(b, 3, size, size))

    def fused() -> list[torch.Tensor]:  # per image: E dense prompts (E, C, g, g) from (E, T, Dl) states
        queries = [_leaf(1, dim, g, g, grad=depth is not None).expand(e, -1, -1, -1) for _ in range(b)]
        return [fusion(q, pe, _leaf(e, tokens, llm, grad=True)) for q in queries]

    def decoder() -> list[torch.Tensor]:  # per image: E masks (E, 1, 4g, 4g) from (E, 1, C) sparse prompts
        pe = sam.prompt_encoder.get_dense_pe()  # (1, C, g, g), frozen
        no_mask = sam.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)
        extra = fusion is not None or depth is not None  # the dense prompt then carries a trained term
        masks = []
        for i in range(b):
            dense = no_mask.expand(e, -1, g, g) + (_leaf(e, dim, g, g, grad=True) if extra else 0)
            sparse = _leaf(e, 1, dim, grad=True)  # the projected [SEG] states
            low_res, _ = sam.mask_decoder(
                image_embeddings=embedding[i : i + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=False,
            )  # fmt: skip
            masks.append(low_res)
        return masks

    projector = model.seg_projector  # (M, Dl) [SEG] states -> (M, C)
    parts = [
        _part("SAM image encoder", [sam.image_encoder], encoder, trained=False, per="image"),
        _part("[SEG] projector", [projector], lambda: projector(_leaf(b * e, llm, grad=True)), True, "mask"),
    ]
    if (
        depth is not None
    ):  # (B, 2, 4g, 4g) depth grid -> (B, C, g, g), and (B, C/8, 4g, 4g) with --depth_detail

        def streamed() -> list[torch.Tensor]:
            grid = _leaf(b, 2, 4 * g, 4 * g)
            detail = depth.detail(grid)
            return [depth(grid)] + ([] if detail is None else [detail])

        parts.append(_part("depth stream", [depth], streamed, True, "image"))  # with its detail branch
    if fusion is not None:
        parts.append(_part("semantic fusion", [fusion], fused, trained=True, per="mask"))
    modules = [sam.prompt_encoder, sam.mask_decoder]
    parts.append(_part("SAM prompt enc. + mask decoder", modules, decoder, trained=True, per="mask"))
    return parts


def light_route(model: LFLLMForCausalLM, images: int, expressions: int) -> list[dict[str, Any]]:
    """The light route's parts: the extra CLIP detail pass (when the detail size is not the tower's own)
    and the light mask decoder."""
    cfg, dec = model.config, model.light_decoder.cfg
    b, m = images, images * expressions
    size, tower = model.detail_size, model.model.vision_tower
    parts = []
    if size != cfg.vision_config.image_size:

        def detail() -> torch.Tensor:  # (B, 3, S, S) -> (B, P, Dv), positions interpolated
            with torch.no_grad():
                return model._vision_features(_leaf(b, 3, size, size))

        try:
            parts.append(
                _part(f"CLIP detail pass at {size} px", [tower], detail, False, "image", shared=True)
            )
        except (RuntimeError, NotImplementedError) as exc:
            parts.append(
                dict(name=f"CLIP detail pass at {size} px", trained=False, per="image", shared=True, params=0,
                     trained_params=0, fwd_flops=0, bwd_flops=0, fwd_bwd_flops=0,
                     note=f"not countable on meta ({type(exc).__name__}: {exc}); not included")
            )  # fmt: skip

    def decoder() -> torch.Tensor:  # -> (M, g·r, g·r) logits
        conv = torch.arange(m, device="meta")  # one [SEG] per conversation
        return model.light_decoder(
            _leaf(b, dec.grid**2, dec.vision_dim),  # detail features: the frozen tower's, no grad
            _leaf(m, dec.llm_grid**2, dec.llm_dim, grad=True),  # image-token states of each conversation
            _leaf(m, dec.llm_dim, grad=True),  # [SEG] states
            conv,
            conv // expressions,
        )

    parts.append(_part("light mask decoder", [model.light_decoder], decoder, trained=True, per="mask"))
    return parts


def _totals(parts: list[dict[str, Any]]) -> dict[str, int]:
    own = [p for p in parts if not p["shared"]]
    return dict(
        params=sum(p["params"] for p in own),
        trained_params=sum(p["trained_params"] for p in own),
        fwd_flops=sum(p["fwd_flops"] for p in parts),
        step_flops=sum(p["fwd_bwd_flops"] for p in parts),
    )


def route_flops(
    preset: str = "7b",
    images: int = 2,
    expressions: int = 3,
    light_dim: int = 256,
    detail_size: int = 0,
    fusion: bool = True,
    depth_stream: bool = True,
) -> dict[str, Any]:
    """Parameters and FLOPs of both mask routes for one training step of ``images`` x ``expressions`` masks.

    Returns ``{"preset", "images", "expressions", "masks", "shapes", "routes": {"sam": ..., "light": ...},
    "ratio_sam_over_light", "notes"}``; each route is ``{"parts": [...], "total": {...}}``. A part holds
    ``name``, ``trained``, ``per`` (what it scales with: ``image`` or ``mask``), ``shared`` (its parameters
    are the LLM's tower), ``params`` / ``trained_params``, ``fwd_flops``, ``bwd_flops`` (0 when frozen),
    ``fwd_bwd_flops`` (what a step pays) and ``note``. A total holds ``params``, ``trained_params`` (shared
    parameters excluded), ``fwd_flops`` and ``step_flops`` (frozen forward + trained forward and backward).
    """
    if images < 1 or expressions < 1:
        raise ValueError(f"images {images} and expressions {expressions}: each must be >= 1")
    sam_model = head_model(preset, "sam", fusion=fusion, depth_stream=depth_stream)
    light_model = head_model(preset, "light", light_dim=light_dim, detail_size=detail_size)
    with torch.device("meta"):
        routes = {
            "sam": {"parts": sam_route(sam_model, images, expressions)},
            "light": {"parts": light_route(light_model, images, expressions)},
        }
    for route in routes.values():
        route["total"] = _totals(route["parts"])
    sam_t, light_t = routes["sam"]["total"], routes["light"]["total"]
    vision, text = sam_model.config.vision_config, sam_model.config.text_config
    sam_cfg = sam_model.config.sam_config
    notes = [
        "counted by FlopCounterMode on the meta device: matmuls, convolutions and attention (2 FLOPs per "
        "multiply-add); norms, activations, interpolation (mask upsampling) and losses count 0",
        "the LLM (the same in both routes) is not counted; its LLM-side inputs require grad (LoRA), so a "
        "trained part's backward includes the gradient it sends back into the LLM states",
        "frozen parts run forward only: their fwd+bwd is their forward",
    ]
    if preset in CLIP_SIZES:
        own = get_preset(preset).vision["image_size"]
        notes.append(f"CLIP at {vision.image_size} px (LLaVA-1.5's ViT-L/14-336), not the preset's {own}")
    if light_model.detail_size == vision.image_size:
        notes.append("light route: detail features from the LLM's own CLIP pass (no extra vision FLOPs)")
    notes += [f"{p['name']}: {p['note']}" for r in routes.values() for p in r["parts"] if p["note"]]
    shapes = dict(
        clip_size=int(vision.image_size), clip_patch=int(vision.patch_size),
        vision_dim=int(vision.hidden_size), llm_dim=int(text.hidden_size),
        sam_variant=sam_cfg["variant"], sam_size=int(sam_cfg["img_size"]),
        sam_grid=int(sam_cfg["img_size"] // sam_cfg["patch_size"]), sam_dim=int(sam_cfg["prompt_embed_dim"]),
        semantic_fusion=fusion, depth_stream=depth_stream, detail_size=light_model.detail_size,
        light_decoder=dataclasses.asdict(light_model.light_decoder.cfg),
    )  # fmt: skip
    return dict(
        preset=preset, images=images, expressions=expressions, masks=images * expressions, shapes=shapes,
        routes=routes,
        ratio_sam_over_light={
            "step_flops": sam_t["step_flops"] / light_t["step_flops"],
            "fwd_flops": sam_t["fwd_flops"] / light_t["fwd_flops"],
            "params": sam_t["params"] / light_t["params"],
            "trained_params": sam_t["trained_params"] / light_t["trained_params"],
        },
        notes=notes,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- report
def _row(*cells: Any) -> str:
    """route, part, per, params M, trained M, GFLOP fwd, GFLOP fwd+bwd: one line of the table."""
    widths = (-6, -32, -6, 9, 10, 11, 14)
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, widths)).rstrip()


def report(result: dict[str, Any]) -> str:
    """The readable table: one row per part, a total per route, the ratio SAM route / light route."""
    s, dec = result["shapes"], result["shapes"]["light_decoder"]
    lines = [
        f"mask-head compute, preset {result['preset']}: {result['images']} images x "
        f"{result['expressions']} expressions = {result['masks']} masks per step",
        f"  CLIP {s['clip_size']} px (patch {s['clip_patch']}, width {s['vision_dim']}), LLM width "
        f"{s['llm_dim']}, SAM {s['sam_variant']} at {s['sam_size']} px ({s['sam_grid']}x{s['sam_grid']} x "
        f"{s['sam_dim']})",
        f"  light decoder: width {dec['dim']}, detail grid {dec['grid']} at {s['detail_size']} px, semantic "
        f"grid {dec['semantic_grid'] or dec['grid']}, upscale {dec['upscale']}",
        "",
        _row("route", "part", "per", "params M", "trained M", "GFLOP fwd", "GFLOP fwd+bwd"),
    ]

    def num(value: float, scale: float) -> str:
        return f"{value / scale:.2f}"

    for name, route in result["routes"].items():
        for p in route["parts"]:
            params = f"({num(p['params'], 1e6)})" if p["shared"] else num(p["params"], 1e6)
            lines.append(
                _row(name, p["name"], p["per"], params, num(p["trained_params"], 1e6),
                     num(p["fwd_flops"], 1e9), num(p["fwd_bwd_flops"], 1e9))
            )  # fmt: skip
        t = route["total"]
        lines.append(
            _row(name, "total per step", "", num(t["params"], 1e6), num(t["trained_params"], 1e6),
                 num(t["fwd_flops"], 1e9), num(t["step_flops"], 1e9))
        )  # fmt: skip
    r = {k: f"{v:.1f}" if v >= 1 else f"{v:.2g}" for k, v in result["ratio_sam_over_light"].items()}
    lines += [
        "",
        f"SAM route / light route: {r['step_flops']}x the FLOPs per step (fwd+bwd), {r['fwd_flops']}x "
        f"forward, {r['params']}x the parameters, {r['trained_params']}x the trained ones",
    ]
    if any(p["shared"] for route in result["routes"].values() for p in route["parts"]):
        lines.append("(params in parentheses: the LLM's own CLIP tower, shared, not in the totals)")
    return "\n".join([*lines, *(f"note: {n}" for n in result["notes"])])


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/head_flops.py``: print the table of :func:`route_flops`; ``--json PATH`` also writes it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_flags(p, FlopsOptions)
    args = p.parse_args(argv)
    try:
        opts = options_from_args(FlopsOptions, args)
        result = route_flops(
            opts.preset, opts.images, opts.expressions, opts.light_dim, opts.detail_size, opts.fusion,
            opts.depth_stream,
        )  # fmt: skip
    except ValueError as exc:
        p.error(str(exc).split("; ")[0])
    print(report(result))
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=2))
    return 0
