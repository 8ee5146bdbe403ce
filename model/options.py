"""The LFLLM options a user chooses: one dataclass, each option's only default (the paper's method).

``train_ds.py``, the merge script, ``chat.py`` and the benchmark derive their flags from these fields
(``training.config``); the model config (``model.lfllm.LFLLMConfig``) takes its defaults from here, and a
merged model records the values it was built with, so :func:`model.build.build_lfllm` can refuse a flag
that disagrees with it (:func:`mismatched_flags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from utils.conversation import PROMPT_ORDERS
from utils.options import (
    at_least,
    finite_at_least_zero,
    flag_name,
    option,
    parse_range,
    show_range,
    show_value,
)
from utils.views import parse_views

CAAM_TARGETS: tuple[str, ...] = ("clip", "sam", "both")
CAAM_MODES: tuple[str, ...] = ("fixed", "learned", "occlusion")
DEPTH_PROJECTORS: tuple[str, ...] = ("shared", "separate")
MASK_HEADS: tuple[str, ...] = ("sam", "light")
#: The options that only exist in the SAM route (refused with ``--mask_head light``).
SAM_ROUTE_OPTIONS: tuple[str, ...] = ("semantic_fusion", "depth_stream", "depth_detail")


def _views(text: str) -> str:
    parse_views(text)  # a ValueError names what is wrong with the spec
    return text


@dataclass(frozen=True)
class ModelOptions:
    """The LFLLM fields a user chooses (defaults: the paper's method; flags: the reference's names)."""

    use_depth: bool = option(
        True, "<DEPTH> tokens from the disparity map (--no_depth: LISA baseline)", flag="depth", resume=True
    )
    use_caam: bool = option(
        True, "Center Angular Aggregation Module (--no_caam: LISA baseline)", flag="caam", resume=True
    )
    caam_target: str = option(
        "both", "which encoders see the CAAM-aggregated view", choices=CAAM_TARGETS, resume=True
    )
    caam_mode: str = option(
        "fixed", "CAAM aggregation: fixed weights, learned, occlusion-aware", choices=CAAM_MODES, resume=True
    )
    caam_views: str = option("4", "'4', '8', 'cross2' or view names like 5_4,5_6", parse=_views, resume=True)
    depth_range: tuple[float, float] = option(
        (-1.0, 1.0),
        "disparity (px) mapped to black..white; write --depth_range=-0.5,2 for a negative start",
        parse=parse_range,
        show=show_range,
        resume=True,
    )
    depth_projector: str = option(
        "shared", "projector of the <DEPTH> tokens", choices=DEPTH_PROJECTORS, resume=True
    )
    use_mm_start_end: bool = option(True, "wrap visual placeholders in <im_start>/<im_end>", resume=True)
    prompt_order: str = option(
        "image_first",
        "visual placeholders before the question (LLaVA's order) or after it (for a base pretrained so)",
        choices=PROMPT_ORDERS,
        resume=True,
    )
    answer_box: bool = option(
        False,
        "answers state the target's box (0.1 grid) before [SEG]; evaluated with --eval_protocol generated",
        resume=True,
    )
    semantic_fusion: bool = option(
        False,
        "LIRA-style semantic fusion: SAM's image embedding reads the LLM's image/depth-token states by "
        "cross-attention, as SAM's dense prompt",
        resume=True,
    )
    depth_stream: bool = option(
        False,
        "the disparity map reaches SAM's mask decoder directly: pooled to 4x SAM's grid, encoded by a small "
        "conv net, added to the dense prompt (and the semantic fusion's queries)",
        resume=True,
    )
    depth_detail: bool = option(
        False,
        "the depth stream also reaches the mask decoder's upscaled embedding (4x SAM's grid, the grid the mask "
        "is read from), so mask edges can follow the disparity's (needs --depth_stream)",
        resume=True,
    )
    mask_head: str = option(
        "sam",
        "what turns [SEG] into a mask: SAM's decoder on SAM's image embedding, or the light decoder over "
        "the MLLM's own features (MLLMSeg's design; no SAM at all)",
        choices=MASK_HEADS,
        resume=True,
    )
    light_detail_size: int = option(
        0,
        "light head: input size (px) of the vision tower's detail pass, a multiple of the tower's own size "
        "(position embeddings interpolated; the LLM's tokens come from the same view pooled to the tower's "
        "size); 0: the tower's own size",
        check=at_least(0),
        resume=True,
    )
    light_dim: int = option(
        256, "light head: decoder width (a multiple of 8)", check=at_least(8), resume=True
    )
    gres: bool = option(
        False,
        "generalised referring segmentation: a [REJ] token answers an expression that names no object (its "
        "slot gives an empty mask), as MLLMSeg and GSVA do; needed to train on no-target expressions",
        resume=True,
    )
    out_dim: int = option(
        256, "[SEG] projection width; must equal SAM's prompt width (256 for every official SAM)", resume=True
    )
    image_size: int = option(
        1024, "SAM input size; must equal the SAM checkpoint's (1024 for every official SAM)", resume=True
    )
    ce_loss_weight: float = option(
        1.0, "weight of the answer's cross-entropy", resume=True, check=finite_at_least_zero
    )
    bce_loss_weight: float = option(2.0, "weight of the mask BCE", resume=True, check=finite_at_least_zero)
    dice_loss_weight: float = option(
        0.5, "weight of the mask dice loss", resume=True, check=finite_at_least_zero
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth_range", parse_range(show_range(self.depth_range)))
        for name, allowed in (
            ("caam_target", CAAM_TARGETS),
            ("caam_mode", CAAM_MODES),
            ("depth_projector", DEPTH_PROJECTORS),
            ("prompt_order", PROMPT_ORDERS),
            ("mask_head", MASK_HEADS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected one of {allowed}")
        if self.mask_head == "light":
            for name in SAM_ROUTE_OPTIONS:
                if getattr(self, name):
                    raise ValueError(
                        f"--{name} belongs to the SAM route; the light head (--mask_head light) reads the "
                        "MLLM's states itself: drop one of the two"
                    )
            if self.use_caam and self.caam_target == "sam":
                raise ValueError(
                    "--caam_target sam: the light head (--mask_head light) has no SAM encoder; use clip or both "
                    "(both: the vision tower's passes)"
                )
        elif self.depth_detail and not self.depth_stream:
            raise ValueError("--depth_detail is a branch of the depth stream: add --depth_stream")
        elif self.light_detail_size:
            raise ValueError("--light_detail_size is an option of the light head: add --mask_head light")
        if self.light_dim % 8:
            raise ValueError(f"--light_dim {self.light_dim}: expected a multiple of 8 (its attention heads)")
        _views(self.caam_views)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelOptions:
        """The options recorded in ``values`` (e.g. ``trainable.json``); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})


#: The defaults, for code that only reads them.
DEFAULT_MODEL_OPTIONS = ModelOptions()


#: Options that are properties of the SAM checkpoint, not fields of the model config.
SAM_PROPERTIES = {"image_size": "img_size"}


def recorded_options(config: Any) -> dict[str, Any]:
    """The :class:`ModelOptions` values a built model's config records (``caam_views`` as its offsets;
    ``image_size`` from its SAM config, when it has one)."""
    out = {}
    for f in dataclasses.fields(ModelOptions):
        if f.name == "caam_views":
            continue
        if f.name in SAM_PROPERTIES:
            sam_cfg = getattr(config, "sam_config", None)
            if sam_cfg:
                out[f.name] = sam_cfg[SAM_PROPERTIES[f.name]]
            continue
        value = getattr(config, f.name)
        out[f.name] = tuple(float(v) for v in value) if f.name == "depth_range" else value
    return out


def mismatched_flags(
    source: str, options: ModelOptions, given: Collection[str], recorded: Mapping[str, Any]
) -> list[str]:
    """One line per option in ``given`` (field names the user set) whose value differs from ``recorded``
    (what ``source`` was built with), naming the flag, both values and the source."""
    lines = []
    fields = {f.name: f for f in dataclasses.fields(ModelOptions)}
    for name in sorted(given):
        if name not in recorded or name not in fields:
            continue
        mine, theirs = getattr(options, name), recorded[name]
        if name == "caam_views":
            mine, theirs = parse_views(mine), tuple(tuple(o) for o in theirs)
        if mine != theirs:
            field = fields[name]
            lines.append(
                f"--{flag_name(field)}: {show_value(field, getattr(options, name))} given, but {source} has "
                f"{show_value(field, recorded[name]) if name != 'caam_views' else theirs}"
            )
    return lines


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding of an answer (the ``generated`` protocol, chat, the demo)."""

    max_new_tokens: int = option(
        32, "tokens generated per answer (generated protocol / chat)", check=at_least(1)
    )
