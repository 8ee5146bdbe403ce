"""SAM from Meta's ``segment_anything``: build by variant, load the official checkpoint format.

Variants ``vit_h`` / ``vit_l`` / ``vit_b`` are segment_anything's own builders (``sam_vit_h_4b8939.pth``
etc.); ``tiny`` is the same classes at toy size for tests and the CPU quickstart. Every variant is
described by a plain dict (``sam_config``) that is stored in the LFLLM config, so a merged model rebuilds
SAM without the original checkpoint file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from utils.safe_load import torch_load_reason

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "tiny": dict(
        embed_dim=64,
        depth=2,
        num_heads=4,
        global_attn_indexes=(1,),
        img_size=256,
        prompt_embed_dim=32,
        window_size=8,
        decoder_depth=2,
        decoder_mlp_dim=128,
        decoder_heads=4,
        iou_head_hidden_dim=32,
    ),
    # The shipped pretrained tiny SAM (scripts/pretrain_tiny_base.py): 160-px input with 8-px patches, i.e.
    # 20x20 tokens and an 80x80 mask grid (docs/RESULTS.md: the best IoU per CPU-second measured).
    "tiny160": dict(
        embed_dim=64,
        depth=4,
        num_heads=4,
        global_attn_indexes=(1, 3),
        img_size=160,
        patch_size=8,
        prompt_embed_dim=32,
        window_size=10,
        decoder_depth=2,
        decoder_mlp_dim=128,
        decoder_heads=4,
        iou_head_hidden_dim=32,
    ),
}
_FULL_SIZE = dict(
    img_size=1024,
    prompt_embed_dim=256,
    window_size=14,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    decoder_heads=8,
    iou_head_hidden_dim=256,
)


def sam_config(variant: str) -> dict[str, Any]:
    """The complete architecture dict of a SAM variant (``vit_h``, ``vit_l``, ``vit_b``, ``tiny``)."""
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}")
    cfg = {"variant": variant, "patch_size": 16, **_FULL_SIZE, **SAM_VARIANTS[variant]}
    cfg["global_attn_indexes"] = list(cfg["global_attn_indexes"])
    return cfg


def build_sam(cfg: dict[str, Any]) -> Sam:
    """Build an (untrained) ``segment_anything.modeling.Sam`` from an architecture dict."""
    emb = cfg["prompt_embed_dim"]
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = ImageEncoderViT(
        depth=cfg["depth"],
        embed_dim=cfg["embed_dim"],
        img_size=cfg["img_size"],
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg["num_heads"],
        patch_size=cfg["patch_size"],
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(cfg["global_attn_indexes"]),
        window_size=cfg["window_size"],
        out_chans=emb,
    )
    prompt = PromptEncoder(
        embed_dim=emb,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg["img_size"], cfg["img_size"]),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=cfg["decoder_depth"],
            embedding_dim=emb,
            mlp_dim=cfg["decoder_mlp_dim"],
            num_heads=cfg["decoder_heads"],
        ),
        transformer_dim=emb,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def reset_sam_buffers(sam: Sam) -> None:
    """Rewrite SAM's non-persistent normalisation buffers (lost when a model is built on the meta device)."""
    device = sam.image_encoder.patch_embed.proj.weight.device
    sam.pixel_mean = torch.tensor(SAM_PIXEL_MEAN, device=device).view(-1, 1, 1)
    sam.pixel_std = torch.tensor(SAM_PIXEL_STD, device=device).view(-1, 1, 1)


def read_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official-format SAM state dict (e.g. ``sam_vit_h_4b8939.pth``) with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SAM checkpoint not found (pass --vision_pretrained)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt/unsafe file
        raise ValueError(f"{path}: cannot read SAM checkpoint: {torch_load_reason(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "image_encoder.patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: not a SAM state dict (no image_encoder.patch_embed.proj.weight)")
    return state


def infer_sam_variant(state: dict[str, torch.Tensor]) -> str:
    """The variant whose encoder width and depth match ``state``."""
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, spec in SAM_VARIANTS.items():
        if spec["embed_dim"] == width and spec["depth"] == depth:
            return name
    raise ValueError(f"no SAM variant has a {width}-wide, {depth}-deep image encoder")


def load_sam(path: str | Path) -> tuple[Sam, dict[str, Any]]:
    """Build the SAM variant stored in ``path`` and load it strictly. Returns (sam, its config dict)."""
    state = read_sam_state(path)
    try:
        variant = infer_sam_variant(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (variants: {sorted(SAM_VARIANTS)})") from None
    cfg = sam_config(variant)
    sam = build_sam(cfg)
    try:
        missing, unexpected = sam.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise ValueError(
            f"{path}: tensor shapes do not match the {variant} SAM ({len(lines)} mismatched), e.g. "
            f"{lines[0] if lines else exc}"
        ) from None
    if missing or unexpected:
        raise ValueError(f"{path}: SAM keys do not match; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return sam, cfg


def normalise_sam_pixels(x: torch.Tensor, resized_hw: torch.Tensor) -> torch.Tensor:
    """SAM's input from RGB on 0..255: ``(x - pixel_mean) / pixel_std``, then exactly 0 outside each image's
    resized (unpadded) area, as SAM pads after normalising. The one place SAM's input is normalised (the
    model's ``encode_sam``, the SAM pretraining).

    Args:
        x: (B, 3, T, T) float RGB on 0..255, the resized image at the top left.
        resized_hw: (B, 2) int, each image's (h, w) inside T x T.

    Returns:
        (B, 3, T, T) in ``x``'s dtype.
    """
    mean = x.new_tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    hw = resized_hw.to(x.device)
    valid = (ys < hw[:, 0].view(-1, 1, 1)) & (xs < hw[:, 1].view(-1, 1, 1))
    return x * valid.unsqueeze(1)
