"""Which depth-referring expressions of a generated benchmark the centre image alone can answer.

The generator places nearer objects lower and larger (``layout._place``, ``--perspective 1``), as a camera
would, so "the closest pole" can often be read off the ground-contact row without any disparity. This module
measures that shortcut per depth kind, from the files a generated dataset holds (``<ds>.json`` refs,
``instances.json`` boxes, ``attributes.json`` categories, colours and disparities):

* ``unique``: the expression's description ``D`` (the target's category, and its colour when the sentence
  names it) matches one object of the scene: the depth words are not needed at all;
* ``row``: the ground-row rule picks the target among ``M(D)`` -- for ``closest`` / ``distance`` the member whose
  visible box ends lowest / highest; for ``front`` / ``behind`` the member overlapping the partner ``Y``
  horizontally whose box ends furthest below / above ``Y``'s;
* ``disparity``: the same rules on the objects' disparities (the light field's answer; 1.0 when the generator
  is right);
* ``chance``: the mean of ``1 / |M(D)|``.

A depth-swap check (each scene given another scene's disparity) can only cost what the image cannot answer:
roughly the share of expressions neither ``unique`` nor ``row`` gets.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from dataset.synthetic.expressions import MIN_OVERLAP

CUE_KINDS: tuple[str, ...] = ("closest", "distance", "behind", "front")
_RELATION = re.compile(r"^(?:the )?(.*?)(?: that is)? (behind|in front of) the (.+)$")


def _overlap(a: list[float], b: list[float]) -> bool:
    """Visible boxes ``(x, y, w, h)`` overlapping horizontally by ``MIN_OVERLAP`` of the narrower one."""
    inter = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    return inter >= MIN_OVERLAP * min(a[2], b[2]) and inter > 0


def _members(objs: dict[int, dict], words: list[str], category: str) -> list[int]:
    """Objects matching the description ``words`` names: ``category``, and a colour when one of its words is."""
    colours = {o["colour"] for o in objs.values()}
    colour = next((w for w in words if w in colours), None)
    return [k for k, o in objs.items() if o["category"] == category and colour in (None, o["colour"])]


def _partner(objs: dict[int, dict], phrase: str) -> int | None:
    """The one object the phrase ``"[colour] category"`` (plural-free) names, or None."""
    words = phrase.split()
    for k in range(len(words)):
        category = " ".join(words[k:])
        found = _members(objs, words[:k], category)
        if found and any(o["category"] == category for o in objs.values()):
            return found[0] if len(found) == 1 else None
    return None


def _pick(kind: str, members: list[int], objs: dict[int, dict], key: str, partner: int | None) -> int | None:
    """The member a rule picks: by ``key`` ("bottom", larger = nearer, or "disparity_px")."""
    if kind in ("closest", "distance"):
        pool = members
        best = max if kind == "closest" else min
        return best(pool, key=lambda k: objs[k][key]) if pool else None
    if partner is None:
        return None
    sign = 1.0 if kind == "front" else -1.0
    ref = objs[partner][key]
    pool = [
        k
        for k in members
        if k != partner
        and _overlap(objs[k]["bbox"], objs[partner]["bbox"])
        and sign * (objs[k][key] - ref) > 0
    ]
    return max(pool, key=lambda k: sign * objs[k][key]) if pool else None


def load_scenes(dataset_dir: str | Path, ds: str) -> tuple[list[dict], dict[int, dict[int, dict]]]:
    """The refs of ``refer_seg/<ds>`` and, per image id, its objects ``{ann_id: {category, colour,
    disparity_px, bbox, bottom}}`` (``bottom``: the visible box's last row, px)."""
    root = Path(dataset_dir) / "refer_seg" / ds
    paths = [root / f"{ds}.json", root / "instances.json", root / "attributes.json"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a generated dataset writes it; regenerate {ds})")
    refs, instances, attributes = (json.loads(p.read_text()) for p in paths)
    scenes: dict[int, dict[int, dict]] = defaultdict(dict)
    for ann in instances["annotations"]:
        record = attributes.get(str(ann["id"]))
        if record is None:
            raise ValueError(f"{paths[2]}: no record for annotation {ann['id']}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        scenes[int(ann["image_id"])][int(ann["id"])] = {**record, "bbox": [x, y, w, h], "bottom": y + h}
    return refs, scenes


def cue_table(dataset_dir: str | Path, ds: str, split: str = "val") -> dict[str, dict[str, Any]]:
    """Per depth kind (``CUE_KINDS``, plus ``"depth kinds"`` pooling them): the share of the ``split``
    sentences each reading answers (``unique``, ``row``, ``row_or_unique``, ``disparity``), ``chance``
    and ``n``. A sentence whose partner cannot be resolved counts as not answered by ``row``/``disparity``."""
    refs, scenes = load_scenes(dataset_dir, ds)
    hits: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in (*CUE_KINDS, "depth kinds")}
    for ref in refs:
        kinds = [k for k in ref.get("subsets", []) if k in CUE_KINDS]
        if ref.get("split") != split or len(kinds) != 1:
            continue
        kind, objs, target = kinds[0], scenes[int(ref["image_id"])], int(ref["ann_id"])
        category = objs[target]["category"]
        for sentence in ref["sentences"]:
            text = sentence["sent"].lower().rstrip(".")
            partner, head = None, text
            match = _RELATION.match(text) if kind in ("behind", "front") else None
            if match:
                head, partner = match.group(1), _partner(objs, match.group(3))
            members = _members(objs, head.split(), category)
            if target not in members:
                continue  # a sentence this parser does not read; left out rather than guessed
            row = _pick(kind, members, objs, "bottom", partner) == target
            unique = len(members) == 1
            row_values = {
                "unique": float(unique),
                "row": float(row),
                "row_or_unique": float(row or unique),
                "disparity": float(_pick(kind, members, objs, "disparity_px", partner) == target),
                "chance": 1.0 / len(members),
            }
            for name in (kind, "depth kinds"):
                for key, value in row_values.items():
                    hits[name][key].append(value)
    return {
        name: {**{k: sum(v) / len(v) for k, v in values.items()}, "n": len(values["chance"])}
        for name, values in hits.items()
        if values
    }
