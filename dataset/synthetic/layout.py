"""Scene layout and rendering for the synthetic light-field generator (see ``dataset/synthetic.py``).

A scene is a background plane plus fronto-parallel object layers, each with a constant disparity ``d`` (px
between adjacent views). View ``(row, col)`` at angular offset ``(drow, dcol)`` from the centre shows, at pixel
``(x', y')``, the point of each layer at centre-view coordinates ``(x' + d*dcol, y' + d*drow)``; layers are
composited back to front (ascending disparity), so occlusion is right in every view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.shapes import (
    CATEGORIES,
    CATEGORY_COLOURS,
    HEIGHT_FRACTION,
    PALETTE,
    SHAPES,
    SmoothTexture,
    sample_shape_params,
    sample_waves,
)

BACKGROUND_DISPARITY = (-0.5, 0.0)
OBJECT_DISPARITY = (0.0, 1.6)
BRIDGE_DISPARITY = (0.0, 0.5)
PAIR_MIN_GAP = 0.45
"""Minimum disparity gap (px) between the two objects of a same-looking pair."""
MIN_PERIOD_PX = 24.0
"""Shortest texture period at 640x480, scaled with the image (never below ``MIN_PERIOD_FLOOR_PX``)."""
MIN_PERIOD_FLOOR_PX = 10.0
CATEGORY_WEIGHTS = np.array([1.0, 0.8, 1.4, 1.0, 1.0, 0.9, 1.4, 0.35, 1.0])


def _box(cx: float, bottom: float, size: float, half_width: float) -> tuple[float, float, float, float]:
    pad = 0.05 * size + 1.0
    return cx - half_width * size - pad, bottom - size - pad, cx + half_width * size + pad, bottom + pad


@dataclass
class Layer:
    """One fronto-parallel object layer; ``layer_id`` is its value in ``layer_ids`` (1-based)."""

    layer_id: int
    disparity: float
    category: str
    colour: str
    cx: float
    bottom: float
    size: float
    params: dict
    texture: SmoothTexture

    def box(self) -> tuple[float, float, float, float]:
        """Centre-view bounding box ``(x0, y0, x1, y1)`` of the silhouette, padded."""
        return _box(self.cx, self.bottom, self.size, self.params["half_width"])

    def mask(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Silhouette at centre-view coordinates ``u`` (w,) x ``v`` (h,) -> bool (h, w)."""
        a = ((u - self.cx) / self.size)[None, :]
        b = ((self.bottom - v) / self.size)[:, None]
        return SHAPES[self.category](a, b, self.params)


def _min_period(cfg: SyntheticConfig) -> float:
    return max(MIN_PERIOD_PX * min(cfg.height / 480, cfg.width / 640), MIN_PERIOD_FLOOR_PX)


def _object_texture(rng: np.random.Generator, colour: str, box: tuple, p0: float) -> SmoothTexture:
    """Palette colour plus gentle waves (periods >= ``p0`` px) and a ramp of at most 8 levels over ``box``."""
    base = np.array(PALETTE[colour], float) + rng.uniform(-6, 6, 3)
    x0, y0, x1, y1 = box
    ramp = (rng.uniform(-8, 8) / (x1 - x0), rng.uniform(-8, 8) / (y1 - y0), (x0 + x1) / 2, (y0 + y1) / 2)
    return SmoothTexture(base, rng.uniform(0.85, 1.15, 3), sample_waves(rng, 3, p0, 4 * p0, (3.0, 7.0)), ramp)


def sample_background(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[SmoothTexture, float, float]:
    """Background texture, its disparity, and the horizon row (objects stand below it)."""
    p0 = _min_period(cfg)
    waves = sample_waves(rng, 4, 1.5 * p0, 8 * p0, (3.0, 7.0))
    gain = rng.uniform(0.85, 1.15, 3)
    disparity = float(rng.uniform(*BACKGROUND_DISPARITY))
    if rng.random() < 0.6:
        horizon = float(rng.uniform(0.35, 0.55) * cfg.height)
        sky = np.array([130.0, 175.0, 215.0]) + rng.uniform(-10, 10, 3)
        ground = np.array([115.0, 105.0, 95.0]) + rng.uniform(-15, 15, 3)
        blend = max(4.0, 8.0 * cfg.height / 480)
        return (
            SmoothTexture(sky, gain, waves, lower_base=ground, horizon=horizon, blend_px=blend),
            disparity,
            horizon,
        )
    wall = np.array([175.0, 165.0, 150.0]) + rng.uniform(-20, 20) + rng.uniform(-8, 8, 3)
    return SmoothTexture(wall, gain, waves), disparity, 0.5 * cfg.height


def _sample_kinds(rng: np.random.Generator, n: int, pair: bool) -> list[tuple[str, str]]:
    """(category, colour) per object; only the designated pair (objects 0 and 1) may share both."""
    chosen: list[tuple[str, str]] = []
    weights = CATEGORY_WEIGHTS / CATEGORY_WEIGHTS.sum()
    while len(chosen) < n:
        if pair and len(chosen) == 1:
            chosen.append(chosen[0])
            continue
        cat = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights))]
        colour = str(rng.choice(CATEGORY_COLOURS.get(cat, tuple(PALETTE))))
        if (cat, colour) in chosen or (cat == "bridge" and any(c == "bridge" for c, _ in chosen)):
            continue
        chosen.append((cat, colour))
    return chosen


def _sample_disparities(rng: np.random.Generator, kinds: list[tuple[str, str]], pair: bool) -> list[float]:
    """One disparity per object; objects 0 and 1 of a pair end up at least ``PAIR_MIN_GAP`` apart.

    The second pair member is redrawn until the gap holds; when no value of its range can give the gap
    (a bridge pair: range 0.5 px wide, first member near its middle), the first member is redrawn too.
    """
    ranges = [BRIDGE_DISPARITY if c == "bridge" else OBJECT_DISPARITY for c, _ in kinds]
    out = [float(rng.uniform(*r)) for r in ranges]
    while pair and abs(out[0] - out[1]) < PAIR_MIN_GAP:
        lo, hi = ranges[1]
        if out[0] - PAIR_MIN_GAP < lo and out[0] + PAIR_MIN_GAP > hi:
            out[0] = float(rng.uniform(*ranges[0]))
            continue
        out[1] = float(rng.uniform(lo, hi))
    return out


def _place(
    rng: np.random.Generator, cfg: SyntheticConfig, cat: str, d: float, horizon: float, params: dict
) -> tuple[float, float, float]:
    """Ground-contact row, height and half width (px): nearer objects stand lower and are larger.

    The apparent depth that places the object is its disparity's share of ``OBJECT_DISPARITY``, mixed with an
    independent uniform draw as ``cfg.perspective`` says (1: the disparity alone, the default scenes, whose
    random stream this leaves unchanged; 0: placement says nothing about depth).
    """
    depth = (d - OBJECT_DISPARITY[0]) / (OBJECT_DISPARITY[1] - OBJECT_DISPARITY[0])
    if cfg.perspective < 1.0:
        depth = cfg.perspective * depth + (1.0 - cfg.perspective) * float(rng.uniform())
    span = cfg.height - horizon
    bottom = min(horizon + span * (0.25 + 0.7 * depth) * rng.uniform(0.9, 1.05), cfg.height - 3.0)
    size = HEIGHT_FRACTION[cat] * cfg.height * (0.65 + 0.5 * depth) * rng.uniform(0.9, 1.1)
    size = min(size, bottom - 3.0, (cfg.width / 2 - 4.0) / params["half_width"])
    hw = params["half_width"] * size
    return bottom, size, hw


def sample_layers(rng: np.random.Generator, cfg: SyntheticConfig, horizon: float) -> tuple[list[Layer], bool]:
    """``min_objects..max_objects`` layers; the bool says objects 0 and 1 form a same-looking pair."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pair = n >= 2 and rng.random() < cfg.same_looking_prob
    kinds = _sample_kinds(rng, n, pair)
    disparities = _sample_disparities(rng, kinds, pair)
    p0 = _min_period(cfg)
    layers: list[Layer] = []
    for k, ((cat, colour), d) in enumerate(zip(kinds, disparities)):
        params = sample_shape_params(cat, rng)
        bottom, size, hw = _place(rng, cfg, cat, d, horizon, params)
        lo, hi = hw + 3.0, cfg.width - hw - 3.0
        if layers and rng.random() < 0.5:
            other = layers[int(rng.integers(len(layers)))]
            cx = float(np.clip(other.cx + rng.normal(0.0, 0.6 * max(hw, 8.0)), lo, hi))
        else:
            cx = float(rng.uniform(lo, hi))
        texture = _object_texture(rng, colour, _box(cx, bottom, size, params["half_width"]), p0)
        layers.append(Layer(k + 1, d, cat, colour, cx, bottom, size, params, texture))
    return layers, pair


def render_view(
    bg: SmoothTexture, bg_d: float, layers: list[Layer], cfg: SyntheticConfig, drow: int, dcol: int
) -> tuple[np.ndarray, np.ndarray]:
    """One view at angular offset ``(drow, dcol)`` -> (uint8 RGB (H, W, 3), int16 layer ids (H, W)).

    Layers are drawn back to front; each is evaluated at centre-view coordinates ``(x' + d*dcol, y' + d*drow)``
    over its shifted bounding box only.
    """
    h, w = cfg.height, cfg.width
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    img = bg.evaluate(xs + bg_d * dcol, ys + bg_d * drow)
    ids = np.zeros((h, w), np.int16)
    for layer in sorted(layers, key=lambda la: (la.disparity, la.layer_id)):
        sx, sy = layer.disparity * dcol, layer.disparity * drow
        x0, y0, x1, y1 = layer.box()
        px0, px1 = max(0, math.floor(x0 - sx)), min(w - 1, math.ceil(x1 - sx))
        py0, py1 = max(0, math.floor(y0 - sy)), min(h - 1, math.ceil(y1 - sy))
        if px0 > px1 or py0 > py1:
            continue
        u, v = xs[px0 : px1 + 1] + sx, ys[py0 : py1 + 1] + sy
        m = layer.mask(u, v)
        np.copyto(img[:, py0 : py1 + 1, px0 : px1 + 1], layer.texture.evaluate(u, v), where=m[None])
        ids[py0 : py1 + 1, px0 : px1 + 1][m] = layer.layer_id
    rgb = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        rgb[:, :, c] = np.clip(np.rint(img[c]), 0, 255)
    return rgb, ids


def full_area(layer: Layer, cfg: SyntheticConfig) -> int:
    """Pixels of the unoccluded silhouette inside the centre view."""
    x0, y0, x1, y1 = layer.box()
    px0, px1 = max(0, math.floor(x0)), min(cfg.width - 1, math.ceil(x1))
    py0, py1 = max(0, math.floor(y0)), min(cfg.height - 1, math.ceil(y1))
    u, v = np.arange(px0, px1 + 1, dtype=np.float64), np.arange(py0, py1 + 1, dtype=np.float64)
    return int(layer.mask(u, v).sum())
