"""Shapes, colours and smooth textures for the synthetic light-field generator (``dataset/synthetic.py``).

Every object is drawn in a normalised frame anchored at its ground-contact point: with ``h`` the object
height in pixels, ``a = (u - cx) / h`` grows to the right and ``b = (bottom - v) / h`` grows upwards, and a
shape occupies ``b`` in ``[0, 1]`` and ``|a| <= half_width``. Shapes are boolean functions of broadcast
coordinate arrays (``a`` of shape ``(1, w)``, ``b`` of shape ``(h, 1)``), so a whole bounding box is evaluated
at once; textures are sums of low-frequency plane waves, evaluated as a rank-``2K`` matrix product.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CATEGORIES: tuple[str, ...] = (
    "bike",
    "fence",
    "person",
    "pole",
    "traffic sign",
    "vegetation",
    "vehicle",
    "bridge",
    "rider",
)
"""The nine Ref-UrbanLF categories; category id = index + 1."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (215, 200, 45),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "white": (215, 215, 215),
    "black": (45, 45, 45),
}
"""Named object colours (RGB) used in expressions; textures vary around them by at most ~35 levels."""

CATEGORY_COLOURS: dict[str, tuple[str, ...]] = {
    "vegetation": ("green", "yellow", "orange"),
    "bridge": ("white", "black", "red", "blue"),
}
"""Allowed colours per category; categories not listed use the whole palette."""

HEIGHT_FRACTION: dict[str, float] = {
    "bike": 0.2,
    "fence": 0.2,
    "person": 0.38,
    "pole": 0.6,
    "traffic sign": 0.4,
    "vegetation": 0.42,
    "vehicle": 0.26,
    "bridge": 0.3,
    "rider": 0.4,
}
"""Nominal object height as a fraction of the image height (before the depth-dependent scale)."""

Mask = np.ndarray


def _ellipse(a: Mask, b: Mask, ca: float, cb: float, ra: float, rb: float) -> Mask:
    return ((a - ca) / ra) ** 2 + ((b - cb) / rb) ** 2 <= 1.0


def _superellipse(a: Mask, b: Mask, ca: float, cb: float, ra: float, rb: float) -> Mask:
    return ((a - ca) / ra) ** 4 + ((b - cb) / rb) ** 4 <= 1.0


def _box(a: Mask, b: Mask, a0: float, a1: float, b0: float, b1: float) -> Mask:
    return (a >= a0) & (a <= a1) & (b >= b0) & (b <= b1)


def _ring(a: Mask, b: Mask, ca: float, cb: float, r_out: float, r_in: float) -> Mask:
    r2 = (a - ca) ** 2 + (b - cb) ** 2
    return (r2 <= r_out**2) & (r2 >= r_in**2)


def _segments(a: Mask, b: Mask, points: list[tuple[float, float]], thickness: float) -> Mask:
    """Union of thick line segments through consecutive ``points`` (a polyline)."""
    out = np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=bool)
    for (pa, pb), (qa, qb) in itertools.pairwise(points):
        da, db = qa - pa, qb - pb
        t = np.clip(((a - pa) * da + (b - pb) * db) / (da * da + db * db), 0.0, 1.0)
        out |= (a - pa - t * da) ** 2 + (b - pb - t * db) ** 2 <= thickness**2
    return out


def _triangle(a: Mask, b: Mask, p: tuple[tuple[float, float], ...]) -> Mask:
    """Inside of a counter-clockwise triangle: all three edge functions non-negative."""
    out = np.ones(np.broadcast_shapes(a.shape, b.shape), dtype=bool)
    for (pa, pb), (qa, qb) in zip(p, p[1:] + p[:1]):
        out &= (qa - pa) * (b - pb) - (qb - pb) * (a - pa) >= 0
    return out


def _person(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _ellipse(a, b, 0.0, 0.9, 0.075, 0.09) | _superellipse(a, b, 0.0, 0.61, 0.12, 0.17)
    m |= _segments(a, b, [(-0.05, 0.47), (-0.07, 0.03)], 0.04)
    m |= _segments(a, b, [(0.05, 0.47), (0.08, 0.03)], 0.04)
    arm = prm.get("arm", 0.17)
    return (
        m
        | _segments(a, b, [(-0.12, 0.74), (-arm, 0.45)], 0.03)
        | _segments(a, b, [(0.12, 0.74), (arm, 0.45)], 0.03)
    )


def _bike_parts(a: Mask, b: Mask, s: float, t: float) -> Mask:
    """A bike of height ``s`` (wheels of radius ``0.3 s``), frame thickness ``t``."""
    m = _ring(a, b, -0.5 * s, 0.3 * s, 0.3 * s, 0.23 * s) | _ring(a, b, 0.5 * s, 0.3 * s, 0.3 * s, 0.23 * s)
    frame = [(-0.5, 0.3), (0.0, 0.35), (0.35, 0.8), (-0.12, 0.8), (0.0, 0.35), (0.5, 0.3), (0.35, 0.8)]
    m |= _segments(a, b, [(x * s, y * s) for x, y in frame], t)
    m |= _segments(a, b, [(0.35 * s, 0.8 * s), (0.42 * s, 0.97 * s), (0.52 * s, 0.97 * s)], t)
    return m | _box(a, b, -0.24 * s, -0.0 * s, 0.8 * s, 0.88 * s)


def _bike(a: Mask, b: Mask, prm: dict) -> Mask:
    return _bike_parts(a, b, 1.0, 0.035)


def _rider(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _bike_parts(a, b, 0.5, 0.02)
    m |= _superellipse(a, b, -0.02, 0.62, 0.1, 0.15) | _ellipse(a, b, 0.04, 0.88, 0.065, 0.08)
    m |= _segments(a, b, [(-0.04, 0.48), (0.1, 0.33), (0.12, 0.18)], 0.035)
    return m | _segments(a, b, [(0.04, 0.7), (0.2, 0.47)], 0.028)


def _vehicle(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _superellipse(a, b, 0.0, 0.38, 0.98, 0.22)
    m |= _superellipse(a, b, prm.get("cabin", -0.05), 0.66, 0.55, 0.3) & (b >= 0.4)
    return m | _ellipse(a, b, -0.6, 0.15, 0.15, 0.15) | _ellipse(a, b, 0.6, 0.15, 0.15, 0.15)


def _pole(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _box(a, b, -0.025, 0.025, 0.0, 0.97)
    if prm.get("lamp", False):
        m |= _segments(a, b, [(0.0, 0.95), (0.15, 0.95)], 0.015) | _ellipse(a, b, 0.16, 0.93, 0.04, 0.03)
    return m


def _traffic_sign(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _box(a, b, -0.022, 0.022, 0.0, 0.68)
    variant = prm.get("variant", "disc")
    if variant == "disc":
        return m | _ellipse(a, b, 0.0, 0.82, 0.17, 0.17)
    if variant == "triangle":
        return m | _triangle(a, b, ((-0.19, 0.65), (0.19, 0.65), (0.0, 0.99)))
    return m | (np.abs(a) + np.abs(b - 0.82) <= 0.17)


def _fence(a: Mask, b: Mask, prm: dict) -> Mask:
    hw = prm["half_width"]
    m = _box(a, b, -hw, hw, 0.3, 0.38) | _box(a, b, -hw, hw, 0.72, 0.8)
    for x in np.linspace(-hw + 0.03, hw - 0.03, prm.get("posts", 5)):
        m |= _box(a, b, x - 0.03, x + 0.03, 0.0, 1.0)
    return m


def _vegetation(a: Mask, b: Mask, prm: dict) -> Mask:
    m = _box(a, b, -0.06, 0.06, 0.0, 0.4)
    for ca, cb, r in prm["blobs"]:
        m |= _ellipse(a, b, ca, cb, r, r)
    return m


def _bridge(a: Mask, b: Mask, prm: dict) -> Mask:
    hw = prm["half_width"]
    m = _box(a, b, -hw, hw, 0.78, 0.95) | _box(a, b, -hw, hw, 0.97, 1.0)
    m |= _box(a, b, -hw, -hw + 0.15, 0.0, 0.78) | _box(a, b, hw - 0.15, hw, 0.0, 0.78)
    outer = _ellipse(a, b, 0.0, 0.0, hw - 0.15, 0.8)
    return m | (outer & ~_ellipse(a, b, 0.0, 0.0, hw - 0.3, 0.66) & (b >= 0))


SHAPES: dict[str, Callable[[Mask, Mask, dict], Mask]] = {
    "bike": _bike,
    "fence": _fence,
    "person": _person,
    "pole": _pole,
    "traffic sign": _traffic_sign,
    "vegetation": _vegetation,
    "vehicle": _vehicle,
    "bridge": _bridge,
    "rider": _rider,
}


def sample_shape_params(category: str, rng: np.random.Generator) -> dict:
    """Per-object shape variations; ``half_width`` is the extent ``max |a|`` in height units."""
    if category == "fence":
        return {"half_width": float(rng.uniform(1.0, 2.0)), "posts": int(rng.integers(4, 8))}
    if category == "bridge":
        return {"half_width": float(rng.uniform(1.3, 1.7))}
    if category == "vegetation":
        k = int(rng.integers(4, 8))
        r = rng.uniform(0.14, 0.21, k)
        blobs = np.stack([rng.uniform(-0.55 + r, 0.55 - r), rng.uniform(0.45, 1.0 - r), r], axis=1)
        return {"half_width": 0.56, "blobs": [tuple(map(float, x)) for x in blobs]}
    if category == "traffic sign":
        return {"half_width": 0.2, "variant": str(rng.choice(["disc", "triangle", "diamond"]))}
    if category == "pole":
        lamp = bool(rng.random() < 0.5)
        return {"half_width": 0.2 if lamp else 0.03, "lamp": lamp}
    if category == "vehicle":
        return {"half_width": 1.0, "cabin": float(rng.uniform(-0.25, 0.25))}
    if category == "person":
        return {"half_width": 0.2, "arm": float(rng.uniform(0.14, 0.19))}
    return {"half_width": {"bike": 0.81, "rider": 0.41}[category]}


@dataclass
class SmoothTexture:
    """Colour field ``rgb(u, v) = base(v) + gain * L(u, v)`` with a smooth luminance pattern ``L``.

    ``L`` is a sum of plane waves ``amp * sin(alpha u + beta v + phi)`` (each written as a rank-2 separable
    product) plus a linear ramp; ``base(v)`` blends ``base`` into ``lower_base`` below ``horizon`` with a
    tanh of width ``blend_px`` (backgrounds only). All terms are smooth, so bilinear resampling is accurate.
    """

    base: np.ndarray  # (3,) float
    gain: np.ndarray  # (3,) float
    waves: np.ndarray  # (K, 4): alpha, beta, phi, amp
    ramp: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # gu, gv, u0, v0
    lower_base: np.ndarray | None = None
    horizon: float = 0.0
    blend_px: float = 1.0

    def evaluate(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Colours at the grid ``u`` (w,) x ``v`` (h,) of centre-view coordinates -> float32 (3, h, w)."""
        alpha, beta, phi, amp = self.waves.T
        au = u[:, None] * alpha[None, :]
        bv = v[:, None] * beta[None, :] + phi[None, :]
        gu, gv, u0, v0 = self.ramp
        ones_u, ones_v = np.ones_like(u), np.ones_like(v)
        f = np.concatenate([np.sin(au), np.cos(au), (gu * (u - u0))[:, None], ones_u[:, None]], axis=1)
        g = np.concatenate(
            [np.cos(bv) * amp, np.sin(bv) * amp, ones_v[:, None], (gv * (v - v0))[:, None]], axis=1
        )
        # einsum without BLAS: multi-threaded BLAS is slow on busy machines and not bit-reproducible.
        lum = np.einsum("hk,wk->hw", g.astype(np.float32), f.astype(np.float32), optimize=False)
        base = np.broadcast_to(self.base, (len(v), 3)).astype(np.float32)
        if self.lower_base is not None:
            s = 0.5 * (1.0 + np.tanh((v - self.horizon) / self.blend_px))
            base = base + (s[:, None] * (self.lower_base - self.base)).astype(np.float32)
        out = np.empty((3, len(v), len(u)), np.float32)
        for c in range(3):  # planar: broadcasting over a trailing axis of 3 is several times slower
            np.multiply(lum, np.float32(self.gain[c]), out=out[c])
            out[c] += base[:, c, None]
        return out


def sample_waves(
    rng: np.random.Generator, k: int, min_period: float, max_period: float, amp: tuple
) -> np.ndarray:
    """``k`` random plane waves (alpha, beta, phi, amp) -> (k, 4), periods in [min_period, max_period] px."""
    period = rng.uniform(min_period, max_period, k)
    theta = rng.uniform(0.0, np.pi, k)
    freq = 2.0 * np.pi / period
    return np.stack(
        [freq * np.cos(theta), freq * np.sin(theta), rng.uniform(0, 2 * np.pi, k), rng.uniform(*amp, k)],
        axis=1,
    )
