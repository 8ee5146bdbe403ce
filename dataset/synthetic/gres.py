"""Generalised referring expressions (GRES) for synthetic scenes: several targets, or none.

Written by the generator when ``SyntheticConfig.gres`` is set (a separate dataset: the one-target refs of the
same scenes stay exactly what they are without it, and these are added beside them). The scene's *universe* is
the same as in :mod:`dataset.synthetic.expressions` (every object with a visible pixel); disparity ``d`` in px,
larger = nearer. Every expression is true by construction:

* ``multi`` (several targets): "the vehicles" / "all the vehicles" when ``|M(category)| >= 2``; "the red
  vehicles" when ``|M(colour, category)| >= 2``; "the objects in front of the Y" when at least two objects
  are nearer than ``Y`` by ``DEPTH_MARGIN`` and overlap it horizontally (as the one-target ``front`` rule),
  and no other object overlapping ``Y`` lies in the ambiguous band (nearer by more than ``DISTRACTOR_SLACK``
  but less than ``DEPTH_MARGIN``). The targets are every member.
* ``nt-absent`` (no target, an absent attribute): "the blue bridge" when the scene has a bridge but none is
  blue, or "the bridge" when it has none.
* ``nt-depth`` (no target, a false depth relation): "the D behind the Y" where ``D`` and ``Y`` each match one
  object, ``D`` overlaps ``Y`` horizontally and lies *in front of* it by at least ``DEPTH_MARGIN`` (and the
  converse for "in front of"). Only the depth can reject it: both objects are there and they overlap.

Both no-target kinds also carry the tag ``no-target``. The share of no-target expressions is kept near
gRefCOCO's (32,202 of 278,232 expressions, 11.6 %) by :data:`NO_TARGET_SECOND_PROB`; ``write_dataset``'s
summary reports the share it reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset.synthetic.expressions import (
    DEPTH_MARGIN,
    DISTRACTOR_SLACK,
    MIN_OVERLAP,
    SceneObject,
    _members,
    _overlap_px,
    _phrase,
    unique_descriptions,
)
from dataset.synthetic.shapes import CATEGORIES, CATEGORY_COLOURS, PALETTE

PLURALS: dict[str, str] = {
    "bike": "bikes",
    "fence": "fences",
    "person": "people",
    "pole": "poles",
    "traffic sign": "traffic signs",
    "vegetation": "patches of vegetation",
    "vehicle": "vehicles",
    "bridge": "bridges",
    "rider": "riders",
}
NO_TARGET_SECOND_PROB = 0.25
"""Every scene gets one no-target expression, and a second with this chance: with the one-target refs' 1-3
sentences each, that puts the no-target share near gRefCOCO's 11.6 % (measured in ``docs/DATA.md``)."""
MULTI_PER_SCENE = 2
"""At most this many multi-target expressions per scene."""
GRES_REF_OFFSET = 50
"""``ref_id = image_id * 100 + GRES_REF_OFFSET + k`` for the k-th GRES ref of a scene (object refs use 1..49)."""

MULTI_TEMPLATES = ("the {p}", "all the {p}")
FRONT_TEMPLATES = ("the objects in front of the {y}", "everything in front of the {y}")
FALSE_RELATION = {"behind": "the {d} behind the {y}", "front": "the {d} in front of the {y}"}


@dataclass(frozen=True)
class GresExpression:
    """One GRES sentence: its targets (object indices; empty for no target) and its tags."""

    sentence: str
    targets: tuple[int, ...]
    tags: tuple[str, ...]


def _plural(colour: str | None, category: str) -> str:
    noun = PLURALS[category]
    return noun if colour is None else f"{colour} {noun}"


def _need(t: SceneObject, y: SceneObject) -> int:
    """The horizontal overlap (px) the one-target ``behind`` / ``front`` rule asks of ``t`` and ``y``."""
    return max(1, int(np.ceil(MIN_OVERLAP * min(t.bbox[2], y.bbox[2]))))


def multi_target(universe: list[SceneObject]) -> list[GresExpression]:
    """Every true plural expression of the scene (see the module docstring)."""
    out: list[GresExpression] = []
    for category in CATEGORIES:
        group = _members(universe, (None, category))
        if len(group) >= 2:
            targets = tuple(sorted(o.index for o in group))
            out += [
                GresExpression(t.format(p=_plural(None, category)), targets, ("multi",))
                for t in MULTI_TEMPLATES
            ]
        for colour in sorted({o.colour for o in group}):
            same = _members(universe, (colour, category))
            if len(same) >= 2 and len(same) < len(group):  # the colour narrows the set
                targets = tuple(sorted(o.index for o in same))
                out.append(GresExpression(f"the {_plural(colour, category)}", targets, ("multi",)))
    for y in universe:
        overlapping = [t for t in universe if t.index != y.index and _overlap_px(t, y) >= _need(t, y)]
        nearer = [t for t in overlapping if t.disparity - y.disparity >= DEPTH_MARGIN]
        unclear = [t for t in overlapping if DISTRACTOR_SLACK < t.disparity - y.disparity < DEPTH_MARGIN]
        if len(nearer) < 2 or unclear:
            continue
        targets = tuple(sorted(t.index for t in nearer))
        for dy in unique_descriptions(y, universe):
            out += [
                GresExpression(t.format(y=_phrase(dy)), targets, ("multi", "front")) for t in FRONT_TEMPLATES
            ]
    return out


def absent_attribute(universe: list[SceneObject], rng: np.random.Generator) -> list[GresExpression]:
    """No-target expressions naming an attribute nothing in the scene has."""
    out: list[GresExpression] = []
    present = {o.category for o in universe}
    for category in sorted(present):
        colours = CATEGORY_COLOURS.get(category, tuple(PALETTE))
        missing = [c for c in colours if not _members(universe, (c, category))]
        if missing:
            colour = missing[int(rng.integers(len(missing)))]
            out.append(GresExpression(f"the {colour} {category}", (), ("no-target", "nt-absent")))
    for category in CATEGORIES:
        if category not in present:
            out.append(GresExpression(f"the {category}", (), ("no-target", "nt-absent")))
    return out


def false_relation(universe: list[SceneObject]) -> list[GresExpression]:
    """No-target expressions whose depth relation is the reverse of the truth (see the module docstring)."""
    out: list[GresExpression] = []
    for t in universe:
        for y in universe:
            if y.index == t.index:
                continue
            if _overlap_px(t, y) < _need(t, y):
                continue
            gap = t.disparity - y.disparity  # > 0: t is nearer, i.e. in front of y
            if abs(gap) < DEPTH_MARGIN:
                continue
            claim = "behind" if gap > 0 else "front"  # the false one
            for dt in unique_descriptions(t, universe):
                group = _members(universe, dt)
                if len(group) != 1:
                    continue
                for dy in unique_descriptions(y, universe):
                    sentence = FALSE_RELATION[claim].format(d=_phrase(dt), y=_phrase(dy))
                    out.append(GresExpression(sentence, (), ("no-target", "nt-depth")))
    return out


def gres_expressions(objects: list[SceneObject], rng: np.random.Generator) -> list[GresExpression]:
    """The GRES expressions of one scene: up to :data:`MULTI_PER_SCENE` multi-target ones and one or two
    no-target ones (each a false depth relation when the scene has one, half of the time, else an absent
    attribute; never the same sentence twice)."""
    universe = [o for o in objects if o.area > 0]
    out: list[GresExpression] = []
    multi = multi_target(universe)
    if multi:
        picks = rng.choice(len(multi), size=min(MULTI_PER_SCENE, len(multi)), replace=False)
        out += [multi[i] for i in sorted(picks)]
    depth, absent = false_relation(universe), absent_attribute(universe, rng)
    for _ in range(1 + int(rng.random() < NO_TARGET_SECOND_PROB)):
        pool = depth if depth and (not absent or rng.random() < 0.5) else absent
        if pool:
            pick = pool.pop(int(rng.integers(len(pool))))
            if all(pick.sentence != e.sentence for e in out):
                out.append(pick)
    return out


__all__ = ["GRES_REF_OFFSET", "GresExpression", "gres_expressions"]
