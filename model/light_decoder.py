"""A light mask decoder over the MLLM's own features (MLLMSeg's design, adapted to LLaVA): no SAM.

Three inputs, all already computed by the model that emits ``[SEG]``:

* **detail** tokens: the vision tower's patch features before the projector, (B, P, Dv) for B images on a
  g x g grid (P = g²);
* **semantic** tokens: the LLM's last-layer states at the image-token positions of each conversation,
  (N, Ps, Dl) on a gs x gs grid (gs = g, or coarser when the detail pass runs at a higher resolution than the
  LLM's view: they are then upsampled bilinearly to g x g). With the expression before the image
  (``--prompt_order expression_first``) they have already read the expression;
* the ``[SEG]`` state, (M, Dl), one per mask, with the conversation it belongs to.

Fusion, per mask: (1) *detail-enhanced*: the semantic tokens of its conversation attend to the detail tokens
of its image (cross-attention, learned 2D positions on both); (2) *semantic-consistent*: the ``[SEG]`` query
attends to the enhanced tokens, and the tokens are modulated by the updated query; a small self-attention
block mixes them. (3) A sub-pixel head (``PixelShuffle``, as MLLMSeg's) lifts the g x g tokens to a
(g·r) x (g·r) map of per-pixel embeddings; the mask logits are their dot product with an MLP of the query.
The logits are returned as logits: losses take them as such (MLLMSeg's release applies a logits loss to
probabilities; not copied).

Shapes: B images, N conversations, M masks, P = g² tokens, C the decoder width, r the upscale factor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

#: ``format`` metadata of a light-decoder weight file (:func:`save_light_decoder`).
LIGHT_FORMAT = "lfllm-light-decoder"
#: Its name in a training export folder and in a base folder.
LIGHT_FILE = "light_decoder.safetensors"


@dataclass(frozen=True)
class LightDecoderConfig:
    """Widths of the light decoder (``vision_dim`` / ``llm_dim`` come from the model)."""

    vision_dim: int
    llm_dim: int
    grid: int
    semantic_grid: int = 0  # the LLM's token grid when coarser than ``grid``; 0: the same
    dim: int = 256
    heads: int = 8
    upscale: int = 4

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"light decoder width {self.dim} is not a multiple of its {self.heads} heads")
        if self.upscale not in (1, 2, 4, 8):
            raise ValueError(f"light decoder upscale {self.upscale}: expected 1, 2, 4 or 8")
        if self.grid < 1:
            raise ValueError(f"light decoder grid {self.grid}: must be >= 1")
        if self.semantic_grid < 0 or self.semantic_grid > self.grid:
            raise ValueError(
                f"light decoder semantic grid {self.semantic_grid}: expected 0 or 1..{self.grid} (the detail grid)"
            )

    @property
    def llm_grid(self) -> int:
        """The grid of the semantic tokens."""
        return self.semantic_grid or self.grid


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP, residual (queries (X, Q, C) attend to keys (X, K, C))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class LightMaskDecoder(nn.Module):
    """See the module docstring. ``forward`` -> mask logits (M, g·r, g·r) at the token grid's frame (the
    CLIP input's square); :func:`masks_to_image` maps them to an image's size."""

    def __init__(self, cfg: LightDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, r = cfg.dim, cfg.upscale
        self.detail_in = nn.Sequential(nn.LayerNorm(cfg.vision_dim), nn.Linear(cfg.vision_dim, c))
        self.semantic_in = nn.Sequential(nn.LayerNorm(cfg.llm_dim), nn.Linear(cfg.llm_dim, c))
        self.seg_in = nn.Sequential(nn.LayerNorm(cfg.llm_dim), nn.Linear(cfg.llm_dim, c))
        self.pos = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, c) * 0.02)
        self.detail_enhance = _CrossBlock(c, cfg.heads)
        self.query_update = _CrossBlock(c, cfg.heads)
        self.modulate = nn.Linear(c, 2 * c)
        self.mix = nn.TransformerEncoderLayer(
            c, cfg.heads, 2 * c, dropout=0.0, batch_first=True, norm_first=True
        )
        out = max(c // (r * r), 16)
        # 1 x 1 before the shuffle, the 3 x 3 mixing after it (9x cheaper than 3 x 3 on the coarse grid)
        self.head = nn.Sequential(
            nn.Conv2d(c, out * r * r, 1),
            nn.PixelShuffle(r),
            nn.GroupNorm(1, out),
            nn.GELU(),
            nn.Conv2d(out, out, 3, padding=1),
        )
        self.query_out = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, out))

    def forward(
        self,
        detail: torch.Tensor,
        semantic: torch.Tensor,
        seg: torch.Tensor,
        seg_conv: torch.Tensor,
        conv_image: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits for every ``[SEG]``.

        Args:
            detail: (B, P, Dv) vision patch features before the projector.
            semantic: (N, Ps, Dl) LLM last-layer states at the image-token positions (Ps = gs²).
            seg: (M, Dl) ``[SEG]`` states.
            seg_conv: (M,) int64 conversation of each ``[SEG]``.
            conv_image: (N,) int64 image of each conversation.

        Returns:
            (M, g·r, g·r) float32 logits.
        """
        g, gs = self.cfg.grid, self.cfg.llm_grid
        if detail.shape[1] != g * g or semantic.shape[1] != gs * gs:
            raise ValueError(
                f"light decoder: {detail.shape[1]} detail and {semantic.shape[1]} semantic tokens for a "
                f"{g}x{g} detail and {gs}x{gs} semantic grid"
            )
        dtype = self.pos.dtype
        d = self.detail_in(detail.to(dtype)) + self.pos
        s = self.semantic_in(semantic.to(dtype))
        if gs != g:  # (N, gs², C) -> (N, g², C), bilinear on the grid
            s = s.transpose(1, 2).reshape(len(s), -1, gs, gs)
            s = nn.functional.interpolate(s, size=(g, g), mode="bilinear", align_corners=False)
            s = s.flatten(2).transpose(1, 2)
        s = s + self.pos
        q = self.seg_in(seg.to(dtype))[:, None]  # (M, 1, C)
        image_of = conv_image[seg_conv]
        tokens = self.detail_enhance(s[seg_conv], d[image_of])  # (M, P, C): semantic reads detail
        q = self.query_update(q, tokens)  # [SEG] reads the enhanced tokens
        scale, shift = self.modulate(q).chunk(2, dim=-1)
        tokens = self.mix(tokens * (1 + scale) + shift)  # semantic-consistent: tokens follow the query
        grid = tokens.transpose(1, 2).reshape(len(tokens), -1, g, g)
        pixels = self.head(grid)  # (M, out, g·r, g·r)
        weights = self.query_out(q[:, 0])  # (M, out)
        logits = torch.einsum("mchw,mc->mhw", pixels, weights) / math.sqrt(weights.shape[-1])
        return logits.float()


def masks_to_image(
    logits: torch.Tensor, size: int, original_hw: tuple[int, int], resized_hw: tuple[int, int]
) -> torch.Tensor:
    """Logits on the CLIP input square -> logits at the original (H, W).

    The image was resized to ``resized_hw`` (shortest side ``size``, ``dataset.transforms
    .shortest_side_shape``) and centre-cropped to ``size`` x ``size`` (``clip_geometry``): the square is
    upsampled to the crop window, the margins outside the crop take the nearest border value, and the
    result is resized to the original. (M, s', s') -> (M, H, W) float32.
    """
    rh, rw = resized_hw
    top, left = (rh - size) // 2, (rw - size) // 2
    square = nn.functional.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear")
    padded = nn.functional.pad(square, (left, rw - size - left, top, rh - size - top), mode="replicate")
    return nn.functional.interpolate(padded, size=tuple(original_hw), mode="bilinear")[:, 0]


def save_light_decoder(
    state: Mapping[str, torch.Tensor],
    cfg: LightDecoderConfig,
    path: str | Path,
    record: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a light decoder's weights (``LightMaskDecoder.state_dict()`` names) as a safetensors file of
    ``dtype`` (float32, or float16/bfloat16 for a shipped file at half the size; :func:`load_light_decoder`
    casts to the decoder's own dtype) whose metadata holds :data:`LIGHT_FORMAT`, the decoder's shapes (``cfg``)
    and ``record`` (how it was made). Written to a temporary name first, then renamed: an existing file is
    never left half-written."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"a light-decoder file is float32, float16 or bfloat16, not {dtype}")
    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    meta = {"format": LIGHT_FORMAT, "config": json.dumps(asdict(cfg)), "record": json.dumps(record or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_light_decoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, decoder shapes, record) of a file written by :func:`save_light_decoder`. Raises
    ``FileNotFoundError`` / ``ValueError`` naming ``--light_pretrained`` and the file."""
    path = Path(path)
    flag = f"--light_pretrained {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{flag}: not a readable .safetensors file ({exc})") from None
    if meta.get("format") != LIGHT_FORMAT:
        raise ValueError(
            f"{flag}: not a light-decoder file (its metadata has no format {LIGHT_FORMAT!r}); a light training "
            f"run writes one as export/<tag>/{LIGHT_FILE}"
        )
    try:
        shapes, record = json.loads(meta["config"]), json.loads(meta.get("record", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag}: its metadata is damaged ({exc})") from None
    return tensors, shapes, record


@torch.no_grad()
def load_light_decoder(decoder: LightMaskDecoder, path: str | Path) -> dict[str, Any]:
    """Initialise ``decoder`` from a light-decoder file: its shapes must be the decoder's, every tensor
    present with its shape and finite, nothing else in the file. Returns the file's record."""
    tensors, shapes, record = read_light_decoder(path)
    flag = f"--light_pretrained {path}"
    want = asdict(decoder.cfg)
    diff = [f"{k} {shapes.get(k)} in the file, {v} here" for k, v in want.items() if shapes.get(k) != v]
    if diff:
        raise ValueError(
            f"{flag}: made for another light decoder ({'; '.join(diff)}); check --light_dim, "
            "--light_detail_size and the base (--version)"
        )
    own = decoder.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{flag}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"{flag}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{flag}: {name} holds NaN or infinite values")
    for name, tensor in tensors.items():
        own[name].copy_(tensor)
    return record


def parameter_count(cfg: LightDecoderConfig) -> int:
    """Parameters of a light decoder of ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LightMaskDecoder(cfg).parameters())


class SemanticFusion(nn.Module):
    """LIRA's semantic fusion (SEFE) adapted to the SAM route: SAM's image embedding reads the LLM's states
    at the image-token positions (and the ``<DEPTH>`` positions) of the ``[SEG]``'s conversation by one
    cross-attention layer; the result enters SAM's mask decoder as its dense prompt, so the decoder's image
    side knows what the conversation is about and ``[SEG]`` no longer carries the location alone.

    The output projection starts at zero: an untrained fusion leaves the SAM route exactly as it was.
    """

    def __init__(self, llm_dim: int, sam_dim: int, heads: int = 8) -> None:
        super().__init__()
        heads = heads if sam_dim % heads == 0 else 1
        self.states_in = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, sam_dim))
        self.norm = nn.LayerNorm(sam_dim)
        self.attn = nn.MultiheadAttention(sam_dim, heads, batch_first=True)
        self.out = nn.Linear(sam_dim, sam_dim)
        self.out.zero_init = (
            True  # kept zero by LFLLMForCausalLM._init_weights (HF re-initialises missing weights)
        )
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image_embedding: torch.Tensor, pe: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Dense prompts, one per ``[SEG]``.

        Args:
            image_embedding: (K, C, g, g) SAM image embedding of each ``[SEG]``'s image.
            pe: (1, C, g, g) SAM's dense positional encoding.
            states: (K, T, Dl) the LLM states of each ``[SEG]``'s conversation (image, then depth tokens).

        Returns:
            (K, C, g, g) in ``image_embedding``'s dtype.
        """
        k, c, gh, gw = image_embedding.shape
        dtype = self.out.weight.dtype
        queries = (image_embedding + pe).flatten(2).transpose(1, 2).to(dtype)  # (K, g², C)
        keys = self.states_in(states.to(dtype))
        fused = self.attn(self.norm(queries), keys, keys, need_weights=False)[0]
        return self.out(fused).transpose(1, 2).reshape(k, c, gh, gw).to(image_embedding.dtype)
