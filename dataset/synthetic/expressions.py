"""Referring expressions for synthetic scenes: generated only when true and unambiguous in the scene.

The *universe* of a scene is every object with at least one visible pixel in the centre view (exactly the
objects written to ``instances.json``). A description ``D`` is ``(colour | None, category)``; ``M(D)`` is
the set of universe objects it matches. Rules (disparity ``d`` in px, larger = nearer):

* ``category`` "the vehicle": ``|M(cat)| == 1``. ``colour`` "the red vehicle": ``|M(colour, cat)| == 1`` and
  the category alone is ambiguous.
* ``spatial`` "the D on the left" (``|M(D)| == 2``) / "on the far left" (``|M(D)| >= 3``): extreme centroid x
  of the visible mask, at least ``SPATIAL_MARGIN`` x image width from the next one; same for right.
* ``closest`` / ``distance``: ``|M(D)| >= 2`` and ``d`` exceeds (falls short of) every other member's by at
  least ``DEPTH_MARGIN``.
* ``near`` "the D near the camera": the only member of ``M(D)`` in the near band: ``d >= NEAR_DISPARITY``,
  every other member ``d <= NEAR_DISPARITY - DEPTH_MARGIN``.
* ``behind`` / ``front`` "the D behind / in front of the Dy": ``Y`` is the only match of its own
  description ``Dy``; the target is at least ``DEPTH_MARGIN`` behind (in front of) ``Y`` and their visible
  bounding boxes overlap horizontally by at least ``MIN_OVERLAP`` of the narrower one; every other member
  of ``M(D)`` either does not overlap ``Y`` horizontally or is not behind (in front of) ``Y`` by more than
  ``DISTRACTOR_SLACK``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

DEPTH_MARGIN = 0.15
DISTRACTOR_SLACK = 0.05
NEAR_DISPARITY = 1.0
SPATIAL_MARGIN = 0.08
MIN_OVERLAP = 0.2
DEPTH_KINDS: tuple[str, ...] = ("closest", "distance", "behind", "front", "near")
KINDS: tuple[str, ...] = ("category", "colour", "spatial", *DEPTH_KINDS)
DEPTH_PROBABILITY = 0.6
"""Chance that an object with both depth and non-depth expressions available gets a depth one."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "category": ("the {d}", "the {d} in the image"),
    "colour": ("the {d}", "the {d} in the image"),
    "left2": ("the {d} on the left", "the left {d}"),
    "right2": ("the {d} on the right", "the right {d}"),
    "left3": ("the {d} on the far left", "the leftmost {d}"),
    "right3": ("the {d} on the far right", "the rightmost {d}"),
    "closest": ("the closest {d}", "the {d} nearest to the camera", "the {d} closest to the camera"),
    "distance": ("the {d} in the distance", "the farthest {d}", "the {d} farthest from the camera"),
    "behind": ("the {d} behind the {y}", "the {d} that is behind the {y}"),
    "front": ("the {d} in front of the {y}", "the {d} that is in front of the {y}"),
    "near": ("the {d} near the camera", "the {d} near the viewer"),
}


@dataclass
class SceneObject:
    """One object of a scene. ``index`` is 0-based; its layer id in ``layer_ids`` is ``index + 1``.

    ``mask`` is the visible part in the centre view, bool (H, W); ``bbox`` is its COCO box ``(x, y, w, h)``
    in pixels (zeros when invisible); ``centroid`` its ``(x, y)`` mean; ``full_area`` the pixel count of the
    unoccluded silhouette in the centre view; ``visible_fraction = area / full_area``.
    """

    index: int
    category: str
    category_id: int
    colour: str
    disparity: float
    mask: np.ndarray
    visible_fraction: float
    bbox: tuple[int, int, int, int]
    area: int
    full_area: int
    centroid: tuple[float, float]
    referable: bool

    @property
    def layer_id(self) -> int:
        return self.index + 1


@dataclass(frozen=True)
class Expression:
    """One sentence referring to ``objects[object_index]``; ``relation_index`` is Y for behind/front."""

    object_index: int
    sentence: str
    kind: str
    relation_index: int | None = None


Desc = tuple[str | None, str]


def _phrase(desc: Desc) -> str:
    return desc[1] if desc[0] is None else f"{desc[0]} {desc[1]}"


def _members(universe: list[SceneObject], desc: Desc) -> list[SceneObject]:
    return [o for o in universe if o.category == desc[1] and desc[0] in (None, o.colour)]


def _overlap_px(p: SceneObject, q: SceneObject) -> int:
    """Horizontal overlap (px) of the visible bounding boxes of ``p`` and ``q``; <= 0 when disjoint."""
    return min(p.bbox[0] + p.bbox[2], q.bbox[0] + q.bbox[2]) - max(p.bbox[0], q.bbox[0])


def unique_descriptions(obj: SceneObject, universe: list[SceneObject]) -> list[Desc]:
    """Descriptions of ``obj`` that match nothing else in the universe."""
    descs: list[Desc] = [(None, obj.category), (obj.colour, obj.category)]
    return [d for d in descs if len(_members(universe, d)) == 1]


def _relation_ok(t: SceneObject, y: SceneObject, group: list[SceneObject], sign: float) -> bool:
    """``t`` behind (sign=+1) or in front of (sign=-1) ``y`` unambiguously among ``group``."""
    need = max(1, int(np.ceil(MIN_OVERLAP * min(t.bbox[2], y.bbox[2]))))
    if sign * (y.disparity - t.disparity) < DEPTH_MARGIN or _overlap_px(t, y) < need:
        return False
    others = [z for z in group if z.index not in (t.index, y.index)]
    return all(
        _overlap_px(z, y) <= 0 or sign * (y.disparity - z.disparity) <= DISTRACTOR_SLACK for z in others
    )


def _group_candidates(t: SceneObject, group: list[SceneObject], width: int) -> dict[str, list[str]]:
    """Non-relational candidates for ``t`` within ``group = M(D)`` (``t`` in it), keyed by kind."""
    out: dict[str, list[str]] = defaultdict(list)
    others = [o for o in group if o.index != t.index]
    if not others:
        return out
    xs = sorted((o.centroid[0], o.index) for o in group)
    size = "2" if len(group) == 2 else "3"
    if xs[0][1] == t.index and xs[1][0] - xs[0][0] >= SPATIAL_MARGIN * width:
        out["spatial"] += list(TEMPLATES["left" + size])
    if xs[-1][1] == t.index and xs[-1][0] - xs[-2][0] >= SPATIAL_MARGIN * width:
        out["spatial"] += list(TEMPLATES["right" + size])
    if t.disparity >= max(o.disparity for o in others) + DEPTH_MARGIN:
        out["closest"] += list(TEMPLATES["closest"])
    if t.disparity <= min(o.disparity for o in others) - DEPTH_MARGIN:
        out["distance"] += list(TEMPLATES["distance"])
    if t.disparity >= NEAR_DISPARITY and all(o.disparity <= NEAR_DISPARITY - DEPTH_MARGIN for o in others):
        out["near"] += list(TEMPLATES["near"])
    return out


def candidate_expressions(
    t: SceneObject, universe: list[SceneObject], width: int
) -> dict[str, list[Expression]]:
    """Every true and unambiguous expression for ``t``, keyed by kind (see the module docstring)."""
    out: dict[str, list[Expression]] = defaultdict(list)
    for desc in [(None, t.category), (t.colour, t.category)]:
        group = _members(universe, desc)
        d = _phrase(desc)
        if len(group) == 1:
            kind = "category" if desc[0] is None else "colour"
            if kind == "category" or len(_members(universe, (None, t.category))) > 1:
                out[kind] += [Expression(t.index, s.format(d=d), kind) for s in TEMPLATES[kind]]
        for kind, templates in _group_candidates(t, group, width).items():
            out[kind] += [Expression(t.index, s.format(d=d), kind) for s in templates]
        for y in universe:
            if y.index == t.index:
                continue
            for kind, sign in (("behind", 1.0), ("front", -1.0)):
                if not _relation_ok(t, y, group, sign):
                    continue
                for dy in unique_descriptions(y, universe):
                    out[kind] += [
                        Expression(t.index, s.format(d=d, y=_phrase(dy)), kind, y.index)
                        for s in TEMPLATES[kind]
                    ]
    return {k: list({e.sentence: e for e in v}.values()) for k, v in out.items()}


def same_looking(t: SceneObject, universe: list[SceneObject]) -> bool:
    """``t`` shares category and colour with another visible object."""
    return len(_members(universe, (t.colour, t.category))) > 1


def choose_expressions(
    t: SceneObject, universe: list[SceneObject], width: int, rng: np.random.Generator
) -> list[Expression]:
    """1-3 sentences of one kind for ``t``; depth kinds only for same-looking objects; [] if none apply."""
    cands = candidate_expressions(t, universe, width)
    depth = [k for k in DEPTH_KINDS if k in cands]
    other = [k for k in KINDS if k in cands and k not in DEPTH_KINDS]
    if same_looking(t, universe):
        other = []
    if not depth and not other:
        return []
    pool = depth if depth and (not other or rng.random() < DEPTH_PROBABILITY) else other
    kind = pool[int(rng.integers(len(pool)))]
    n = min(len(cands[kind]), int(rng.integers(1, 4)))
    picks = rng.choice(len(cands[kind]), size=n, replace=False)
    return [cands[kind][i] for i in sorted(picks)]


def generate_expressions(
    objects: list[SceneObject], width: int, rng: np.random.Generator
) -> list[Expression]:
    """Expressions for every referable object of a scene, in object order."""
    universe = [o for o in objects if o.area > 0]
    out: list[Expression] = []
    for t in objects:
        if t.referable:
            out += choose_expressions(t, universe, width, rng)
    return out
