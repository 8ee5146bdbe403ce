"""2D pretraining data for the tiny base: centre views of generated scenes, with captions and grounding QA.

The tiny SAM and the tiny LLaVA are pretrained on these before any light-field fine-tuning, the way the real
SAM (SA-1B) and LLaVA (captions, then instructions with LLaVA-1.5's REC data) were made. The scenes come
from the same generator as the benchmark but with their own seed (:data:`PRETRAIN_SEED`), so no benchmark
scene, train or val, is ever seen; only the centre view is rendered (no light field, no disparity, no
``[SEG]``: those are what LFLLM's fine-tuning adds).

A box is written as LLaVA-1.5 writes REC boxes: ``[x0, y0, x1, y1]`` normalised to the image, 2 decimals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.expressions import SceneObject, candidate_expressions
from dataset.synthetic.generator import render_scene
from dataset.synthetic.shapes import CATEGORIES, PALETTE
from utils.boxes import box_text

PRETRAIN_SEED = 1_000_003
"""Generator seed of the pretraining scenes (the benchmark uses ``--seed`` 0 by default; any seed other
than this one gives disjoint scenes, since a scene is a function of ``(seed, image_id)``)."""
HELD_OUT_START = 1_000_000
"""Scene ids from here on are the pretraining *held-out* scenes (scores only, never trained on)."""

NUM_PATCH_CLASSES = 1 + len(CATEGORIES) * len(PALETTE)
"""Dense labels of the vision stage: background + every (category, colour)."""

CAPTION_QUESTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What does this image show?",
    "Give a short caption of the image.",
)
REC_QUESTIONS: tuple[str, ...] = (
    "Please give the bounding box of {expr}.",
    "Where is {expr}? Answer with its bounding box.",
    "Locate {expr} in the image and give its box.",
)
REG_QUESTIONS: tuple[str, ...] = (
    "What is the object at {box}?",
    "Name the object in the region {box}.",
)
LIST_QUESTIONS: tuple[str, ...] = (
    "Which objects are in the image, from left to right?",
    "List the objects you see from left to right.",
)


@dataclass(frozen=True)
class PretrainScene:
    """One pretraining image: the centre view (H, W, 3) uint8, its visible objects (``masks`` (K, H, W)
    bool, ``boxes`` (K, 4) float32 xyxy in px, ``names`` "red vehicle"), and every true, unambiguous
    referring expression as ``(object index, sentence)``."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    names: tuple[str, ...]
    centroids_x: tuple[float, ...]
    expressions: tuple[tuple[int, str], ...]


def pretrain_config(height: int = 120, width: int = 160, seed: int = PRETRAIN_SEED) -> SyntheticConfig:
    """Generator settings of the pretraining scenes (the benchmark's defaults otherwise)."""
    return SyntheticConfig(height=height, width=width, angular=3, num_train=0, num_val=0, seed=seed)


def pretrain_scene(image_id: int, cfg: SyntheticConfig) -> PretrainScene:
    """Render the centre view of scene ``image_id`` and collect its objects and expressions.

    Deterministic per ``(cfg.seed, image_id)``. Objects with no visible pixel are dropped.
    """
    c = cfg.centre
    scene = render_scene(image_id, cfg, views=[(c, c)])
    visible: list[SceneObject] = [o for o in scene.objects if o.area > 0]
    exprs: list[tuple[int, str]] = []
    for k, obj in enumerate(visible):
        if not obj.referable:
            continue
        for group in candidate_expressions(obj, visible, cfg.width).values():
            exprs += [(k, e.sentence) for e in group]
    boxes = np.array(
        [[o.bbox[0], o.bbox[1], o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3]] for o in visible], np.float32
    ).reshape(-1, 4)
    masks = np.stack([o.mask for o in visible]) if visible else np.zeros((0, cfg.height, cfg.width), bool)
    return PretrainScene(
        image=scene.views[(c, c)],
        masks=masks,
        boxes=boxes,
        names=tuple(f"{o.colour} {o.category}" for o in visible),
        centroids_x=tuple(float(o.centroid[0]) for o in visible),
        expressions=tuple(exprs),
    )


def label_map(scene: PretrainScene) -> np.ndarray:
    """(H, W) int64 dense label of the centre view: 0 = background, else ``1 + category * 7 + colour``
    of the visible object (see :data:`NUM_PATCH_CLASSES`)."""
    colours = list(PALETTE)
    out = np.zeros(scene.masks.shape[1:], np.int64)
    for mask, name in zip(scene.masks, scene.names):
        colour, category = name.split(" ", 1)
        out[mask] = 1 + CATEGORIES.index(category) * len(colours) + colours.index(colour)
    return out


def _listing(scene: PretrainScene) -> str:
    order = np.argsort(scene.centroids_x, kind="stable")
    names = [f"a {scene.names[i]}" for i in order]
    if len(names) <= 1:
        return (names or ["nothing"])[0] + "."
    return ", ".join(names[:-1]) + " and " + names[-1] + "."


def caption(scene: PretrainScene) -> str:
    """A caption naming every visible object from left to right ("a red vehicle, ... and a blue pole.")."""
    return _listing(scene)


def caption_pair(scene: PretrainScene, rng: np.random.Generator) -> tuple[str, str]:
    """Stage-1 (projector alignment) sample: a caption question and the caption."""
    return CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))], caption(scene)


def grounding_pair(scene: PretrainScene, rng: np.random.Generator, box_step: float = 0.01) -> tuple[str, str]:
    """Stage-2 (instruction tuning) sample: REC (expression -> box) most of the time, else REG
    (box -> name) or the left-to-right object list. Falls back to the list when no expression exists.
    Boxes are written on the grid ``box_step`` (see :func:`box_text`)."""
    h, w = scene.image.shape[:2]
    kind = rng.random()
    if scene.expressions and kind < 0.7:
        k, sent = scene.expressions[int(rng.integers(len(scene.expressions)))]
        q = REC_QUESTIONS[int(rng.integers(len(REC_QUESTIONS)))].format(expr=sent)
        return q, box_text(scene.boxes[k], h, w, box_step)
    if len(scene.names) and kind < 0.85:
        k = int(rng.integers(len(scene.names)))
        q = REG_QUESTIONS[int(rng.integers(len(REG_QUESTIONS)))].format(
            box=box_text(scene.boxes[k], h, w, box_step)
        )
        return q, f"the {scene.names[k]}."
    return LIST_QUESTIONS[int(rng.integers(len(LIST_QUESTIONS)))], _listing(scene)


def pretrain_corpus(scenes: list[PretrainScene]) -> list[str]:
    """Every text the pretraining samples can contain (for training the tokenizer)."""
    texts = list(CAPTION_QUESTIONS + LIST_QUESTIONS)
    texts += [q.format(box="[0.12, 0.34, 0.56, 0.78]") for q in REG_QUESTIONS]
    for s in scenes:
        h, w = s.image.shape[:2]
        texts.append(caption(s))
        texts += [f"the {n}." for n in s.names]
        texts += [box_text(b, h, w) for b in s.boxes]
        texts += [q.format(expr=e) for _, e in s.expressions for q in REC_QUESTIONS[:1]]
    return texts
