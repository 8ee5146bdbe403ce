"""LISA's VQA and reasoning-segmentation tasks for the synthetic light fields, from the generator's truth.

Written by the generator when ``SyntheticConfig.tasks`` is set; the refs, instances and views stay
byte-identical to a run without it (the tasks draw from their own generator ``[seed, image_id, 3]``). The
*universe* is every object with a visible pixel in the centre view (:mod:`dataset.synthetic.expressions`); an
object is *clear* when it is large enough for a ref (``SceneObject.referable``); disparity ``d`` in px,
larger = nearer.

On disk, beside ``refer_seg/<ds>`` and ``lf/<ds>``::

    llava_dataset/<ds>.json, <ds>_val.json     LLaVA-Instruct: one record per scene {id, image, conversations}
    reason_seg/<ds>/{train,val}/<stem>.json    ReasonSeg: one target per file {text, is_sentence, shapes,
                                               tags, explicit}; <stem> = Image<id>, then Image<id>__2, ...
    reason_seg/<ds>/val_explicit/<stem>.json   the val targets again, text = their explicit expressions
    reason_seg/<ds>/explanatory/train.json     [{image: <stem>, query, outputs}] for the train targets

VQA (2-4 turns a scene of different kinds, ``<image>`` in the first question only), each answer exact:
``count`` "How many vehicles are there?" (a category whose objects are all clear); ``colour`` "What colour is
the vehicle?" (the only one of its category, clear); ``nearer`` "Which is nearer to the camera, the A or the
B?" (two clear objects named uniquely, at least ``DEPTH_MARGIN`` apart); ``occlusion`` "How much of the A is
visible?" (the ref's occlusion level) and "Which object is the most hidden behind other things?"; ``exists``
"Is there a bridge in the scene?" (yes: a clear member; no: nothing of the category is visible).

Reasoning targets (the target must have a ref, whose sentences become ``explicit``): ``closest`` /
``farthest``: nearer (farther) than every other object by ``DEPTH_MARGIN``; ``occluded``: visible fraction
below ``OCCLUDED_BELOW`` and at least ``OCCLUSION_MARGIN`` below every other object's; ``function``: the only
object of its category, described by its use, and no object of a category the description could also fit.
Tags: the kind, the occlusion level, ``implicit`` (``explicit`` in ``val_explicit``) and the category.

Polygons are outer contours of the visible mask (``cv2.findContours``, ``CHAIN_APPROX_SIMPLE``: lossless). A
mask with holes (bike wheels, fence panels) is first cut by vertical lines through its holes into hole-free
pieces, so that filling every polygon with ``cv2.fillPoly`` gives back the mask exactly: a hole is background,
not an ``ignore`` region, and the outer contours alone would cover it (mean IoU 0.90 on the default config).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.expressions import DEPTH_MARGIN, SceneObject, _members, _phrase, unique_descriptions
from dataset.synthetic.gres import PLURALS
from dataset.synthetic.shapes import CATEGORIES
from dataset.synthetic.task_texts import A_NOUN, DEPTH_TEXTS, FUNCTIONS, OCCLUSION_WORDS, SINGULAR, number

OCCLUSION_MARGIN = 0.15
"""The most occluded object's visible fraction is at least this much below every other object's."""
OCCLUDED_BELOW = 0.7
"""...and below this (occlusion level ``o-2`` or ``o-3``)."""
SECOND_TARGET_PROB = 0.5
"""Chance of a second reasoning target in a scene that has one."""
QUESTIONS = {
    "count": "How many",
    "colour": "What colour",
    "nearer": "Which is",
    "occlusion": ("How much", "Which object is the most hidden"),
    "exists": "Is there",
}
"""How each kind of question begins (for the summary)."""


@dataclass
class SceneTasks:
    """One scene's task records: its VQA record (None when it has fewer than two questions) and its
    reasoning targets, each ``{stem, json (the ReasonSeg record), explanation, iou (polygons vs mask)}``."""

    image_id: int
    split: str
    vqa: dict | None
    targets: list[dict] = field(default_factory=list)


def _percent(fraction: float) -> int:
    return int(5 * round(20 * fraction))


def _name(o: SceneObject, universe: list[SceneObject]) -> str | None:
    """The shortest description of ``o`` that names it alone ("vehicle", "red vehicle"), else None."""
    descs = unique_descriptions(o, universe)
    return _phrase(descs[0]) if descs else None


def _level(ref: dict | None) -> str | None:
    return next((t for t in ref["subsets"] if t in OCCLUSION_WORDS), None) if ref else None


def vqa_questions(universe: list[SceneObject], refs: dict[int, dict]) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) of the scene, keyed by kind (see the module docstring); ``refs`` maps an
    object index to its one-target ref."""
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in ("count", "colour", "nearer", "occlusion")}
    out.update({"exists-yes": [], "exists-no": []})
    clear = [o for o in universe if o.referable]
    for cat in CATEGORIES:
        group = _members(universe, (None, cat))
        if not group:
            out["exists-no"].append(
                (f"Is there {A_NOUN[cat]} in the scene?", f"No, there is no {cat} in the scene.")
            )
        elif all(o.referable for o in group):
            n = len(group)
            noun = f"{number(n)} {SINGULAR[cat] if n == 1 else PLURALS[cat]}"
            answer = f"There {'is' if n == 1 else 'are'} {noun}."
            out["count"].append((f"How many {PLURALS[cat]} are there?", answer))
        if any(o.referable for o in group):
            yes = f"Yes, there is {A_NOUN[cat]} in the scene."
            out["exists-yes"].append((f"Is there {A_NOUN[cat]} in the scene?", yes))
        if len(group) == 1 and group[0].referable:
            out["colour"].append((f"What colour is the {cat}?", f"The {cat} is {group[0].colour}."))
    named = [(o, _name(o, universe)) for o in clear if _name(o, universe)]
    for i, (a, na) in enumerate(named):
        for b, nb in named[i + 1 :]:
            if abs(a.disparity - b.disparity) < DEPTH_MARGIN:
                continue
            near, far = (na, nb) if a.disparity > b.disparity else (nb, na)
            out["nearer"].append(
                (
                    f"Which is nearer to the camera, the {na} or the {nb}?",
                    f"The {near} is nearer to the camera.",
                )
            )
            out["nearer"].append(
                (
                    f"Which is farther from the camera, the {nb} or the {na}?",
                    f"The {far} is farther from the camera.",
                )
            )
    for o, name in named:
        level = _level(refs.get(o.index))
        if level == "no-o":
            out["occlusion"].append(
                (f"How much of the {name} is visible?", f"All of it: the {name} is not occluded.")
            )
        elif level:
            pct, words = _percent(o.visible_fraction), OCCLUSION_WORDS[level]
            answer = f"About {pct} % of the {name} is visible: it is {words}."
            out["occlusion"].append((f"How much of the {name} is visible?", answer))
    hidden = most_occluded(universe)
    if hidden is not None and hidden.index in refs and _name(hidden, universe):
        pct = _percent(hidden.visible_fraction)
        answer = f"The {_name(hidden, universe)}: only about {pct} % of it is visible."
        out["occlusion"].append(("Which object is the most hidden behind other things?", answer))
    return out


def scene_conversation(questions: dict[str, list[tuple[str, str]]], rng: np.random.Generator) -> list[dict]:
    """2-4 turns of different kinds where the scene has them (``exists`` yes or no at even odds), as the
    alternating human / gpt messages of LLaVA-Instruct, ``<image>`` in the first question."""
    kinds = [k for k in ("count", "colour", "nearer", "occlusion") if questions[k]]
    exists = [k for k in ("exists-yes", "exists-no") if questions[k]]
    if exists:
        kinds.append(exists[int(rng.integers(len(exists)))])
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    turns = [questions[k][int(rng.integers(len(questions[k])))] for k in order[: int(rng.integers(2, 5))]]
    if len(turns) < 2:  # a single kind: a second question of any kind (yes and no both), where there is one
        rest = [qa for k in sorted(questions) for qa in questions[k] if qa not in turns]
        turns += [rest[int(rng.integers(len(rest)))]] if rest else []
    messages = []
    for j, (question, answer) in enumerate(turns):
        messages += [
            {"from": "human", "value": ("<image>\n" if j == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    return messages


def most_occluded(universe: list[SceneObject]) -> SceneObject | None:
    """The object hidden the most, when it is clearly so (see ``OCCLUSION_MARGIN``), else None."""
    if len(universe) < 2:
        return None
    low, *rest = sorted(universe, key=lambda o: o.visible_fraction)
    if (
        low.visible_fraction >= OCCLUDED_BELOW
        or rest[0].visible_fraction < low.visible_fraction + OCCLUSION_MARGIN
    ):
        return None
    return low


def reasoning_candidates(universe: list[SceneObject]) -> list[tuple[SceneObject, str, str]]:
    """(target, kind, explanation) for every target an implicit description identifies alone."""
    out: list[tuple[SceneObject, str, str]] = []
    for o in universe:
        others = [p for p in universe if p.index != o.index]
        if not others:
            continue
        gap = o.disparity - max(p.disparity for p in others)
        if gap >= DEPTH_MARGIN:
            why = f"its disparity is {o.disparity:.2f} px, {gap:.2f} px more than any other object's"
            out.append((o, "closest", f"It is the object nearest to the camera: {why}."))
        gap = min(p.disparity for p in others) - o.disparity
        if gap >= DEPTH_MARGIN:
            why = f"its disparity is {o.disparity:.2f} px, {gap:.2f} px less than any other object's"
            out.append((o, "farthest", f"It is the object farthest from the camera: {why}."))
        use = FUNCTIONS[o.category]
        alone = len(_members(universe, (None, o.category))) == 1
        if alone and not any(p.category in use.conflicts for p in others):
            out.append((o, "function", f"It is the only {o.category} in the scene, and {use.reason}."))
    hidden = most_occluded(universe)
    if hidden is not None:
        pct = _percent(hidden.visible_fraction)
        why = f"Only about {pct} % of it is visible: nearer things hide more of it than of any other object."
        out.append((hidden, "occluded", why))
    return out


def _texts(
    o: SceneObject, kind: str, universe: list[SceneObject], rng: np.random.Generator
) -> tuple[list[str], bool]:
    """1-3 implicit queries of one style (sentences or phrases) for ``o`` as the ``kind`` target."""
    is_sentence = bool(rng.random() < 0.5)
    if kind == "function":
        use = FUNCTIONS[o.category]
        pool = list(use.sentences if is_sentence else use.phrases)
    elif kind == "occluded" and sum(p.visible_fraction < 0.95 for p in universe) > 1:
        pool = list(DEPTH_TEXTS[kind][is_sentence][1:])  # "partly hidden" only when nothing else is
    else:
        pool = list(DEPTH_TEXTS[kind][is_sentence])
    n = min(len(pool), int(rng.integers(1, 4)))
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))], is_sentence


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Polygons, int32 (K, 2) of ``(x, y)`` pixel centres, whose ``cv2.fillPoly`` union is ``mask`` (H, W)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return []
    crop = np.pad(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8), 1)
    return [p + np.array([xs.min() - 1, ys.min() - 1], np.int32) for p in _hole_free(crop)]


def _hole_free(m: np.ndarray) -> list[np.ndarray]:
    """Outer contours of ``m`` (uint8, zero border) after cutting each hole by a vertical line through it."""
    n, labels = cv2.connectedComponents(1 - m, connectivity=4)  # background; the holes miss the border
    holes = [k for k in range(1, n) if k != labels[0, 0]]
    if not holes:
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return [c.reshape(-1, 2).astype(np.int32) for c in contours]
    cut = int(np.median(np.nonzero(labels == holes[0])[1]))
    left, right = m.copy(), m.copy()
    left[:, cut:] = 0
    right[:, :cut] = 0
    return _hole_free(left) + _hole_free(right)


def fill_polygons(polygons: list, shape: tuple[int, int]) -> np.ndarray:
    """The bool (H, W) mask of ``polygons`` filled one by one with ``cv2.fillPoly`` (ReasonSeg's reading)."""
    out = np.zeros(shape, np.uint8)
    for p in polygons:
        cv2.fillPoly(out, [np.asarray(p, np.int32).reshape(-1, 1, 2)], 1)
    return out.astype(bool)


def scene_tasks(
    image_id: int, objects: list[SceneObject], refs: list[dict], cfg: SyntheticConfig
) -> SceneTasks:
    """The VQA record and the reasoning targets of scene ``image_id`` (``refs``: its written refs)."""
    rng = np.random.default_rng([cfg.seed, image_id, 3])
    universe = [o for o in objects if o.area > 0]
    by_ann = {r["ann_id"]: r for r in refs if isinstance(r["ann_id"], int)}
    ref_of = {o.index: by_ann[a] for o in universe if (a := image_id * 100 + o.layer_id) in by_ann}
    messages = scene_conversation(vqa_questions(universe, ref_of), rng)
    vqa = {"id": f"{cfg.ds_name}-{image_id}", "image": f"Image{image_id}", "conversations": messages}
    cands = [c for c in reasoning_candidates(universe) if c[0].index in ref_of]
    want = 1 + int(rng.random() < SECOND_TARGET_PROB)
    picked: list[tuple[SceneObject, str, str]] = []
    for kind in rng.permutation(sorted({c[1] for c in cands})).tolist():
        free = [c for c in cands if c[1] == kind and all(c[0].index != p[0].index for p in picked)]
        if free and len(picked) < want:
            picked.append(free[int(rng.integers(len(free)))])
    out = SceneTasks(image_id, cfg.split_of(image_id), vqa if len(messages) >= 4 else None)
    for k, (o, kind, why) in enumerate(picked):
        texts, is_sentence = _texts(o, kind, universe, rng)
        explicit = [s["sent"] for s in ref_of[o.index]["sentences"]]
        shapes = [
            {"label": "target", "points": p.tolist(), "shape_type": "polygon"} for p in mask_polygons(o.mask)
        ]
        tags = [kind, _level(ref_of[o.index]), "implicit", o.category]
        stem = f"Image{image_id}" + (f"__{k + 1}" if k else "")
        record = {
            "text": texts,
            "is_sentence": is_sentence,
            "shapes": shapes,
            "tags": tags,
            "explicit": explicit,
        }
        outputs = f"The target is {explicit[0]}. {why}"
        query = texts[int(rng.integers(len(texts)))]
        iou = _iou(fill_polygons([s["points"] for s in shapes], o.mask.shape), o.mask)
        out.targets.append(
            {
                "stem": stem,
                "json": record,
                "explanation": {"image": stem, "query": query, "outputs": outputs},
                "iou": iou,
            }
        )
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def task_paths(root: Path, ds: str) -> list[Path]:
    """The paths the tasks add under ``root`` (files and folders), in the order they are installed."""
    return [
        root / "llava_dataset" / f"{ds}.json",
        root / "llava_dataset" / f"{ds}_val.json",
        root / "reason_seg" / ds,
    ]


def write_task_files(root: Path, cfg: SyntheticConfig, scenes: list[SceneTasks]) -> dict:
    """Write every task file of :func:`task_paths` under ``root`` (the generator's temporary folder); returns
    their counts: VQA records and turns per split, reasoning targets per split and tag, polygon IoU."""
    llava, reason = root / "llava_dataset", root / "reason_seg" / cfg.ds_name
    llava.mkdir(parents=True)
    for sub in ("train", "val", "val_explicit", "explanatory"):
        (reason / sub).mkdir(parents=True)
    explanations = []
    summary: dict = {"vqa": {}, "reason_seg": {}, "tags": {}, "polygon_iou": {}}
    for split, path in (("train", llava / f"{cfg.ds_name}.json"), ("val", llava / f"{cfg.ds_name}_val.json")):
        records = [s.vqa for s in scenes if s.split == split and s.vqa]
        path.write_text(json.dumps(records, indent=1))
        summary["vqa"][split] = {
            "records": len(records),
            "turns": sum(len(r["conversations"]) // 2 for r in records),
        }
        targets = [t for s in scenes if s.split == split for t in s.targets]
        for t in targets:
            (reason / split / f"{t['stem']}.json").write_text(json.dumps(t["json"]))
            if split == "val":
                explicit = {**t["json"], "text": t["json"]["explicit"], "is_sentence": False}
                explicit["tags"] = [("explicit" if g == "implicit" else g) for g in t["json"]["tags"]]
                (reason / "val_explicit" / f"{t['stem']}.json").write_text(json.dumps(explicit))
            else:
                explanations.append(t["explanation"])
        summary["reason_seg"][split] = len(targets)
        summary["tags"][split] = dict(sorted(Counter(g for t in targets for g in t["json"]["tags"]).items()))
        ious = [t["iou"] for t in targets]
        summary["polygon_iou"][split] = {
            "mean": float(np.mean(ious)) if ious else None,
            "min": min(ious, default=None),
        }
    (reason / "explanatory" / "train.json").write_text(json.dumps(explanations, indent=1))
    turns = [(q["value"], a["value"]) for s in scenes if s.vqa for q, a in _pairs(s.vqa["conversations"])]
    summary["questions"] = {
        k: sum(q.split("\n")[-1].startswith(p) for q, _ in turns) for k, p in QUESTIONS.items()
    }
    summary["questions"]["exists_yes"] = sum(a.startswith("Yes") for _, a in turns)
    summary["questions"]["exists_no"] = sum(a.startswith("No") for _, a in turns)
    return summary


def _pairs(messages: list[dict]) -> list[tuple[dict, dict]]:
    return list(zip(messages[::2], messages[1::2]))


__all__ = ["SceneTasks", "fill_polygons", "mask_polygons", "scene_tasks", "task_paths", "write_task_files"]
