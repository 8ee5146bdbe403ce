"""Settings of the built-in disparity estimator: :class:`DisparityConfig` (every default, once) and its
command-line form (``KEY=VALUE`` overrides; :class:`DisparityFlags`, the estimator scripts' flags)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from utils.options import option

#: Ways to combine the direction groups (see :class:`DisparityConfig`).
OCCLUSION_MODES: tuple[str, ...] = ("axis", "best", "none")


@dataclass(frozen=True)
class DisparityConfig:
    """Every setting of :func:`estimate_disparity`; the defaults live here and nowhere else.

    The defaults were chosen on the synthetic benchmark (``docs/DISPARITY.md``); the ones to revisit for
    noisier real captures are ``tau_color`` / ``tau_grad`` (raise them) and ``prefilter_eps``.

    Attributes:
        d_min, d_max: swept disparity range in px between adjacent views (inclusive). ``[-1, 2]`` covers
            UrbanLF-Syn (GT in about ``[-0.5, 1.6]``) with margin on both sides and the small disparities
            of plenoptic (Lytro Illum, UrbanLF-Real) captures; widen it for other data.
        num_planes: planes in ``[d_min, d_max]`` (41 = a 0.075 px step; the parabola fit does the rest).
        views: which views :func:`disparity_for_scene` loads (:func:`view_set_offsets`): ``"cross"`` (centre
            row and column: 16 neighbours on 9x9), ``"full"`` (whole grid), ``"4"``, ``"8"``, ``"cross2"``,
            or a list like ``"5_1,5_9,1_5,9_5"``. :func:`estimate_disparity` uses the views it is given.
        features: ``"rgb"`` or ``"grey"`` (channel mean; about 2x faster, a little less accurate) matching.
        prefilter_radius, prefilter_eps: edge-preserving pre-smoothing of every view (self-guided filter,
            window ``2r + 1``): variations with a local variance well below ``eps`` (8-bit quantisation
            steps, sensor noise) are averaged out, edges and texture stronger than ``sqrt(eps)`` (~8 grey
            levels) are kept. Removes the pull of quantised low-contrast texture towards integer shifts.
            ``prefilter_radius = 0`` disables it.
        alpha: weight of the gradient term of the matching cost (the colour term gets ``1 - alpha``).
        tau_color: truncation of the colour difference (channel mean; images in [0, 1]).
        tau_grad: truncation of the gradient difference.
        radius: guided-filter (cost aggregation) window radius at full resolution (window ``2r + 1``).
        eps: guided-filter regulariser (larger = smoother, less edge-aware).
        color_guide: colour (3x3 covariance) guided filter; False = grey guide.
        gf_subsample: the guided filter's coefficients are computed at ``1 / gf_subsample`` resolution
            (fast guided filter); 1 = exact.
        occlusion: combination of the direction groups: ``"axis"`` (per axis the better side, mean of the
            axes; default), ``"best"`` (mean of the ``occlusion_keep`` best groups) or ``"none"`` (mean).
        occlusion_keep: for ``occlusion="best"``: groups kept per pixel; ``None`` = half, rounded up.
        subpixel: parabola refinement of the winning plane.
        median: size of an optional final median filter (odd; 1 = off).
        chunk_mb: size of the largest temporary of the sweep (the planes of one chunk are processed
            together, one or a few views at a time). Peak memory is about ``10 * chunk_mb`` plus the
            ``(B, num_planes, H, W)`` float32 cost volume (50 MB at 640x480); small chunks are also fast on
            the CPU, where glibc recycles freed blocks below 32 MB instead of page-faulting fresh ones.
    """

    d_min: float = -1.0
    d_max: float = 2.0
    num_planes: int = 41
    views: str = "cross"
    features: str = "rgb"
    prefilter_radius: int = 2
    prefilter_eps: float = 1e-3
    alpha: float = 0.1
    tau_color: float = 0.01
    tau_grad: float = 0.005
    radius: int = 7
    eps: float = 1e-4
    color_guide: bool = True
    gf_subsample: int = 2
    occlusion: str = "axis"
    occlusion_keep: int | None = None
    subpixel: bool = True
    median: int = 1
    chunk_mb: float = 24.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.d_min) and math.isfinite(self.d_max) and self.d_min < self.d_max):
            raise ValueError(f"DisparityConfig: need finite d_min < d_max, got {self.d_min}, {self.d_max}")
        if self.num_planes < 3:
            raise ValueError(f"DisparityConfig: num_planes must be >= 3, got {self.num_planes}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DisparityConfig: alpha must be in [0, 1], got {self.alpha}")
        if self.tau_color <= 0 or self.tau_grad <= 0 or self.eps <= 0:
            raise ValueError(
                "DisparityConfig: tau_color, tau_grad and eps must be > 0, got "
                f"{self.tau_color}, {self.tau_grad}, {self.eps}"
            )
        if self.gf_subsample < 1:
            raise ValueError(f"DisparityConfig: gf_subsample must be >= 1, got {self.gf_subsample}")
        if self.radius < 1:
            raise ValueError(f"DisparityConfig: radius must be >= 1, got {self.radius}")
        if self.occlusion not in OCCLUSION_MODES:
            raise ValueError(
                f"DisparityConfig: occlusion must be one of {OCCLUSION_MODES}, got {self.occlusion!r}"
            )
        if self.occlusion_keep is not None and self.occlusion_keep < 1:
            raise ValueError(
                f"DisparityConfig: occlusion_keep must be >= 1 or None, got {self.occlusion_keep}"
            )
        if self.median < 1 or self.median % 2 == 0:
            raise ValueError(f"DisparityConfig: median must be odd and >= 1, got {self.median}")
        if self.features not in ("rgb", "grey"):
            raise ValueError(f"DisparityConfig: features must be 'rgb' or 'grey', got {self.features!r}")
        if self.prefilter_radius < 0 or self.prefilter_eps <= 0:
            raise ValueError(
                "DisparityConfig: need prefilter_radius >= 0 and prefilter_eps > 0, got "
                f"{self.prefilter_radius}, {self.prefilter_eps}"
            )
        if not self.chunk_mb > 0:
            raise ValueError(f"DisparityConfig: chunk_mb must be > 0, got {self.chunk_mb}")

    @property
    def step(self) -> float:
        """Spacing of the planes in px."""
        return (self.d_max - self.d_min) / (self.num_planes - 1)


#: The defaults, for callers that want to read them.
DEFAULT_DISPARITY_CONFIG = DisparityConfig()

_PARSERS: dict[str, Any] = {"float": float, "int": int, "str": str}


def config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["tau_color=0.02", "occlusion=best", "occlusion_keep=none"]`` into typed field overrides.

    For command lines (``--set KEY=VALUE``). Raises ``ValueError`` naming an unknown field or a value of
    the wrong type.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(DisparityConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in types:
            raise ValueError(f"bad option {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.lower() in ("true", "1")
            elif kind.endswith("| None") and text.lower() == "none":
                out[key] = None
            else:
                out[key] = _PARSERS[kind.split("|")[0].strip()](text)
        except ValueError:
            raise ValueError(f"bad option {item!r}: {key} expects {kind}") from None
    return out


@dataclass(frozen=True)
class DisparityFlags:
    """The estimator's command-line options, defaults from :class:`DisparityConfig`: the four settings a
    user changes most (``--views``, ``--d_min``, ``--d_max``, ``--num_planes``) and a repeatable
    ``--set KEY=VALUE`` for any other field (:func:`config_overrides`). :meth:`config` builds the config."""

    d_min: float = option(DEFAULT_DISPARITY_CONFIG.d_min, "smallest swept disparity (px)")
    d_max: float = option(DEFAULT_DISPARITY_CONFIG.d_max, "largest swept disparity (px)")
    num_planes: int = option(DEFAULT_DISPARITY_CONFIG.num_planes, "planes in [d_min, d_max]")
    views: str = option(
        DEFAULT_DISPARITY_CONFIG.views, "view set: cross | full | 4 | 8 | cross2 | '5_1,5_9,...'"
    )
    overrides: tuple[str, ...] = option(
        (),
        "any other DisparityConfig field, e.g. --set tau_color=0.02 (repeatable)",
        flag="set",
        repeat=True,
        metavar="KEY=VALUE",
    )

    def config(self) -> DisparityConfig:
        """The :class:`DisparityConfig` these flags describe. Raises ``ValueError`` (or ``TypeError``)
        naming a bad field or value."""
        return DisparityConfig(
            d_min=self.d_min,
            d_max=self.d_max,
            num_planes=self.num_planes,
            views=self.views,
            **config_overrides(self.overrides),
        )


def plane_disparities(config: DisparityConfig, device: torch.device | str = "cpu") -> Tensor:
    """``(num_planes,)`` float32 disparities of the sweep, ``d_min`` .. ``d_max`` inclusive."""
    return torch.linspace(config.d_min, config.d_max, config.num_planes, dtype=torch.float32, device=device)
